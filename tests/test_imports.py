"""ncbench's own modules import each other without a cycle; every import counts, those inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ncbench": ROOT / "ncbench", "ncbench.methods": ROOT / "methods", "ncbench.datasets": ROOT / "datasets"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the three packages (a package is its ``__init__``)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def _own(name: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of the dotted ``name`` that is one of ``known``."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules among ``known`` that ``module`` imports anywhere in its file."""
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # ``from pkg import x`` imports the module pkg.x when there is one, else pkg itself
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        targets.update(t for t in (_own(n, known) for n in names) if t and t != module)
    return targets


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per back edge met in a depth-first walk."""
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "a.py").write_text("def f():\n    from ncbench import b\n")
    (tmp_path / "b.py").write_text("from .a import f\nimport ncbench.c as c\n")
    (tmp_path / "c.py").write_text("x = 1\n")
    known = {"ncbench": tmp_path / "__init__.py", **{f"ncbench.{m}": tmp_path / f"{m}.py" for m in "abc"}}
    graph = {m: imports(m, p, known) for m, p in known.items()}
    assert graph == {"ncbench": set(), "ncbench.a": {"ncbench.b"}, "ncbench.b": {"ncbench.a", "ncbench.c"},
                     "ncbench.c": set()}
    assert find_cycles(graph) == [["ncbench.a", "ncbench.b", "ncbench.a"]]


def test_no_import_cycles():
    known = modules()
    assert {"ncbench.harness", "ncbench.methods.clip", "ncbench.datasets.synthetic"} <= set(known)
    graph = {module: imports(module, path, known) for module, path in known.items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)
