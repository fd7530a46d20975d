"""The layering rule of docs/ARCHITECTURE.md, checked on the source with `ast` (no import runs):

- no import cycle among the project's modules (imports inside functions count: they are cycles all the same);
- the core `crossrec` imports neither Ray nor an outer layer (`trainers`, `serving`, `crossrec_cli`);
- `trainers` and `serving` never import each other or the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).parents[1]
PACKAGES = {
    "crossrec": REPO / "platform" / "crossrec",
    "trainers": REPO / "trainers",
    "serving": REPO / "serving",
    "crossrec_cli": REPO / "crossrec_cli",
}
# package -> top-level packages it must never import
FORBIDDEN = {
    "crossrec": {"ray", "trainers", "serving", "crossrec_cli"},
    "trainers": {"serving", "crossrec_cli"},
    "serving": {"trainers", "crossrec_cli"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for f in sorted(root.rglob("*.py")):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported_names(module: str, path: Path, known: set[str] = frozenset()) -> set[str]:
    """Every module an import statement in `path` imports, at any depth (relative imports resolved). For
    `from a import b`: `a.b` when that is a module in `known`, else `a`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join([*pkg, *([node.module] if node.module else [])])
            for a in node.names:
                names.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (`from a import b` counts `a.b` when that is a module, else `a`)."""
    mods = modules()
    graph = {}
    for m, path in mods.items():
        graph[m] = {n for n in imported_names(m, path, set(mods)) if n in mods and n != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_inward():
    bad = []
    for m, path in modules().items():
        top = m.split(".")[0]
        for name in sorted(imported_names(m, path)):
            if name.split(".")[0] in FORBIDDEN.get(top, ()):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checks_see_a_cycle_and_a_forbidden_import(tmp_path):
    """The checker itself: a planted cycle and a planted `import ray` in the core are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.train\n    from .x import y\n    from . import z\n")
    assert imported_names("crossrec.pkg.m", f, {"crossrec.pkg.z"}) == {"ray.train", "crossrec.pkg.x", "crossrec.pkg.z"}
