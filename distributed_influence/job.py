"""The audit as stages: plan, featurize, fit head, α + score, reduce (DESIGN.md §2).

:func:`run_audit` drives the same stages over either pool: an in-process one (the
single-process engine) or Ray actors. Nothing big passes through the driver: training
features stay in the workers, and test features stay in Ray's object store, where the workers
that computed them put them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import time

import numpy as np

from . import __version__
from . import faults, index
from . import reduce as rd
from . import storage
from . import tables
from .config import AuditConfig
from .fit import fit_head
from .inputs import Inputs, prepare_inputs
from .representer import fidelity_from_moments, fidelity_moments, per_class, predicted_classes
from .resume import WorkStore, run_key
from .scoring import summarize as scoring_summary
from .shard import WorkerSettings, plan_shards
from .sources import options_from
from .worker import InProcessPool, RayPool, progress_bar, unwrap_ray_error

log = logging.getLogger(__name__)


def _versions() -> dict:
    import pyarrow
    import ray
    import scipy

    from .tfimport import import_keras, import_tensorflow

    keras, tf = import_keras(), import_tensorflow()
    return {
        "distributed_influence": __version__,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
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
    OpenBLAS threads spin on the cores the workers compute on: with the default thread count
    a round trip of the head fit took 76 ms instead of 45 ms on the 2-core benchmark.
    """
    if not use_ray:
        return contextlib.nullcontext()  # the in-process engine does the math here: keep BLAS
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def run_audit(config: AuditConfig, use_ray: bool = True) -> dict:
    """Runs a full audit and writes the tables and manifest to ``config.out``.

    Finished work is persisted under ``OUT/_work/`` as it completes; re-running the same
    command after a crash reuses it (see :mod:`distributed_influence.resume`).

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
    fault = faults.from_env()
    with timer.stage("validate"):
        inputs = prepare_inputs(config)
    started = False
    pool = None
    gpus = 0.0
    try:
        if use_ray:
            from .runtime import plan_workers, start_ray

            with timer.stage("ray_start"):
                started = start_ray(config.address)
            n_workers, gpus, cpus = plan_workers(config.shards, config.workers, config.gpus_per_worker)
            n_shards = config.shards or n_workers
        else:
            n_workers = 1
            n_shards = config.shards or 1
        specs = plan_shards(inputs.train.n_rows, n_shards)
        key = run_key(config.digest(), inputs.model_bytes, config.train, config.test,
                      [(s.start, s.stop) for s in specs])
        store = WorkStore.open(config.out, key, config.overwrite)
        settings = WorkerSettings(
            model_name=inputs.model_name, train=_absolute(config.train), test=_absolute(config.test),
            target=config.target,
            lam=config.lam, k=config.k, n_train=inputs.train.n_rows, batch_size=config.batch_size,
            test_block=config.test_block, scoring=config.scoring, feature_layer=config.feature_layer,
            logit_layer=config.logit_layer, input_shape=inputs.input_shape, scale=config.scale,
            index_dir=storage.join(store.path, index.INDEX_DIR), fault=fault,
            source_options={k: v for k, v in options_from(config).items() if k != "scale"},
            layouts={"train": inputs.train.layout(), "test": inputs.test.layout()},
        )
        if use_ray:
            pool = RayPool(inputs.model_bytes, settings, min(n_workers, len(specs)), cpus, gpus)
        else:
            pool = InProcessPool(inputs.model_bytes, settings)
        log.info("%d training rows in %d shards on %d workers (%g GPU each)",
                 inputs.train.n_rows, len(specs), pool.n_workers, gpus)
        with _driver_threads(use_ray):
            manifest = _run_stages(config, inputs, pool, specs, store, timer, fault)
    except Exception as exc:
        raise unwrap_ray_error(exc) from None
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            import ray

            ray.shutdown()
    manifest["run_key"] = key
    manifest["workers"]["gpus_per_worker"] = gpus
    manifest["timings"]["total"] = round(time.perf_counter() - t_start, 4)
    _publish_index(store, config.out)  # before the manifest: a reader that sees it sees all
    tables.write_outputs(config.out, manifest.pop("_tables"), manifest)
    store.remove()
    return manifest


def _absolute(spec: str) -> str:
    """Local paths as absolute paths: workers may not share the driver's working directory."""
    return spec if storage.is_uri(spec) or spec.startswith("digits") else os.path.abspath(spec)


