"""The package's layout: its modules import one another without a cycle, counting imports made
inside functions (a cycle hidden in a function is still a cycle: the two modules cannot be
understood, tested or loaded apart); and the output's readers (format/, readers/, integrations/)
import no Beam, JAX or TensorFlow, neither themselves nor through the package's other modules."""

import ast
from collections.abc import Iterator
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


def outside(node: ast.Import | ast.ImportFrom) -> set[str]:
    """The packages from outside ours an import statement loads, by their top-level names."""
    if isinstance(node, ast.ImportFrom):
        names = [] if node.level else [node.module or ""]
    else:
        names = [alias.name for alias in node.names]
    return {name.partition(".")[0] for name in names} - {"beam_extract"}


def import_statements(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, function bodies included, and whether it runs only when a function
    is called (False: when the module is loaded)."""
    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, in_function
            yield from visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                      ast.Lambda)))
    yield from visit(tree, False)


def module_imports() -> dict[str, set[tuple[str, bool]]]:
    """Per module of the package: what it imports, the package's modules by their names and other
    packages by their top-level names, each with whether only inside a function."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    found = {}
    for module, path in paths.items():
        tree = ast.parse(path.read_text("utf-8"), str(path))
        found[module] = set()
        for node, in_function in import_statements(tree):
            targets = imported(module, path.name == "__init__.py", node, set(paths)) | outside(node)
            found[module] |= {(target, in_function) for target in targets}
    return found


def import_graph() -> dict[str, set[str]]:
    """The package's modules each imports (outside packages left out)."""
    imports = module_imports()
    return {module: {target for target, _ in targets if target in imports} for module, targets in imports.items()}


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


# The output is read where the pipeline's dependencies are not installed. Beam and JAX are never
# imported there, not even inside a function; TensorFlow only inside the functions that hand out
# TensorFlow objects (`tf_dataset`, `tf_feature_spec`), so loading a reader never loads it.
READERS_SIDE = ("beam_extract.format", "beam_extract.readers", "beam_extract.integrations")
NEVER = ("apache_beam", "jax")
NOT_ON_LOAD = ("tensorflow",)


def framework_imports(imports: dict[str, set[tuple[str, bool]]], roots: list[str]) -> list[str]:
    """Each way a root module reaches a refused framework, as the chain of modules that imports it:
    NEVER through any import, NOT_ON_LOAD through the imports that run when modules are loaded."""
    found = set()
    for root in roots:
        for frameworks, on_load in ((NEVER, False), (NOT_ON_LOAD, True)):
            chains, queue = {root: [root]}, [root]
            while queue:
                module = queue.pop(0)
                for target, in_function in sorted(imports[module]):
                    if on_load and in_function:
                        continue
                    if target in frameworks:
                        found.add(" -> ".join(chains[module]) + f" imports {target}")
                    elif target in imports and target not in chains:
                        chains[target] = chains[module] + [target]
                        queue.append(target)
    return sorted(found)


def test_the_boundary_check_follows_the_package_and_function_local_imports():
    tree = ast.parse("import numpy\nclass C:\n    import json\n    def f(self):\n        import tensorflow as tf\n")
    assert [(outside(node), in_function) for node, in_function in import_statements(tree)] == [
        ({"numpy"}, False), ({"json"}, False), ({"tensorflow"}, True)]
    imports = {"p.format.a": {("p.format.b", False), ("numpy", False)},
               "p.format.b": {("p.sink.w", True), ("tensorflow", True)},
               "p.sink.w": {("apache_beam", False), ("tensorflow", False)}}
    assert framework_imports(imports, ["p.format.a"]) == ["p.format.a -> p.format.b -> p.sink.w imports apache_beam"]
    imports["p.format.b"] = {("p.sink.w", False)}
    assert framework_imports(imports, ["p.format.a"]) == ["p.format.a -> p.format.b -> p.sink.w imports apache_beam",
                                                          "p.format.a -> p.format.b -> p.sink.w imports tensorflow"]
    assert framework_imports({"p.format.a": {("tensorflow", True), ("jax", True)}}, ["p.format.a"]) == [
        "p.format.a imports jax"]


def test_the_readers_side_imports_no_beam_jax_or_tensorflow():
    imports = module_imports()
    roots = sorted(m for m in imports if any(m == side or m.startswith(side + ".") for side in READERS_SIDE))
    assert {"beam_extract.format.schema", "beam_extract.readers.reader", "beam_extract.integrations.pytorch"} <= set(roots)
    assert framework_imports(imports, roots) == []
