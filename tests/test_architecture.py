"""The package is a stack of layers (docs/architecture.md): every import goes to the same layer or below.

Imports are read with ``ast`` from the source (module level and inside functions), so a lazy import
that climbs a layer fails here as surely as a top-level one.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "xkern"

# bottom to top; a module belongs to the first prefix that matches it (longest prefixes listed first)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("format and kernels", ("xkern._version", "xkern.errors", "xkern.fileio", "xkern.distributed", "xkern.nf4",
                            "xkern.kernels", "xkern.plot", "xkern.threads", "xkern.commands")),
    ("ops", ("xkern.ops",)),
    ("adapters, data", ("xkern.adapters", "xkern.data")),
    ("nn", ("xkern.nn",)),
    ("train", ("xkern.train",)),
    ("serve", ("xkern.serve",)),
    ("models and recipes", ("xkern.xcross", "xkern.weave", "xkern.recipes")),
    ("recommend", ("xkern.recommend",)),
    ("demo", ("xkern.demo",)),
    ("command", ("xkern.cli",)),
    ("package face", ("xkern",)),
]
EXTENSIONS = {"xkern._C", "xkern._cpu"}
# rooms of one layer that must not import each other
SIBLINGS_APART = [("xkern.adapters", "xkern.data"), ("xkern.xcross", "xkern.weave")]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def _layer(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "xkern"):
            return i
    assert module == "xkern", f"{module} is in no layer: add it to LAYERS"
    return len(LAYERS) - 1


def _imports(module: str, path: Path, modules: set[str]) -> set[str]:
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                up = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            if name != "xkern" and not name.startswith("xkern."):
                continue
            if name in EXTENSIONS:  # compiled modules: kernels, the bottom layer
                continue
            while name and name not in modules:  # "xkern.nn.NF4LoRALinear" -> "xkern.nn"
                name = name.rpartition(".")[0]
            if name == "xkern" and module != "xkern" and names[-1] == "xkern" and len(names) > 1 \
                    and all(n in EXTENSIONS for n in names[:-1]):
                continue  # `from xkern import _C`
            if name == "xkern" and module != "xkern":
                out.add(name)  # the package face, never fine from inside
            elif name and name != module and not module.startswith(name + "."):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_module_imports_from_a_higher_layer():
    bad = []
    for module, targets in _graph().items():
        for t in targets:
            if t == "xkern" and module != "xkern":
                bad.append(f"{module} imports the package face `xkern` (import from the defining module)")
            elif _layer(t) > _layer(module):
                bad.append(f"{module} ({LAYERS[_layer(module)][0]}) imports {t} ({LAYERS[_layer(t)][0]})")
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("a,b", SIBLINGS_APART)
def test_sibling_rooms_do_not_import_each_other(a, b):
    graph = _graph()
    crossing = [(m, t) for m, ts in graph.items() for t in ts
                if (m.startswith(a) and t.startswith(b)) or (m.startswith(b) and t.startswith(a))]
    assert not crossing


def test_no_import_loops():
    graph = _graph()
    state: dict[str, int] = {}
    loops = []

    def visit(v: str, stack: list[str]) -> None:
        state[v] = 1
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                loops.append(stack[stack.index(w):] + [w] if w in stack else [v, w])
            elif w not in state:
                visit(w, stack + [w])
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v, [v])
    assert not loops, loops


def test_kernels_and_format_import_nothing_above_them():
    graph = _graph()
    for module, targets in graph.items():
        if _layer(module) == 0:
            assert all(_layer(t) == 0 for t in targets), (module, targets)
