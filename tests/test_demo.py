"""The README's main command, `distributed-influence demo`, on a reduced size, through Ray."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from distributed_influence.cli import main

pytestmark = pytest.mark.slow  # trains a CNN and starts Ray: the inner loop skips it


def test_demo_finds_flipped_labels(tmp_path, capsys):
    import psutil  # in the test extra (Ray depends on it too)
    import ray

    assert not ray.is_initialized()  # the demo starts, and must stop, a Ray instance of its own
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--n-train", "600", "--epochs", "25"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # Every process of the demo's Ray instance must be gone, and nothing about Ray's autoscaler
    # monitor said on stderr while it stopped.
    assert not ray.is_initialized()
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(started, timeout=10)
    assert not alive, [p.cmdline()[:3] for p in alive]
    assert "autoscaler" not in captured.err.lower(), captured.err[-2000:]
    for name in ("influence_topk", "train_scores", "test_scores"):
        assert os.path.isfile(os.path.join(out, name, "part-00000.parquet")), name
    assert os.path.isfile(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "manifest.json")) as fh:
        manifest = json.load(fh)
    assert manifest["workers"]["backend"] == "ray"
    test = pq.read_table(os.path.join(out, "test_scores")).to_pydict()
    z = np.abs(np.array(test["surrogate_logit"], dtype=np.float64))
    assert np.all(np.array(test["decomposition_error"]) <= 1e-4 * np.maximum(1.0, z))

    # Independently of the demo's own count: flipped ids from its data dir vs the audit ranks.
    flipped = np.loadtxt(os.path.join(out, "data", "flipped_ids.txt"), dtype=np.int64)
    assert len(flipped) == 60
    train = pq.read_table(os.path.join(out, "train_scores")).to_pydict()
    rank = dict(zip(train["train_id"], train["audit_rank"]))
    found = np.mean([rank[i] <= 0.2 * len(rank) for i in flipped])
    assert found >= 0.5, found
    with open(os.path.join(out, "demo.json")) as fh:
        assert json.load(fh)["flipped_found"]["top_20pct"] == found
    assert f"{found:.0%} in the top 20%" in printed
