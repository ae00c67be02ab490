"""Pruned against dense scoring on the full Fashion-MNIST audit, side by side in one run.

Why this exists: the pruned scoring path (``--scoring pruned``, the default) claims to give the
same tables as the dense one while scoring a few percent of the (test, train) pairs. This
script checks both claims on the full audit (60,000 train × 10,000 test, the seed-shaped CNN,
d = 1600, k = 10), through the real CLI:

1. reads Fashion-MNIST (or synthetic images of the same shapes, and says so), trains the CNN
   or reuses the one in ``--work-dir``;
2. runs ``distributed-influence audit`` with ``--scoring pruned`` and ``--scoring dense``,
   alternating (pruned, dense, dense, pruned for two rounds), so both see the same machine,
   after one warm-up run (``--scoring dense``, printed, not in the means). Without it the
   first job, always a pruned one, pays for what came before: on this project's 2-core machine
   it was 4 and 8 s slower than the benchmark's other pruned runs in two of three benchmarks
   run after other work (the operating system's caches of TensorFlow's libraries and of the
   data, disk writes still going on);
3. prints, per method, the stage times from the manifest, the top-k scoring time inside the
   workers (the ``score_shard`` calls, without α and the train index), the pairs scored and the
   end-to-end wall time, their ratios, and where the remaining seconds go; the end-to-end
   ratio both as the ratio of the means and as the median of the rounds' ratios (each round
   runs both methods back to back; with three rounds or more, one run slowed by other work
   moves the mean, not the median);
4. compares the three tables exactly: ids, kinds, ranks and every integer column equal, float
   columns bit for bit (the largest difference is printed if they are not).

The machine may be shared: the ratios come from runs side by side, and the load is printed.

Usage::

    python benchmarks/scoring.py                                # the full audit, 2 rounds
    python benchmarks/scoring.py --n-train 6000 --n-test 1000   # a quick reduced run
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import JobRun, load_data, run_benchmark, run_job, train_model, write_npz  # noqa: E402

TABLES = ("influence_topk", "train_scores", "test_scores")
METHODS = ("pruned", "dense")

# Targets (from the issue).
TARGET_PAIRS = 0.05
TARGET_SCORE_SPEEDUP = 8.0
TARGET_END_TO_END = 0.7
#: CPU-s the host may take from a job for other machines (steal) for its round to count as quiet.
QUIET_STEAL = 1.0


def read_table(out: str, name: str):
    """A result table, whether written as a Parquet dataset directory or as one file."""
    import pyarrow.parquet as pq

    path = os.path.join(out, name)
    return pq.read_table(path if os.path.isdir(path) else path + ".parquet")


def compare_tables(out_a: str, out_b: str) -> Dict[str, dict]:
    """Per table: rows, whether every column is equal, and the largest float difference."""
    result = {}
    for name in TABLES:
        a, b = read_table(out_a, name), read_table(out_b, name)
        info = {"rows": a.num_rows, "same_schema": a.schema == b.schema, "same_rows": a.num_rows == b.num_rows,
                "unequal": [], "max_diff": 0.0}
        if info["same_schema"] and info["same_rows"]:
            for col in a.column_names:
                x = a.column(col).to_numpy(zero_copy_only=False)
                y = b.column(col).to_numpy(zero_copy_only=False)
                if x.dtype.kind == "f":
                    same = np.array_equal(x, y, equal_nan=True)
                    if not same:
                        info["max_diff"] = max(info["max_diff"], float(np.nanmax(np.abs(x - y))))
                else:
                    same = np.array_equal(x, y)
                if not same:
                    info["unequal"].append(col)
        result[name] = info
    return result


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Pruned vs dense scoring on the full audit, side by side.")
    p.add_argument("--n-train", type=int, default=60000, help="training examples used (default 60000)")
    p.add_argument("--n-test", type=int, default=10000, help="test examples used (default 10000)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the CNN (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the CNN's initialisation (default 0)")
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of (pruned, dense) runs, alternating the order (default 2)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs (--scoring dense) before the rounds, not in the means (default 1)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX directory (default: the "
                   "dataset-fashion-mnist Debian package, else synthetic data)")
    p.add_argument("--work-dir", default=None,
                   help="inputs, model and outputs; a model.keras and .npz files already there are "
                        "reused (default: a temporary directory, removed at the end)")
    return p.parse_args(argv)


def prepare(args, work: str) -> dict:
    paths = {"train": os.path.join(work, "train.npz"), "test": os.path.join(work, "test.npz"),
             "model": os.path.join(work, "model.keras")}
    if all(os.path.exists(p) for p in paths.values()):
        print(f"reusing the model and data in {work}")
        return paths
    train, test = load_data(args.data_dir, args.n_train, args.n_test)
    write_npz(paths["train"], train.x, train.y)
    write_npz(paths["test"], test.x, test.y)
    kind = "synthetic data (Fashion-MNIST not found)" if train.origin == "synthetic" else \
        f"Fashion-MNIST from {os.path.dirname(train.origin)}"
    print(f"data: {kind}; {len(train.y)} train x {len(test.y)} test")
    trained = train_model(train, test, args.epochs, 0, paths["model"], args.seed)
    print(f"model: the seed's CNN (d = 1600), {args.epochs} epoch(s) in {trained['seconds']:.1f} s, "
          f"test accuracy {trained['test_accuracy']:.3f}")
    return paths


def topk_seconds(run: JobRun) -> float:
    """The slowest worker's top-k scoring (its shards' score_shard calls, which run in parallel)."""
    per_node: Dict[str, float] = {}
    for shard, rec in zip(run.manifest["shards"], run.manifest["scoring"]["shards"]):
        per_node[str(shard["index"] % run.manifest["workers"]["count"])] = (
            per_node.get(str(shard["index"] % run.manifest["workers"]["count"]), 0.0) + rec["seconds"])
    return max(per_node.values())


def summary(runs: List[JobRun]) -> dict:
    """Means over a method's runs of the numbers printed."""
    stages = sorted({k for r in runs for k in r.manifest["timings"]})
    out = {f"stage {k}": float(np.mean([r.manifest["timings"].get(k, 0.0) for r in runs])) for k in stages}
    out["top-k scoring (workers)"] = float(np.mean([topk_seconds(r) for r in runs]))
    out["end to end (wall)"] = float(np.mean([r.wall for r in runs]))
    out["outside run_audit"] = out["end to end (wall)"] - out["stage total"]
    return out


