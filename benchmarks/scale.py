"""Scale benchmark: a trained MLP on a C-class Gaussian mixture, audited through the CLI on a
Ray cluster of several nodes on this machine; or, with ``--backbone resnet50``, an ImageNet-shaped
ResNet-50 on random images.

    python benchmarks/scale.py --n 1000000 --m 100000 --classes 100 --dim 128 --shards 16 --nodes 2
    python benchmarks/scale.py --n 100000 --m 10000 --classes 1000 --compare-classes 100 --dim 2048 \
        --act gelu --compare-dense --no-variants
    python benchmarks/scale.py --backbone resnet50 --n 2048 --m 512 --classes 1000

What it does, all in one run so that ratios are fair on a shared machine:

1. makes the data (n train + m test rows of a C-class Gaussian mixture in ``--input-dim``
   dimensions, 10% of the training labels flipped) and trains a small Keras MLP
   (input → Dense(d, ``--act``) → Dense(C) → softmax) on part of it; gelu and tanh give
   signed features;
2. starts a Ray cluster of ``--nodes`` nodes on loopback (``ray.cluster_utils.Cluster`` in this
   process, so every Ray process is a child of it and its memory can be sampled);
3. runs ``distributed-influence audit --address <head>`` (plus ``--audit-args``) and prints
   per-stage times, the head fit's passes over the training features, the driver's and the
   workers' peak RSS against their budgets;
4. measures each stage's floor right after the audit, in this process: the faster of a bare Keras
   ``predict`` and the package's Featurizer over the same rows (featurize), one float32 Hessian
   product on one shard's rows against the two GEMMs it needs (fit), the GEMMs of the pairs the
   job scored at this machine's float32 GEMM rate (score), and prints stage, floor and ratio in
   one table;
5. checks exactness: the decomposition error from the manifest, and the top-k of sampled test
   rows against a brute-force NumPy computation from the train index the audit wrote;
6. with ``--compare-classes C2``: the same audit at C2 classes (same n, m, d, shards), and the
   score stage, the fit's passes and the pairs scored side by side; with ``--compare-dense``: the
   audit again with ``--scoring dense``, and its tables compared exactly;
7. a paper estimate for ImageNet-1k from the measured rates, for this machine and one GPU
   (whose GEMM rate, ``--gpu-tflops``, is an assumption);
8. unless ``--no-variants``: the same at ``--variant-n`` rows with m, m × 4, and shards × 4, to
   see how the driver's memory grows.

``--backbone resnet50`` replaces 1 and 6: a ResNet-50 with random weights on 64×64×3 random
images, whose featurize stage is compared with a bare ``predict`` over the same rows.

Timings are noisy when other processes share the machine; the contention line says how much.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import scale_backbone as sb  # noqa: E402 - this benchmark's parts
import scale_parts as sp  # noqa: E402
from common import K, matmul_gflops, run_benchmark, run_job  # noqa: E402 - the benchmarks' shared helpers
from sampler import TreeSampler  # noqa: E402

#: ResNet-50's input side here: small enough for a few thousand rows on a 2-core machine.
BACKBONE_SIDE = 64

GiB = 1024.0 ** 3
NOISE = 0.10


# ------------------------------------------------------------------------------------- data
def mixture(n: int, classes: int, input_dim: int, seed: int, flip: float = 0.0):
    """n rows of a C-class Gaussian mixture; ``flip`` of the labels replaced by another class."""
    centers = np.random.default_rng(12345).normal(0.0, 1.0, size=(classes, input_dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = centers[y] + rng.normal(0.0, 0.45, size=(n, input_dim)).astype(np.float32)
    flipped = np.zeros(0, np.int64)
    if flip:
        flipped = np.sort(rng.choice(n, size=int(flip * n), replace=False))
        y = y.copy()
        y[flipped] = (y[flipped] + rng.integers(1, classes, size=len(flipped))) % classes
    return x.astype(np.float32), y.astype(np.int64), flipped


def write_npz(path: str, x: np.ndarray, y: np.ndarray) -> str:
    """A job input with ids 0..n-1, uncompressed: the job reads it by byte range."""
    np.savez(path, x=x, y=y, id=np.arange(len(y), dtype=np.int64))  # uncompressed: read by byte range
    return path


def train_mlp(x, y, classes: int, dim: int, epochs: int, path: str, seed: int, act: str = "relu") -> dict:
    """Trains the MLP whose Dense(d, ``act``) layer gives the features (gelu/tanh: signed ones)."""
    from distributed_influence.tfimport import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(dim, activation=act, name="features"),
        keras.layers.Dense(classes, name="logits"),
        keras.layers.Activation("softmax", name="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    t0 = time.perf_counter()
    hist = model.fit(x, y, epochs=epochs, batch_size=512, verbose=0)
    model.save(path)
    return {"seconds": time.perf_counter() - t0, "train_accuracy": float(hist.history["accuracy"][-1])}


def make_workload(root: str, n: int, m: int, classes: int, input_dim: int, dim: int, epochs: int,
                  fit_rows: int, seed: int = 0, act: str = "relu") -> dict:
    """Train and test .npz files and the MLP trained on the first ``fit_rows`` training rows."""
    os.makedirs(root, exist_ok=True)
    x, y, flipped = mixture(n, classes, input_dim, seed, flip=NOISE)
    train = write_npz(os.path.join(root, "train.npz"), x, y)
    model = os.path.join(root, "mlp.keras")
    info = train_mlp(x[:fit_rows], y[:fit_rows], classes, dim, epochs, model, seed, act)
    del x, y
    xt, yt, _ = mixture(m, classes, input_dim, seed + 1)
    test = write_npz(os.path.join(root, "test.npz"), xt, yt)
    return {"model": model, "train": train, "test": test, "flipped": flipped, **info}


# ----------------------------------------------------------------------------------- cluster
def start_cluster(nodes: int, cpus_per_node: int):
    """A Ray cluster on loopback whose processes are children of this one."""
    from ray.cluster_utils import Cluster

    from distributed_influence.cluster.compat import use_loopback

    use_loopback()
    # A private temp dir and no dashboard: other Ray instances on this machine stay untouched.
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="scale_ray_", dir="/tmp"))
    # On a busy machine a raylet's agents can take longer than Ray's default 30 s to start.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "180000")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus_per_node, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus_per_node)
    cluster.wait_for_nodes()
    return cluster


def audit(work: dict, out: str, shards: int, address: str, label: str, extra=()) -> dict:
    """One CLI run against the cluster, with the driver's and the workers' memory sampled;
    ``extra``: more audit flags (``--audit-args``, ``--scoring dense``), after ours so they win."""
    cluster_sampler = TreeSampler(os.getpid())  # the cluster's raylets and workers are our children
    cluster_sampler.start()
    try:
        run = run_job(work["model"], work["train"], work["test"], out, out + ".log",
                      extra=("--shards", str(shards), "--address", address, *extra))
    finally:
        cluster_sampler.stop()
    worker_peak = max((s.peak_rss for s in cluster_sampler.seen.values()
                       if any("ray::" in t or "default_worker.py" in t for t in s.titles)
                       and s.pid != run.manifest.get("driver_pid")), default=0)
    m = run.manifest
    # The issue's budget for a worker: its shards' features × 2.5 + the test features + 1 GB
    # (shard i starts on worker i mod workers; the feature rows are d+1 float32 values).
    row_bytes = (m["feature_dim"] + 1) * 4
    per_worker = [sum(s["rows"] for s in m["shards"] if s["index"] % m["workers"]["count"] == w)
                  for w in range(m["workers"]["count"])]
    budget = 2.5 * max(per_worker) * row_bytes + m["n_test"] * row_bytes + 1e9
    res = {"label": label, "wall": run.wall, "timings": m["timings"], "head_fit": m["head_fit"],
           "driver_rss": run.peaks["driver"], "worker_rss": worker_peak, "worker_budget": budget,
           "decomposition": m["decomposition"], "nodes": m["workers"]["nodes"],
           "workers": m["workers"]["count"], "shards": len(m["shards"]), "reduce": m.get("reduce", {}),
           "contention": run.contention.text(), "out": out, "manifest": m}
    return res


def show(res: dict) -> None:
    """One audit's stage times, fit passes and memory against its budgets, as text lines."""
    t = res["timings"]
    fit = res["head_fit"]
    p = fit.get("passes", {})
    print(f"[{res['label']}] wall {res['wall']:.1f} s; stages: " +
          ", ".join(f"{k} {v:.1f} s" for k, v in t.items()), flush=True)
    print(f"[{res['label']}] {res['shards']} shards, {res['workers']} workers on {res['nodes']} nodes; "
          f"head fit: {fit['iterations']} iterations, max|grad J| {fit['max_abs_grad']:.2e}, passes "
          f"{p.get('total')} (evaluations {p.get('evaluations')}, Hessian products "
          f"{p.get('hessian_products')}, sketches {p.get('sketches')} with {p.get('sketch_directions')} "
          f"directions)", flush=True)
    print(f"[{res['label']}] peak RSS: driver {res['driver_rss'] / GiB:.2f} GiB, largest worker "
          f"{res['worker_rss'] / GiB:.2f} GiB; decomposition max relative error "
          f"{res['decomposition']['max_relative_error']:.2e}; {res['contention']}", flush=True)
    print(f"[{res['label']}] worker budget (its shards' features x 2.5 + test features + 1 GB): "
          f"{res['worker_budget'] / 1e9:.3f} GB; largest worker {res['worker_rss'] / 1e9:.3f} GB: "
          f"{'within' if res['worker_rss'] <= res['worker_budget'] else 'OVER'}; driver "
          f"{res['driver_rss'] / 1e9:.3f} GB (target <= 1 GB)", flush=True)


