"""The shape of trainer/: packages import only downwards, nothing but the entry points imports `trainer.cli`,
and there are no import cycles, between packages or between the modules of one package.

Every `import` / `from ... import` in trainer/**.py counts, including those inside functions (a lazy import is
still a dependency: it runs the first time the function does), except those under `if TYPE_CHECKING:`, which
never run. Read with `ast`; nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "trainer"

# trainer/'s own top-level modules: the foundation every package may import
FOUNDATION = "foundation"
# the layer of each package: a module may import its own package and lower layers only
LAYERS: dict[str, int] = {
    FOUNDATION: 0,   # trainer/*.py: errors, config, units, runtime, diskspace, terratorch_compat, launch_hook
    "memory": 1,     # named profiles, DeepSpeed presets, optimizer-state bytes: pure rules
    "backbones": 2,  # our backbone registrations and the catalog of real dimensions
    "data": 2,       # GeoTIFF datasets, synthetic data, normalization stats
    "model": 3,      # the TerraTorch model and task, the profile applied to it
    "plan": 4,       # the planner: memory and step time of every profile, the auto choice
    "train": 5,      # a job: run, loop, checkpoints, exports
    "predict": 6,    # sliding-window prediction from an export
    "sweep": 6,      # grids of jobs in subprocesses
    "bench": 7,      # benchmarks and comparisons (run sweeps and predictions)
    "cli": 8,        # every command's parser and entry; imported only by __main__ and launch/*.py
    "entry": 9,      # trainer/__main__.py (`python -m trainer`)
}
ENTRY_POINTS = {"trainer.__main__"}  # besides cli itself, the only trainer module that may import trainer.cli


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _runtime_nodes(tree: ast.AST):
    """Every node of the tree except what sits under `if TYPE_CHECKING:` (annotations only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = child.test if isinstance(child, ast.If) else None
            if test is not None and (getattr(test, "id", None) == "TYPE_CHECKING"
                                     or getattr(test, "attr", None) == "TYPE_CHECKING"):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The trainer modules `name` imports (relative imports resolved; `from pkg import mod` is `pkg.mod`)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known and "." in t:  # `import trainer.x.y` of a name inside a module
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                out.add(t)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {n: imports_of(n, p, set(mods)) for n, p in mods.items()}


def package_of(name: str) -> str:
    if name in ENTRY_POINTS:
        return "entry"
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else FOUNDATION


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, nodes in sorted order for a stable answer)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def package_edges(g: dict[str, set[str]]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for a, deps in g.items():
        for b in deps:
            if package_of(a) != package_of(b):
                edges.setdefault(package_of(a), set()).add(package_of(b))
    return edges


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} imports {b} ({package_of(a)}, layer {LAYERS[package_of(a)]}, may not import "
                  f"{package_of(b)}, layer {LAYERS[package_of(b)]})"
                  for a, deps in g.items() for b in deps
                  if package_of(a) != package_of(b) and LAYERS[package_of(b)] >= LAYERS[package_of(a)])


def cli_importers(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} imports {b}" for a, deps in g.items() for b in deps
                  if package_of(b) == "cli" and package_of(a) != "cli" and a not in ENTRY_POINTS)


def module_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """A cycle inside each package, between its modules (the package's own __init__ left out: importing a
    submodule runs it, and it may re-export its submodules)."""
    out = []
    for pkg in sorted(set(map(package_of, g))):
        inside = {a: {b for b in deps if package_of(b) == pkg and b != f"trainer.{pkg}"}
                  for a, deps in g.items() if package_of(a) == pkg and a != f"trainer.{pkg}"}
        if cycle := find_cycle(inside):
            out.append(cycle)
    return out


@pytest.fixture(scope="module")
def trainer_graph():
    g = graph()
    assert len(g) > 50 and "trainer.cli" in g and "trainer.train.run" in g  # the walk found the package
    return g


def test_every_package_has_a_layer(trainer_graph):
    unknown = sorted({package_of(n) for n in trainer_graph} - set(LAYERS))
    assert not unknown, f"packages without a layer in LAYERS: {unknown}"


def test_no_cycle_between_packages(trainer_graph):
    cycle = find_cycle(package_edges(trainer_graph))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle)


def test_no_cycle_inside_a_package(trainer_graph):
    cycles = module_cycles(trainer_graph)
    assert not cycles, "import cycles between modules: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_follow_the_layers(trainer_graph):
    bad = layer_violations(trainer_graph)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_only_entry_points_import_cli(trainer_graph):
    bad = cli_importers(trainer_graph)
    assert not bad, "only trainer/__main__.py and launch/*.py may import trainer.cli:\n" + "\n".join(bad)


def test_at_most_eight_modules_at_the_top():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 8, f"trainer/ holds {len(top)} modules directly: {top}"


def test_the_checks_catch_a_bad_import(tmp_path):
    """The same checks on a small tree that breaks each rule: they must fail there."""
    root = tmp_path / "trainer"
    files = {
        "errors.py": "",
        "__main__.py": "from trainer.cli import main\n",
        "cli/__init__.py": "from trainer.train import run\n",
        "train/__init__.py": "",
        "train/run.py": "def f():\n    from trainer.cli import main\n    from . import loop\n",  # upward, into cli
        "train/loop.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trainer.cli import main\n"
                         "from trainer.train.run import f\n",  # run -> loop -> run; the annotation-only import is none
        "memory/__init__.py": "",
        "memory/profiles.py": "from ..train import run\n",  # relative, upward
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    g = graph(root)
    assert g["trainer.memory.profiles"] == {"trainer.train.run"}
    assert find_cycle(package_edges(g)) == ["cli", "train", "cli"]
    assert cli_importers(g) == ["trainer.train.run imports trainer.cli"]
    assert module_cycles(g) == [["trainer.train.loop", "trainer.train.run", "trainer.train.loop"]]
    assert layer_violations(g) == [
        "trainer.memory.profiles imports trainer.train.run (memory, layer 1, may not import train, layer 5)",
        "trainer.train.run imports trainer.cli (train, layer 5, may not import cli, layer 8)"]


def private_uses(root: Path = ROOT) -> list[str]:
    """`from trainer.x import _name` and `x._name` on an imported trainer module, across modules: a name with a
    leading underscore belongs to its module (`__dunder__` names are not private)."""
    mods = modules(root)
    found = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases: dict[str, str] = {}  # local name -> the trainer module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trainer"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in mods:
                        aliases[a.asname or a.name] = full
                    elif a.name.startswith("_") and not a.name.startswith("__") and node.module != name:
                        found.append(f"{name} imports {node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != name):
                found.append(f"{name} uses {aliases[node.value.id]}.{node.attr}")
    return sorted(set(found))


def test_no_private_names_across_modules():
    assert private_uses() == []


def test_private_names_across_modules_are_caught(tmp_path):
    root = tmp_path / "trainer"
    (root / "train").mkdir(parents=True)
    (root / "errors.py").write_text("def _hidden():\n    pass\n")
    (root / "train" / "__init__.py").write_text("")
    (root / "train" / "run.py").write_text("from trainer.errors import _hidden\nfrom trainer import errors as E\n"
                                           "E._hidden()\nE.__name__\n")
    assert private_uses(root) == ["trainer.train.run imports trainer.errors._hidden",
                                  "trainer.train.run uses trainer.errors._hidden"]
