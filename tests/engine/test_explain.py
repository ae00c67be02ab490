"""`explain` on held-back test examples equals the full audit's rows for them."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import audit_config, multi_output_model

from distributed_influence.cli import main
from distributed_influence.engine.job import run_audit


def _subset_rows(out, ids, name):
    t = pq.read_table(os.path.join(out, name))
    mask = np.isin(t.column("test_id").to_numpy(), ids)
    return t.filter(mask)


def test_explain_equals_full_audit_on_held_back_examples(files, tmp_path, capsys):
    full = str(tmp_path / "full")
    run_audit(audit_config(files, full, k=4, shards=3), use_ray=False)
    assert len(os.listdir(os.path.join(full, "index"))) == 4  # 3 shards + the head

    d = np.load(files["test"])
    held = np.array([2, 5, 11, 17])
    sub = str(tmp_path / "held.npz")
    np.savez(sub, x=d["x"][held], y=d["y"][held], id=held.astype(np.int64))
    out = str(tmp_path / "explained")
    assert main(["explain", "--index", full, "--model", files["model"], "--test", sub, "--out", out]) == 0
    assert "4 test examples" in capsys.readouterr().out

    for name in ("influence_topk", "test_scores"):
        expected = _subset_rows(full, held, name)
        got = pq.read_table(os.path.join(out, name))
        assert got.schema == expected.schema
        assert got.num_rows == expected.num_rows == (len(held) * 8 if "topk" in name else len(held))
        for col in got.column_names:
            a, b = got.column(col).to_numpy(), expected.column(col).to_numpy()
            if a.dtype.kind == "f" and col != "decomposition_error":
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=col)
            elif col != "decomposition_error":
                np.testing.assert_array_equal(a, b, err_msg=col)


def test_explain_refuses_another_model_and_missing_index(files, tmp_path, capsys):
    other = tmp_path / "other.keras"
    full = str(tmp_path / "full")
    run_audit(audit_config(files, full, k=2), use_ray=False)
    d = np.load(files["train"])
    m = multi_output_model(d["x"][:20], d["y"][:20])
    m.save(str(other))
    assert main(["explain", "--index", full, "--model", str(other), "--test", files["test"],
                 "--out", str(tmp_path / "o")]) == 2
    assert "not the model the index" in capsys.readouterr().err
    assert main(["explain", "--index", str(tmp_path), "--model", files["model"], "--test", files["test"],
                 "--out", str(tmp_path / "o")]) == 2
    assert "no train index" in capsys.readouterr().err


def test_load_results_returns_the_tables(files, tmp_path):
    import distributed_influence

    out = str(tmp_path / "out")
    run_audit(audit_config(files, out, k=3), use_ray=False)
    res = distributed_influence.load_results(out)
    assert res.influence_topk.num_rows == 20 * 6 and res.train_scores.num_rows == 60
    assert res.test_scores.num_rows == 20 and res.manifest["k"] == 3
    frames = res.to_pandas()
    top = frames["influence_topk"]
    first = top[(top.test_id == 0) & (top.kind == "proponent")].sort_values("rank")
    assert first.representer_value.is_monotonic_decreasing
    assert res.manifest["tables"]["influence_topk"] == ["influence_topk/part-00000.parquet"]

    # The layout before the scale-out: one file per table, no part listing in the manifest.
    import json
    import shutil

    old = tmp_path / "old"
    old.mkdir()
    for name in ("influence_topk", "train_scores", "test_scores"):
        pq.write_table(getattr(res, name), old / f"{name}.parquet")
    manifest = dict(res.manifest)
    manifest.pop("tables")
    (old / "manifest.json").write_text(json.dumps(manifest))
    again = distributed_influence.load_results(str(old))
    for name in ("influence_topk", "train_scores", "test_scores"):
        assert getattr(again, name).equals(getattr(res, name)), name
    shutil.rmtree(os.path.join(out, "test_scores"))
    from distributed_influence.errors import InputError

    with pytest.raises(InputError, match="test_scores: not found"):
        distributed_influence.load_results(out)


def test_readme_duckdb_queries_run_on_the_tables(files, tmp_path, monkeypatch):
    import duckdb
    out = tmp_path / "results"
    run_audit(audit_config(files, out, k=3), use_ray=False)
    monkeypatch.chdir(tmp_path)
    worst = duckdb.sql("SELECT train_id, label, audit_score FROM 'results/train_scores/*.parquet' "
                       "ORDER BY audit_rank LIMIT 20").fetchall()
    train = pq.read_table(out / "train_scores").to_pydict()
    order = np.argsort(train["audit_rank"])[:20]
    assert [r[0] for r in worst] == [train["train_id"][i] for i in order]
    counts = duckdb.sql("SELECT train_id, count(*) AS n FROM 'results/influence_topk/*.parquet' "
                        "WHERE kind = 'opponent' AND rank = 1 GROUP BY train_id ORDER BY n DESC LIMIT 10").fetchall()
    assert sum(n for _, n in counts) <= 20 and counts[0][1] >= 1