# ------------------------------------------------------------------------ fit cost, exactness
#: The head fit of main when the scale-out work began: the baseline the fit's cost is compared to.
BASELINE_FIT_COMMIT = "6b4c0d8"


def _features(work: dict, rows: int, classes: int):
    """The first ``rows`` training rows' augmented features and one-hot targets, in this process."""
    from distributed_influence.data.model import Featurizer, load_model, read_model_bytes, split_model
    from distributed_influence.method import representer as rp

    split = split_model(load_model(read_model_bytes(work["model"]), "mlp.keras"), None, None, "mlp.keras")
    data = np.load(work["train"])
    feats, _ = Featurizer(split, 8192)(data["x"][:rows])
    return rp.augment(feats), rp.one_hot(data["y"][:rows], classes), split.theta()


def _pass_seconds(x: np.ndarray, targets: np.ndarray, theta: np.ndarray, repeats: int = 3) -> float:
    """The best of a few float32 objective passes (Σ CE and its gradient) over x, with the sums
    the job's CPU workers use: the unit the fit's cost is given in."""
    from distributed_influence.method import cpu_sums

    cpu_sums.objective_sums(x, targets, theta, "float32")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        cpu_sums.objective_sums(x, targets, theta, "float32")
        best = min(best, time.perf_counter() - t0)
    return best


