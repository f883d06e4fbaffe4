"""Imports point one way: no cycle in the package, and no module imports one above its layer (not even lazily)."""

import ast
from pathlib import Path

import microgpt_jax

PACKAGE = Path(microgpt_jax.__file__).parent
# low to high: a module may import its own layer or those below it
LAYERS = [
    {"errors", "config", "jsonfile", "text", "tokenizer", "runtime"},
    {"model", "layout", "dataset", "data", "parallel", "memory", "flops", "metrics", "plot", "graph", "hf"},
    {"train", "sample", "prepare"},
    {"loop", "checkpoint", "rundir", "loggers"},
    {"session", "sweep", "evaluate", "check", "reproduce", "bench", "bench_torch"},
    {"commands"},
    {"cli", "__main__", "__init__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def imports(path: Path) -> set[str]:
    """The package's modules that a file imports, anywhere in it (functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "microgpt_jax":
            base = node.module.removeprefix("microgpt_jax").lstrip(".")
            names = [a.name for a in node.names]
            found |= {f"{base}.{n}".lstrip(".") if (PACKAGE / base.replace(".", "/") / f"{n}.py").exists() else base for n in names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("microgpt_jax.") for a in node.names if a.name.startswith("microgpt_jax.")}
    return {name for name in found if name}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    top = module.split(".")[0]
    (index,) = [i for i, names in enumerate(LAYERS) if top in names]
    return index


def test_every_module_has_a_layer():
    for module in graph():
        layer(module)  # raises for a module nobody placed


def test_no_import_points_up_a_layer():
    upward = [(m, i) for m, imported in graph().items() for i in imported if layer(i) > layer(m)]
    assert not upward, upward


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, each as the modules along it."""
    state, found = {}, []

    def visit(module, path):
        state[module] = "open"
        for nxt in sorted(edges.get(module, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return found


def test_no_import_cycle():
    assert not cycles(graph()), cycles(graph())


def test_the_checks_can_fail(tmp_path):
    """A lazy import inside a function is seen, and a cycle through three modules is found."""
    (tmp_path / "m.py").write_text("def f():\n    from microgpt_jax.session import Session\n    from microgpt_jax import cli\n")
    assert imports(tmp_path / "m.py") == {"session", "cli"}
    assert cycles({"data": {"dataset"}, "dataset": {"prepare"}, "prepare": {"data"}}) == [["data", "dataset", "prepare", "data"]]
