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
        shard_info: per shard: rows, where and how long it ran (see :func:`name_nodes`).
        resume: which shards were reused and which computed, and whether the head fit was reused.
        theta_residual: max |Θ − Σ_i x_iᵀα_i| / max |Θ|, the fit's residual as the decomposition sees it.
        workers: ``count``, ``backend`` and ``devices`` of the pool.
        recovery: what the pool recovered from (lost workers, nodes, objects).
        timings: seconds per stage.

    Returns:
        The manifest, without the versions, run key and total time, which the caller adds.
    """
    # Every node that did a shard's work: a shard moved by recovery counts where it was featurized
    # for the fit and where it was scored.
    nodes = sorted({i[k] for i in shard_info.values() for k in ("featurized_on", "scored_on") if i.get(k)})
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


def name_nodes(info: dict, result: dict, reused: bool) -> None:
    """Completes a shard's manifest entry with where it was featurized and scored, and how long.

    ``featurized_on`` is the node whose worker featurized the shard for the head fit (or, when
    resumed after the fit, before scoring); ``scored_on`` the node whose worker scored it. They
    differ for a shard that recovery moved after its worker or node was lost. A reused shard's
    nodes are those of the attempt that scored it, from its saved record. ``node`` stays, for
    readers of earlier manifests, as the node that scored it: that worker wrote its partials.

    Args:
        info: the shard's entry; ``featurized_on`` is set when this run featurized it.
        result: the shard's scored record (this run's, or the saved one when ``reused``).
        reused: whether the shard's scored partials came from an earlier attempt.
    """
    if reused or "featurized_on" not in info:
        info["featurized_on"] = _node(result.get("featurized_on"))
    info["scored_on"] = info["node"] = _node(result.get("node"))
    info.update(score_seconds=round(float(result["seconds"]), 4), reused=reused)


def featurized_record(result: dict, info: dict) -> dict:
    """A scored shard's record as saved for a resume: with the node that featurized it, which only
    the driver knows (the scoring worker reports its own node)."""
    return {**result, "featurized_on": info.get("featurized_on") or ""}  # a string: saved without pickling


def _node(value) -> str | None:
    """A node id as the manifest shows it: None outside Ray (and in records that name none)."""
    text = "" if value is None else str(value)
    return text or None
