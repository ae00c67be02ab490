"""The full Fashion-MNIST audit, timed and measured against targets.

Why this exists: the project claims that auditing a whole data set through Ray costs little
more than the same math done by hand in one process, that the scoring stage runs near the
machine's matrix-product speed, and that a worker's memory does not grow with the number of
(test × train) pairs. This script checks those claims on the full Fashion-MNIST audit
(60,000 train × 10,000 test, k = 10) from one run, on whatever machine runs it:

1. trains a small CNN of the seed's shape (Conv-Pool-Conv-Pool-Flatten-Dense logits-softmax,
   the flattened conv output being the d = 1600 features; saved with outputs
   [features, logits, softmax]);
2. runs ``distributed-influence audit`` as a subprocess (Ray started locally), sampling the
   resident memory of the driver and every descendant process, and reads the stage timings
   from ``OUT/manifest.json``;
3. does the same math with the fastest bare single-process code we could write (one batched
   forward pass, in-memory L-BFGS of the head, closed-form α, one blocked test×train product
   with an exact top-k) and checks it finds the same proponents and opponents; and, as a second
   reference, times the job's own fit algorithm on all features in memory;
4. measures the machine's float32 matrix-product speed, to put the scoring stage in proportion;
5. runs the job again with the test set doubled, to show memory does not grow with m × n, and
   with one worker, to show how the scoring stage scales with workers;
6. prints each target with PASS/FAIL.

Every number printed is measured in the run that prints it. The data are the Debian package
``dataset-fashion-mnist`` (``apt-get install -y dataset-fashion-mnist``) or ``--data-dir``;
without them the script uses synthetic images of the same shapes and says so.

Usage::

    python benchmarks/full_audit.py                              # the full audit
    python benchmarks/full_audit.py --n-train 6000 --n-test 1000 # a quick reduced run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402 - the benchmarks' shared helpers sit beside this script
    MATMUL_REPEATS,
    GiB,
    JobRun,
    K,
    load_data,
    matmul_gflops,
    run_benchmark,
    run_job,
    train_model,
    write_npz,
)
from full_audit_bare import FLATTEN_DIM, BareResult, run_bare  # noqa: E402 - the bare single-process reference
from sampler import import_psutil  # noqa: E402

#: The reference matrix product: (M × K) by (K × N) float32, best of REPEATS.
MATMUL_SHAPE = (4096, 1601, 30000)

# Targets (from the issue).
TARGET_JOB_OVER_BARE = 1.25
TARGET_SCORE_FRACTION = 0.60
TARGET_PEAK_RSS_BYTES = 2.5e9
TARGET_GROWTH = 0.10
TARGET_TOTAL_SECONDS = 600.0


def score_flops(m: int, n: int, d: int) -> float:
    """Multiply-adds of the scoring product, as flops: 2·m·n·(d+1)."""
    return 2.0 * m * n * (d + 1)


# ------------------------------------------------------------------------------ agreement


def job_topk(out_dir: str, kind: str, m: int) -> np.ndarray:
    """The job's (m, K) train ids of one kind, by test id and rank."""
    import pyarrow.parquet as pq

    t = pq.read_table(os.path.join(out_dir, "influence_topk"),  # the dataset of part files
                      columns=["test_id", "kind", "rank", "train_id"]).to_pandas()
    t = t[t["kind"] == kind].sort_values(["test_id", "rank"])
    return t["train_id"].to_numpy().reshape(m, -1)


def agreement(job_ids: np.ndarray, bare_ids: np.ndarray) -> Tuple[float, float]:
    """(fraction of test rows with the same top-1, mean fraction of shared top-K ids)."""
    top1 = float(np.mean(job_ids[:, 0] == bare_ids[:, 0]))
    shared = np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(job_ids, bare_ids)])
    return top1, float(shared)


# ------------------------------------------------------------------------------- printing


def gb(nbytes: float) -> str:
    """Bytes as decimal gigabytes, the unit of the targets."""
    return f"{nbytes / 1e9:.2f} GB"


