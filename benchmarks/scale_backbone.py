"""The scale benchmark's ImageNet-shaped parts: a ResNet-50 backbone audited through the CLI,
its featurize stage against a bare ``predict``, and a paper estimate for ImageNet-1k.

Why a backbone: with an MLP the featurize stage is nearly free, so it cannot show whether the
job's forward passes run as fast as Keras does alone; ResNet-50 (d = 2,048 after global average
pooling) makes featurize the stage it is on ImageNet. Its weights are random (``weights=None``:
nothing is downloaded); speed does not depend on them.
"""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
from common import write_npz
from scale_parts import duration, load_split, rate, show_table, yes

#: ResNet-50's feature dimension after global average pooling.
RESNET_DIM = 2048
#: The featurize stage should run at this fraction of a bare predict's rows/s, or faster.
TARGET_FEATURIZE = 0.85
#: ImageNet-1k: train rows, validation rows used as the test set, d, C.
IMAGENET = {"n": 1_281_167, "m": 50_000, "d": RESNET_DIM, "classes": 1000}


def make_backbone_workload(root: str, n: int, m: int, classes: int, side: int, seed: int = 0) -> dict:
    """ResNet-50 (random weights, ``side`` × ``side`` × 3 inputs, softmax head over C classes)
    saved as .keras, and random images as train and test .npz files (x float32 in [0, 1], y, id).

    Raises:
        SystemExit: the package does not split the model at d = 2,048 features.
    """
    from distributed_influence.tfimport import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    os.makedirs(root, exist_ok=True)
    model = keras.applications.ResNet50(weights=None, input_shape=(side, side, 3), classes=classes)
    path = os.path.join(root, "resnet50.keras")
    model.save(path)
    split = load_split(path)  # as the job's workers will see it
    if split.feature_dim != RESNET_DIM or split.n_classes != classes:
        raise SystemExit(f"ResNet-50 split at d = {split.feature_dim}, C = {split.n_classes}; "
                         f"expected d = {RESNET_DIM}, C = {classes}")
    print(f"backbone: ResNet-50, random weights, {side}x{side}x3 inputs; the package's split: head "
          f"'{split.head_layer}', d = {split.feature_dim}, C = {split.n_classes}", flush=True)
    rng = np.random.default_rng(seed)
    paths = {"model": path}
    for name, rows in (("train", n), ("test", m)):
        x = rng.integers(0, 256, size=(rows, side, side, 3), dtype=np.uint8).astype(np.float32) / 255.0
        paths[name] = write_npz(os.path.join(root, name + ".npz"), x, rng.integers(0, classes, size=rows))
    return paths


def featurize_rows(res: dict, bare: dict) -> List[list]:
    """The job's featurize rates (the stage, each shard, the workers together) and the bare one."""
    m = res["manifest"]
    n, n_test = m["n_train"], m["n_test"]
    stage = res["timings"]["featurize"]
    rows = [["job: featurize stage (train + test; reading, loading the model, tracing included)",
             n + n_test, f"{stage:.2f}", rate((n + n_test) / stage)]]
    workers = m["workers"]["count"]
    busy = [0.0] * workers
    for s in m["shards"]:
        sec = s.get("featurize_seconds") or 0.0
        busy[s["index"] % workers] += sec  # shard i starts on worker i mod workers
        rows.append([f"job: shard {s['index']} (featurize_seconds, one worker)", s["rows"], f"{sec:.2f}",
                     rate(s["rows"] / sec) if sec else "–"])
    if max(busy) > 0:
        rows.append([f"job: {workers} workers together (train rows / busiest worker's seconds)", n,
                     f"{max(busy):.2f}", rate(n / max(busy))])
    for what, key in (("Keras predict", "keras_seconds"), ("the package's Featurizer", "featurizer_seconds")):
        rows.append([f"bare: {what} in one process, all cores (batch {bare['batch']})", bare["rows"],
                     f"{bare[key]:.2f}", rate(bare["rows"] / bare[key])])
    return rows


def show_featurize(res: dict, bare: dict, cluster_cpus: int) -> float:
    """The backbone's featurize comparison; returns job stage rows/s ÷ bare rows/s."""
    show_table(f"[{res['label']}] featurize: the job against a bare predict over the same rows:",
               ["what", "rows", "seconds", "rows/s"], featurize_rows(res, bare))
    m = res["manifest"]
    job = (m["n_train"] + m["n_test"]) / res["timings"]["featurize"]
    ratio = job / (bare["rows"] / bare["keras_seconds"])
    print(f"[{res['label']}] job featurize rows/s / bare predict rows/s = {ratio:.2f} (target >= "
          f"{TARGET_FEATURIZE}: {yes(ratio >= TARGET_FEATURIZE)}); against the package's Featurizer alone: "
          f"{job / (bare['rows'] / bare['featurizer_seconds']):.2f}; the job ran on {cluster_cpus} Ray CPUs, "
          f"the bare passes on this machine's {os.cpu_count()} cores", flush=True)
    return ratio