def _publish_index(store: WorkStore, out: str) -> None:
    """Moves the finished train index from the run's work area to ``OUT/index``."""
    final = storage.join(out, index.INDEX_DIR)
    storage.remove_tree(final)
    storage.move_tree(storage.join(store.path, index.INDEX_DIR), final)


def _featurize_test(pool, inputs: Inputs) -> dict:
    """Test features, computed by the workers in parallel and left where they are (in Ray's
    object store): the driver keeps only references, logits, ids and labels."""
    parts = plan_shards(inputs.test.n_rows, pool.n_workers)
    x_parts, metas = pool.call_split("featurize_test", [(p.start, p.stop) for p in parts])
    test = {"x_parts": x_parts,
            "logits": np.concatenate([m["logits"] for m in metas]),
            "ids": np.concatenate([m["ids"] for m in metas])}
    if metas[0]["labels"] is not None:
        test["labels"] = np.concatenate([m["labels"] for m in metas])
    if "keys" in metas[0]:
        test["keys"] = np.concatenate([m["keys"] for m in metas])
    return test


def _fit(config: AuditConfig, inputs: Inputs, pool, specs, store: WorkStore) -> dict:
    """The head fit on the shards' sums, and the fidelity of the surrogate; persisted."""
    def sums(theta, precision):
        res = pool.map("objective", specs, theta, precision)
        return sum(r[0] for r in res), np.sum([r[1] for r in res], axis=0)

    def hvp(theta, v, precision):
        return np.sum(pool.map("hvp", specs, theta, v, precision), axis=0)

    with progress_bar(None, "fit head", "it") as bar:
        def on_iteration(it, g):
            bar.update(1)
            bar.set_postfix_str(f"max|grad J|={g:.2e}", refresh=False)

        fit = fit_head(sums, hvp, inputs.train.n_rows, config.lam, inputs.split.theta(),
                       tol=config.grad_tol, max_iter=config.max_iter, on_iteration=on_iteration)
    if not fit.converged:
        log.warning("head fit stopped at max|grad J| = %.3g > %.3g after %d iterations",
                    fit.max_abs_grad, config.grad_tol, fit.iterations)
    log.info("head fit: %d iterations, max|grad J| = %.3g (%s)", fit.iterations, fit.max_abs_grad, fit.method)
    result = {
        "theta": fit.theta,
        "info": {"iterations": fit.iterations, "evaluations": fit.evaluations,
                 "max_abs_grad": fit.max_abs_grad, "objective": fit.objective,
                 "converged": fit.converged, "method": fit.method},
        "train_moments": np.sum(pool.map("fidelity", specs, fit.theta), axis=0),
    }
    store.save("fit", result)
    return result


def _with_keys(topk, train, test_table, results: list, test: dict):
    """Appends the string keys of sources that have them (DESIGN.md §3): ``train_key`` to
    influence_topk and train_scores, ``test_key`` to influence_topk and test_scores."""
    if tables.TRAIN_KEY in results[0]["train"]:
        ids = np.concatenate([r["train"]["train_id"] for r in results])
        keys = np.concatenate([r["train"][tables.TRAIN_KEY] for r in results])
        topk = tables.add_key_column(topk, "train_id", tables.TRAIN_KEY, ids, keys)
        train = tables.add_key_column(train, "train_id", tables.TRAIN_KEY, ids, keys)
    if "keys" in test:
        topk = tables.add_key_column(topk, "test_id", tables.TEST_KEY, test["ids"], test["keys"])
        test_table = tables.add_key_column(test_table, "test_id", tables.TEST_KEY, test["ids"], test["keys"])
    return topk, train, test_table
def _scoring(config: AuditConfig, records: list) -> dict:
    """The manifest's ``scoring`` section; one warning line when pruned fell back to dense."""
    summary = scoring_summary(records, config.scoring)
    if summary["method"] != config.scoring:
        log.warning("--scoring %s: scored densely instead (%s)", config.scoring, summary["reason"])
    log.info("scoring (%s): %.2f%% of the (test, train) pairs scored", summary["method"],
             100 * summary["pairs_scored_fraction"])
    return summary


