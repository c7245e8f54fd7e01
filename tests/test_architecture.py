"""The shape of the code: imports go one way, between layers and within them, and files stay short.

Layers, lowest first: runtime/ (transport, engine, collectives) -> model/ (ops, model families,
parallelism, training) -> tools/ (benchmarks, trace tools) and cluster/ (the CLI and the driver).
A module may import from its own layer and those below it, never above, and no chain of imports
leads back to where it started. Read from the source (AST), so nothing is imported to check it.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("runtime", "model", "cluster", "tools")
# What each layer must not import.
FORBIDDEN = {"runtime": {"model", "cluster", "tools"}, "model": {"cluster", "tools"}}
MAX_LINES = 400
# Files allowed over MAX_LINES, each with the reason it reads better whole.
LONG_FILES: set = set()


def _modules() -> dict:
    """Dotted module name -> file path, for every .py file under the packages."""
    modules = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules["ringpipe." + dotted.removesuffix(".__init__")] = path
    return modules


def _imports(module: str, path: str, modules: dict) -> set:
    """The project modules `module` imports (anywhere in the file, also inside functions).
    `from package import name` counts as importing package.name when that is a module, else as
    importing the package."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {module: _imports(module, path, modules) for module, path in modules.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_import_graph_sees_every_package_and_the_known_edges(graph):
    # The checks below would pass vacuously on an empty or misread graph.
    assert {"ringpipe.runtime", "ringpipe.model", "ringpipe.cluster.cli", "ringpipe.tools.trace_io"} <= set(graph)
    assert "ringpipe.model.nn.ops" in graph["ringpipe.model.gpt2.model"]
    assert "ringpipe.model.gpt2.config" in graph["ringpipe.model.gpt2.checkpoint"]


def test_no_module_imports_itself_back_through_a_chain(graph):
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_from_the_layers_above_it(graph, layer):
    upward = {module: sorted(target for target in targets if target.split(".")[1] in FORBIDDEN[layer])
              for module, targets in graph.items() if module.split(".")[1] == layer}
    assert {module: targets for module, targets in upward.items() if targets} == {}


def test_the_cli_subcommands_do_not_import_the_cli_back(graph):
    # Only `python -m ringpipe.cluster` (cluster/__main__.py), the entry point above it, starts the CLI.
    assert [module for module, targets in graph.items()
            if "ringpipe.cluster.cli" in targets and module != "ringpipe.cluster.__main__"] == []


def test_no_source_file_is_longer_than_the_limit_unless_listed():
    long = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    with open(path, encoding="utf-8") as f:
                        lines = sum(1 for _ in f)
                    relative = os.path.relpath(path, ROOT).replace(os.sep, "/")
                    if lines > MAX_LINES and relative not in LONG_FILES:
                        long[relative] = lines
    assert long == {}, f"split these along their seams (or justify them in LONG_FILES): {long}"