def estimate_inputs(res: dict, floors: dict, gemm_gflops: float, backbone: Optional[dict]) -> dict:
    """The per-row rates of one run that the ImageNet estimate scales up."""
    m, t = res["manifest"], res["timings"]
    passes = m["head_fit"].get("passes", {}).get("total") or 0
    d, sc = m["feature_dim"], m["scoring"]
    score_floor = (sc["pairs_scored"] * (d + 1) * 2 / (floors["score_gflops"] * 1e9)
                   + 3 * m["n_train"] * (d + 1) * m["n_classes"] * 2 / (floors["alpha_gflops"] * 1e9))
    hvp = floors["hvp"]
    return {"n": m["n_train"], "m": m["n_test"], "d": d, "classes": m["n_classes"], "passes": passes,
            "pass_seconds": t["fit"] / max(passes, 1),
            # A Hessian product over all n rows in one process with all cores: a pass's compute.
            "pass_compute": hvp["hvp_seconds"] * m["n_train"] / hvp["rows"],
            "pairs_fraction": sc["pairs_scored_fraction"],
            "scoring": sc["method"], "score_ratio": t["score"] / max(score_floor, 1e-12),
            "reduce_rows_per_s": (m["n_train"] + m["n_test"]) / t["reduce"], "gemm_gflops": gemm_gflops,
            "alpha_gflops": floors["alpha_gflops"],
            "backbone": backbone}


def show_estimate(e: dict, gpu_tflops: float, side: int) -> None:
    """ImageNet-1k, per stage, from this run's rates: this CPU machine and one GPU.

    The GPU column is an assumption, not a measurement: every GEMM-bound part is taken to run at
    the same fraction of the GEMM rate there as here (CPU seconds × CPU GEMM rate / GPU rate);
    the fit's per-pass overhead and the reduce stay as measured.
    """
    N, M, D, C = IMAGENET["n"], IMAGENET["m"], IMAGENET["d"], IMAGENET["classes"]
    speedup = gpu_tflops * 1e3 / e["gemm_gflops"]
    rows = []
    bb = e["backbone"]
    if bb:
        pixels = (side / bb["side"]) ** 2
        feat = (N + M) / bb["rows_per_s"] * pixels
        rows.append(["featurize", f"(n+m) / {rate(bb['rows_per_s'])} rows/s of the job's ResNet-50 at "
                     f"{bb['side']}x{bb['side']}, x {pixels:.2f} for {side}x{side} pixels", duration(feat),
                     duration(feat / speedup)])
    else:
        feat = None
        rows.append(["featurize", "not measured: run with --backbone resnet50", "–", "–"])
    # A pass's compute grows with n·(d+1)·C; the rest of the measured per-pass time (Ray round trips,
    # the driver's step) does not grow with n, and scaling it too would swamp a small run's estimate.
    scale = (N * (D + 1) * C) / (e["n"] * (e["d"] + 1) * e["classes"])
    compute = min(e["pass_compute"], e["pass_seconds"])
    overhead = e["pass_seconds"] - compute
    fit_compute, fit_fixed = e["passes"] * compute * scale, e["passes"] * overhead
    fit = fit_compute + fit_fixed
    rows.append(["fit", f"{e['passes']} passes (as measured) x ({compute:.4g} s of Hessian-product compute per "
                 f"pass, scaled by n·(d+1)·C: x {scale:.3g}, + {overhead:.4g} s of other per-pass time, not "
                 f"scaled); the whole measured per-pass time scaled: {duration(e['passes'] * e['pass_seconds'] * scale)}",
                 duration(fit), duration(fit_compute / speedup + fit_fixed)])
    flops = e["pairs_fraction"] * N * M * (D + 1) * 2
    pairs = flops / (e["gemm_gflops"] * 1e9)
    # The α pass (α, the per-train sums, Σ x_iᵀα_i) runs in float64 NumPy on every worker, a GPU
    # worker's too: at the measured float64 rate in both columns.
    alpha = 3 * N * (D + 1) * C * 2 / (e["alpha_gflops"] * 1e9)
    score = pairs + alpha
    rows.append(["score", f"{e['pairs_fraction']:.4f} of n·m pairs ({e['scoring']}, as measured) x (d+1) x 2 "
                 f"flops at the GEMM rate ({duration(pairs)}), + the alpha pass's 3 n·(d+1)·C float64 GEMMs at "
                 f"{e['alpha_gflops']:.0f} GFLOP/s on the CPU in both columns ({duration(alpha)}) (this run's "
                 f"score stage: {e['score_ratio']:.1f} x its floor)",
                 duration(score), duration(pairs / speedup + alpha)])
    red = (N + M) / e["reduce_rows_per_s"]
    rows.append(["reduce", f"(n+m) / {rate(e['reduce_rows_per_s'])} rows/s (as measured; on CPUs in both)",
                 duration(red), duration(red)])
    total = [x for x in (feat, fit, score, red) if x is not None]
    gpu = [x / speedup for x in (feat, fit_compute, pairs) if x is not None] + [alpha, fit_fixed, red]
    rows.append(["total" + ("" if feat else " (without featurize)"), "", duration(sum(total)),
                 duration(sum(gpu))])
    show_table(f"paper estimate for ImageNet-1k (n = {N}, m = {M}, d = {D}, C = {C}) from this run's rates "
               f"(features: {N * (D + 1) * 4 / 1e9:.1f} GB across the workers):",
               ["stage", "how", f"this machine ({e['gemm_gflops']:.0f} GFLOP/s float32 GEMM, measured)",
                f"one GPU ({gpu_tflops:g} TFLOP/s float32, ASSUMED)"], rows)
    print("The GPU column is an assumption, not a measurement: --gpu-tflops sets its float32 GEMM rate, and "
          "featurize, the fit's compute and score are taken to reach the same fraction of it as here; the fit's "
          "other per-pass time and reduce stay as here. On a small run the measured rates include fixed costs "
          "(workers loading the model and tracing it, Ray round trips), which the estimate scales with n: "
          "featurize and reduce are then upper bounds; score is at the GEMM floor, a lower bound. "
          "The passes and the pairs fraction at ImageNet's n, d and C are taken as measured here.", flush=True)