def _run_stages(config: AuditConfig, inputs: Inputs, pool, specs, store: WorkStore,
                timer: _Timer, fault) -> dict:
    shard_info = {s.index: {"index": s.index, "start": s.start, "stop": s.stop, "rows": s.rows}
                  for s in specs}
    results = {s.index: store.load(f"shard-{s.index}") for s in specs}
    reused = sorted(i for i, r in results.items() if r is not None)
    todo = [s for s in specs if results[s.index] is None]
    if reused:
        log.info("resuming: %d of %d shards already scored", len(reused), len(specs))
    fit = store.load("fit")

    with timer.stage("featurize"):
        # The fit needs every shard; afterwards only the shards still to be scored.
        for p in pool.map("prepare", specs if fit is None else todo, desc="featurize train"):
            shard_info[p["shard"]].update(node=p["node"] or None, featurize_seconds=round(p["seconds"], 4))
        test = _featurize_test(pool, inputs)
        test_pred = predicted_classes(test["logits"])

    with timer.stage("fit"):
        if fit is None:  # else resumed: the saved fit loaded above
            fit = _fit(config, inputs, pool, specs, store)
    theta = fit["theta"]

    with timer.stage("score"):
        saved = []

        def persist(spec, result):
            store.save(f"shard-{spec.index}", result)
            saved.append(spec.index)
            faults.maybe_stop_driver(fault, len(saved))

        shared = (theta, test["x_parts"], pool.put(test_pred))
        for spec, r in zip(todo, pool.map("score", todo, *shared, desc="alpha + score", on_result=persist)):
            results[spec.index] = r
    for i, r in results.items():
        shard_info[i].setdefault("node", str(r.get("node", "")) or None)  # reused: node of the first run
        shard_info[i].update(score_seconds=round(float(r["seconds"]), 4), reused=i in reused)

    with timer.stage("reduce"):
        faults.maybe_hold(fault, "reduce")
        ordered = [results[s.index] for s in specs]
        topk = rd.merge_topk_table(ordered, config.k, test["ids"], test_pred)
        train = rd.train_table(ordered)
        alpha_head = np.sum([r["alpha_head"] for r in ordered], axis=0)
        surrogate = ordered[0]["test_surrogate"]
        # per_class: a binary model's one logit z as [−z, z], the logits of classes 0 and 1.
        dec = rd.test_table(test["ids"], test.get("labels"), test_pred, per_class(test["logits"]),
                            per_class(surrogate),
                            per_class(np.sum([r["test_alpha_head"] for r in ordered], axis=0)))
        residual = float(np.max(np.abs(theta - alpha_head)) / np.max(np.abs(theta)))
        index.write_head(storage.join(store.path, index.INDEX_DIR), theta, alpha_head)
        topk, train, test_table = _with_keys(topk, train, dec["table"], ordered, test)

    nodes = sorted({i["node"] for i in shard_info.values() if i.get("node")})
    return {
        "_tables": {tables.INFLUENCE_TOPK: topk, tables.TRAIN_SCORES: train,
                    tables.TEST_SCORES: test_table},
        "config": {key: storage.redact(val) for key, val in config.to_dict().items()},
        "config_digest": config.digest(),
        "model_sha256": hashlib.sha256(inputs.model_bytes).hexdigest(),
        "index": {"dir": index.INDEX_DIR, "shards": len(specs)},
        "versions": _versions(),
        "n_train": int(inputs.train.n_rows),
        "n_test": int(inputs.test.n_rows),
        "n_classes": int(inputs.n_classes),
        "feature_dim": int(inputs.split.feature_dim),
        "input_shape": [None if d is None else int(d) for d in inputs.input_shape],
        "sources": {"train": inputs.train.describe(), "test": inputs.test.describe()},
        "head_layer": inputs.split.head_layer,
        "lambda": float(config.lam),
        "target": config.target,
        "k": int(config.k),
        "head_fit": {**fit["info"], "grad_tol": config.grad_tol},
        "fidelity": {"train": fidelity_from_moments(fit["train_moments"]),
                     "test": fidelity_from_moments(fidelity_moments(surrogate, test["logits"]))},
        "decomposition": {"max_error": dec["max_error"], "max_relative_error": dec["max_relative_error"],
                          "theta_residual": residual},
        "scoring": _scoring(config, [results[s.index].get("scoring") for s in specs]),
        "shards": [shard_info[s.index] for s in specs],
        "resume": {"reused_shards": reused, "computed_shards": [s.index for s in todo]},
        "workers": {"count": pool.n_workers, "nodes": max(1, len(nodes)), "backend": pool.backend,
                    "devices": pool.devices()},
        "recovery": pool.recovery(),
        "timings": dict(timer.times),
    }
