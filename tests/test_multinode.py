"""Two Ray nodes (ray.cluster_utils.Cluster on loopback): shards run on both, tables unchanged."""

import pytest

from distributed_influence.job import run_audit
from distributed_influence.runtime import use_loopback

from conftest import assert_same_results, audit_config


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    use_loopback()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address)
    yield c
    ray.shutdown()
    c.shutdown()


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
