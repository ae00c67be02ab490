"""``distributed-influence explain``: new test examples against the train index of an audit.

The training side of an audit (features, α for every class, the fitted head) does not depend
on the test set, so explaining new test examples only needs their features and one scoring
pass over the stored index: the tables equal those of a full audit on the same test examples.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from typing import Optional

import numpy as np

from distributed_influence.config import AuditConfig, fields
from distributed_influence.errors import ConfigError, InputError
from distributed_influence.store import storage

#: The settings of :class:`AuditConfig` that ``explain`` takes too (the rest come from the audit).
SHARED = ("k", "batch_size", "test_block", "scoring")


def run_explain(index_out: str, model: str, test: str, out: str, k: Optional[int] = None,
                batch_size: Optional[int] = None, test_block: int = 1024, scoring: str = "pruned") -> dict:
    """Scores the test source against the train index stored in ``index_out``.

    Args:
        index_out: the ``--out`` directory of an audit (holds ``manifest.json`` and ``index/``).
        model: the audit's model file; refused if it is not byte-identical.
        test: test source to explain.
        out: output directory for the ``influence_topk`` and ``test_scores`` datasets and manifest.
        k: proponents/opponents per test example (default: the audit's k).
        batch_size: rows per forward pass; None picks it from the input size.
        test_block: test examples scored at once.
        scoring: ``pruned`` (default) or ``dense``: the same tables (see :mod:`distributed_influence.method.scoring`). No
            per-train sums are written here, so pruning never has to fall back.

    Returns:
        The manifest written to ``out``.

    Raises:
        ConfigError: a setting breaks the audit's check of it, or k exceeds the training rows.
        InputError: the index, the model or the test source cannot be used.
    """
    # The audit's own checks of the settings both commands have, before TensorFlow loads.
    _check_shared(k=k, batch_size=batch_size, test_block=test_block, scoring=scoring)
    # Deferred: these import TensorFlow, which `--help` and argument errors should not wait for.
    from distributed_influence.data.featurize import featurize
    from distributed_influence.data.model import Featurizer, load_model, read_model_bytes, split_model
    from distributed_influence.engine import reduce as rd
    from distributed_influence.method import logits as logits_mod
    from distributed_influence.method import representer as rp
    from distributed_influence.store import index, tables

    t0 = time.perf_counter()
    index_dir = storage.join(index_out, index.INDEX_DIR)
    audit, files = _read_audit(index_out, index_dir, out)
    cfg = audit["config"]
    data = read_model_bytes(model)
    if hashlib.sha256(data).hexdigest() != audit.get("model_sha256"):
        raise InputError(f"{model}: not the model the index in {index_out} was built with")
    k = int(audit["k"] if k is None else k)
    if k > audit["n_train"]:
        raise ConfigError(f"--k must be between 1 and the {audit['n_train']} training examples, got {k}")
    name = storage.basename(model)
    split = split_model(load_model(data, name), cfg.get("feature_layer"), cfg.get("logit_layer"), name)
    src, input_shape = _open_test(test, audit, split)

    test_x, logits, test_ids, test_y, test_keys = featurize(src, Featurizer(split, batch_size), input_shape,
                                                            0, src.n_rows)
    pred = logits_mod.predicted_classes(logits)

    t_score = time.perf_counter()
    results, train_ids, train_keys = _score_index(files, test_x, pred, k, test_block, scoring)
    t_score = time.perf_counter() - t_score
    theta, alpha_head = index.read_head(index_dir)
    topk = rd.merge_topk_table(results, k, test_ids, pred)
    dec = rd.test_table(test_ids, test_y, pred, logits_mod.per_class(logits),
                        logits_mod.per_class(rp.linear_logits(test_x, theta)),
                        logits_mod.per_class(rp.linear_logits(test_x, alpha_head)))
    topk, test_table = _with_keys(topk, dec["table"], train_ids, train_keys, test_ids, test_keys)
    manifest = {
        "command": "explain",
        "index": storage.redact(index_out) if storage.is_uri(index_out) else os.path.abspath(index_out),
        "audit_run_key": audit.get("run_key"),
        "model_sha256": audit.get("model_sha256"),
        "test": storage.redact(test),
        "k": k,
        "n_train": audit["n_train"],
        "n_test": int(src.n_rows),
        "decomposition": {"max_error": dec["max_error"], "max_relative_error": dec["max_relative_error"]},
        "scoring": rd.summarize_scoring([r["scoring"] for r in results], scoring),
        "timings": {"score": round(t_score, 4), "total": round(time.perf_counter() - t0, 4)},
    }
    tables.write_outputs(out, {tables.INFLUENCE_TOPK: topk, tables.TEST_SCORES: test_table}, manifest)
    return manifest


def _check_shared(**settings) -> None:
    """Applies the audit's checks to the settings ``explain`` shares with it (:data:`SHARED`).

    Raises:
        ConfigError: a value breaks the check, in the words the audit would use.
    """
    for name, value in settings.items():
        if value is not None or name != "k":  # a k of None is the audit's, checked when it ran
            fields.check(AuditConfig, name, value)


def _read_audit(index_out: str, index_dir: str, out: str) -> tuple:
    """The audit's manifest and its index's shard files, refused unless complete.

    Raises:
        InputError: no audit's manifest, or an incomplete index.
        ConfigError: ``out`` holds an audit's results, which explain must not overwrite.
    """
    from distributed_influence.store import index, tables

    files = index.shard_files(index_dir)
    try:
        audit = tables.read_manifest(index_out)
    except (OSError, ValueError):
        raise InputError(f"{index_out}: no readable manifest.json of an audit") from None
    if "config" not in audit or "index" not in audit:
        raise InputError(f"{index_out}: manifest.json is not an audit's (was --out of explain?)")
    if len(files) != audit["index"]["shards"]:
        raise InputError(f"{index_dir}: {len(files)} shard files but the audit wrote "
                         f"{audit['index']['shards']}; the index is incomplete")
    if storage.exists(storage.join(out, tables.MANIFEST)):
        previous = tables.read_manifest(out)
        if previous.get("command") != "explain":
            raise ConfigError(f"{out}: holds the results of an audit; choose another --out for explain")
    return audit, files


def _open_test(test: str, audit: dict, split) -> tuple:
    """The test source, read as the audit read its sources, checked against the model.

    Returns:
        (the source, the input shape of one example).
    """
    from distributed_influence.data.inputs import check_source
    from distributed_influence.data.sources import open_source, options_from

    input_shape = tuple(audit.get("input_shape") or split.input_shape)
    # A test image folder is labelled with the training folder's classes, as in the audit.
    classes = ((audit.get("sources") or {}).get("train") or {}).get("classes")
    src = open_source(test, classes=classes, **options_from(audit["config"]))
    check_source(src, "test", split.n_classes, input_shape, need_labels=False)
    return src, input_shape


def _with_keys(topk, test_table, train_ids: list, train_keys: list, test_ids: np.ndarray, test_keys) -> tuple:
    """The tables with the string keys of the rows they name, where the sources have keys."""
    from distributed_influence.store import tables

    if train_keys:  # the index names the file (or key) of every proponent and opponent
        topk = tables.add_key_column(topk, "train_id", tables.TRAIN_KEY, np.concatenate(train_ids),
                                     np.concatenate(train_keys))
    if test_keys is not None:
        topk = tables.add_key_column(topk, "test_id", tables.TEST_KEY, test_ids, test_keys)
        test_table = tables.add_key_column(test_table, "test_id", tables.TEST_KEY, test_ids, test_keys)
    return topk, test_table


def _score_index(files: list, test_x: np.ndarray, pred: np.ndarray, k: int, test_block: int,
                 scoring: str) -> tuple:
    """Scores the test features against every shard file of the index, one at a time.

    Returns:
        (each shard's ``topk`` and ``scoring`` record, the ids and string keys of the shards
        that have keys).
    """
    from distributed_influence.method import scoring as sc
    from distributed_influence.store import index

    results, train_ids, train_keys = [], [], []
    for path in files:
        shard = index.read_shard(path)
        if shard["keys"] is not None:
            train_ids.append(shard["ids"])
            train_keys.append(shard["keys"])
        scored = sc.score_shard(shard["x"], shard["ids"], shard["alpha"], test_x, pred, k, test_block,
                                method=scoring, train_sums=False)
        results.append({"topk": scored["topk"], "scoring": scored["scoring"]})
    return results, train_ids, train_keys


def cmd_explain(args: argparse.Namespace) -> int:
    m = run_explain(args.index, args.model, args.test, args.out, k=args.k, batch_size=args.batch_size,
                    test_block=args.test_block, scoring=args.scoring)
    print(f"wrote {args.out}: influence_topk/, test_scores/ (Parquet datasets), manifest.json "
          f"({m['n_test']} test examples against {m['n_train']} training examples; "
          f"max decomposition error {m['decomposition']['max_error']:.2e})")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="explain new test examples with the train index of an audit",
                       description="Score new test examples against the train index an audit wrote "
                                   "to OUT/index: no training pass, no head fit. The tables equal a "
                                   "full audit's on the same test examples.")
    p.add_argument("--index", required=True, help="the --out directory of a finished audit")
    p.add_argument("--model", required=True, help="the audit's .keras model (checked byte for byte)")
    p.add_argument("--test", required=True, help="test source to explain (.npz, .parquet, TFRecord, an image folder, IDX, "
                                                "digits:test; read with the audit's source options)")
    p.add_argument("--out", required=True, help="output directory for influence_topk/test_scores tables")
    # The settings an audit has too, with its types, choices, help and checks; only --k means
    # something else here: it defaults to the k of the audit.
    fields.add_arguments(p, AuditConfig, only=SHARED, overrides={"k": dict(
        default=None, help="proponents and opponents per test example (default: the audit's k)")})
    p.set_defaults(func=cmd_explain)