def print_job(title: str, run: JobRun, m: int, n: int) -> None:
    """Wall time, stages, and memory peaks of one job run."""
    man = run.manifest
    t = man["timings"]
    stages = {k: v for k, v in t.items() if k != "total"}
    print(f"\n== {title}: {n} train x {m} test, {man['workers']['count']} Ray workers, "
          f"{len(man['shards'])} shards")
    for line in run.stdout.strip().splitlines():
        print(f"  | {line}")
    print(f"end-to-end wall time (CLI subprocess)       {run.wall:8.2f} s")
    print(f"  run_audit total (manifest)                {t['total']:8.2f} s")
    for name, sec in stages.items():
        print(f"    stage {name:<34}{sec:8.2f} s")
    inside = t["total"] - sum(stages.values())
    print(f"    not in a stage (Ray start/stop, actors) {inside:8.2f} s")
    print(f"  outside run_audit (interpreter, imports, writing) {run.wall - t['total']:6.2f} s")
    for s in man["shards"]:
        print(f"  shard {s['index']}: {s['rows']} rows, featurize {s['featurize_seconds']:.2f} s, "
              f"alpha+score {s['score_seconds']:.2f} s")
    fit = man["head_fit"]
    print(f"  head fit: {fit['method']}, {fit['iterations']} iterations, {fit['evaluations']} evaluations, "
          f"max|grad J| = {fit['max_abs_grad']:.2e}")
    print(f"  decomposition max error {man['decomposition']['max_error']:.2e}")
    p = run.peaks
    print(f"  peak RSS: driver {gb(p['driver'])}, largest worker {gb(p['worker'])} "
          f"({run.n_workers_seen} worker processes), raylet {gb(p['raylet'])}, gcs {gb(p['gcs'])}, "
          f"largest other {gb(p['other'])}; whole tree {gb(run.peak_tree_rss)} ({run.samples} samples)")
    print(f"  {run.contention.text()}")


def print_bare(bare: BareResult, m: int, n: int, d: int) -> None:
    """Stage times of the bare computation."""
    print(f"\n== bare single process: {n} train x {m} test")
    for name, sec in bare.times.items():
        print(f"  {name:<40}{sec:8.2f} s")
    print(f"  {'total':<40}{bare.total:8.2f} s")
    f = bare.fit_info
    print(f"  head fit: float32 L-BFGS {f['lbfgs_iterations']} iterations / {f['lbfgs_evaluations']} "
          f"evaluations to max|grad J| {f['lbfgs_max_grad']:.2e}, then {f['newton_steps']} Newton "
          f"step(s) with {f['hessians']} exact Hessian(s): final max|grad J| = {f['max_grad']:.2e}")
    print(f"  scoring: {score_flops(m, n, d) / bare.times['score'] / 1e9:.1f} GFLOP/s "
          f"(2*m*n*(d+1) / bare score seconds); influence |sums|: {f['abs_sums']}")
    print(f"  {bare.contention.text()}")


def pass_fail(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


# ----------------------------------------------------------------------------------- main


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="Time the full Fashion-MNIST influence audit (k=10) through the real CLI against "
                    "bare single-process code, the machine's float32 matmul speed and memory targets. "
                    "Every number printed is measured in this run.",
        epilog="Targets: job <= 1.25 x bare; scoring >= 60% of matmul GFLOP/s; peak RSS of any "
               "process <= 2.5 GB and < 10% growth when the test set doubles; total < 10 min.")
    p.add_argument("--n-train", type=int, default=60000, help="training examples used (default 60000)")
    p.add_argument("--n-test", type=int, default=10000, help="test examples used (default 10000)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs of the CNN (default 2)")
    p.add_argument("--features", type=int, default=0,
                   help="0 (default): the seed's CNN, whose features are the flattened conv output "
                        "(d = 1600); N > 0: insert a Dense(N, relu) 'features' layer (d = N)")
    p.add_argument("--data-dir", default=None,
                   help="directory with {train,t10k}-images-idx3-ubyte[.gz] and their labels files "
                        "(default: the dataset-fashion-mnist Debian package's directory, found with "
                        "dpkg -L; synthetic data when absent)")
    p.add_argument("--work-dir", default=None,
                   help="where inputs, model and outputs are written (default: a temporary "
                        "directory, removed at the end)")
    p.add_argument("--skip-scaling", action="store_true",
                   help="skip the run with one worker (the scaling of the scoring stage)")
    p.add_argument("--skip-doubled", action="store_true",
                   help="skip the second job run with the test set doubled")
    p.add_argument("--seed", type=int, default=0, help="seed of the CNN's initialisation (default 0)")
    return p.parse_args(argv)


