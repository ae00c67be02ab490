"""Shared fixtures: tiny Keras models of every supported shape, saved as real `.keras` files,
and small data sets written as real `.npz` / Parquet files."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from distributed_influence import testing

N_FEATURES = 6
N_CLASSES = 3


def blobs(n: int, seed: int, n_features: int = N_FEATURES, n_classes: int = N_CLASSES):
    """Gaussian blobs: a classification problem a tiny model learns in a few epochs."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(0, 2.0, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n)
    x = centers[y] + rng.normal(0, 1.0, size=(n, n_features))
    return x.astype(np.float32), y.astype(np.int64)


def _fit(model, x, y, epochs=5):
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)


def multi_output_model(x, y):
    """The seed's shape: a functional model with outputs [features, logits, softmax]."""
    import keras

    keras.utils.set_random_seed(1)
    inp = keras.Input((x.shape[1],))
    f = keras.layers.Dense(8, activation="relu", name="features")(inp)
    z = keras.layers.Dense(N_CLASSES, name="logits")(f)
    p = keras.layers.Activation("softmax", name="softmax")(z)
    _fit(keras.Model(inp, p), x, y)
    return keras.Model(inp, [f, z, p])


def sequential_activation_model(x, y):
    import keras

    keras.utils.set_random_seed(2)
    m = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(N_CLASSES),
        keras.layers.Activation("softmax"),
    ])
    _fit(m, x, y)
    return m


def functional_fused_model(x, y):
    import keras

    keras.utils.set_random_seed(3)
    inp = keras.Input((x.shape[1],))
    h = keras.layers.Dense(8, activation="relu")(inp)
    p = keras.layers.Dense(N_CLASSES, activation="softmax")(h)
    m = keras.Model(inp, p)
    _fit(m, x, y)
    return m


def sequential_softmax_layer_model(x, y):
    import keras

    keras.utils.set_random_seed(4)
    m = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(7, activation="relu"),
        keras.layers.Dense(N_CLASSES),
        keras.layers.Softmax(),
    ])
    _fit(m, x, y)
    return m


def named_layers_model(x, y):
    """Ends in a sigmoid, so only --feature-layer/--logit-layer can say where the head is."""
    import keras

    keras.utils.set_random_seed(5)
    inp = keras.Input((x.shape[1],))
    f = keras.layers.Dense(8, activation="relu", name="embed")(inp)
    z = keras.layers.Dense(N_CLASSES, name="scores")(f)
    out = keras.layers.Activation("sigmoid", name="squash")(z)
    return keras.Model(inp, out)


MODEL_FACTORIES = {
    "multi_output": multi_output_model,
    "sequential_activation": sequential_activation_model,
    "functional_fused": functional_fused_model,
    "sequential_softmax_layer": sequential_softmax_layer_model,
}


#: Row ranges every source is read by in the source tests: whole, edges, middle, empty.
RANGES = [(0, 50), (0, 1), (7, 23), (49, 50), (10, 10)]


@pytest.fixture
def arrays():
    """50 rows of (4, 3) examples, labels, and ids not in row order."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=50)
    ids = rng.permutation(1000)[:50].astype(np.int64)
    return x, y, ids


@pytest.fixture(scope="session")
def data():
    x_tr, y_tr = blobs(60, seed=0)
    x_te, y_te = blobs(20, seed=1)
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="session")
def files(tmp_path_factory, data):
    """A multi-output model and npz sources on disk, shared by the session."""
    x_tr, y_tr, x_te, y_te = data
    root = tmp_path_factory.mktemp("inputs")
    model = multi_output_model(x_tr, y_tr)
    model_path = str(root / "model.keras")
    model.save(model_path)
    train = str(root / "train.npz")
    test = str(root / "test.npz")
    np.savez(train, x=x_tr, y=y_tr)
    np.savez(test, x=x_te, y=y_te)
    return {"model": model_path, "train": train, "test": test, "root": root}


def audit_config(files, out, k=4, **kw):
    """The audit settings of `files` (model, train, test) writing to `out`."""
    from distributed_influence.config import AuditConfig

    return AuditConfig(model=files["model"], train=files["train"], test=files["test"], out=str(out), k=k, **kw)


@pytest.fixture(scope="session")
def reference(files, tmp_path_factory):
    """The single-process engine's tables (k = 4) on `files`: what every distributed run must equal."""
    from distributed_influence.engine.job import run_audit

    out = str(tmp_path_factory.mktemp("ref") / "out")
    run_audit(audit_config(files, out, k=4), use_ray=False)
    return out


