"""The package's import graph: no circle (lazy imports inside functions count), nothing imports
the command line module, the math imports no storage, engine or cluster code; and the driver of
a Ray run never loads TensorFlow."""

import ast
import os

import pytest

import distributed_influence

PACKAGE = os.path.dirname(distributed_influence.__file__)
NAME = "distributed_influence"


def _modules() -> dict:
    """dotted module name (without the package's) → its file; a subpackage is its __init__."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        rel = os.path.relpath(folder, PACKAGE)
        prefix = "" if rel == "." else rel.replace(os.sep, ".") + "."
        for f in files:
            if f.endswith(".py"):
                name = prefix + f[:-3]
                found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = os.path.join(folder, f)
    found.pop("__init__", None)
    return found


def _graph() -> dict:
    """module → the package modules it imports anywhere in its source."""
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{mod}: relative import (the package imports absolutely)"
                if node.module == NAME:
                    targets.update(a.name for a in node.names)
                elif (node.module or "").startswith(NAME + "."):
                    base = node.module[len(NAME) + 1:]
                    targets.add(base)
                    targets.update(f"{base}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name[len(NAME) + 1:] for a in node.names if a.name.startswith(NAME + "."))
        graph[mod] = {t for t in targets if t in modules} - {mod}
    return graph


def test_the_graph_sees_the_packages_modules():
    graph = _graph()
    assert {"cli", "demo", "report.page", "report.summary", "method.scoring", "engine.job",
            "cluster.compat", "store.tables", "data.sources.parquet"} <= set(graph)
    assert "method.scoring" in graph["engine.shard"]  # the walk finds real edges


def test_no_import_cycles_and_cli_on_top():
    graph = _graph()
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


def test_the_math_imports_no_storage_engine_cluster_or_report_code():
    """``method/`` is pure functions over arrays, testable without Ray or files."""
    forbidden = ("engine", "cluster", "store", "report")
    bad = {mod: sorted(d for d in deps if d.split(".")[0] in forbidden)
           for mod, deps in _graph().items() if mod.startswith("method")}
    assert not any(bad.values()), bad


def _run(code: str, *args: str, env: dict = None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def _last_json(proc) -> dict:
    """The JSON a child process printed last; the process must have succeeded."""
    import json

    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # starts Ray
def test_a_ray_run_never_loads_tensorflow_in_the_driver(files, tmp_path):
    """The workers describe the model; the driver's process never imports TensorFlow or Keras
    (seconds of a core at start-up), and the manifest still names their versions. And the run
    leaves no AutoGraph file in the temporary directory: TensorFlow's AutoGraph writes the code it
    generates for a ``tf.function`` there and removes it at the process's exit, which a Ray
    worker, stopped by Ray, never reaches."""
    code = (
        "import json, sys\n"
        "from distributed_influence.config import AuditConfig\n"
        "from distributed_influence.engine.job import run_audit\n"
        "m = run_audit(AuditConfig(model=sys.argv[1], train=sys.argv[2], test=sys.argv[3], out=sys.argv[4], k=3))\n"
        "print(json.dumps({'loaded': sorted(n for n in ('tensorflow', 'keras') if n in sys.modules),\n"
        "                  'versions': m['versions'], 'n_classes': m['n_classes']}))\n"
    )
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = _run(code, files["model"], files["train"], files["test"], str(tmp_path / "out"),
                env={"TMPDIR": str(temp), "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp")})
    res = _last_json(proc)
    assert not [f for f in os.listdir(temp) if "autograph" in f], os.listdir(temp)
    import keras

    assert res["loaded"] == []
    assert res["versions"]["keras"] == keras.__version__ and res["versions"]["tensorflow"]
    assert res["n_classes"] == 3


@pytest.mark.slow  # starts Ray
def test_a_bad_model_found_by_a_worker_is_one_line_and_no_output(tmp_path):
    """In a Ray run the model is checked by the first worker: the user still gets one line on
    stderr (no notice of Ray's) and exit code 2, and nothing is written."""
    import keras
    import numpy as np

    x = np.random.default_rng(0).normal(size=(30, 6)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(30) % 3)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Lambda(lambda t: t + 1), keras.layers.Dense(3)])
    model.save(tmp_path / "lambda.keras")
    out = tmp_path / "out"
    proc = _run("import sys\nfrom distributed_influence.cli import main\nsys.exit(main(sys.argv[1:]))",
                "audit", "--model", str(tmp_path / "lambda.keras"), "--train", str(tmp_path / "d.npz"),
                "--test", str(tmp_path / "d.npz"), "--out", str(out), "--k", "3")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "safe mode" in lines[0], proc.stderr
    assert not out.exists()


def _sources():
    for mod, path in sorted(_modules().items()):
        with open(path, encoding="utf-8") as fh:
            yield mod, path, fh.read()


def test_modules_stay_small_and_functions_short():
    """No module over 500 lines; no function over 80 lines of code (its docstring aside) unless
    a comment in it says why it is longer than that."""
    import re

    long_modules = {mod: src.count("\n") for mod, _, src in _sources() if src.count("\n") > 500}
    assert not long_modules, long_modules
    long_functions = []
    for mod, _, src in _sources():
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            doc = body[0].end_lineno - body[0].lineno + 1 if ast.get_docstring(node) is not None else 0
            size = node.end_lineno - node.lineno + 1 - doc
            text = "\n".join(lines[node.lineno - 1:node.end_lineno])
            if size > 80 and not re.search(r"#[^\n]*longer than", text):
                long_functions.append(f"{mod}.{node.name}: {size} lines")
    assert not long_functions, long_functions


def test_nothing_reaches_into_other_libraries_internals_outside_the_compat_module():
    """Ray's private modules, the import system and the garbage collector are not the package's
    to change; the two touches Ray has no public API for live in ``cluster/compat.py``. Quieting
    a library's logger by its name is fine."""
    import re

    pattern = re.compile(r"ray\._private|_global_node|ray\._raylet|sys\.modules\[|meta_path|gc\.freeze")
    found = [f"{mod}:{i}: {line.strip()}" for mod, _, src in _sources() if mod != "cluster.compat"
             for i, line in enumerate(src.splitlines(), 1)
             if pattern.search(line) and "getLogger" not in line and "_LOGGER = " not in line]
    assert not found, found
