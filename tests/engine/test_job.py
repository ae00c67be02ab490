"""The distributed job on a real local Ray instance (one per module), against the single-process engine."""

import numpy as np
import pytest
from conftest import assert_same_results, audit_config

from distributed_influence.cluster.runtime import plan_workers, start_ray
from distributed_influence.engine.job import run_audit

pytestmark = pytest.mark.slow  # a Ray instance or cluster of its own: the inner loop skips it


@pytest.fixture(scope="module")
def ray_local():
    import ray

    start_ray(num_cpus=2, num_gpus=2)  # two logical GPUs: Ray schedules them, TensorFlow finds none
    yield ray
    ray.shutdown()


def test_sharded_ray_job_equals_single_process(ray_local, files, reference, tmp_path):
    """Several shards per worker (3 on 2: one worker holds two), on CPU workers, which hide every
    GPU from TensorFlow."""
    shards = 3
    out = str(tmp_path / "out")
    m = run_audit(audit_config(files, out, shards=shards, gpus_per_worker=0), use_ray=True)
    assert m["workers"]["backend"] == "ray"
    assert len(m["shards"]) == shards
    assert sum(s["rows"] for s in m["shards"]) == 60
    assert m["workers"]["count"] == min(2, shards)
    for d in m["workers"]["devices"]:
        assert d["ray_gpu_ids"] == [] and d["cuda_visible_devices"] == ""
    assert_same_results(reference, out)


def test_gpu_workers_each_get_their_own_gpu(ray_local, files, reference, tmp_path):
    assert plan_workers(None, None, None) == (2, 1.0, 1.0)  # GPUs present: one worker per GPU
    out = str(tmp_path / "out")
    m = run_audit(audit_config(files, out, shards=4, gpus_per_worker=1), use_ray=True)
    devices = m["workers"]["devices"]
    assert len(devices) == 2
    gpu_ids = [d["ray_gpu_ids"] for d in devices]
    assert all(len(g) == 1 for g in gpu_ids) and gpu_ids[0] != gpu_ids[1]
    for d in devices:
        assert d["cuda_visible_devices"] == d["ray_gpu_ids"][0]
        assert d["tf_gpus"] == []  # no GPU on this machine: TensorFlow runs on the CPU
    assert m["workers"]["gpus_per_worker"] == 1.0
    assert_same_results(reference, out)


def test_fit_worker_api_returns_only_sums(ray_local, files):
    """The driver receives (d+1)×C sums per shard, never training features."""
    from distributed_influence.cluster.pool import RayPool
    from distributed_influence.data.inputs import prepare_inputs
    from distributed_influence.engine.plan import WorkerSettings, plan_shards

    cfg = audit_config(files, "unused")
    inputs = prepare_inputs(cfg)
    settings = WorkerSettings(model_name="model.keras", train=cfg.train, test=cfg.test, target="labels",
                              lam=cfg.lam, k=cfg.k, n_train=60, batch_size=16, test_block=8)
    pool = RayPool(inputs.model_bytes, settings, 2, 1.0, 0.0)
    try:
        specs = plan_shards(60, 3)
        theta = inputs.split.theta()
        for loss, grad in pool.map("objective", specs, theta):
            assert isinstance(loss, float)
            assert grad.shape == theta.shape == (inputs.split.feature_dim + 1, inputs.n_classes)
        for hv in pool.map("hvp", specs, theta, np.ones_like(theta)):
            assert hv.shape == theta.shape
        for moments in pool.map("fidelity", specs, theta):
            assert moments.shape == (7,)
    finally:
        pool.shutdown()


@pytest.mark.parametrize("target", ["labels", "predictions"])
def test_worker_drops_the_logits_after_the_fit_only_when_nothing_needs_them(files, target):
    """After the fidelity call a labels-fit worker frees its shards' logits; the scoring's
    per-train columns, a repeated fidelity call and the fit's targets do not change."""
    from distributed_influence.data.inputs import prepare_inputs
    from distributed_influence.engine.plan import WorkerSettings, plan_shards
    from distributed_influence.engine.shard import ShardWorker
    from distributed_influence.method import representer as rp

    cfg = audit_config(files, "unused")
    inputs = prepare_inputs(cfg)
    settings = WorkerSettings(model_name="model.keras", train=cfg.train, test=cfg.test, target=target,
                              lam=cfg.lam, k=cfg.k, n_train=60, batch_size=16, test_block=8)
    worker = ShardWorker(inputs.model_bytes, settings)
    spec = plan_shards(60, 2)[1]
    theta = inputs.split.theta()
    d = worker._data(spec)
    logits = d.logits.copy()
    targets = d.targets[:].copy()
    first = worker.fidelity(spec, theta)
    assert (worker._data(spec).logits is None) == (target == "labels")
    np.testing.assert_array_equal(worker.fidelity(spec, theta), first)  # asked again: the same
    d = worker._data(spec)
    np.testing.assert_array_equal(d.targets[:], targets)
    np.testing.assert_array_equal(d.predicted, np.argmax(logits, axis=1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(d.label_probability, probs[np.arange(len(probs)), d.labels], rtol=1e-6)
    expected = rp.one_hot(d.labels, logits.shape[1]) if target == "labels" else probs
    np.testing.assert_allclose(targets, expected, rtol=1e-6, atol=1e-12)


def test_a_shard_writes_its_train_index_as_scored_and_a_failed_write_fails_the_call(files, tmp_path):
    """The shard's train index holds its rows, features and α as scored; a write that fails is
    the call's error."""
    from distributed_influence.data.inputs import prepare_inputs
    from distributed_influence.engine.plan import WorkerSettings, plan_shards
    from distributed_influence.engine.shard import ShardWorker
    from distributed_influence.store import index

    cfg = audit_config(files, "unused")
    inputs = prepare_inputs(cfg)
    spec = plan_shards(60, 2)[0]
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the index folder should be")
    for index_dir, fails in ((str(tmp_path / "index"), False), (str(blocker / "index"), True)):
        settings = WorkerSettings(model_name="model.keras", train=cfg.train, test=cfg.test, target="labels",
                                  lam=cfg.lam, k=cfg.k, n_train=60, batch_size=16, test_block=8,
                                  index_dir=index_dir)
        worker = ShardWorker(inputs.model_bytes, settings)
        # A test part as the workers' featurize_test leaves it: features and the model's logits.
        part = {"x": worker._data(spec).x[:5].copy(), "logits": np.zeros((5, 3), np.float32)}
        if fails:
            with pytest.raises(OSError):
                worker.score(spec, inputs.split.theta(), [part], np.zeros(5, np.int64))
            continue
        result = worker.score(spec, inputs.split.theta(), [part], np.zeros(5, np.int64))
        stored = index.read_shard(index.shard_file(index_dir, spec.index))
        np.testing.assert_array_equal(stored["ids"], result["train"]["train_id"])
        np.testing.assert_array_equal(stored["x"], worker._data(spec).x)
        np.testing.assert_array_equal(stored["alpha"][np.arange(len(stored["ids"])), stored["labels"]],
                                      result["train"]["alpha_label"])
