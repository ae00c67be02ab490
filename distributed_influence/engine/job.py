"""The audit as stages: plan, featurize, fit head, α + score, reduce (docs/design.md, "Pipeline").

:func:`run_audit` drives the same stages over either pool: an in-process one (the
single-process engine) or Ray actors. Nothing big passes through the driver: training
features stay in the workers, and test features stay in Ray's object store, where the workers
that computed them put them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import time
from typing import Optional

import numpy as np

from distributed_influence import __version__
from distributed_influence.config import AuditConfig
from distributed_influence.data.inputs import Inputs, open_inputs, prepare_inputs
from distributed_influence.data.sources import options_from
from distributed_influence.data.sources.base import check_unique_keys
from distributed_influence.engine import reduce as rd
from distributed_influence.engine.manifest import build_manifest, featurized_record, name_nodes
from distributed_influence.method.logits import error_classes
from distributed_influence.store import index, storage, tables
from distributed_influence.store.workstore import WorkStore, fingerprint, input_record, run_key

# The modules of the workers' math (shard, scoring, representer) import TensorFlow, which is slow
# to import: a Ray run's driver never imports them (the workers describe the model), and the
# in-process engine imports them where needed.

log = logging.getLogger(__name__)


def _versions(libraries: dict) -> dict:
    """Versions for the manifest; ``libraries``: TensorFlow's and Keras's, as the workers (or
    this process, in-process) loaded them."""
    import pyarrow
    import ray
    import scipy

    return {
        "distributed_influence": __version__,
        "python": platform.python_version(),
        **libraries,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
    }


class _Timer:
    def __init__(self):
        self.times = {}

    def stage(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()
                log.info("stage %s: started", name)

            def __exit__(self, *exc):
                timer.times[name] = round(time.perf_counter() - self.t0, 4)
                if exc[0] is None:
                    log.info("stage %s: done in %.2f s", name, timer.times[name])

        return _Stage()


def _driver_threads(use_ray: bool):
    """One BLAS thread in a driver that only orchestrates Ray workers.

    The driver's BLAS (NumPy, and scipy's L-BFGS) is idle between its tiny calls, and idle
    OpenBLAS threads spin on the cores the workers compute on, slowing every round trip of the
    head fit.
    """
    if not use_ray:
        return contextlib.nullcontext()  # the in-process engine does the math here: keep BLAS
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def run_audit(config: AuditConfig, use_ray: bool = True) -> dict:
    """Runs a full audit and writes the tables and manifest to ``config.out``.

    Finished work is persisted under ``OUT/_work/`` as it completes; re-running the same
    command after a crash reuses it (see :mod:`distributed_influence.store.workstore`).

    Args:
        config: the validated settings.
        use_ray: False runs every shard in this process (the single-process engine).

    Returns:
        The manifest that was written.

    Raises:
        InputError: bad input, found on the driver or by a worker; no table is written.
    """
    timer = _Timer()
    t_start = time.perf_counter()
    run = _Run()
    try:
        _start(config, use_ray, timer, run)
        # SciPy brings its own BLAS: loaded before the thread limit below applies to it.
        import distributed_influence.method.fit  # noqa: F401

        with _driver_threads(use_ray):
            manifest = _run_stages(config, run.inputs, run.pool, run.specs, run.store, timer)
        manifest["versions"] = _versions(run.libraries)
    except Exception as exc:
        from distributed_influence.cluster.pool import unwrap_ray_error

        raise unwrap_ray_error(exc) from None
    finally:
        if run.pool is not None:
            run.pool.shutdown()
        if run.started:
            from distributed_influence.cluster.runtime import stop_ray

            stop_ray()
    manifest["run_key"] = run.key
    manifest["workers"]["gpus_per_worker"] = run.gpus
    manifest["timings"]["total"] = round(time.perf_counter() - t_start, 4)
    _publish_index(run.store, config.out)  # before the manifest: a reader that sees it sees all
    tables.publish(config.out, storage.join(run.store.path, "tables"), tables.TABLES, manifest)
    run.store.remove()
    return manifest


@dataclasses.dataclass
class _Run:
    """What the start of a run set up, filled in as it goes, so that a failure half-way shuts
    down exactly what was started."""

    inputs: Optional[Inputs] = None
    pool: object = None
    specs: list = dataclasses.field(default_factory=list)
    key: str = ""
    store: Optional[WorkStore] = None
    libraries: dict = dataclasses.field(default_factory=dict)
    gpus: float = 0.0
    started: bool = False  # this run started or joined Ray, and stops it


def _start(config: AuditConfig, use_ray: bool, timer: "_Timer", run: _Run) -> None:
    """Checks the inputs, starts the workers (Ray's or this process's), plans the shards and
    opens the work store."""
    if use_ray:
        opened = open_inputs(config)  # what needs no TensorFlow: a wrong path stops here, before Ray
        from distributed_influence.cluster.runtime import plan_workers, start_ray

        with timer.stage("ray_start"):
            run.started = start_ray(config.address)
        n_workers, run.gpus, cpus = plan_workers(config.shards, config.workers, config.gpus_per_worker)
        n_shards = config.shards or n_workers
    else:
        with timer.stage("validate"):
            opened = run.inputs = prepare_inputs(config)
        n_shards = config.shards or 1
    from distributed_influence.engine.plan import plan_shards

    run.specs = plan_shards(opened.train.n_rows, n_shards)
    bounds = [(s.start, s.stop) for s in run.specs]
    prints = {"train": fingerprint(config.train), "test": fingerprint(config.test)}
    run.key = run_key(config.digest(), opened.model_bytes, config.train, config.test, bounds, prints)
    inputs = input_record(config.digest(), opened.model_bytes, prints, bounds)
    settings = _worker_settings(config, opened, run.key)
    if use_ray:
        from distributed_influence.cluster.pool import RayPool

        # The workers start now and load the model; the first checks it and the sources
        # against it, so this process never loads TensorFlow (seconds of a core that the
        # workers, starting at the same time, would otherwise wait for).
        run.pool = RayPool(opened.model_bytes, settings, min(n_workers, len(run.specs)), cpus, run.gpus)
        with timer.stage("validate"):
            described = run.pool.describe()
            run.inputs = prepare_inputs(config, opened, split=described["split"])
        run.libraries = described["versions"]
    else:
        from distributed_influence.engine.pool import InProcessPool
        from distributed_influence.tfimport import versions

        run.pool = InProcessPool(run.inputs.model_bytes, settings)
        run.libraries = versions()
    # Inputs valid: another job's work is refused, or with --overwrite replaced at the first save.
    run.store = WorkStore.open(config.out, run.key, config.overwrite, inputs)
    log.info("%d training rows in %d shards on %d workers (%g GPU each)",
             run.inputs.train.n_rows, len(run.specs), run.pool.n_workers, run.gpus)


def _worker_settings(config: AuditConfig, opened, key: str):
    """What the workers are told: the settings marked for workers, copied from ``config``, and
    what this run found out (the model's name, the sources' rows and layouts, where the index goes).
    """
    from distributed_influence.engine.plan import WorkerSettings

    return WorkerSettings.from_config(
        config, model_name=opened.model_name, train=_absolute(config.train), test=_absolute(config.test),
        n_train=opened.train.n_rows, index_dir=storage.join(WorkStore(config.out, key).path, index.INDEX_DIR),
        source_options={k: v for k, v in options_from(config).items() if k != "scale"},
        layouts={"train": opened.train.layout(), "test": opened.test.layout()},
    )


def _absolute(spec: str) -> str:
    """Local paths as absolute paths: workers may not share the driver's working directory."""
    return spec if storage.is_uri(spec) or spec.startswith("digits") else os.path.abspath(spec)