def _baseline_fit_module():
    """fit.py as it was at BASELINE_FIT_COMMIT, loaded from git (None outside a git checkout)."""
    import importlib.util
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        code = subprocess.run(["git", "-C", root, "show", f"{BASELINE_FIT_COMMIT}:distributed_influence/fit.py"],
                              check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = os.path.join(tempfile.mkdtemp(), "fit_baseline.py")
    with open(path, "w") as fh:
        fh.write(code)
    spec = importlib.util.spec_from_file_location("fit_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fit_comparison(work: dict, rows: int, classes: int, lam: float = 0.003) -> dict:
    """The head fit in this process on the first ``rows`` training rows: this version's
    ``fit_head`` (default and adaptive sketch policies) against the one of main at
    BASELINE_FIT_COMMIT, all on the same sums (NumPy, as on the job's CPU workers), each in
    multiples of one float32 objective pass over the same rows."""
    from distributed_influence.method import cpu_sums
    from distributed_influence.method.fit import fit_head

    x, t64, theta0 = _features(work, rows, classes)
    cache: dict = {}

    def sums(theta, precision):
        return cpu_sums.objective_sums(x, t64, theta, precision)

    def hvp(theta, v, precision):
        key = (theta.tobytes(), precision)
        if key not in cache:
            cache.clear()
            cache[key] = cpu_sums.softmax_blocks(x, theta, precision)
        return cpu_sums.hvp_sums(x, theta, v, precision, probs=cache[key])

    def sketch(theta, v, stride):  # the job's sketch: a sample of the rows
        return cpu_sums.hvp_sums(x, theta, v, "float32", stride=stride)

    unit = _pass_seconds(x, t64, theta0)
    out = {"rows": rows, "objective_pass_seconds": unit}
    fits = [("this version (sketch always, the default)",
             lambda: fit_head(sums, hvp, rows, lam, theta0, sketch_sums=sketch)),
            ("this version (sketch adaptive)",
             lambda: fit_head(sums, hvp, rows, lam, theta0, sketch="adaptive", sketch_sums=sketch))]
    baseline = _baseline_fit_module()
    if baseline is None:
        print("[fit] no git checkout here: the baseline fit is not run", flush=True)
    else:
        fits.append((f"main at {BASELINE_FIT_COMMIT}", lambda: baseline.fit_head(sums, hvp, rows, lam, theta0)))
    for label, run in fits:
        t0 = time.perf_counter()
        fit = run()
        sec = time.perf_counter() - t0
        out[label] = {"seconds": sec, "in_passes": sec / unit, "passes": getattr(fit, "passes", None),
                      "max_abs_grad": fit.max_abs_grad}
        print(f"[fit, {rows} rows in one process] {label}: {sec:.1f} s = {sec / unit:.0f} float32 objective "
              f"passes ({unit:.3f} s each), max|grad J| {fit.max_abs_grad:.1e}, passes {out[label]['passes']}",
              flush=True)
    if baseline is not None:
        base = out[f"main at {BASELINE_FIT_COMMIT}"]["in_passes"]
        for label, _ in fits[:2]:
            print(f"[fit] {label} / main at {BASELINE_FIT_COMMIT}: {out[label]['in_passes'] / base:.2f}", flush=True)
    return out


# ------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    """The benchmark's options (the module docstring is the --help text)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="training rows")
    ap.add_argument("--m", type=int, default=100_000, help="test rows")
    ap.add_argument("--classes", type=int, default=100, help="C")
    ap.add_argument("--dim", type=int, default=128, help="d, the feature dimension (width of the MLP)")
    ap.add_argument("--act", choices=("relu", "gelu", "tanh"), default="relu",
                    help="activation of the MLP's feature layer (gelu, tanh: signed features)")
    ap.add_argument("--audit-args", default="", help="more audit flags, one string (split like a shell "
                    "does), e.g. \"--scoring dense\"")
    ap.add_argument("--compare-classes", type=int, default=0,
                    help="also run the main audit at this C (same n, m, d, shards) and compare (0: no)")
    ap.add_argument("--compare-dense", action="store_true",
                    help="also run the main audit with --scoring dense and compare the tables exactly")
    ap.add_argument("--backbone", choices=("resnet50",), default=None,
                    help="instead of the MLP: ResNet-50 (random weights) on 64x64x3 random images")
    ap.add_argument("--gpu-tflops", type=float, default=20.0,
                    help="float32 GEMM rate ASSUMED for one GPU in the ImageNet estimate (default 20)")
    ap.add_argument("--estimate-side", type=int, default=224,
                    help="image side of the ImageNet estimate's backbone (its featurize scales by pixels)")
    ap.add_argument("--input-dim", type=int, default=32, help="dimension of the mixture's inputs")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--nodes", type=int, default=2, help="Ray nodes on this machine")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fit-rows", type=int, default=100_000, help="rows the MLP is trained on")
    ap.add_argument("--samples", type=int, default=20, help="test rows checked by brute force")
    ap.add_argument("--variant-n", type=int, default=200_000, help="n of the m×4 and shards×4 runs")
    ap.add_argument("--variant-m", type=int, default=10_000, help="m of the variants' base run")
    ap.add_argument("--no-main", action="store_true", help="only the variants")
    ap.add_argument("--fit-compare-rows", type=int, default=0,
                    help="also fit the head in one process on this many rows with this version's "
                         "fit and with main's at the scale-out's start, in float32 objective passes (0: skip)")
    ap.add_argument("--fit-compare-only", action="store_true", help="only that comparison, no cluster")
    ap.add_argument("--no-variants", action="store_true", help="only the main run")
    ap.add_argument("--work-dir", default=None,
                    help="where the workloads, models and audits are written and kept (default: a temporary "
                         "directory, removed at the end)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    return ap.parse_args(argv)


def measured_case(work: dict, root: str, args, address: str, label: str, extra: tuple) -> dict:
    """One audit with its floors, its stage table and the brute-force check of its top-k."""
    res = audit(work, os.path.join(root, "out"), args.shards, address, label, extra)
    show(res)
    floors = sp.measure_floors(work, res)
    sp.show_stages(res, floors)
    res["floors"] = {k: v for k, v in floors.items() if k != "featurize"}
    res["floors"]["featurize"] = {k: v for k, v in floors["featurize"].items() if not isinstance(v, np.ndarray)}
    res["topk_check"] = sp.check_topk(work, res["out"], args.samples, K)
    print(f"[{label}] brute-force check of {res['topk_check']['lists'] // 2} test rows: "
          f"{json.dumps(res['topk_check'])}", flush=True)
    return res


def run_mlp(args, address: str, extra: tuple) -> dict:
    """The main audit (and the one at --compare-classes, and its dense twin), with floors."""
    results = {}
    for classes in [args.classes] + ([args.compare_classes] if args.compare_classes else []):
        root = os.path.join(args.work_dir, "main" if classes == args.classes else f"main_c{classes}")
        t0 = time.perf_counter()
        work = make_workload(root, args.n, args.m, classes, args.input_dim, args.dim, args.epochs,
                             min(args.fit_rows, args.n), act=args.act)
        print(f"\ndata + model (C = {classes}, d = {args.dim}, {args.act}): {time.perf_counter() - t0:.1f} s "
              f"(MLP train accuracy {work['train_accuracy']:.3f} on noisy labels)", flush=True)
        res = measured_case(work, root, args, address, f"C={classes}", extra)
        results[res["label"]] = res
        if classes == args.classes and args.compare_dense:
            dense = audit(work, os.path.join(root, "out_dense"), args.shards, address, f"C={classes} dense",
                          extra + ("--scoring", "dense"))
            show(dense)
            res["dense_comparison"] = sp.show_dense_comparison(res, dense)
            results[dense["label"]] = dense
    if args.compare_classes:
        main_res = results[f"C={args.classes}"]
        main_res["class_comparison"] = sp.show_class_comparison(main_res, results[f"C={args.compare_classes}"])
    return results


def run_backbone(args, address: str, extra: tuple, cluster_cpus: int) -> dict:
    """ResNet-50 through the CLI, its featurize stage against a bare predict, and its floors."""
    root = os.path.join(args.work_dir, "backbone")
    work = sb.make_backbone_workload(root, args.n, args.m, args.classes, BACKBONE_SIDE)
    res = measured_case(work, root, args, address, f"resnet50 C={args.classes}", extra)
    bare = res["floors"]["featurize"]
    res["featurize_ratio"] = sb.show_featurize(res, bare, cluster_cpus)
    return {res["label"]: res}


def run_variants(args, address: str, extra: tuple) -> dict:
    """m, m × 4 and shards × 4 at --variant-n rows: how the driver's memory grows."""
    results = {}
    root = os.path.join(args.work_dir, "variants")
    work = make_workload(root, args.variant_n, 4 * args.variant_m, args.classes, args.input_dim,
                         args.dim, args.epochs, min(args.fit_rows, args.variant_n), act=args.act)
    small = dict(work)
    small["test"] = write_npz(os.path.join(root, "test_small.npz"),
                              *mixture(args.variant_m, args.classes, args.input_dim, 1)[:2])
    for label, w, shards in (("base", small, args.shards), ("m x4", work, args.shards),
                             ("shards x4", small, 4 * args.shards)):
        res = audit(w, os.path.join(root, "out_" + label.replace(" ", "")), shards, address, label, extra)
        show(res)
        results[label] = res
    base = results["base"]["driver_rss"]
    for label in ("m x4", "shards x4"):
        growth = results[label]["driver_rss"] / base - 1
        print(f"driver peak RSS {label}: {results[label]['driver_rss'] / GiB:.3f} GiB vs "
              f"{base / GiB:.3f} GiB: {growth:+.1%}", flush=True)
    return results


def imagenet_estimate(args, results: dict) -> None:
    """The paper estimate from the first measured audit (the main one, or the backbone's)."""
    res = next(iter(results.values()))
    d = sb.IMAGENET["d"]
    gemm = matmul_gflops(1024, d + 1, 4096)  # the scoring GEMM's shape at ImageNet's d
    backbone = None
    if args.backbone:
        m = res["manifest"]
        backbone = {"rows_per_s": (m["n_train"] + m["n_test"]) / res["timings"]["featurize"],
                    "side": BACKBONE_SIDE}
    sb.show_estimate(sb.estimate_inputs(res, res["floors"], gemm, backbone), args.gpu_tflops, args.estimate_side)


def main(argv=None) -> int:
    """Runs the benchmark with one Ray cluster for all its audits, shut down at the end."""
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.work_dir is not None:
        return _main(args)
    args.work_dir = tempfile.mkdtemp(prefix="scale_bench_")
    try:
        return _main(args)
    finally:
        shutil.rmtree(args.work_dir, ignore_errors=True)


def _main(args) -> int:
    """The benchmark in ``args.work_dir``."""
    extra = tuple(shlex.split(args.audit_args))
    t_all = time.perf_counter()
    print(f"machine: {os.cpu_count()} cores; k = {K}; noise {NOISE:.0%}; extra audit flags: "
          f"{' '.join(extra) or 'none'}", flush=True)
    results = {}
    if args.fit_compare_rows:
        root = os.path.join(args.work_dir, "fitcmp")
        work = make_workload(root, args.fit_compare_rows, 100, args.classes, args.input_dim, args.dim,
                             args.epochs, min(args.fit_rows, args.fit_compare_rows), act=args.act)
        results["fit_comparison"] = fit_comparison(work, args.fit_compare_rows, args.classes)
        if args.fit_compare_only:
            return 0
    cluster = start_cluster(args.nodes, args.cpus_per_node)
    try:
        measured = {}
        if args.backbone:
            measured = run_backbone(args, cluster.address, extra, args.nodes * args.cpus_per_node)
        elif not args.no_main:
            measured = run_mlp(args, cluster.address, extra)
        results.update(measured)
        if not args.no_variants and not args.backbone:
            results.update(run_variants(args, cluster.address, extra))
    finally:
        cluster.shutdown()
    sp.show_memory(list(results[k] for k in results if k != "fit_comparison"))
    if measured:
        imagenet_estimate(args, measured)
    print(f"benchmark total: {time.perf_counter() - t_all:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(run_benchmark("scale", main))
