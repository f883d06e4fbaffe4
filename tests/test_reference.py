"""The scalar engine against the seed program, bit for bit; its variants against finite
differences; `python -m reference` as a standalone program (flags, data, --save)."""

import gzip
import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import reference
import reference.__main__ as program
from reference.engine import Value, topological_order
from reference.gpt import backward_batch, dropout_masks, rope
from tests import seed_program
from tests.helpers import MODEL_VARIANTS, ROOT, all_variants, assert_one_line_error

SMALL = ["--n-layer", "2", "--n-embd", "8", "--n-head", "2", "--block-size", "8"]
QUICK = ["--n-embd", "4", "--n-head", "2", "--block-size", "4"]  # where only the program's behaviour matters


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    """Not names: random words, some longer than a block, with blank and padded lines. A small
    alphabet, so that samples from a barely trained model soon draw BOS (and the tests are quick)."""
    rng = random.Random(5)
    lines = ["".join(rng.choice("aZ-é") for _ in range(rng.randint(1, 12))) for _ in range(30)]
    lines[3], lines[7] = "  ", f"  {lines[7]} "
    path = tmp_path_factory.mktemp("words") / "words.txt"
    path.write_text("\n" + "\n".join(lines) + "\n\n", encoding="utf-8")
    return path


def run_main(capsys, *args):
    """`python -m reference ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        program.main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def run_program(*args, env=None):
    return subprocess.run([sys.executable, "-m", "reference", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True)


# --- the seed, bit for bit ---


def test_the_defaults_are_the_seed_bit_for_bit(words):
    """The API, step by step and sample by sample, at microgpt's shape: the seed's weights and names."""
    lines, weights = seed_program.run(words, num_steps=2, num_samples=4)
    rng = random.Random(42)
    docs = program.read_docs(words)
    rng.shuffle(docs)
    uchars = sorted(set("".join(docs)))
    bos = len(uchars)
    cfg = reference.Config(vocab_size=bos + 1)
    state = reference.init_state(cfg, rng)
    adam = reference.Adam(reference.parameters(state), 2)
    for s in range(2):
        reference.train_step(state, cfg, adam, s, [bos] + [uchars.index(c) for c in docs[s]] + [bos])
    assert {k: [[p.data for p in row] for row in m] for k, m in state.items()} == weights  # == on floats
    names = ["".join(uchars[t] for t in reference.sample(state, cfg, rng, bos)) for _ in range(4)]
    assert [f"sample {i + 1:2d}: {n}" for i, n in enumerate(names)] == lines[-4:]


def test_another_shape_is_the_seed_bit_for_bit_and_save_round_trips(words, tmp_path):
    """`python -m reference` prints what the seed prints, and --save writes the seed's weights."""
    lines, weights = seed_program.run(words, num_steps=3, n_layer=2, n_embd=8, n_head=2, block_size=8)
    out = run_program("--steps", 3, "--data", words, "--save", tmp_path / "w.safetensors", *SMALL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == lines  # every loss and every sampled name
    saved = load_file(tmp_path / "w.safetensors")
    assert sorted(saved) == sorted(weights) and all(a.dtype == "float64" for a in saved.values())
    for name, rows in weights.items():
        assert saved[name].tolist() == rows, name  # == on floats: the last bit of every weight


def random_graph(draw_ops):
    """Nodes built from earlier ones (so shared), a node's children in any order, repeats allowed (a * a)."""
    nodes = [Value(float(i)) for i in range(3)]
    for picks in draw_ops:
        nodes.append(Value(0.0, tuple(nodes[-1 - p % len(nodes)] for p in picks)))
    return Value(0.0, tuple(nodes[i % len(nodes)] for i in (-1, 0, len(nodes) // 2)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 50), min_size=1, max_size=4), max_size=40))
def test_the_order_is_the_seeds_recursive_order(ops):
    root = random_graph(ops)
    assert [id(n) for n in topological_order(root)] == [id(n) for n in seed_program.build_topo(root, [], set())]


# --- the variants of the contract ---

TINY = reference.Config(vocab_size=5, n_embd=4, n_head=2, n_layer=1, block_size=5)
# every weight any variant has: the gated MLP, norm gains and layernorm biases at every site, the blocks' biases
FULL = TINY._replace(mlp="gated", norm="layernorm", norm_gain=True, final_norm=True, bias=True)
TOKENS = [4, 0, 3, 1, 1, 2, 4]  # cut to 5 positions
VARIANTS = {
    **MODEL_VARIANTS,
    "softplus, one new table entry": dict(activation="softplus"),
    "all": all_variants(activation="gelu"),
}


def state_for(cfg, seed=0):
    """Weights for cfg cut from one full set: the same numbers whatever is left out, wpe zeroed
    (so rope is compared with no position signal, not with another one), gains and biases moved off 1 and 0."""
    rng = random.Random(seed)
    full = reference.init_state(FULL, rng)
    full["wpe"] = [[Value(0.0) for _ in row] for row in full["wpe"]]
    for name, _ in reference.gpt.vector_shapes(FULL):
        full[name] = [Value(v.data + rng.gauss(0, 0.3)) for v in full[name]]
    state = {name: [row[:n_in] for row in full[name][:n_out]] for name, (n_out, n_in) in reference.param_shapes(cfg)}
    return state | {name: full[name][:n] for name, n in reference.gpt.vector_shapes(cfg)}


def ones_like(masks):
    """Masks of the same shape, every entry 1.0."""
    if isinstance(masks, dict):
        return {k: ones_like(v) for k, v in masks.items()}
    return [ones_like(v) for v in masks] if isinstance(masks, list) else 1.0


def masks_for(cfg):
    return dropout_masks(cfg, cfg.block_size, random.Random(1)) if cfg.dropout else None


def loss_and_grads(cfg, state, masks=None):
    for p in reference.parameters(state):
        p.grad = 0
    out = reference.loss(state, cfg, TOKENS, masks)
    out.backward()
    return out.data, [p.grad for p in reference.parameters(state)]


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_changes_the_loss_and_its_gradient_is_right(name, monkeypatch):
    monkeypatch.setitem(reference.ACTIVATIONS, "softplus", lambda x: (1 + x.exp()).log())
    cfg = TINY._replace(**VARIANTS[name])
    state, masks = state_for(cfg), masks_for(cfg)
    value, grads = loss_and_grads(cfg, state, masks)
    assert value != loss_and_grads(TINY, state_for(TINY))[0]  # the option is not ignored
    # the largest gradient entry of each matrix, against a central finite difference
    h, params = 1e-6, reference.parameters(state)
    start = 0
    for matrix in state.values():
        n = len(reference.gpt.entries(matrix))
        i = max(range(start, start + n), key=lambda j: abs(grads[j]))
        start += n
        p, x = params[i], params[i].data
        p.data = x + h
        up = reference.loss(state, cfg, TOKENS, masks).data
        p.data = x - h
        down = reference.loss(state, cfg, TOKENS, masks).data
        p.data = x
        assert (up - down) / (2 * h) == pytest.approx(grads[i], rel=1e-6, abs=1e-9)


def test_grouped_attention_with_as_many_kv_heads_is_the_default_exactly():
    cfg = TINY._replace(n_kv_head=TINY.n_head)
    assert loss_and_grads(cfg, state_for(cfg)) == loss_and_grads(TINY, state_for(TINY))


def test_dropout_masks_of_ones_are_no_dropout_exactly():
    ones = ones_like(masks_for(TINY._replace(dropout=0.5)))
    assert loss_and_grads(TINY, state_for(TINY), ones) == loss_and_grads(TINY, state_for(TINY))


def test_rope_at_position_0_is_no_rotation_and_else_a_rotation():
    x = [Value(v) for v in (0.3, -1.2, 0.7, 2.0)]
    assert [v.data for v in rope(x, 0, 10000.0)] == [v.data for v in x]
    y = [v.data for v in rope(x, 3, 10000.0)]
    assert y != [v.data for v in x]
    for i in range(2):  # each pair (i, i + half) keeps its length
        assert y[i] ** 2 + y[i + 2] ** 2 == pytest.approx(x[i].data ** 2 + x[i + 2].data ** 2, rel=1e-14)


def test_gradient_accumulation_gives_the_full_batchs_gradient():
    cfg = TINY._replace(dropout=0.3)
    docs = [TOKENS, [4, 2, 4], [4, 1, 0, 0, 4], [4, 3, 4]]
    masks = [dropout_masks(cfg, 5, random.Random(i)) for i in range(4)]
    results = {}
    for k in (1, 2, 4):
        state = state_for(cfg)
        results[k] = backward_batch(state, cfg, docs, k, masks), [p.grad for p in reference.parameters(state)]
    mean = sum(reference.loss(state_for(cfg), cfg, d, m).data for d, m in zip(docs, masks)) / 4
    assert results[1][0] == pytest.approx(mean, rel=1e-15)
    scale = max(abs(g) for g in results[1][1])
    for k in (2, 4):  # the same sums, added up in another order: equal to round-off of the largest gradient
        assert results[k][0] == pytest.approx(results[1][0], rel=1e-15)
        assert max(abs(a - b) for a, b in zip(results[k][1], results[1][1])) <= 1e-15 * scale


# --- the optimizer's options ---


def adam_after_one_step(grads, **options):
    params = [Value(v) for v in (0.5, -1.0, 2.0)]
    for p, g in zip(params, grads):
        p.grad = g
    adam = reference.Adam(params, 10, **options)
    adam.step(0)
    return [p.data for p in params]


def test_weight_decay_is_decoupled():
    # no gradient: Adam's part is 0, so the step is lr_0 * weight_decay * p exactly
    assert adam_after_one_step([0, 0, 0], weight_decay=0.1) == [p - 0.01 * (0.0 + 0.1 * p) for p in (0.5, -1.0, 2.0)]
    assert adam_after_one_step([0.3, 0, 0], weight_decay=0.1) != adam_after_one_step([0.3, 0, 0])


def test_grad_clip_scales_the_global_norm():
    grads = [3.0, 0.0, 4.0]  # norm 5
    assert adam_after_one_step(grads, grad_clip=1.0) == adam_after_one_step([g * (1.0 / 5.0) for g in grads])
    assert adam_after_one_step(grads, grad_clip=5.0) == adam_after_one_step(grads)  # at the bound: untouched
    assert adam_after_one_step([3.0, 0.1, 4.0], grad_clip=1.0) != adam_after_one_step([3.0, 0.1, 4.0])


def test_schedules():
    adam = lambda **o: reference.Adam([], 10, lr=0.01, **o)
    assert [adam().lr_at(s) for s in range(10)] == [0.01 * (1 - s / 10) for s in range(10)]  # the seed's
    warm = adam(warmup=4, min_lr=0.002)
    assert [warm.lr_at(s) for s in (0, 2, 4, 7)] == pytest.approx([0.0, 0.005, 0.01, 0.006], rel=1e-15)  # 7: halfway down
    cosine = adam(schedule="cosine", min_lr=0.002, warmup=2)
    assert cosine.lr_at(6) == pytest.approx(0.006, rel=1e-15)  # the cosine's midpoint
    assert cosine.lr_at(3) > 0.002 + 0.008 * (1 - 1 / 8)  # above the straight line early on
    assert cosine.lr_at(10) == pytest.approx(0.002, rel=1e-15)


# --- python -m reference ---


def test_the_variant_flags_reach_the_model(words, tmp_path, capsys):
    args = ["--steps", 2, "--data", words, "--n-embd", 8, "--n-head", 2, "--block-size", 6]
    variant = ["--pos", "rope", "--tie-embeddings", "--n-kv-head", 1, "--dropout", 0.2, "--batch-size", 2, "--grad-accum", 2]
    variant += ["--norm", "layernorm", "--activation", "relu2", "--qk-norm", "--logit-softcap", 3, "--weight-decay", 0.1]
    variant += ["--grad-clip", 1, "--schedule", "cosine", "--min-lr", 0.001, "--warmup", 1, "--lr", 0.02]
    code, base, err = run_main(capsys, *args)
    assert code == 0, err
    code, out, err = run_main(capsys, *args, *variant, "--save", tmp_path / "v.safetensors")
    assert code == 0, err
    assert out.splitlines()[:2] == base.splitlines()[:2]  # same data
    assert out.splitlines()[3:] != base.splitlines()[3:]
    saved = load_file(tmp_path / "v.safetensors")
    assert "wpe" not in saved and "lm_head" not in saved
    assert saved["layer0.attn_wk"].shape == (4, 8) and saved["layer0.attn_wq"].shape == (8, 8)


def test_dropout_draws_from_its_own_stream(words, capsys, monkeypatch):
    """Masks drawn (from their own stream) but made all ones: the run is the run without dropout,
    samples included, so the draws did not touch the seed's stream."""
    draw = program.dropout_masks
    code, base, _ = run_main(capsys, "--steps", 2, "--data", words, *QUICK)
    code, with_dropout, _ = run_main(capsys, "--steps", 2, "--data", words, *QUICK, "--dropout", 0.5)
    assert with_dropout != base
    monkeypatch.setattr(program, "dropout_masks", lambda cfg, n, rng: ones_like(draw(cfg, n, rng)))
    code, out, err = run_main(capsys, "--steps", 2, "--data", words, *QUICK, "--dropout", 0.5)
    assert code == 0, err
    assert out == base


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--steps", "0"], "--steps: must be a positive integer, got 0"),
        (["--n-head", "3"], "n_embd (16) must be divisible by n_head (3)"),
        (["--n-kv-head", "3"], "n_kv_head (3) must divide n_head (4)"),
        (["--pos", "rope", "--n-embd", "6", "--n-head", "2"], "rope needs an even head_dim, got 3"),
        (["--norm", "batchnorm"], "invalid choice: 'batchnorm'"),
        (["--dropout", "1"], "must be a number in [0, 1), got 1.0"),
        (["--grad-accum", "2"], "--grad-accum (2) must divide --batch-size"),
        (["--warmup", "5", "--steps", "5"], "--warmup (5) must be below --steps (5)"),
        (["--min-lr", "0.1"], "--min-lr (0.1) must be at most --lr (0.01)"),
        (["--save", "/nonexistent/dir/w.safetensors"], "no directory /nonexistent/dir"),
        (["--data", "/nonexistent.txt"], "data file not found: /nonexistent.txt"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line(capsys, args, fragment):
    code, _, err = run_main(capsys, *args)
    assert code == 2
    assert_one_line_error(code, err, fragment)


def test_bad_input_is_one_line_from_the_command_too(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    out = run_program("--data", tmp_path / "bad.txt")
    assert_one_line_error(out.returncode, out.stderr, "is not valid UTF-8")


def test_default_data_the_environment_then_the_packaged_names(words, tmp_path, monkeypatch, capsys):
    packaged = tmp_path / "names.txt.gz"
    monkeypatch.setattr(program, "PACKAGED_NAMES", packaged)
    monkeypatch.delenv("MICROGPT_JAX_DATA", raising=False)
    code, _, err = run_main(capsys, "--steps", 1, *QUICK)
    assert_one_line_error(code, err, f"data file not found: {packaged}", "--data")
    packaged.write_bytes(gzip.compress(b"ab\nba\nabba\n"))
    code, out, _ = run_main(capsys, "--steps", 1, *QUICK)
    assert out.splitlines()[:2] == ["num docs: 3", "vocab size: 3"]
    monkeypatch.setenv("MICROGPT_JAX_DATA", str(words))
    code, out, _ = run_main(capsys, "--steps", 1, *QUICK)
    assert out.splitlines()[0] == "num docs: 29"


def test_the_program_imports_nothing_of_the_package():
    code = "import sys, reference.__main__; print(sorted(m for m in sys.modules if m.split('.')[0] in ('microgpt_jax', 'numpy', 'jax')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
