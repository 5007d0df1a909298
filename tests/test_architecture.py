"""The package's shape: layers that import only downward, no import cycles, no private names across modules.

Layers, lowest first (a module may import its own layer or any below it):

    0  emnist_cnn (the package root), startup, config, errors
    1  core       pure computation
    2  io         files; demos (synthetic digits and instruments for tests and benchmarks)
    3  training   a run's data, epoch loop, session, schedulers, tracking; this process's device and threads
    4  engine     what a command does besides training (evaluate, compare, export, predict, import)
    5  present    tables, figures, the report
    6  cli        flags, handlers, entry point
    7  __main__

Every import counts, including those deferred inside functions. The checker
is tested on small packages written here, so it is known to catch each kind
of violation; then it must find none in emnist_cnn.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import emnist_cnn

PACKAGE_DIR = Path(emnist_cnn.__file__).parent
LAYERS = {"startup": 0, "config": 0, "errors": 0, "core": 1, "io": 2, "demos": 2, "training": 3, "engine": 4,
          "present": 5, "cli": 6, "__main__": 7}


def module_names(package_dir: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def layer_of(module: str, package: str, layers: dict[str, int]) -> int:
    parts = module.split(".")
    return 0 if len(parts) == 1 else layers[parts[1]]


def imports_of(module: str, path: Path, modules: dict[str, Path], package: str):
    """(imported module, names imported from it, line) for every import of the package's own modules."""
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == package:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] != package:
                continue
            plain = []
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:  # `from . import files`: the submodule itself
                    yield sub, [], node.lineno
                else:
                    plain.append(alias.name)
            if plain:
                yield target, plain, node.lineno


def check_architecture(package_dir: Path, package: str, layers: dict[str, int]) -> list[str]:
    """Every violation, one line each: an upward import, a private name across modules, an import cycle."""
    modules = module_names(package_dir, package)
    problems, graph = [], {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, line in imports_of(module, path, modules, package):
            if target not in modules:
                problems.append(f"{module}:{line} imports {target}, which does not exist")
                continue
            if target != module:
                graph[module].add(target)
            if layer_of(target, package, layers) > layer_of(module, package, layers):
                problems.append(f"{module}:{line} imports {target} from a higher layer")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.append(f"{module}:{line} imports private {', '.join(private)} from {target}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in find_cycles(graph)]
    return problems


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component) + [sorted(component)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root / "pkg", *(p for p in (root / "pkg").rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return root / "pkg"


CLEAN = {"config.py": "X = 1\n", "core/a.py": "from ..config import X\n", "engine/b.py": "from ..core.a import X\n"}


@pytest.mark.parametrize("extra, expected", [
    ({}, None),
    # core imports engine inside a function: an upward import, and with engine -> core a cycle too.
    ({"core/a.py": "from ..config import X\n\ndef f():\n    from ..engine import b\n"}, "from a higher layer"),
    ({"core/a.py": "from ..config import X\n\ndef f():\n    from ..engine import b\n"}, "import cycle"),
    ({"engine/c.py": "from .b import X\n", "engine/b.py": "from ..core.a import X\nfrom . import c\n"},
     "import cycle: pkg.engine.b -> pkg.engine.c -> pkg.engine.b"),
    ({"engine/c.py": "from .b import _helper\n"}, "imports private _helper from pkg.engine.b"),
    ({"engine/c.py": "import pkg.nothing\n"}, "does not exist"),
])
def test_the_checker_catches_each_kind_of_violation(tmp_path, extra, expected):
    root = write_package(tmp_path, {**CLEAN, **extra})
    problems = check_architecture(root, "pkg", {"config": 0, "core": 1, "engine": 3})
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_emnist_cnn_has_layers_without_cycles_or_private_imports():
    assert check_architecture(PACKAGE_DIR, "emnist_cnn", LAYERS) == []
    # Every module is in a known layer, so a new folder must be placed deliberately.
    for module in module_names(PACKAGE_DIR, "emnist_cnn"):
        layer_of(module, "emnist_cnn", LAYERS)


def test_public_modules_declare_all():
    for module, path in module_names(PACKAGE_DIR, "emnist_cnn").items():
        if path.name == "__main__.py" or (path.name == "__init__.py" and module != "emnist_cnn.cli"):
            continue
        tree = ast.parse(path.read_text())
        names = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        assert "__all__" in names, f"{module} has no __all__"


def test_ruff_finds_nothing():
    """The linter configured in pyproject.toml, over the package, the tests and the benchmarks."""
    root = PACKAGE_DIR.parents[1]
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"], cwd=root,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_code_edits_the_import_path():
    """The package is installed (make setup), the benchmarks run as `python -m benchmarks.NAME` and the tests
    get the repository root from pyproject.toml: no module reaches another by editing sys.path. Catches:
    `sys.path.insert(0, ...)` in a benchmark or test (what bench.py and tracking.py did). The one exception:
    tests/warmstart.py gives a forked child the sys.path[0] Python gives the command it runs."""
    root = PACKAGE_DIR.parents[1]
    found = []
    for folder in ("src", "benchmarks", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                        and node.value.id == "sys"):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert [f for f in found if not f.startswith("tests/warmstart.py:")] == []
    assert len(found) == 1, found
