"""`microgpt-jax reproduce` prints what the scalar engine prints, line for line."""

import subprocess
import sys

from tests.helpers import ROOT

STEPS = "10"  # every line kind (counts, steps, header, samples): more steps would print more of the same


def run(*args):
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_reproduce_matches_the_scalar_engine_line_for_line(names_path):
    ours = run("-m", "microgpt_jax", "reproduce", "--steps", STEPS, "--data", str(names_path))
    theirs = run("-m", "reference", "--steps", STEPS, "--data", str(names_path))
    assert ours == theirs
    # and it is the spec's output format: counts, one line per step, header, 20 samples
    assert ours[:3] == ["num docs: 32033", "vocab size: 27", "num params: 4192"]
    assert ours[3].startswith(f"step    1 / {STEPS:>4} | loss ")
    assert ours[3 + int(STEPS)] == ""
    assert ours[4 + int(STEPS)] == "--- inference (new, hallucinated names) ---"
    assert [line[:10] for line in ours[-20:]] == [f"sample {i:2d}:" for i in range(1, 21)]
