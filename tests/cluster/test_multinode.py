"""Two Ray nodes (ray.cluster_utils.Cluster on loopback): shards run on both, tables unchanged."""

import pytest
from conftest import assert_same_results, audit_config, loopback_cluster

from distributed_influence.engine.job import run_audit

pytestmark = pytest.mark.slow  # a Ray instance or cluster of its own: the inner loop skips it


@pytest.fixture(scope="module")
def cluster():
    yield from loopback_cluster(1, 1)


def test_two_nodes_share_the_shards_and_match_single_process(cluster, files, reference, tmp_path):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    out = str(tmp_path / "out")
    m = run_audit(audit_config(files, out, k=4, shards=4), use_ray=True)
    shard_nodes = {s["node"] for s in m["shards"]}
    assert len(shard_nodes) == 2, m["shards"]
    assert m["workers"]["nodes"] == 2
    assert {d["node"] for d in m["workers"]["devices"]} == shard_nodes
    assert_same_results(reference, out)
