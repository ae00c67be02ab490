"""The package's modules import each other without a circle (lazy imports inside functions
count), and nothing imports the command line module."""

import ast
import os

import distributed_influence

PACKAGE = os.path.dirname(distributed_influence.__file__)


def _graph() -> dict:
    """module → the package modules it imports anywhere in its source."""
    modules = {f[:-3] for f in os.listdir(PACKAGE) if f.endswith(".py")}
    graph = {}
    for mod in modules:
        tree = ast.parse(open(os.path.join(PACKAGE, mod + ".py"), encoding="utf-8").read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distributed_influence."):
                deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("distributed_influence."))
        graph[mod] = (deps & modules) - {mod}
    return graph


def test_no_import_cycles_and_cli_on_top():
    graph = _graph()
    assert {"cli", "report", "demo", "summary"} <= set(graph)
    assert not [m for m, deps in graph.items() if "cli" in deps]
    state = {}

    def visit(mod, path):
        state[mod] = "open"
        for dep in sorted(graph[mod]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
