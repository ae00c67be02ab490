"""The reduce stage's summaries, from the shards' scoring records."""

import numpy as np
import pytest

from distributed_influence.engine.reduce import summarize_scoring
from distributed_influence.method import scoring


def test_summary_reports_fractions_and_the_fallback():
    recs = [{"method": np.asarray("pruned"), "pairs_scored": np.asarray(10), "pairs_total": 100, "reason": ""},
            {"method": "dense", "pairs_scored": 300, "pairs_total": 300, "reason": scoring.REASON_NEGATIVE}]
    s = summarize_scoring(recs, "pruned")
    assert s["method"] == "dense" and s["reason"] == scoring.REASON_NEGATIVE
    assert s["pairs_scored_fraction"] == pytest.approx(310 / 400)
    assert [sh["pairs_scored_fraction"] for sh in s["shards"]] == [0.1, 1.0]
    assert summarize_scoring(recs[:1], "pruned")["method"] == "pruned"
    assert summarize_scoring(recs[:1], "pruned")["reason"] is None