def _publish_index(store: WorkStore, out: str) -> None:
    """Moves the finished train index from the run's work area to ``OUT/index``."""
    final = storage.join(out, index.INDEX_DIR)
    storage.remove_tree(final)
    storage.move_tree(storage.join(store.path, index.INDEX_DIR), final)


def _featurize(pool, inputs: Inputs, specs) -> tuple:
    """The training shards ``specs`` featurized and kept by their workers, and the test set's
    features and logits, computed by the workers in parallel and left where they are (in Ray's
    object store): the driver keeps only references and per-row integers (explained classes,
    ids, labels), never an (m × C) or (m × d) array.

    Returns:
        (``prepare``'s results, the test set as :func:`_run_stages` uses it).

    Raises:
        SourceError: two rows of a source share a key that only the workers could read (a
            TFRecord id feature); raised before anything is saved, so nothing is written.
    """
    from distributed_influence.engine.plan import plan_shards

    parts = plan_shards(inputs.test.n_rows, pool.n_workers)
    prepared, test_parts, metas = pool.featurize(specs, [(p.start, p.stop) for p in parts], desc="featurize")
    test = {"parts": test_parts,
            "pred": np.concatenate([m["pred"] for m in metas]),
            "ids": np.concatenate([m["ids"] for m in metas])}
    if metas[0]["labels"] is not None:
        test["labels"] = np.concatenate([m["labels"] for m in metas])
    if "keys" in metas[0]:
        test["keys"] = np.concatenate([m["keys"] for m in metas])
    _check_worker_keys(inputs, prepared, test)
    return prepared, test


