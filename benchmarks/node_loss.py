"""A node lost during scoring of the full Fashion-MNIST audit, with no spare capacity.

Why this exists: big batch jobs run on preemptible machines, so the project claims that losing
a node costs time, not the audit: the lost worker's shards move to the surviving workers, which
featurize those rows again from storage and carry on, and the tables come out identical. This
script checks that on the full audit (60,000 train × 10,000 test, k = 10), as a user would try
it, and measures what the loss costs:

1. trains the seed-shaped CNN (benchmarks/common.py) and writes the inputs;
2. starts ``ray.cluster_utils.Cluster`` on loopback in this process: a head with no CPUs (the
   driver) and three 1-CPU worker nodes, so a lost worker has no free slot to restart on;
3. runs the audit (9 shards, 3 workers) undisturbed;
4. runs it again and, a few seconds into the scoring stage, removes one worker node (its
   processes killed without warning unless ``--graceful``);
5. compares the two runs' tables column by column (exact equality) and prints both runs' stage
   times and the manifest's ``recovery`` section.

Every number printed is measured in the run that prints it.

Usage::

    python benchmarks/node_loss.py                               # the full audit
    python benchmarks/node_loss.py --n-train 6000 --n-test 1000  # a quick reduced run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import List, Optional

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import K, load_data, run_benchmark, train_model, write_npz  # noqa: E402 - the benchmarks' shared helpers

#: Worker nodes of the cluster (one 1-CPU worker each) and shards of the audit.
NODES = 3
SHARDS = 9
#: Object store of each node: the test features (10,000 × 1601 float32 = 64 MB) fit in it.
OBJECT_STORE_BYTES = 400 * 1024 * 1024
TABLES = ("influence_topk", "train_scores", "test_scores")


class RemoveDuringScoring(logging.Handler):
    """Removes a worker node ``delay`` seconds after the driver logs the start of scoring."""

    def __init__(self, cluster, delay: float, graceful: bool):
        super().__init__(logging.INFO)
        self.cluster, self.delay, self.graceful = cluster, delay, graceful
        self.removed: Optional[str] = None
        self.at: Optional[float] = None
        self.timer: Optional[threading.Timer] = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.timer is None and record.getMessage() == "stage score: started":
            self.timer = threading.Timer(self.delay, self._remove)
            self.timer.start()

    def _remove(self) -> None:
        node = sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)[0]
        self.at = time.perf_counter()
        self.cluster.remove_node(node, allow_graceful=self.graceful)
        self.removed = node.node_id
        print(f"  removed node {node.node_id[:12]} ({'graceful' if self.graceful else 'killed'}) "
              f"{self.delay:g} s into scoring", flush=True)


def audit(paths: dict, out: str, restart_wait: float):
    """One audit on the running cluster; returns (manifest, wall seconds)."""
    from distributed_influence.cluster import recovery
    from distributed_influence.config import AuditConfig
    from distributed_influence.engine.job import run_audit

    recovery.RESTART_WAIT = restart_wait
    shutil.rmtree(out, ignore_errors=True)
    config = AuditConfig(model=paths["model"], train=paths["train"], test=paths["test"], out=out, k=K,
                         shards=SHARDS)
    t0 = time.perf_counter()
    manifest = run_audit(config, use_ray=True)
    return manifest, time.perf_counter() - t0


def compare(out_a: str, out_b: str) -> bool:
    """Prints, per table, whether every column is exactly equal; returns whether all are."""
    from distributed_influence import load_results

    a, b = load_results(out_a), load_results(out_b)
    same = True
    for name in TABLES:
        ta, tb = getattr(a, name), getattr(b, name)
        diffs = []
        if ta.schema != tb.schema or ta.num_rows != tb.num_rows:
            diffs.append(f"schema/rows differ ({ta.num_rows} vs {tb.num_rows})")
        else:
            for col in ta.column_names:
                x = ta.column(col).to_numpy(zero_copy_only=False)
                y = tb.column(col).to_numpy(zero_copy_only=False)
                if x.dtype.kind == "f":
                    if not np.array_equal(x, y, equal_nan=True):
                        diffs.append(f"{col}: max |diff| {np.nanmax(np.abs(x - y)):.3g}")
                elif not np.array_equal(x, y):
                    diffs.append(f"{col}: {int(np.sum(x != y))} values differ")
        same &= not diffs
        print(f"  {name}: {ta.num_rows} rows, " + ("identical" if not diffs else "DIFFERENT: " + "; ".join(diffs)))
    return same


def stage_line(label: str, manifest: dict, wall: float) -> str:
    t = manifest["timings"]
    stages = ", ".join(f"{s} {t[s]:.1f} s" for s in ("featurize", "fit", "score", "reduce") if s in t)
    return f"{label}: {wall:.1f} s wall ({stages})"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Remove a worker node during the scoring of the full "
                                            "Fashion-MNIST audit; compare with an undisturbed run.")
    p.add_argument("--n-train", type=int, default=60000, help="training examples used (default 60000)")
    p.add_argument("--n-test", type=int, default=10000, help="test examples used (default 10000)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs of the CNN (default 1)")
    p.add_argument("--delay", type=float, default=3.0, help="seconds into scoring the node is removed (3)")
    p.add_argument("--graceful", action="store_true",
                   help="let the node's processes shut down (default: killed, like a preempted VM)")
    p.add_argument("--restart-wait", type=float, default=None,
                   help="seconds a lost worker may take to come back (default: the package's)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: the Debian package)")
    p.add_argument("--work-dir", default=None, help="inputs and outputs (default: a temporary directory)")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  %(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed_influence").setLevel(logging.INFO)
    from distributed_influence.cluster import recovery

    restart_wait = recovery.RESTART_WAIT if args.restart_wait is None else args.restart_wait
    work = args.work_dir or tempfile.mkdtemp(prefix="node_loss_")
    os.makedirs(work, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs; load average at start "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; work dir {work}", flush=True)
    cluster = None
    try:
        train, test = load_data(args.data_dir, args.n_train, args.n_test)
        paths = {"train": write_npz(os.path.join(work, "train.npz"), train.x, train.y),
                 "test": write_npz(os.path.join(work, "test.npz"), test.x, test.y),
                 "model": os.path.join(work, "model.keras")}
        trained = train_model(train, test, args.epochs, 0, paths["model"], seed=0)
        origin = "synthetic" if train.origin == "synthetic" else "Fashion-MNIST"
        print(f"data: {origin}, {len(train.y)} train x {len(test.y)} test; CNN {args.epochs} epoch(s), "
              f"test accuracy {trained['test_accuracy']:.3f}", flush=True)

        import ray
        from ray.cluster_utils import Cluster

        from distributed_influence.cluster.compat import use_loopback

        use_loopback()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES})
        for _ in range(NODES):
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE_BYTES)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        print(f"cluster: head with 0 CPUs + {NODES} worker nodes with 1 CPU each (loopback); "
              f"{SHARDS} shards; lost workers waited for {restart_wait:g} s", flush=True)

        print("run 1: undisturbed", flush=True)
        m_a, wall_a = audit(paths, os.path.join(work, "out_a"), restart_wait)
        print("run 2: a worker node removed during scoring", flush=True)
        remover = RemoveDuringScoring(cluster, args.delay, args.graceful)
        logging.getLogger("distributed_influence.engine.job").addHandler(remover)
        try:
            m_b, wall_b = audit(paths, os.path.join(work, "out_b"), restart_wait)
        finally:
            logging.getLogger("distributed_influence.engine.job").removeHandler(remover)
        if remover.removed is None:
            print("the node was not removed (scoring ended first): use a smaller --delay")
            return 1

        print("\nresults")
        print(stage_line("  run 1, undisturbed", m_a, wall_a))
        print(stage_line("  run 2, node lost  ", m_b, wall_b))
        print(f"  cost of the loss: {wall_b - wall_a:+.1f} s wall, scoring stage "
              f"{m_b['timings']['score'] - m_a['timings']['score']:+.1f} s")
        print("  recovery (manifest): " + json.dumps(m_b["recovery"]))
        identical = compare(os.path.join(work, "out_a"), os.path.join(work, "out_b"))
        print(f"\ntables identical to the undisturbed run: {'yes' if identical else 'NO'}; "
              f"load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        return 0 if identical else 1
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_benchmark("node_loss", main))
