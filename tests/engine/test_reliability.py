"""Reliability: worker loss, driver crash and resume, out-of-memory back-off, deterministic failures."""

import logging
import os

import numpy as np
import pytest
from conftest import assert_same_results, audit_config

from distributed_influence import testing
from distributed_influence.cluster.runtime import start_ray
from distributed_influence.config import AuditConfig
from distributed_influence.engine.job import run_audit
from distributed_influence.errors import ConfigError, SourceError
from distributed_influence.method import representer as rp
from distributed_influence.store import tables
from distributed_influence.testing import InjectedFault

pytestmark = pytest.mark.slow  # a Ray instance or cluster of its own: the inner loop skips it


@pytest.fixture(scope="module")
def ray_local():
    import ray

    start_ray(num_cpus=2, runtime_env=testing.runtime_env())  # fault injection in its workers
    yield ray
    ray.shutdown()


def test_worker_killed_mid_scoring_is_restarted_and_results_unchanged(ray_local, files, reference, tmp_path,
                                                                        inject_fault, monkeypatch):
    marker = tmp_path / "killed"
    inject_fault(f"kill-worker:1:{marker}")
    out = str(tmp_path / "out")
    run_audit(audit_config(files, out, shards=4), use_ray=True)
    assert marker.exists()  # the worker scoring shard 1 really died (its pid is in the file)
    assert int(marker.read_text()) != os.getpid()
    assert_same_results(reference, out)


def test_driver_crash_then_rerun_reuses_finished_shards(ray_local, files, reference, tmp_path, inject_fault):
    out = str(tmp_path / "out")
    inject_fault("stop-driver-after:2")
    with pytest.raises(InjectedFault):
        run_audit(audit_config(files, out, shards=5), use_ray=True)
    # A failed run leaves no final table, and keeps its partial results.
    assert not set(os.listdir(out)) & set(tables.TABLES)
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    work = os.path.join(out, "_work")
    (key,) = os.listdir(work)
    assert len([f for f in os.listdir(os.path.join(work, key)) if f.startswith("shard-")]) == 2

    # Other settings must not mix with these partials (refused before any work: checked in
    # process, the same check as under Ray, without starting workers).
    inject_fault(None)
    with pytest.raises(ConfigError, match="different job"):
        run_audit(audit_config(files, out, shards=5, lam=0.01), use_ray=False)

    m = run_audit(audit_config(files, out, shards=5), use_ray=True)
    assert len(m["resume"]["reused_shards"]) == 2
    assert len(m["resume"]["computed_shards"]) == 3
    assert sorted(m["resume"]["reused_shards"] + m["resume"]["computed_shards"]) == list(range(5))
    assert m["resume"]["fit_reused"] is True
    # One node: every shard featurized and scored there, the reused ones as their records say.
    here = ray_local.get_runtime_context().get_node_id()
    assert [(s["featurized_on"], s["scored_on"], s["node"]) for s in m["shards"]] == [(here, here, here)] * 5
    assert not os.path.exists(work)  # partials dropped once the tables are written
    assert_same_results(reference, out)

    # Results of a different job are refused too, unless --overwrite.
    with pytest.raises(ConfigError, match="different job"):
        run_audit(audit_config(files, out, shards=5, lam=0.01), use_ray=False)
    m2 = run_audit(audit_config(files, out, shards=5, lam=0.01, overwrite=True), use_ray=False)
    assert m2["lambda"] == 0.01


def test_bad_row_in_one_shard_fails_the_job_with_its_reason(ray_local, files, tmp_path):
    d = np.load(files["train"])
    x = d["x"].copy()
    x[45, 0] = np.inf
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, x=x, y=d["y"])
    with pytest.raises(SourceError, match="NaN or inf values \\(first in row 45\\)"):
        run_audit(AuditConfig(model=files["model"], train=bad, test=files["test"], out=str(tmp_path / "o"),
                              k=4, shards=3), use_ray=True)
    assert not os.path.exists(os.path.join(tmp_path, "o", "manifest.json"))