def prepare(args, work: str) -> dict:
    """Data, job inputs and the trained model in ``work``; prints what was used."""
    t0 = time.perf_counter()
    train, test = load_data(args.data_dir, args.n_train, args.n_test)
    paths = {"train": write_npz(os.path.join(work, "train.npz"), train.x, train.y),
             "test": write_npz(os.path.join(work, "test.npz"), test.x, test.y),
             "model": os.path.join(work, "model.keras")}
    if not args.skip_doubled:
        paths["test2"] = write_npz(os.path.join(work, "test2.npz"),
                                   np.concatenate([test.x, test.x]), np.concatenate([test.y, test.y]))
    kind = "synthetic data (Fashion-MNIST not found)" if train.origin == "synthetic" else \
        f"Fashion-MNIST from {os.path.dirname(train.origin)}"
    print(f"data: {kind}; {len(train.y)} train x {len(test.y)} test, 28x28x1, 10 classes "
          f"({time.perf_counter() - t0:.1f} s to read and write .npz)")
    trained = train_model(train, test, args.epochs, args.features, paths["model"], args.seed)
    head = f"Dense({args.features}, 'features')-" if args.features else ""
    print(f"model: Conv2D(32,3)-MaxPool-Conv2D(64,3)-MaxPool-Flatten-{head}"
          f"Dense(10, 'logits')-softmax; {args.epochs} epoch(s) in {trained['seconds']:.1f} s, "
          f"test accuracy {trained['test_accuracy']:.3f}")
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    """Prepares data and model, runs every measurement, prints the report; returns 0."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="full_audit_")
    os.makedirs(work, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, {_mem_total() / GiB:.1f} GiB; load average at start "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; work dir {work}")
    print(f"package: {package_revision()}")
    try:
        paths = prepare(args, work)
        report(args, paths, work, t_start)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def package_revision() -> str:
    """The package's version, its git commit, and how many of its files differ from that commit."""
    import distributed_influence

    src = os.path.dirname(os.path.abspath(distributed_influence.__file__))
    text = f"distributed_influence {distributed_influence.__version__} at {src}"
    try:
        head = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return text
    if head.returncode != 0:
        return text
    changed = len([ln for ln in dirty.stdout.splitlines() if ln.strip()])
    return f"{text}, git {head.stdout.strip()}" + (f" + {changed} uncommitted file(s)" if changed else "")


def _mem_total() -> int:
    return import_psutil().virtual_memory().total


