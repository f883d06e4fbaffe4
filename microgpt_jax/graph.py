"""The JAX side of the graph story: a jitted function's program and its buffers.

The scalar engine (`reference.graph`) builds a fresh graph of Python objects
for every token of every step. JAX traces a function once per input shape
into a jaxpr, a static program of array operations that XLA compiles;
running the compiled step builds no graph at all. These helpers count that
program's operations and show which input buffers the compiled step reuses
for its outputs (donation).
"""

import re
from collections import Counter
from dataclasses import dataclass

import jax
from jax.extend.core import ClosedJaxpr, jaxprs_in_params


def op_counts(jaxpr) -> Counter:
    """Primitive name -> equations in the program, nested programs included.

    A nested program (the body of jit, scan, while_loop, custom_jvp, ...) is
    counted once, however many times it runs: this is the size of the
    program, not of the work.
    """
    jaxpr = jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr
    counts = Counter()
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for sub in jaxprs_in_params(eqn.params):
            counts += op_counts(sub)
    return counts


@dataclass(frozen=True)
class Buffer:
    """One input buffer of a compiled function."""

    path: str  # where it sits in the arguments, e.g. "[0]['wte']"
    aval: str  # dtype and shape, e.g. "float32[27,16]"
    donated: bool  # the caller gave it up (donate_argnums)
    aliased_output: int | None  # the output XLA writes into this buffer, if any


def _entry_parameters(hlo_text):
    return hlo_text[hlo_text.index("\nENTRY") :].count(" parameter(")


def _input_output_aliases(hlo_text):
    """HLO parameter index -> output index, from the compiled module's input_output_alias."""
    header = next((line for line in hlo_text.splitlines() if "input_output_alias=" in line), "")
    return {int(param): int(out) for out, param in re.findall(r"\{(\d+)\}: \((\d+), \{", header)}


def buffers(jitted, *args) -> list[Buffer]:
    """Every input buffer of jitted(*args): whether it is donated, and which output reuses it.

    Lowers and compiles for these arguments (nothing runs). Input i of the
    compiled module is argument leaf i as long as no argument is unused
    (JAX drops unused ones); the parameter count is checked against that.
    """
    lowered = jitted.lower(*args)
    infos = jax.tree.leaves_with_path(lowered.args_info)
    hlo = lowered.compile().as_text()
    if _entry_parameters(hlo) != len(infos):
        raise ValueError("some argument is unused and was dropped from the compiled module")
    aliases = _input_output_aliases(hlo)
    rows = []
    for i, (path, info) in enumerate(infos):
        aval = f"{info.dtype}[{','.join(map(str, info.shape))}]"
        rows.append(Buffer(jax.tree_util.keystr(path[1:]), aval, info.donated, aliases.get(i)))
    return rows
