"""The package's layout: its modules import one another without a cycle, counting imports made
inside functions (a cycle hidden in a function is still a cycle: the two modules cannot be
understood, tested or loaded apart)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "beam_extract"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> set[str]:
    """The package's modules an import statement loads: `from a import b` is the module a.b when
    there is one, else a (b is a name defined in a). A parent package that Python imports on the
    way is not counted: it is being imported already when its own submodule imports a sibling."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
    found = set()
    for name in names:
        while name and name not in modules:  # `import a.b.c` of a name inside a.b: a.b
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        graph[module] = set()
        for node in ast.walk(tree):  # every statement, function bodies included
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= imported(module, path.name == "__init__.py", node, set(paths))
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as its modules in import order (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" once all it reaches is explored
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_graph_sees_function_local_and_relative_imports():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set(), "p.c": {"p.a", "p.b"}}) is None
    tree = ast.parse("def f():\n    from beam_extract.model import weights\n    from . import hooks, nothing\n")
    modules = {"beam_extract", "beam_extract.model", "beam_extract.model.weights", "beam_extract.hooks"}
    found = set().union(*(imported("beam_extract.job", False, node, modules) for node in ast.walk(tree)
                          if isinstance(node, ast.ImportFrom)))
    assert found == {"beam_extract.model.weights", "beam_extract.hooks", "beam_extract"}
    assert "beam_extract.model.weights" in import_graph()["beam_extract.model.loaded"]


def test_no_module_imports_itself_through_others():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
