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


def test_a_ray_run_never_loads_tensorflow_in_the_driver(files, tmp_path):
    """The workers describe the model; the driver's process never imports TensorFlow or Keras
    (seconds of a core at start-up), and the manifest still names their versions. And the run
    leaves no AutoGraph file in the temporary directory: TensorFlow's AutoGraph writes the code it
    generates for a ``tf.function`` there and removes it at the process's exit, which a Ray
    worker, stopped by Ray, never reaches (two files per audit, before the project's functions
    were traced without AutoGraph)."""
    code = (
        "import json, sys\n"
        "from distributed_influence.config import AuditConfig\n"
        "from distributed_influence.job import run_audit\n"
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


def test_a_worker_process_converts_and_writes_parquet_without_importing_pandas(tmp_path):
    """pyarrow imports pandas at its first conversion (a third of a second of a core); a
    worker, set up as the job sets up its workers, writes and reads Parquet without it, and an
    explicit ``to_pandas`` still works there."""
    code = (
        "import json, sys\n"
        "import numpy as np\n"
        "from distributed_influence.worker import configure_devices\n"
        "configure_devices(0, 1)\n"
        "import pyarrow as pa, pyarrow.parquet as pq\n"
        "t = pa.table({'i': pa.array(np.arange(4), pa.int64()), 's': pa.array(['a', 'b', 'c', None])})\n"
        "pq.write_table(t, sys.argv[1])\n"
        "back = pq.read_table(sys.argv[1])\n"
        "res = {'equal': back.equals(t), 'pandas_after_parquet': 'pandas' in sys.modules}\n"
        "try:\n"
        "    import importlib.util\n"
        "    has = importlib.util.find_spec('pandas') is not None\n"
        "except ImportError:\n"
        "    has = False\n"
        "if has:\n"
        "    res['to_pandas_rows'] = len(back.to_pandas())\n"
        "print(json.dumps(res))\n"
    )
    proc = _run(code, str(tmp_path / "t.parquet"))
    res = _last_json(proc)
    assert res["equal"] and not res["pandas_after_parquet"], res
    assert res.get("to_pandas_rows", 4) == 4


def test_without_the_worker_set_up_pyarrow_imports_pandas_at_its_first_conversion():
    """The premise of the test above, so that it cannot pass for a pyarrow that no longer
    imports pandas by itself (then the set-up is moot, and this test says so)."""
    import importlib.util

    if importlib.util.find_spec("pandas") is None:
        import pytest

        pytest.skip("pandas is not installed")
    proc = _run("import sys, numpy as np, pyarrow as pa\npa.array(np.arange(3))\nprint('pandas' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_a_local_ray_start_calls_back_once_while_waiting_and_runs_with_the_local_settings():
    """``start_ray(while_waiting=...)`` calls back once, while Ray's start is still under way
    (the driver is not connected yet); the instance has no API server (none was asked for), no
    autoscaler monitor (nothing to scale) and runs with ``LOCAL_SYSTEM_CONFIG``: call results up
    to ``DIRECT_CALL_BYTES`` inside the call, no task events, no metrics. Given an instance that
    is already up, it calls back at once."""
    code = (
        "import json, ray\n"
        "from distributed_influence.runtime import LOCAL_SYSTEM_CONFIG, start_ray, stop_ray\n"
        "calls = []\n"
        "started = start_ray(num_cpus=1, while_waiting=lambda: calls.append(ray.is_initialized()))\n"
        "node = ray._private.worker._global_node\n"
        "again = []\n"
        "restarted = start_ray(while_waiting=lambda: again.append(1))\n"
        "from ray._private import ray_constants as rc\n"
        "config = ray._private.state.state.get_system_config()\n"
        "print(json.dumps({'started': started, 'calls': calls, 'again': again, 'restarted': restarted,\n"
        "                  'api_server': rc.PROCESS_TYPE_DASHBOARD in node.all_processes,\n"
        "                  'monitor': rc.PROCESS_TYPE_MONITOR in node.all_processes,\n"
        "                  'config': {k: config.get(k) for k in LOCAL_SYSTEM_CONFIG},\n"
        "                  'wanted': LOCAL_SYSTEM_CONFIG}))\n"
        "stop_ray()\n"
    )
    proc = _run(code, env={"RAY_ADDRESS": ""})  # a new local instance, whatever the environment says
    res = _last_json(proc)
    assert res["started"] and len(res["calls"]) == 1, res
    assert not res["restarted"] and res["again"] == [1], res
    import ray._private.services as services
    from ray._private.node import Node

    internals = ((services, "get_node"), (Node, "start_api_server"), (Node, "start_monitor"))
    if all(hasattr(owner, name) for owner, name in internals):  # the internals it uses
        assert res["calls"] == [False] and not res["api_server"] and not res["monitor"], res
    assert res["config"] == res["wanted"], res


def test_a_process_of_the_jobs_own_imports_without_cyclic_collections_and_freezes_what_it_made():
    """TensorFlow's import makes ~300,000 long-lived objects: with the collector on, Python
    walked them in 700-odd collections (0.6–0.7 s of a 3.2–3.7 s import on the benchmark
    machine), and every full collection after walks them again. In a process of the job's own
    they are made with the collector paused and frozen; in any other process nothing changes."""
    code = (
        "import gc, json\n"
        "from distributed_influence import heap\n"
        "seen = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and seen.append(info['generation']))\n"
        "with heap.long_lived():\n"
        "    elsewhere = gc.isenabled()\n"
        "heap.freeze()\n"
        "res = {'elsewhere': elsewhere, 'frozen_elsewhere': gc.get_freeze_count()}\n"
        "heap.own_process()\n"
        "with heap.long_lived():\n"
        "    res['inside'] = gc.isenabled()\n"
        "    from distributed_influence.tfimport import import_tensorflow\n"
        "    import_tensorflow(lean=True)\n"
        "    res['collections'] = len(seen)\n"
        "res.update(after=gc.isenabled(), frozen=gc.get_freeze_count(), tracked=len(gc.get_objects()))\n"
        "print(json.dumps(res))\n"
    )
    proc = _run(code)
    res = _last_json(proc)
    assert res["elsewhere"] and res["frozen_elsewhere"] == 0, res
    assert not res["inside"] and res["after"], res
    # TensorFlow itself may collect explicitly a few times; the collector's own runs are gone.
    assert res["collections"] <= 5, res
    assert res["frozen"] > 100_000 and res["tracked"] < res["frozen"] // 10, res


def test_the_command_freezes_its_heap_before_the_exit_and_returns_mains_code():
    """The interpreter's exit walks every object once more for reference cycles (0.27–0.42 s
    after a run that used Ray); the command's entry point freezes them first, and returns
    main's exit code. ``main`` itself (what tests and notebooks call) freezes nothing. The bad
    ``--k`` stops before the audit starts, so only the entry point can have frozen anything."""
    code = (
        "import gc, json, sys\n"
        "from distributed_influence.cli import main, run\n"
        "args = ['audit', '--model', 'm.keras', '--train', 't.npz', '--test', 't.npz', '--out', 'o', '--k', '0']\n"
        "by_main = main(args)\n"
        "after_main = gc.get_freeze_count()\n"
        "by_run = run(args)\n"
        "print(json.dumps({'main': by_main, 'after_main': after_main, 'run': by_run,\n"
        "                  'after_run': gc.get_freeze_count(), 'enabled': gc.isenabled()}))\n"
    )
    proc = _run(code)
    res = _last_json(proc)
    assert res["main"] == res["run"] == 2 and "--k" in proc.stderr, (res, proc.stderr)
    assert res["after_main"] == 0 and res["after_run"] > 10_000 and res["enabled"], res
