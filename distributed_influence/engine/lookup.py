"""Scoring query rows against a stored train index, for the report's supporters.

The same exact scoring as the audit's (:func:`~distributed_influence.method.scoring.score_shard`),
read from the index that an audit publishes under ``OUT/index``.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from distributed_influence.method import scoring
from distributed_influence.method.topk import merge_topk
from distributed_influence.store import index


def score_rows_against_index(files: list, query_x: np.ndarray, query_class: np.ndarray, k: int,
                             block: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """The k strongest proponents of query rows in a stored train index, with the job's scoring.

    Each query row (augmented features, like a test row) is scored against every shard of the
    index for its class, exactly as the audit scores test examples, and the shards' lists are
    merged exactly. The report uses it to show which training examples support a suspicious
    training label (the query is then a training example itself).

    Args:
        files: the index's shard files (:func:`index.shard_files`), or shards already read
            with :func:`index.read_shard` (a caller that read them once need not read twice).
        query_x: (q, d+1) float32 augmented features.
        query_class: (q,) class explained for each query row.
        k: proponents per query row (capped at the index's size).

    Returns:
        (representer values, train ids), each (q, k), strongest first, ties to the smaller id.
    """
    values, ids = [], []
    for item in files:
        shard = item if isinstance(item, dict) else index.read_shard(item)
        scored = scoring.score_shard(shard["x"], shard["ids"], shard["alpha"], query_x, query_class, k, block,
                                     train_sums=False)
        values.append(scored["topk"]["proponent"]["values"])
        ids.append(scored["topk"]["proponent"]["ids"])
    return merge_topk(values, ids, min(k, sum(v.shape[1] for v in values)), largest=True)