def run_with_retry(paths: dict, out: str, log_path: str, method: str, attempts: int = 3) -> JobRun:
    """One job run; a run whose Ray node did not come up (Ray waits 30 s for its raylet, too
    little on an overloaded machine) is started again, and that is printed: it is no measurement."""
    for attempt in range(1, attempts + 1):
        try:
            return run_job(paths["model"], paths["train"], paths["test"], out, log_path, ("--scoring", method))
        except SystemExit:
            with open(log_path) as fh:
                startup = "timed out during startup" in fh.read()
            if not startup or attempt == attempts:
                raise
            print(f"  {method}: Ray's node did not start in time (machine overloaded); starting the run again",
                  flush=True)
    raise AssertionError("unreachable")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="scoring_bench_")
    os.makedirs(work, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, shared with other work: load average at start "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    try:
        paths = prepare(args, work)
        runs: Dict[str, List[JobRun]] = {m: [] for m in METHODS}
        for i in range(args.warmup):
            out = os.path.join(work, "out_warmup")
            run = run_with_retry(paths, out, os.path.join(work, f"warmup-{i}.log"), "dense")
            print(f"  warm-up {i + 1} (dense, not in the means): wall {run.wall:.2f} s; {run.contention.text()}",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
        for rnd in range(args.rounds):
            for method in (METHODS if rnd % 2 == 0 else METHODS[::-1]):
                out = os.path.join(work, f"out_{method}")
                run = run_with_retry(paths, out, os.path.join(work, f"{method}-{rnd}.log"), method)
                sc = run.manifest["scoring"]
                print(f"  round {rnd + 1} {method}: wall {run.wall:.2f} s, stage score "
                      f"{run.manifest['timings']['score']:.2f} s, top-k {topk_seconds(run):.2f} s, "
                      f"pairs {sc['pairs_scored_fraction']:.3%} ({sc['method']}); {run.contention.text()}",
                      flush=True)
                runs[method].append(run)
        report(runs, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nbenchmark time {time.perf_counter() - t0:.0f} s; load average at the end "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


def report(runs: Dict[str, List[JobRun]], work: str) -> None:
    p, d = summary(runs["pruned"]), summary(runs["dense"])
    n_runs = len(runs["pruned"])
    print(f"\nmeans over {n_runs} run(s) each, seconds   {'pruned':>10} {'dense':>10} {'pruned/dense':>13}")
    for key in p:
        ratio = p[key] / d[key] if d[key] else float("nan")
        print(f"  {key:<36} {p[key]:10.2f} {d[key]:10.2f} {ratio:13.3f}")
    last = {m: runs[m][-1].manifest["scoring"] for m in METHODS}
    for m in METHODS:
        sc = last[m]
        shards = ", ".join(f"{s['pairs_scored_fraction']:.3%}" for s in sc["shards"])
        print(f"  pairs scored, {m:<6}: {sc['pairs_scored']:,} of {sc['pairs_total']:,} = "
              f"{sc['pairs_scored_fraction']:.3%} (per shard: {shards}); (test row, shard) pairs whose 2k "
              f"candidates were re-scored (near-ties at the k-th place): {sc.get('rows_rescored', 0)}, of them "
              f"finished over the whole shard: "
              f"{sc['rows_finished_densely']}; method recorded: {sc['method']}")

    print("\ntables, pruned against dense (last runs):")
    cmp = compare_tables(os.path.join(work, "out_pruned"), os.path.join(work, "out_dense"))
    identical = True
    for name, info in cmp.items():
        same = info["same_schema"] and info["same_rows"] and not info["unequal"]
        identical &= same
        print(f"  {name}: {info['rows']} rows, {'identical' if same else 'DIFFERENT'}"
              + ("" if same else f" (columns {info['unequal']}, max float difference {info['max_diff']:.3g})"))

    pairs = last["pruned"]["pairs_scored_fraction"]
    speed = d["top-k scoring (workers)"] / p["top-k scoring (workers)"]
    stage = d["stage score"] / p["stage score"]
    e2e = p["end to end (wall)"] / d["end to end (wall)"]
    # Each round runs both methods back to back: the round's ratio compares runs minutes apart.
    # With three rounds or more, one run that the machine slowed down moves the mean, not the
    # median of those ratios (other processes' CPU time is printed for every run above).
    per_round = [a.wall / b.wall for a, b in zip(runs["pruned"], runs["dense"])]
    e2e_median = float(np.median(per_round))
    print("\ntargets")
    print(f"  tables identical: {'yes' if identical else 'no'}  {ok(identical)}")
    print(f"  pairs scored <= {TARGET_PAIRS:.0%} of m x n: {pairs:.3%}  {ok(pairs <= TARGET_PAIRS)}")
    # The scoring this issue prunes is the (test, train) pairs' (score_shard). The manifest's
    # score stage also holds the α pass and the train index's write, the same work in both
    # paths: its ratio is printed, and it is not what the target measures.
    print(f"  scoring of the pairs (top-k, score_shard) >= {TARGET_SCORE_SPEEDUP:.0f}x faster than dense: "
          f"{speed:.1f}x  {ok(speed >= TARGET_SCORE_SPEEDUP)}  (the manifest's whole score stage, with the "
          f"alpha pass and the train index both paths do alike: {stage:.1f}x)")
    print(f"  end to end <= {TARGET_END_TO_END} x dense, ratio of the means: {e2e:.3f} x  "
          f"{ok(e2e <= TARGET_END_TO_END)}")
    print(f"  end to end <= {TARGET_END_TO_END} x dense, median of the rounds' ratios: {e2e_median:.3f} x  "
          f"{ok(e2e_median <= TARGET_END_TO_END)}  (rounds: {', '.join(f'{r:.3f}' for r in per_round)})")
    # Not a target, a diagnosis: on a virtual machine the host may run other machines on this
    # one's cores (steal); the rounds where it took little from either job show the code's ratio.
    quiet = [r for r, a, b in zip(per_round, runs["pruned"], runs["dense"])
             if max(a.contention.steal, b.contention.steal) < QUIET_STEAL]
    if quiet:
        print(f"  (not a target) the rounds where the host took under {QUIET_STEAL:g} CPU-s from each job for "
              f"other machines: {len(quiet)} of {len(per_round)}, median ratio {float(np.median(quiet)):.3f} x, "
              f"range {min(quiet):.3f} to {max(quiet):.3f}")
    else:
        print(f"  (not a target) in every round the host took {QUIET_STEAL:g} CPU-s or more from a job "
              f"for other machines")


def ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


if __name__ == "__main__":
    sys.exit(run_benchmark("scoring", main))
