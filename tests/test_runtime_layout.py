"""runtime/ is the bottom layer: it imports nothing of the rest of ringpipe."""
import ast
import pathlib

RUNTIME = pathlib.Path(__file__).resolve().parents[1] / "runtime"


def test_runtime_imports_nothing_of_model_cluster_or_tools():
    found = []
    for path in sorted(RUNTIME.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}:{node.lineno}: {name}" for name in names
                      if name.split(".")[0] in ("model", "cluster", "tools", "tests")]
    assert found == []