def _check_worker_keys(inputs: Inputs, prepared: list, test: dict) -> None:
    """Refuses a key on two rows, where only the workers saw the keys (the driver checked the
    others when it opened the sources). A resumed run sees only the shards it featurizes again;
    the others were checked by the run that featurized them, with the same inputs (the run key
    fingerprints them)."""
    keyed = [p for p in prepared if "keys" in p]
    if keyed:
        check_unique_keys(inputs.train, np.concatenate([p.pop("ids") for p in keyed]),
                          np.concatenate([p.pop("keys") for p in keyed]))  # dropped: only this needs them
    if "keys" in test and not inputs.test.keys_listed():
        check_unique_keys(inputs.test, test["ids"], test["keys"])


def _fit(config: AuditConfig, inputs: Inputs, pool, specs, store: WorkStore) -> dict:
    """The head fit on the shards' sums, and the fidelity of the surrogate; persisted."""
    from distributed_influence.engine.pool import progress_bar
    from distributed_influence.method.fit import fit_head

    def sums(theta, precision):
        res = pool.map_summed("objective", specs, _sent(theta, precision), precision)
        return sum(r[0] for r in res), np.sum([r[1] for r in res], axis=0)

    def hvp(theta, v, precision):
        return np.sum(pool.map_summed("hvp", specs, _sent(theta, precision), _sent(v, precision), precision), axis=0)

    def sketch(theta, v, stride):  # every shard samples its own rows
        return np.sum(pool.map_summed("hvp", specs, _sent(theta, "float32"), _sent(v, "float32"), "float32", stride),
                      axis=0)

    with progress_bar(None, "fit head", "it") as bar:
        def on_iteration(it, g):
            bar.update(1)
            bar.set_postfix_str(f"max|grad J|={g:.2e}", refresh=False)

        fit = fit_head(sums, hvp, inputs.train.n_rows, config.lam, inputs.split.theta(),
                       tol=config.grad_tol, max_iter=config.max_iter, on_iteration=on_iteration,
                       sketch_sums=sketch)
    if not fit.converged:
        log.warning("head fit stopped at max|grad J| = %.3g > %.3g after %d iterations",
                    fit.max_abs_grad, config.grad_tol, fit.iterations)
    log.info("head fit: %d iterations, max|grad J| = %.3g (%s)", fit.iterations, fit.max_abs_grad, fit.method)
    result = {
        "theta": fit.theta,
        "info": {"iterations": fit.iterations, "evaluations": fit.evaluations, "passes": fit.passes,
                 "max_abs_grad": fit.max_abs_grad, "objective": fit.objective,
                 "converged": fit.converged, "method": fit.method},
        "train_moments": np.sum(pool.map("fidelity", specs, fit.theta), axis=0),
    }
    store.save("fit", result)
    return result