def read(out: str, name: str):
    """One table of an output directory, from its part files (``OUT/NAME/part-*.parquet``)."""
    import pyarrow.parquet as pq

    path = os.path.join(out, name)
    assert os.path.isdir(path), f"{path}: not a dataset directory"
    return pq.read_table(path)


def assert_same_results(out_a: str, out_b: str, rtol: float = 1e-5) -> None:
    """Tables of two runs: same ids, kinds and ranks; float columns within rtol (relative to scale)."""
    from distributed_influence.store import tables

    for name in tables.TABLES:
        a = read(out_a, name)
        b = read(out_b, name)
        assert a.schema == b.schema and a.num_rows == b.num_rows, name
        for col in a.column_names:
            x, y = a.column(col).to_numpy(zero_copy_only=False), b.column(col).to_numpy(zero_copy_only=False)
            if col == "decomposition_error":  # float rounding residue: small in both, not equal
                assert np.all(x <= 1e-5) and np.all(y <= 1e-5), name
            elif x.dtype.kind == "f":
                scale = max(np.nanmax(np.abs(x)), 1e-30)
                np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale * 1e-2, err_msg=f"{name}:{col}")
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"{name}:{col}")


#: What the command line puts before the one line of a refusal.
ERROR_PREFIX = "distributed-influence: error: "


def assert_one_line_refusal(capsys, code: int) -> str:
    """Checks a refusal of bad input as users see it: exit code 2 and exactly one line on
    stderr, with the command's prefix (a traceback or a second line would bury the problem, and
    scripts tell bad input from a crash by the code).

    Call it right after the command ran in this process (``main([...])``), with what it returned.

    Returns:
        The line, without the prefix.
    """
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), err
    return lines[0][len(ERROR_PREFIX):]


def loopback_cluster(head_cpus: int, worker_nodes: int, **head_args):
    """A `ray.cluster_utils.Cluster` on loopback with this process as its driver (Ray needs the
    driver here for several raylets on one address); a generator for module fixtures."""
    import ray
    from ray.cluster_utils import Cluster

    from distributed_influence.cluster.compat import use_loopback

    use_loopback()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, **head_args})
    for _ in range(worker_nodes):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env=testing.runtime_env())  # fault injection in its workers
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="session", autouse=True)
def fault_file(tmp_path_factory):
    """The file that names the fault to inject (see ``distributed_influence.testing``), known to
    every Ray instance the tests start: its name is in the environment before any of them."""
    path = tmp_path_factory.mktemp("faults") / "fault"
    os.environ[testing.FAULT_FILE_ENV] = str(path)
    yield path
    os.environ.pop(testing.FAULT_FILE_ENV, None)


@pytest.fixture
def inject_fault(fault_file, monkeypatch):
    """``inject_fault(text)`` makes the fault ``text`` strike (``None`` ends it); the driver's
    wrappers are installed here and removed after the test. Ray workers need a Ray instance
    started with ``testing.runtime_env()``."""
    testing.install(monkeypatch.setattr)

    def inject(text):
        if text:
            fault_file.write_text(text)
        else:
            fault_file.unlink(missing_ok=True)

    yield inject
    fault_file.unlink(missing_ok=True)
