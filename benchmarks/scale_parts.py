"""Parts of the scale benchmark: the floor each stage is measured against, the per-stage table,
the comparisons across C and against dense scoring, all printed as Markdown tables.

Why floors: a stage's seconds alone say little on a shared 2-core machine; the same stage's work
done the plainest way in one process (a bare ``predict``, a bare float32 GEMM), measured in the
same run, says how much of the time is the package's own overhead. Kept apart from scale.py so
that each module stays short enough to read.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from common import matmul_gflops
from sampler import Contention, busy_cpu_seconds, own_cpu_seconds, steal_cpu_seconds

# Targets (from the issue).
TARGET_HVP = 1.3
TARGET_SCORE_RATIO = 1.5
TARGET_PASSES_RATIO = 1.5
TARGET_PAIRS = 1.0
TARGET_PAIRS_PRUNED = 0.05
#: Repeats of the bare timings (best of): on a shared machine the best is the least disturbed.
BEST_OF = 3
#: Seconds one sample of a short bare timing lasts at least (it repeats the call), and its cap on calls.
MIN_SAMPLE = 0.05
MAX_LOOPS = 1000
#: The keys the result tables are sorted by before they are compared.
TABLE_KEYS = {"influence_topk": ("test_id", "kind", "rank"), "test_scores": ("test_id",),
              "train_scores": ("train_id",)}
#: The column that may be null in a pruned run with signed features (Σ_t |r| needs every pair).
ABS_SUM = "influence_abs_sum"
#: Larger objective passes are skipped: their one-hot targets are float64 (n × C × 8 bytes).
MAX_PASS_BYTES = 4e9


# --------------------------------------------------------------------------------- printing
def markdown(headers: Sequence[str], rows: List[Sequence[object]]) -> str:
    """A Markdown pipe table with padded columns: the published report is a text block, so the
    table has to read as text as well as render."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def show_table(title: str, headers: Sequence[str], rows: List[Sequence[object]]) -> None:
    """Prints a titled Markdown table with blank lines around it, so that it renders as a table."""
    print(f"\n{title}\n\n{markdown(headers, rows)}\n", flush=True)


def yes(flag: bool) -> str:
    """A target's verdict; a miss in capitals, so that it stands out in a long table."""
    return "yes" if flag else "NO"


def rate(x: float) -> str:
    """A rate (rows/s, pairs/s) short enough for a table cell."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.1f}"


def duration(s: float) -> str:
    """Seconds, or hours/days for the paper estimate's long ones."""
    if s >= 2 * 86400:
        return f"{s / 86400:.1f} d"
    if s >= 2 * 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.3g} s"


# ----------------------------------------------------------------------------- bare timings
def best_of(fn: Callable[[], object], repeats: int = BEST_OF) -> float:
    """Best seconds per call of ``repeats`` samples after one untimed warm-up (page faults, BLAS
    threads starting): the least disturbed on a shared machine. A sample repeats a short call
    until it lasts about MIN_SAMPLE seconds, because one context switch on a busy machine costs
    more than a sub-millisecond product."""
    t0 = time.perf_counter()
    fn()
    loops = max(1, min(MAX_LOOPS, int(MIN_SAMPLE / max(time.perf_counter() - t0, 1e-6))))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


def load_split(model_path: str):
    """The model's split (featurizer + head), loaded as the job's workers load it."""
    from distributed_influence.data.model import load_model, read_model_bytes, split_model

    name = os.path.basename(model_path)
    return split_model(load_model(read_model_bytes(model_path), name), None, None, name)


