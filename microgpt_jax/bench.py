"""`microgpt-jax bench`: speed measured side by side in one run, printed as a table.

Each case is a function decorated with @case that returns {metric: value};
ratios are computed inside a case from numbers measured in the same run, so
they mean something on a shared, noisy machine. Compile time is reported
apart from steady-state time.
"""

import json
import time

CASES = {}


def case(fn):
    """Register a benchmark case under its function name."""
    CASES[fn.__name__] = fn
    return fn


def timed(fn, *args):
    """(result, seconds) of fn(*args), waiting for any JAX arrays in the result."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def run(names=None, json_path=None, print=print):
    names = names or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        from microgpt_jax.errors import UserError

        raise UserError(f"unknown bench case(s) {unknown}; choose from {sorted(CASES)}")
    results = {}
    for name in names:
        results |= CASES[name]()
    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for k, v in results.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=2)
    return results
