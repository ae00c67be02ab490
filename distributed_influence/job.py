"""The audit as stages: plan, featurize, fit head, α + score, reduce (DESIGN.md §2).

:func:`run_audit` drives the same stages over either pool: an in-process one (the
single-process engine) or Ray actors. Nothing big passes through the driver except the test
features, which are broadcast once with ``ray.put``.
"""

from __future__ import annotations

import logging
import platform
import time
from typing import Optional

import numpy as np

from . import __version__
from . import reduce as rd
from . import tables
from .config import AuditConfig
from .fit import fit_head
from .inputs import Inputs, prepare_inputs
from .representer import fidelity_from_moments, fidelity_moments
from .shard import WorkerSettings, plan_shards
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


def run_audit(config: AuditConfig, use_ray: bool = True) -> dict:
    """Runs a full audit and writes the tables and manifest to ``config.out``.

    Args:
        config: the validated settings.
        use_ray: False runs every shard in this process (the single-process engine).

    Returns:
        The manifest that was written.

    Raises:
        InputError: bad input, found on the driver or by a worker; nothing is written.
    """
    timer = _Timer()
    t_start = time.perf_counter()
    with timer.stage("validate"):
        inputs = prepare_inputs(config)
    started = False
    pool = None
    try:
        if use_ray:
            from .runtime import plan_workers, start_ray

            started = start_ray(config.address)
            n_workers, gpus, cpus = plan_workers(config.shards, config.workers, config.gpus_per_worker)
            n_shards = config.shards or n_workers
        else:
            n_workers, gpus, cpus = 1, 0.0, 0.0
            n_shards = config.shards or 1
        specs = plan_shards(inputs.train.n_rows, n_shards)
        settings = WorkerSettings(
            model_name=inputs.model_name, train=config.train, test=config.test, target=config.target,
            lam=config.lam, k=config.k, n_train=inputs.train.n_rows, batch_size=config.batch_size,
            test_block=config.test_block, feature_layer=config.feature_layer,
            logit_layer=config.logit_layer, input_shape=inputs.input_shape, scale=config.scale,
        )
        if use_ray:
            pool = RayPool(inputs.model_bytes, settings, min(n_workers, len(specs)), cpus, gpus)
        else:
            pool = InProcessPool(inputs.model_bytes, settings)
        log.info("%d training rows in %d shards on %d workers (%g GPU each)",
                 inputs.train.n_rows, len(specs), pool.n_workers, gpus)
        manifest = _run_stages(config, inputs, pool, specs, timer)
    except Exception as exc:
        raise unwrap_ray_error(exc) from None
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            import ray

            ray.shutdown()
    manifest["workers"]["gpus_per_worker"] = gpus
    manifest["timings"]["total"] = round(time.perf_counter() - t_start, 4)
    with timer.stage("write"):
        tables.write_outputs(config.out, manifest.pop("_tables"), manifest)
    return manifest


def _run_stages(config: AuditConfig, inputs: Inputs, pool, specs, timer: _Timer) -> dict:
    n_train = inputs.train.n_rows

    with timer.stage("featurize"):
        prepared = pool.map("prepare", specs, desc="featurize train")
        test_parts = plan_shards(inputs.test.n_rows, pool.n_workers)
        # Test rows are split over the workers too; their features are the one thing broadcast.
        parts = pool.call_all("featurize_rows", [("test", p.start, p.stop) for p in test_parts])
        test_x = np.concatenate([p[0] for p in parts])
        test_logits = np.concatenate([p[1] for p in parts])
        test_ids = np.concatenate([p[2] for p in parts])
        test_labels = None if parts[0][3] is None else np.concatenate([p[3] for p in parts])
        test_pred = np.argmax(test_logits, axis=1).astype(np.int64)

    with timer.stage("fit"):
        def sums(theta):
            res = pool.map("objective", specs, theta)
            return sum(r[0] for r in res), np.sum([r[1] for r in res], axis=0)

        def hvp(theta, v):
            return np.sum(pool.map("hvp", specs, theta, v), axis=0)

        with progress_bar(None, "fit head", "it") as bar:
            def on_iteration(it, g):
                bar.update(1)
                bar.set_postfix_str(f"max|grad J|={g:.2e}", refresh=False)

            fit = fit_head(sums, hvp, n_train, config.lam, inputs.split.theta(),
                           tol=config.grad_tol, max_iter=config.max_iter, on_iteration=on_iteration)
        if not fit.converged:
            log.warning("head fit stopped at max|grad J| = %.3g > %.3g after %d iterations",
                        fit.max_abs_grad, config.grad_tol, fit.iterations)
        train_moments = np.sum(pool.map("fidelity", specs, fit.theta), axis=0)
        test_moments = fidelity_moments(test_x.astype(np.float64) @ fit.theta, test_logits)

    with timer.stage("score"):
        shared = (pool.put(fit.theta), pool.put(test_x), pool.put(test_pred))
        results = pool.map("score", specs, *shared, desc="alpha + score")

    with timer.stage("reduce"):
        topk = rd.merge_topk_table(results, config.k, test_ids, test_pred)
        train = rd.train_table(results)
        alpha_head = np.sum([r["alpha_head"] for r in results], axis=0)
        test = rd.test_table(test_ids, test_labels, test_pred, test_logits, test_x, fit.theta, alpha_head)
        residual = float(np.max(np.abs(fit.theta - alpha_head)) / np.max(np.abs(fit.theta)))

    nodes = sorted({p["node"] for p in prepared if p.get("node")})
    return {
        "_tables": {tables.INFLUENCE_TOPK: topk, tables.TRAIN_SCORES: train,
                    tables.TEST_SCORES: test["table"]},
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "versions": _versions(),
        "n_train": int(n_train),
        "n_test": int(inputs.test.n_rows),
        "n_classes": int(inputs.n_classes),
        "feature_dim": int(inputs.split.feature_dim),
        "head_layer": inputs.split.head_layer,
        "lambda": float(config.lam),
        "target": config.target,
        "k": int(config.k),
        "head_fit": {
            "iterations": fit.iterations, "evaluations": fit.evaluations,
            "max_abs_grad": fit.max_abs_grad, "objective": fit.objective,
            "converged": fit.converged, "method": fit.method, "grad_tol": config.grad_tol,
        },
        "fidelity": {"train": fidelity_from_moments(train_moments),
                     "test": fidelity_from_moments(test_moments)},
        "decomposition": {"max_error": test["max_error"], "max_relative_error": test["max_relative_error"],
                          "theta_residual": residual},
        "shards": [{"index": s.index, "start": s.start, "stop": s.stop, "rows": s.rows,
                    "node": p.get("node"), "featurize_seconds": round(p["seconds"], 4),
                    "score_seconds": round(r["seconds"], 4)}
                   for s, p, r in zip(specs, prepared, results)],
        "workers": {"count": pool.n_workers, "nodes": len(nodes) if nodes else 1,
                    "backend": pool.backend,
                    "devices": pool.devices()},
        "timings": dict(timer.times),
    }