def featurize_floor(work: dict) -> dict:
    """One process running the feature extractor over the job's rows (train, then test) with all
    cores and the job's batch size, two ways: Keras ``predict`` and the package's ``Featurizer``
    (one traced graph; for a small model it avoids much of predict's per-call overhead). The
    faster is the featurize stage's floor.

    Each is run once on one batch before the clock starts, so the floor leaves out tracing the
    graph (which each of the job's workers pays): the best the stage could do.

    Returns:
        seconds (the faster), keras_seconds, featurizer_seconds, rows, batch, and the train
        rows' features with the bias column (n, d+1) float32, which the fit's floors reuse.
    """
    from distributed_influence.data.model import Featurizer, auto_batch_size

    split = load_split(work["model"])
    batch = auto_batch_size(split.input_shape)
    train, test = np.load(work["train"]), np.load(work["test"])
    x, xt = train["x"], test["x"]
    forward = Featurizer(split, batch)
    split.featurizer.predict(x[:batch], batch_size=batch, verbose=0)
    forward(x[:batch])
    t0 = time.perf_counter()
    split.featurizer.predict(x, batch_size=batch, verbose=0)
    split.featurizer.predict(xt, batch_size=batch, verbose=0)
    t1 = time.perf_counter()
    feats, _ = forward(x, augment=True)
    forward(xt)
    t2 = time.perf_counter()
    return {"seconds": min(t1 - t0, t2 - t1), "keras_seconds": t1 - t0, "featurizer_seconds": t2 - t1,
            "rows": len(x) + len(xt), "batch": batch, "train_features": feats, "labels": train["y"],
            "theta": split.theta()}


def hvp_floor(x: np.ndarray, theta: np.ndarray) -> dict:
    """One float32 Hessian product over ``x`` (one shard's rows, with the bias column) against
    the two GEMMs it cannot avoid: X·V ((rows × d+1)·(d+1 × C)) and Wᵀ·X ((C × rows)·(rows × d+1))."""
    from distributed_influence.method import cpu_sums

    rng = np.random.default_rng(0)
    v = rng.normal(size=theta.shape)
    probs = cpu_sums.softmax_blocks(x, theta, "float32")
    hvp = best_of(lambda: cpu_sums.hvp_sums(x, theta, v, "float32", probs=probs))
    v32 = v.astype(np.float32)
    w = rng.random((len(x), theta.shape[1]), dtype=np.float32)
    gemm = best_of(lambda: x @ v32) + best_of(lambda: w.T @ x)
    return {"rows": len(x), "hvp_seconds": hvp, "gemm_seconds": gemm, "ratio": hvp / gemm}


def objective_pass(x: np.ndarray, y: np.ndarray, theta: np.ndarray) -> Optional[float]:
    """Best float32 objective pass (Σ CE and its gradient) over all rows, with the sums the job's
    CPU workers use; None when its float64 one-hot targets would not fit comfortably."""
    from distributed_influence.method import cpu_sums
    from distributed_influence.method import representer as rp

    if len(x) * theta.shape[1] * 8 > MAX_PASS_BYTES:
        return None
    targets = rp.one_hot(y, theta.shape[1])
    return best_of(lambda: cpu_sums.objective_sums(x, targets, theta, "float32"))


