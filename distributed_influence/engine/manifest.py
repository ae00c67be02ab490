"""The manifest of an audit: what was computed, from what, how well and where (docs/outputs.md).

Written last, after every table: a reader that finds it finds complete tables.
"""

from __future__ import annotations

import hashlib

import numpy as np

from distributed_influence.engine import reduce as rd
from distributed_influence.method.logits import fidelity_from_moments
from distributed_influence.store import index, storage


def build_manifest(config, inputs, specs, fit: dict, reduced: dict, scoring: dict, shard_info: dict, *, resume: dict,
          theta_residual: float, workers: dict, recovery: dict, timings: dict) -> dict:
    """The manifest's sections from the stages' results.

    Args:
        config: the run's :class:`~distributed_influence.config.AuditConfig`.
        inputs: the checked inputs (model, sources, head).
        specs: the shard plan.
        fit: the head fit's result (``info``, ``train_moments``).
        reduced: the reduce stage's summaries (``test``, ``train``, ``reused``).
        scoring: the ``scoring`` section.
        shard_info: per shard: rows, where and how long it ran.
        resume: which shards were reused and which computed.
        theta_residual: max |Θ − Σ_i x_iᵀα_i| / max |Θ|, the fit's residual as the decomposition sees it.
        workers: ``count``, ``backend`` and ``devices`` of the pool.
        recovery: what the pool recovered from (lost workers, nodes, objects).
        timings: seconds per stage.

    Returns:
        The manifest, without the versions, run key and total time, which the caller adds.
    """
    nodes = sorted({i["node"] for i in shard_info.values() if i.get("node")})
    test_summary = reduced["test"]
    return {
        "config": {key: storage.redact(val) for key, val in config.to_dict().items()},
        "config_digest": config.digest(),
        "model_sha256": hashlib.sha256(inputs.model_bytes).hexdigest(),
        "index": {"dir": index.INDEX_DIR, "shards": len(specs)},
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
                     "test": fidelity_from_moments(np.sum([r["fidelity"] for r in test_summary], axis=0))},
        "decomposition": {"max_error": max(r["max_error"] for r in test_summary),
                          "max_relative_error": max(r["max_relative_error"] for r in test_summary),
                          "theta_residual": theta_residual},
        "scoring": scoring,
        "reduce": {"test_parts": len(test_summary), "train_parts": len(reduced["train"]),
                   "rows_per_test_part": rd.REDUCE_ROWS,
                   "reused_parts": reduced["reused"],
                   "seconds": round(float(sum(r["seconds"] for r in test_summary + reduced["train"])), 4)},
        "shards": [shard_info[s.index] for s in specs],
        "resume": resume,
        "workers": {"count": workers["count"], "nodes": max(1, len(nodes)), "backend": workers["backend"],
                    "devices": workers["devices"]},
        "recovery": recovery,
        "timings": timings,
    }