def test_out_of_memory_in_forward_pass_halves_the_batch(files, data, caplog):
    import tensorflow as tf

    from distributed_influence.data.model import Featurizer, load_model, read_model_bytes, split_model

    split = split_model(load_model(read_model_bytes(files["model"]), "model.keras"))
    x = data[0]
    expected = Featurizer(split, batch_size=64)(x)
    fz = Featurizer(split, batch_size=64)
    real = fz.forward
    seen = []

    def forward_with_small_memory(batch):
        seen.append(len(batch))
        if len(batch) > 16:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor (injected)")
        return real(batch)

    fz.forward = forward_with_small_memory
    with caplog.at_level(logging.WARNING):
        got = fz(x)
    assert seen[:3] == [60, 32, 16] and fz.batch_size == 16
    assert "batch size now 16" in caplog.text
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


def test_out_of_memory_while_scoring_halves_the_test_block(monkeypatch, caplog):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rp.augment(rng.normal(size=(30, 4)))
    xt = rp.augment(rng.normal(size=(25, 4)))
    alpha = rng.normal(size=(30, 3)) * 1e-2
    pred = rng.integers(0, 3, size=25)
    ids = np.arange(30)
    from distributed_influence.method import dense, scoring

    expected = scoring.score_shard(x, ids, alpha, xt, pred, 4, 25, method="dense", abs_sums=True)
    real = dense.score_block

    def score_block_with_small_memory(xt_block, *args, **kwargs):
        if len(xt_block) > 6:
            raise tf.errors.ResourceExhaustedError(None, None, "OOM (injected)")
        return real(xt_block, *args, **kwargs)

    monkeypatch.setattr(dense, "score_block", score_block_with_small_memory)
    with caplog.at_level(logging.WARNING):
        got = scoring.score_shard(x, ids, alpha, xt, pred, 4, 25, method="dense", abs_sums=True)
    assert "test block now 6" in caplog.text
    for kind in ("proponent", "opponent"):
        np.testing.assert_array_equal(got["topk"][kind]["ids"], expected["topk"][kind]["ids"])
        np.testing.assert_allclose(got["topk"][kind]["values"], expected["topk"][kind]["values"], rtol=1e-6)
    np.testing.assert_allclose(got["influence_abs_sum"], expected["influence_abs_sum"], rtol=1e-6)


def test_in_process_run_resumes_after_a_crash(files, reference, tmp_path, inject_fault):
    out = str(tmp_path / "out")
    inject_fault("stop-driver-after:1")
    with pytest.raises(InjectedFault):
        run_audit(audit_config(files, out, shards=3), use_ray=False)
    inject_fault(None)
    m = run_audit(audit_config(files, out, shards=3, test_block=7), use_ray=False)  # test_block: same job
    assert m["resume"]["reused_shards"] == [0] and m["resume"]["fit_reused"] is True
    assert_same_results(reference, out)


def test_unwritable_output_is_refused_before_any_work(files, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write results there"):
        run_audit(audit_config(files, str(blocker / "out")), use_ray=False)
    assert blocker.read_text() == "not a directory"


def test_a_reduce_task_lost_mid_run_is_retried_and_changes_nothing(ray_local, files, reference, tmp_path,
                                                                    inject_fault, monkeypatch):
    from distributed_influence.engine import reduce as rd

    monkeypatch.setattr(rd, "REDUCE_ROWS", 7)  # 20 test rows: three reduce tasks
    marker = tmp_path / "reducer-killed"
    inject_fault(f"kill-reducer:1:{marker}")
    out = str(tmp_path / "out")
    m = run_audit(audit_config(files, out, shards=3), use_ray=True)
    assert marker.exists() and int(marker.read_text()) != os.getpid()
    assert m["reduce"]["test_parts"] == 3 and len(m["tables"]["influence_topk"]) == 3
    assert_same_results(reference, out)


def test_driver_crash_in_reduce_then_rerun_reuses_finished_parts(ray_local, files, reference, tmp_path,
                                                                  inject_fault, monkeypatch):
    from distributed_influence.engine import reduce as rd

    monkeypatch.setattr(rd, "REDUCE_ROWS", 7)
    out = str(tmp_path / "out")
    inject_fault("stop-driver-after-reduce:2")
    with pytest.raises(InjectedFault):
        run_audit(audit_config(files, out, shards=3), use_ray=True)
    assert not set(os.listdir(out)) & set(tables.TABLES)  # nothing published
    inject_fault(None)
    m = run_audit(audit_config(files, out, shards=3), use_ray=True)
    assert len(m["resume"]["reused_shards"]) == 3
    assert len(m["reduce"]["reused_parts"]) == 2
    assert m["reduce"]["test_parts"] == 3 and m["reduce"]["train_parts"] == 3
    assert_same_results(reference, out)