def measure_floors(work: dict, res: dict) -> dict:
    """The floors of one audit, measured right after it while the cluster is idle."""
    m = res["manifest"]
    n, shards, d = m["n_train"], len(m["shards"]), m["feature_dim"]
    # Other work on the machine slows the bare timings too (a BLAS thread waiting for a core it
    # shares); how much of it there was is printed beside them.
    busy0, own0, steal0, t0 = busy_cpu_seconds(), own_cpu_seconds(), steal_cpu_seconds(), time.perf_counter()
    feat = featurize_floor(work)
    x = feat.pop("train_features")
    hvp = hvp_floor(np.ascontiguousarray(x[:max(1, n // shards)]), feat["theta"])
    one_pass = objective_pass(x, feat.pop("labels"), feat.pop("theta"))
    del x
    # The scoring GEMM's shape: a test block against a block of a shard's rows.
    gflops = matmul_gflops(min(m["n_test"], 1024), d + 1, min(max(1, n // shards), 8192))
    # The α pass's float64 products: blocks of 1,024 shard rows against (d+1) × C columns.
    gflops64 = numpy_gflops(1024, d + 1, m["n_classes"], np.float64)
    foreign = busy_cpu_seconds() - busy0 - (own_cpu_seconds() - own0)
    contention = Contention(time.perf_counter() - t0, max(0.0, foreign), steal_cpu_seconds() - steal0)
    return {"featurize": feat, "hvp": hvp, "objective_pass_seconds": one_pass, "score_gflops": gflops,
            "alpha_gflops": gflops64, "contention": contention.text()}


def numpy_gflops(rows: int, k: int, cols: int, dtype) -> float:
    """Best-of-3 NumPy (BLAS) GEMM rate of (rows × k) by (k × cols) in ``dtype``, in GFLOP/s."""
    a = np.random.default_rng(0).random((rows, k)).astype(dtype)
    b = np.random.default_rng(1).random((k, cols)).astype(dtype)
    return 2.0 * rows * k * cols / best_of(lambda: a @ b) / 1e9


# ------------------------------------------------------------------------------- the tables
def stage_rows(res: dict, floors: dict) -> List[list]:
    """Per stage: seconds, rows/s, the floor, its seconds, the ratio and the target."""
    m, t = res["manifest"], res["timings"]
    n, n_test, d = m["n_train"], m["n_test"], m["feature_dim"]
    passes = m["head_fit"].get("passes", {}).get("total") or 0
    feat, hvp = floors["featurize"], floors["hvp"]
    pass_floor = hvp["gemm_seconds"] * n / hvp["rows"]  # the GEMMs of one pass over all n rows
    sc = m["scoring"]
    # The score stage's GEMMs: the pairs scored (float32) and the α pass's three float64 products
    # of n × (d+1) × C (x·[Θ | S], for the logits and the per-train sums, and Σ x_iᵀα_i).
    pairs_floor = sc["pairs_scored"] * (d + 1) * 2 / (floors["score_gflops"] * 1e9)
    alpha_floor = 3 * n * (d + 1) * m["n_classes"] * 2 / (floors["alpha_gflops"] * 1e9)
    score_floor = pairs_floor + alpha_floor
    rows = [
        ["featurize", f"{t['featurize']:.2f}", rate((n + n_test) / t["featurize"]),
         f"one process, all cores, {n + n_test} rows, batch {feat['batch']}: the faster of Keras predict "
         f"({feat['keras_seconds']:.2f} s) and the package's Featurizer ({feat['featurizer_seconds']:.2f} s)",
         f"{feat['seconds']:.3g}", f"{t['featurize'] / feat['seconds']:.2f}", "–"],
        ["fit", f"{t['fit']:.2f}", rate(n * passes / t["fit"]) if passes else "–",
         f"{passes} passes x the float32 GEMMs of one pass over n rows ({pass_floor:.3g} s)",
         f"{passes * pass_floor:.3g}", f"{t['fit'] / max(passes * pass_floor, 1e-12):.2f}", "–"],
        ["fit: one Hessian product", f"{hvp['hvp_seconds']:.3g}", rate(hvp["rows"] / hvp["hvp_seconds"]),
         f"X·V + Wᵀ·X in NumPy on one shard's {hvp['rows']} rows (d+1 = {d + 1}, C = {m['n_classes']})",
         f"{hvp['gemm_seconds']:.3g}", f"{hvp['ratio']:.2f}",
         f"<= {TARGET_HVP}: {yes(hvp['ratio'] <= TARGET_HVP)}"],
        ["score", f"{t['score']:.2f}", rate(sc["pairs_scored"] / t["score"]) + " pairs",
         f"{sc['pairs_scored']} pairs ({sc['method']}) x (d+1) x 2 flops at {floors['score_gflops']:.1f} GFLOP/s "
         f"({pairs_floor:.3g} s) + the alpha pass's 3 n x (d+1) x C float64 GEMMs at "
         f"{floors['alpha_gflops']:.1f} GFLOP/s ({alpha_floor:.3g} s)",
         f"{score_floor:.3g}", f"{t['score'] / max(score_floor, 1e-12):.1f}", "–"],
        ["reduce", f"{t['reduce']:.2f}", rate((n + n_test) / t["reduce"]), "–", "–", "–", "–"],
    ]
    return rows


def show_stages(res: dict, floors: dict) -> None:
    """The per-stage table of one audit, and the fit in objective passes when measured."""
    show_table(f"[{res['label']}] stages against their floors (all measured in this run):",
               ["stage", "seconds", "rows/s", "floor", "floor s", "ratio", "target"], stage_rows(res, floors))
    print(f"[{res['label']}] while the floors were measured, {floors['contention']}", flush=True)
    fit, one = res["timings"]["fit"], floors["objective_pass_seconds"]
    passes = res["head_fit"].get("passes", {}).get("total")
    if one is None:
        print(f"[{res['label']}] objective pass over all rows: skipped (its one-hot targets would take "
              f"over {MAX_PASS_BYTES / 1e9:.0f} GB)", flush=True)
    else:
        print(f"[{res['label']}] one float32 objective pass over all {res['manifest']['n_train']} rows in one "
              f"process: {one:.3f} s; the fit ({fit:.1f} s) costs {fit / one:.1f} of them; it made {passes} "
              f"passes", flush=True)


def memory_rows(results: List[dict]) -> List[list]:
    """Per audit: the driver's and the largest worker's peak RSS against their budgets."""
    return [[r["label"], f"{r['driver_rss'] / 1e9:.3f}", yes(r["driver_rss"] <= 1e9),
             f"{r['worker_rss'] / 1e9:.3f}", f"{r['worker_budget'] / 1e9:.3f}",
             yes(r["worker_rss"] <= r["worker_budget"])] for r in results]


def show_memory(results: List[dict]) -> None:
    """The memory table of every audit of the run, the issue's budgets beside."""
    show_table("peak RSS (worker budget: its shards' features x 2.5 + the test features + 1 GB):",
               ["audit", "driver GB", "driver <= 1 GB", "largest worker GB", "worker budget GB", "within"],
               memory_rows(results))


def _pairs_ok(res: dict) -> bool:
    """The pairs scored within target: a pruned run should score at most 5% of them."""
    sc = res["manifest"]["scoring"]
    limit = TARGET_PAIRS_PRUNED if sc["method"] == "pruned" else TARGET_PAIRS
    return sc["pairs_scored_fraction"] <= limit


def show_class_comparison(a: dict, b: dict) -> dict:
    """The same audit at two C side by side: the score stage and the fit's passes may grow by at
    most 1.5x from the smaller C to the larger, and the pairs scored stay a small fraction."""
    small, big = sorted((a, b), key=lambda r: r["manifest"]["n_classes"])
    cs, cb = small["manifest"]["n_classes"], big["manifest"]["n_classes"]

    def passes(r):
        """The fit's passes over the training features (0 when the manifest has none)."""
        return r["head_fit"].get("passes", {}).get("total") or 0

    score_ratio = big["timings"]["score"] / small["timings"]["score"]
    # The score stage is the α pass (α, the per-train sums, Σ x_iᵀα_i: n·d·C each) and the top-k
    # scoring (the pairs): the shards' seconds of each, summed over shards.
    topk = [sum(s["seconds"] for s in r["manifest"]["scoring"]["shards"]) for r in (small, big)]
    alpha = [sum(s.get("score_seconds", 0.0) for s in r["manifest"]["shards"]) - t for r, t in zip((small, big), topk)]
    pass_ratio = passes(big) / max(passes(small), 1)
    fits = [r["timings"]["fit"] for r in (small, big)]
    fr = [r["manifest"]["scoring"] for r in (small, big)]
    rows = [
        ["score stage s", f"{small['timings']['score']:.2f}", f"{big['timings']['score']:.2f}",
         f"{score_ratio:.2f}", f"<= {TARGET_SCORE_RATIO}", yes(score_ratio <= TARGET_SCORE_RATIO)],
        ["  of which top-k scoring, shard s summed", f"{topk[0]:.2f}", f"{topk[1]:.2f}",
         f"{topk[1] / max(topk[0], 1e-9):.2f}", "–", "–"],
        ["  of which the alpha pass and index, shard s summed", f"{alpha[0]:.2f}", f"{alpha[1]:.2f}",
         f"{alpha[1] / max(alpha[0], 1e-9):.2f}", f"– ({cb / cs:g} x the GEMMs)", "–"],
        ["fit s", f"{fits[0]:.2f}", f"{fits[1]:.2f}", f"{fits[1] / fits[0]:.2f}", "–", "–"],
        ["fit passes", passes(small), passes(big), f"{pass_ratio:.2f}", f"<= {TARGET_PASSES_RATIO}",
         yes(pass_ratio <= TARGET_PASSES_RATIO)],
        ["pairs scored fraction", f"{fr[0]['pairs_scored_fraction']:.4f} ({fr[0]['method']})",
         f"{fr[1]['pairs_scored_fraction']:.4f} ({fr[1]['method']})", "–",
         f"<= {TARGET_PAIRS} (<= {TARGET_PAIRS_PRUNED} pruned)",
         f"C={cs}: {yes(_pairs_ok(small))}, C={cb}: {yes(_pairs_ok(big))}"],
    ]
    show_table(f"C = {cb} against C = {cs} (same n, m, d, shards; in this run):",
               ["measure", f"C = {cs}", f"C = {cb}", f"ratio {cb}/{cs}", "target", "within"], rows)
    return {"score_ratio": score_ratio, "passes_ratio": pass_ratio}


# ------------------------------------------------------------------------------- exactness
def check_topk(work: dict, out: str, samples: int, k: int, seed: int = 7) -> dict:
    """Top-k of sampled test rows against brute force over the train index (float64)."""
    import pyarrow.parquet as pq

    from distributed_influence.data.model import Featurizer, load_model, read_model_bytes, split_model
    from distributed_influence.method import representer as rp
    from distributed_influence.store import index

    split = split_model(load_model(read_model_bytes(work["model"]), "mlp.keras"), None, None, "mlp.keras")
    test = np.load(work["test"])
    samples = min(samples, len(test["y"]))
    rows = np.sort(np.random.default_rng(seed).choice(len(test["y"]), size=samples, replace=False))
    feats, logits = Featurizer(split, None)(test["x"][rows])  # the job's batch size: images need small ones
    xt = rp.augment(feats).astype(np.float64)
    pred = np.argmax(logits, axis=1)
    xs, alphas, ids = [], [], []
    for path in index.shard_files(os.path.join(out, index.INDEX_DIR)):
        sh = index.read_shard(path)
        xs.append(sh["x"])
        alphas.append(sh["alpha"][:, :])
        ids.append(sh["ids"])
    x = np.concatenate(xs)
    alpha = np.concatenate(alphas)
    tid = np.concatenate(ids)
    del xs, alphas
    topk = pq.read_table(os.path.join(out, "influence_topk"), filters=[("test_id", "in", rows.tolist())],
                         columns=["test_id", "kind", "rank", "train_id", "representer_value"]).to_pydict()
    got = {}
    for t, kind, rank, tr, v in zip(topk["test_id"], topk["kind"], topk["rank"], topk["train_id"],
                                    topk["representer_value"]):
        got.setdefault((t, kind), {})[rank] = (tr, v)
    same, close = 0, 0
    worst = 0.0
    for j, t in enumerate(rows):
        r = alpha[:, pred[j]] * (x.astype(np.float64) @ xt[j])
        for kind, largest in (("proponent", True), ("opponent", False)):
            order = np.lexsort((tid, -r if largest else r))[:k]
            mine = got[(int(t), kind)]
            ids_job = [mine[i + 1][0] for i in range(k)]
            vals_job = np.array([mine[i + 1][1] for i in range(k)])
            same += int(ids_job == tid[order].tolist())
            scale = max(np.abs(r).max(), 1e-30)
            err = float(np.max(np.abs(vals_job - r[order])) / scale)
            worst = max(worst, err)
            close += int(err <= 1e-5)
    return {"lists": 2 * samples, "identical_ids": same, "values_within_1e-5": close,
            "max_value_error_rel": worst}


# ------------------------------------------------------------------------ pruned against dense
def read_sorted(out: str, name: str):
    """A result table (a Parquet dataset directory, or one file), sorted by its keys so that two
    runs' part layouts do not matter."""
    import pyarrow.parquet as pq

    path = os.path.join(out, name)
    table = pq.read_table(path if os.path.isdir(path) else path + ".parquet")
    return table.sort_by([(k, "ascending") for k in TABLE_KEYS[name]])


def _abs_sum_cell(a, b) -> str:
    """influence_abs_sum: its nulls in each run, and equality where both have a value."""
    import pyarrow.compute as pc

    both = pc.and_(a.is_valid(), b.is_valid())
    shared = int(pc.sum(both).as_py() or 0)
    same = pc.filter(a, both).equals(pc.filter(b, both))
    return (f"null in {a.null_count} of {len(a)} rows (pruned), {b.null_count} (dense); "
            f"equal where both set ({shared} rows): {yes(same)}")


def compare_tables(out_pruned: str, out_dense: str) -> Dict[str, dict]:
    """Each table of the two runs compared exactly (``Table.equals`` after sorting by keys),
    except influence_abs_sum, which a pruned run may leave null for signed features."""
    result = {}
    for name in TABLE_KEYS:
        a, b = read_sorted(out_pruned, name), read_sorted(out_dense, name)
        info = {"rows": (a.num_rows, b.num_rows), "abs_sum": "–"}
        if ABS_SUM in a.column_names and ABS_SUM in b.column_names:
            info["abs_sum"] = _abs_sum_cell(a.column(ABS_SUM), b.column(ABS_SUM))
            a, b = a.drop_columns([ABS_SUM]), b.drop_columns([ABS_SUM])
        info["equal"] = a.equals(b)
        if not info["equal"]:
            info["unequal"] = [c for c in a.column_names
                               if c not in b.column_names or not a.column(c).equals(b.column(c))]
        result[name] = info
    return result


def show_dense_comparison(pruned: dict, dense: dict) -> Dict[str, dict]:
    """The run and its ``--scoring dense`` twin: their scoring and whether the tables agree."""
    rows = []
    for r in (pruned, dense):
        sc = r["manifest"]["scoring"]
        rows.append([r["label"], sc["requested"], sc["method"], sc.get("reason") or "–",
                     f"{sc['pairs_scored_fraction']:.4f}", f"{r['timings']['score']:.2f}", f"{r['wall']:.1f}"])
    show_table("pruned against dense scoring of the same audit:",
               ["run", "requested", "scored", "why dense", "pairs fraction", "score s", "wall s"], rows)
    cmp = compare_tables(pruned["out"], dense["out"])
    show_table("their tables (sorted by keys, compared with Table.equals):",
               ["table", "rows", f"equal (without {ABS_SUM})", ABS_SUM],
               [[name, "/".join(map(str, c["rows"])),
                 yes(c["equal"]) + ("" if c["equal"] else f" (differ: {', '.join(c['unequal'])})"),
                 c["abs_sum"]] for name, c in cmp.items()])
    return cmp