def _sent(a: np.ndarray, precision: str) -> np.ndarray:
    """An argument of a fit call as the workers use it: they compute in ``precision`` and cast
    their arguments to it first, so a float32 call is sent float32, bit for bit the same work.

    Why: a float64 head of d = 1600 and 10 classes is 128 kB, above the size up to which Ray
    sends an argument inside the call on a cluster (``max_direct_call_object_size``, 100 kB by
    default; a local instance raises it, see ``cluster.compat.DIRECT_CALL_BYTES``); each larger one
    goes through the object store, which makes each of the fit's many round trips slower.
    """
    return np.asarray(a, np.float32) if precision == "float32" else a


def _scoring(config: AuditConfig, records: list) -> dict:
    """The manifest's ``scoring`` section; one warning line when pruned fell back to dense."""
    from distributed_influence.engine.reduce import summarize_scoring as scoring_summary

    summary = scoring_summary(records, config.scoring)
    if summary["method"] != config.scoring:
        log.warning("--scoring %s: scored densely instead (%s)", config.scoring, summary["reason"])
    log.info("scoring (%s): %.2f%% of the (test, train) pairs scored", summary["method"],
             100 * summary["pairs_scored_fraction"])
    for column in ("influence_abs_sum", "error_influence"):
        if summary[column]["reason"]:
            log.warning("train_scores.%s left null: %s", column, summary[column]["reason"])
    return summary


def _reduce(config: AuditConfig, specs, store: WorkStore, test: dict, test_pred: np.ndarray,
            results: list, pool) -> dict:
    """The reduce stage: the workers merge the shards' partials by range and write the part files.

    Parts are written to ``_work/<key>/tables/`` and their summaries persisted, so a resumed run
    redoes only the ranges that had not finished. The driver passes each task its slice of the
    per-row vectors it holds (ids, labels, explained classes, audit scores); the partials, and the
    model's test logits among them, stay on storage.
    """
    staged = storage.join(store.path, "tables")
    out_dirs = {name: storage.join(staged, name) for name in tables.TABLES}
    partial_dir = storage.join(store.path, rd.PARTIAL_DIR)
    topk_files = [rd.topk_file(partial_dir, s.index) for s in specs]
    test_files = [rd.test_file(partial_dir, s.index) for s in specs]  # shard 0 first: it holds x_t Θ
    summaries = {"test": {}, "train": {}}
    reused = []
    # Sources with string keys (docs/outputs.md): every test task names the training rows of its
    # lists, so the (id, key) pairs are shared once (a per-row vector, like the audit scores).
    train_keys = None
    if tables.TRAIN_KEY in results[0]:
        train_keys = (np.concatenate([r["train_id"] for r in results]),
                      np.concatenate([r[tables.TRAIN_KEY] for r in results]))
        train_keys = pool.put(train_keys)
    calls = {"test": [], "train": []}
    for part, (a, b) in enumerate(tables.split_rows(len(test["ids"]), rd.REDUCE_ROWS)):
        done = store.load(f"reduce-test-{part}")
        if done is not None:
            summaries["test"][part] = done
            reused.append(f"test-{part}")
            continue
        rows = {"ids": test["ids"][a:b], "labels": None if test.get("labels") is None else test["labels"][a:b],
                "pred": test_pred[a:b]}
        if "keys" in test:
            rows["keys"] = test["keys"][a:b]
        calls["test"].append((part, a, b, topk_files, test_files, config.k, rows, out_dirs, train_keys))
    plan = rd.train_plan([r["train_id"] for r in results], [np.abs(r["alpha_label"]) for r in results],
                         [(s.start, s.stop) for s in specs])
    for part, (sources, positions, ranks) in enumerate(plan):
        done = store.load(f"reduce-train-{part}")
        if done is not None:
            summaries["train"][part] = done
            reused.append(f"train-{part}")
            continue
        files = [(rd.train_file(partial_dir, specs[s].index), first) for s, first in sources]
        calls["train"].append((part, files, positions, ranks, out_dirs[tables.TRAIN_SCORES]))
    del plan

    # Test and train parts at once: one test part alone (m ≤ 16,384) would leave CPUs idle.
    kinds = [("test", rd.reduce_test_range)] * len(calls["test"]) + [("train", rd.reduce_train_range)] * len(calls["train"])

    def keep(i, summary):
        kind = kinds[i][0]
        store.save(f"reduce-{kind}-{summary['part']}", summary)
        summaries[kind][summary["part"]] = summary

    pool.run_functions([(fn, args) for (_, fn), args in zip(kinds, calls["test"] + calls["train"])], keep)
    return {"test": [summaries["test"][p] for p in sorted(summaries["test"])],
            "train": [summaries["train"][p] for p in sorted(summaries["train"])],
            "reused": reused, "staged": staged}


