"""Plain-text summaries of an audit, shared by the commands that print or show them.

``audit``, ``demo`` and ``report`` all say what an audit found; the helpers live here, below
all three, so that none of the commands imports another (``cli`` stays the top of the package).
"""

from __future__ import annotations

from typing import List

import numpy as np


def flagged_fractions(audit_rank: np.ndarray, train_ids: np.ndarray, flipped_ids: np.ndarray,
                      fractions=(0.05, 0.10, 0.20)) -> dict:
    """Fraction of the flipped labels found when checking the top p of ``audit_rank``."""
    n = len(audit_rank)
    flipped = np.isin(train_ids, flipped_ids)
    return {p: float(np.sum(flipped & (audit_rank <= int(np.ceil(p * n)))) / max(1, flipped.sum()))
            for p in fractions}


def summary_lines(manifest: dict) -> List[str]:
    """What a person wants to see at the end of an audit."""
    fit = manifest["head_fit"]
    fid = manifest["fidelity"]
    dec = manifest["decomposition"]
    return [
        f"wrote {manifest['config']['out']}: influence_topk/, train_scores/, test_scores/ "
        f"(Parquet datasets), manifest.json",
        f"train {manifest['n_train']} x test {manifest['n_test']}, {manifest['n_classes']} classes, "
        f"feature dim {manifest['feature_dim']}, {len(manifest['shards'])} shards on "
        f"{manifest['workers']['count']} workers ({manifest['workers']['nodes']} node(s))",
        f"head fit: {fit['iterations']} iterations, max|grad J| = {fit['max_abs_grad']:.2e}, "
        f"objective {fit['objective']:.6g}",
        f"decomposition: max |sum_i r_i(t) - z_t| = {dec['max_error']:.2e} "
        f"(relative {dec['max_relative_error']:.2e})",
        f"fidelity (Pearson, surrogate vs model logits): train {fid['train']['pearson']:.4f}, "
        f"test {fid['test']['pearson']:.4f}",
        f"time: {manifest['timings']['total']:.1f} s",
    ] + ([f"scoring: {manifest['scoring']['method']}, "
          f"{100 * manifest['scoring']['pairs_scored_fraction']:.2f}% of the (test, train) pairs scored"]
         if "scoring" in manifest else [])