def report(args, paths: dict, work: str, t_start: float) -> None:
    """Runs the measurements and prints them, then the targets."""
    n, m = args.n_train, args.n_test
    d = args.features or FLATTEN_DIM
    mm_peak = matmul_gflops(*MATMUL_SHAPE)
    mm_shaped = matmul_gflops(MATMUL_SHAPE[0], d + 1, MATMUL_SHAPE[2])
    print(f"machine float32 tf.matmul, best of {MATMUL_REPEATS}: {mm_peak:.1f} GFLOP/s at "
          f"{'x'.join(map(str, MATMUL_SHAPE[:2]))} by {MATMUL_SHAPE[1]}x{MATMUL_SHAPE[2]}; "
          f"{mm_shaped:.1f} GFLOP/s with the inner dimension d+1 = {d + 1}")

    job = run_job(paths["model"], paths["train"], paths["test"], os.path.join(work, "out"),
                  os.path.join(work, "job.log"))
    print_job("job (CLI, Ray local)", job, m, n)
    job_gflops = score_flops(m, n, d) / job.manifest["timings"]["score"] / 1e9
    print(f"  scoring stage: {job_gflops:.1f} GFLOP/s = 2*m*n*(d+1) / score stage seconds "
          f"({job_gflops / mm_peak:.0%} of the machine's {mm_peak:.1f})")

    bare = run_bare(paths["model"], paths["train"], paths["test"])
    print_bare(bare, m, n, d)
    for kind, ids in (("proponent", bare.top_ids), ("opponent", bare.bottom_ids)):
        top1, shared = agreement(job_topk(job.out_dir, kind, m), ids)
        print(f"  agreement with the job, {kind}s: same top-1 for {top1:.1%} of test rows, "
              f"{shared:.1%} of top-{K} ids shared")
    ratio = job.wall / bare.total
    print(f"\njob / bare: {ratio:.2f} (end-to-end {job.wall:.1f} s / bare {bare.total:.1f} s); "
          f"run_audit total / bare: {job.manifest['timings']['total'] / bare.total:.2f}")
    nf = bare.newton_fit
    same_fit = bare.total - bare.times["fit"] + nf["seconds"]
    print(f"second reference, the bare code with the job's fit algorithm in memory ({nf['method']}): "
          f"fit {nf['seconds']:.1f} s to max|grad J| {nf['max_grad']:.1e}, bare total {same_fit:.1f} s, "
          f"job / that {job.wall / same_fit:.2f} (not the target's bare, which is float32 L-BFGS)")

    doubled = None
    if not args.skip_doubled:
        doubled = run_job(paths["model"], paths["train"], paths["test2"], os.path.join(work, "out2"),
                          os.path.join(work, "job2.log"))
        print_job("job, test set doubled", doubled, 2 * m, n)
        for role in ("driver", "worker"):
            a, b = job.peaks[role], doubled.peaks[role]
            print(f"  {role} peak RSS: {gb(a)} at m={m}, {gb(b)} at m={2 * m}: growth {(b - a) / a:+.1%}")

    if not args.skip_scaling:
        one = run_job(paths["model"], paths["train"], paths["test"], os.path.join(work, "out1"),
                      os.path.join(work, "job1.log"), ("--workers", "1"))
        print_job("job with one worker (--workers 1)", one, m, n)
        t1, t2 = one.manifest["timings"]["score"], job.manifest["timings"]["score"]
        n2 = job.manifest["workers"]["count"]
        print(f"  scaling of the scoring stage: 1 worker {t1:.2f} s "
              f"({score_flops(m, n, d) / t1 / 1e9:.1f} GFLOP/s), {n2} workers {t2:.2f} s "
              f"({score_flops(m, n, d) / t2 / 1e9:.1f} GFLOP/s): speed-up {t1 / t2:.2f} x; "
              f"head fit {one.manifest['timings']['fit']:.2f} s against {job.manifest['timings']['fit']:.2f} s")

    print_targets(job, doubled, ratio, job_gflops / mm_peak, time.perf_counter() - t_start, m, n)


def print_targets(job: JobRun, doubled: Optional[JobRun], ratio: float, score_fraction: float,
                  total: float, m: int, n: int) -> None:
    """The block of targets, each with PASS/FAIL."""
    peak = max(job.peaks.values())
    print("\ntargets")
    print(f"  end-to-end job time <= {TARGET_JOB_OVER_BARE} x bare single-process: "
          f"{ratio:.2f} x  {pass_fail(ratio <= TARGET_JOB_OVER_BARE)}")
    print(f"  scoring >= {TARGET_SCORE_FRACTION:.0%} of measured matmul GFLOP/s: "
          f"{score_fraction:.0%}  {pass_fail(score_fraction >= TARGET_SCORE_FRACTION)}")
    print(f"  peak RSS of any process <= {TARGET_PEAK_RSS_BYTES / 1e9:.1f} GB at {n} x {m}: "
          f"{gb(peak)}  {pass_fail(peak <= TARGET_PEAK_RSS_BYTES)}")
    if doubled is not None:
        growth = max((doubled.peaks[r] - job.peaks[r]) / job.peaks[r] for r in ("driver", "worker"))
        print(f"  peak RSS growth (driver, worker) < {TARGET_GROWTH:.0%} when the test set doubles: "
              f"{growth:+.1%}  {pass_fail(growth < TARGET_GROWTH)}")
    else:
        print("  peak RSS growth when the test set doubles: not measured (--skip-doubled)")
    print(f"  benchmark total time < {TARGET_TOTAL_SECONDS / 60:.0f} min: {total:.0f} s  "
          f"{pass_fail(total < TARGET_TOTAL_SECONDS)}")
    print(f"  load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(run_benchmark("full_audit", main))