def _run_stages(config: AuditConfig, inputs: Inputs, pool, specs, store: WorkStore, timer: _Timer) -> dict:
    """Featurize, fit, α + score and reduce, each skipped where the work store has its result.

    Returns:
        The manifest, without what only the caller knows (versions, run key, total time).
    """
    shard_info = {s.index: {"index": s.index, "start": s.start, "stop": s.stop, "rows": s.rows}
                  for s in specs}
    # Saved records are of this version and partials format: the run key hashes both (an earlier
    # version's records, lacking what the reduce reads, are in another work directory, refused).
    results = {s.index: store.load(f"shard-{s.index}") for s in specs}
    reused = sorted(i for i, r in results.items() if r is not None)
    todo = [s for s in specs if results[s.index] is None]
    fit = store.load("fit")
    if fit is not None:
        log.info("resuming: the head fit and %d of %d shards already done", len(reused), len(specs))

    with timer.stage("featurize"):
        # The fit needs every shard; afterwards only the shards still to be scored.
        prepared, test = _featurize(pool, inputs, specs if fit is None else todo)
        for p in prepared:
            shard_info[p["shard"]].update(featurized_on=p["node"] or None,
                                          featurize_seconds=round(p["seconds"], 4))
        test_pred = test["pred"]

    fit_reused = fit is not None
    with timer.stage("fit"):
        if fit is None:  # else resumed: the saved fit loaded above
            fit = _fit(config, inputs, pool, specs, store)
    theta = fit["theta"]

    with timer.stage("score"):
        results.update(_score(pool, store, todo, theta, test, test_pred, shard_info))
    for i, r in results.items():
        name_nodes(shard_info[i], r, reused=i in reused)

    with timer.stage("reduce"):
        ordered = [results[s.index] for s in specs]
        alpha_head = np.sum([r["alpha_head"] for r in ordered], axis=0)
        index.write_head(storage.join(store.path, index.INDEX_DIR), theta, alpha_head)
        devices = pool.devices()
        # The workers drop their shards and run the reduce themselves: they have its libraries
        # loaded already, where fresh task processes would start them again.
        pool.release()
        reduced = _reduce(config, specs, store, test, test_pred, ordered, pool)
        recovery = pool.recovery()
        pool.shutdown()
        del ordered

    scoring = _scoring(config, [results[s.index].get("scoring") for s in specs])
    return build_manifest(
        config, inputs, specs, fit, reduced, scoring, shard_info,
        resume={"reused_shards": reused, "computed_shards": [s.index for s in todo], "fit_reused": fit_reused},
        theta_residual=float(np.max(np.abs(theta - alpha_head)) / np.max(np.abs(theta))),
        workers={"count": pool.n_workers, "backend": pool.backend, "devices": devices},
        recovery=recovery, timings=dict(timer.times))


def _score(pool, store: WorkStore, todo: list, theta: np.ndarray, test: dict, test_pred: np.ndarray,
           shard_info: dict) -> dict:
    """α and the scores of the shards still to do; each result persisted as it arrives, so a
    crash loses only the shards in flight. The record keeps the node that featurized the shard
    (``shard_info``), for a resumed run's manifest."""
    partial_dir = storage.join(store.path, rd.PARTIAL_DIR)

    def persist(spec, result):
        store.save(f"shard-{spec.index}", featurized_record(result, shard_info[spec.index]))

    errors = error_classes(test.get("labels"), test_pred)
    shared = (theta, test["parts"], pool.put(test_pred), partial_dir, None if errors is None else pool.put(errors))
    return {spec.index: r for spec, r in zip(todo, pool.map("score_partial", todo, *shared, desc="alpha + score",
                                                             on_result=persist))}
