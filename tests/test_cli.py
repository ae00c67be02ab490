"""The `distributed-influence audit` command: output contract and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_influence.cli import main
from distributed_influence.store import tables

EXPECTED = {
    "influence_topk": [("test_id", pa.int64()), ("predicted_class", pa.int32()), ("kind", pa.string()),
                               ("rank", pa.int32()), ("train_id", pa.int64()), ("representer_value", pa.float32()),
                               ("alpha", pa.float32()), ("similarity", pa.float32())],
    "train_scores": [("train_id", pa.int64()), ("label", pa.int32()), ("alpha_label", pa.float32()),
                             ("audit_score", pa.float32()), ("audit_rank", pa.int64()),
                             ("influence_sum", pa.float32()), ("influence_abs_sum", pa.float32()),
                             ("predicted_class", pa.int32()), ("label_probability", pa.float32()),
                             ("error_influence", pa.float32()), ("predicted_probability", pa.float32())],
    "test_scores": [("test_id", pa.int64()), ("label", pa.int32()), ("predicted_class", pa.int32()),
                            ("model_logit", pa.float32()), ("surrogate_logit", pa.float32()),
                            ("representer_sum", pa.float32()), ("decomposition_error", pa.float32())],
}


def _parquet_sources(files, root):
    out = {}
    for role in ("train", "test"):
        d = np.load(files[role])
        ids = np.arange(len(d["x"]), dtype=np.int64) * 10 + (7 if role == "train" else 3)
        path = str(root / f"{role}.parquet")
        pq.write_table(pa.table({"id": ids, "label": d["y"], "x": [r.tolist() for r in d["x"]]}), path)
        out[role] = (path, ids)
    return out


@pytest.mark.parametrize("kind", ["npz", "parquet"])
def test_audit_writes_contract_tables(files, tmp_path, kind, capsys):
    train, test = files["train"], files["test"]
    if kind == "parquet":
        src = _parquet_sources(files, tmp_path)
        (train, train_ids), (test, test_ids) = src["train"], src["test"]
    out = str(tmp_path / "out")
    code = main(["audit", "--model", files["model"], "--train", train, "--test", test, "--out", out,
                 "--k", "4", "--in-process"])
    assert code == 0
    assert "decomposition" in capsys.readouterr().out
    for name, cols in EXPECTED.items():
        schema = pq.read_table(os.path.join(out, name)).schema
        assert [(f.name, f.type) for f in schema] == cols, name
    n_test, n_train = 20, 60
    topk = pq.read_table(os.path.join(out, "influence_topk"))
    assert topk.num_rows == n_test * 2 * 4
    assert set(topk.column("kind").to_pylist()) == {"proponent", "opponent"}
    assert sorted(set(topk.column("rank").to_pylist())) == [1, 2, 3, 4]
    train_t = pq.read_table(os.path.join(out, "train_scores"))
    assert train_t.num_rows == n_train
    assert sorted(train_t.column("audit_rank").to_pylist()) == list(range(1, n_train + 1))
    if kind == "parquet":
        assert sorted(train_t.column("train_id").to_pylist()) == sorted(train_ids.tolist())
        test_t = pq.read_table(os.path.join(out, "test_scores"))
        assert test_t.column("test_id").to_pylist() == test_ids.tolist()
        assert set(topk.column("train_id").to_pylist()) <= set(train_ids.tolist())
    m = tables.read_manifest(out)
    for key in ("config", "versions", "n_train", "n_test", "n_classes", "feature_dim", "lambda", "target",
                "head_fit", "fidelity", "shards", "workers", "timings"):
        assert key in m, key
    assert m["n_train"] == n_train and m["n_test"] == n_test and m["n_classes"] == 3
    assert set(m["fidelity"]) == {"train", "test"} and "pearson" in m["fidelity"]["train"]
    assert {"iterations", "max_abs_grad", "objective"} <= set(m["head_fit"])


def test_test_set_without_labels_gives_null_labels(files, tmp_path):
    x = np.load(files["test"])["x"]
    test = str(tmp_path / "unlabelled.npz")
    np.savez(test, x=x)
    out = str(tmp_path / "out")
    assert main(["audit", "--model", files["model"], "--train", files["train"], "--test", test,
                 "--out", out, "--k", "2", "--in-process"]) == 0
    labels = pq.read_table(os.path.join(out, "test_scores")).column("label")
    assert labels.null_count == len(x)


def test_report_flag_writes_the_report_after_the_tables(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["audit", "--model", files["model"], "--train", files["train"], "--test", files["test"],
                 "--out", str(out), "--k", "2", "--in-process", "--report"]) == 0
    page = out / "report" / "index.html"
    assert f"report: {page}" in capsys.readouterr().out
    assert "<html" in page.read_text() and (out / "report" / "suspects.csv").read_text().startswith("train_id,")
    assert tables.read_manifest(str(out))["config"]["report"] is True


def test_report_flag_with_a_remote_out_is_refused_before_the_run(files, capsys):
    assert main(["audit", "--model", files["model"], "--train", files["train"], "--test", files["test"],
                 "--out", "s3://bucket/results", "--report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--report" in err[0] and "s3://bucket/results" in err[0], err


def _bad_cases(files, root):
    x_tr, y_tr = np.load(files["train"])["x"], np.load(files["train"])["y"]

    def npz(name, **arrays):
        path = str(root / name)
        np.savez(path, **arrays)
        return path

    lam_model = keras.Sequential([keras.Input((6,)), keras.layers.Lambda(lambda t: t + 1), keras.layers.Dense(3)])
    lam_path = str(root / "lambda.keras")
    lam_model.save(lam_path)
    relu = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="relu")])
    relu_path = str(root / "relu.keras")
    relu.save(relu_path)
    nan_x = x_tr.copy()
    nan_x[17, 2] = np.nan
    corrupt = root / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1\x00\x00garbage")
    truncated = root / "truncated.npz"
    np.savez(str(truncated), x=x_tr, y=y_tr)
    truncated.write_bytes(truncated.read_bytes()[:300])
    taken = root / "out_taken_by_other_job"
    taken.mkdir()
    (taken / "manifest.json").write_text('{"run_key": "another-job"}')
    return {
        "missing model": (dict(model=str(root / "nope.keras")), "not found"),
        "lambda model": (dict(model=lam_path), "safe mode"),
        "no linear head": (dict(model=relu_path), "no linear head"),
        "label out of range": (dict(train=npz("lab.npz", x=x_tr, y=np.where(np.arange(60) == 5, 3, y_tr))), "outside 0..2"),
        "float labels": (dict(train=npz("flt.npz", x=x_tr, y=y_tr + 0.5)), "integers"),
        "nan input": (dict(train=npz("nan.npz", x=nan_x, y=y_tr)), "NaN or inf"),
        "empty train": (dict(train=npz("empty.npz", x=x_tr[:0], y=y_tr[:0])), "empty"),
        "duplicate ids": (dict(train=npz("dup.npz", x=x_tr, y=y_tr, id=np.arange(60) // 2)), "duplicate id"),
        "shape mismatch": (dict(test=npz("shape.npz", x=x_tr[:, :5], y=y_tr)), "do not fit the model input"),
        "k too large": (dict(k="61"), "exceeds the 60 training"),
        "k zero": (dict(k="0"), "--k"),
        "lambda zero": (dict(lam="0"), "--lam"),
        "corrupt parquet": (dict(train=str(corrupt)), "corrupt"),
        "truncated npz": (dict(train=str(truncated)), "truncated"),
        "empty test": (dict(test=npz("empty_test.npz", x=x_tr[:0], y=y_tr[:0])), "empty"),
        "out of another job": (dict(out=str(taken)), "different job"),
    }


def test_bad_inputs_exit_2_with_one_line_and_no_tables(files, tmp_path, capsys):
    cases = _bad_cases(files, tmp_path)
    for name, (override, needle) in cases.items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        args = dict(model=files["model"], train=files["train"], test=files["test"], k="3", lam="0.003",
                    out=str(out))
        args.update(override)
        out = Path(args["out"])
        before = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
        argv = ["audit", "--in-process"]
        for key, val in args.items():
            argv += [f"--{key}", val]
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1, (name, err)
        assert needle in err, (name, err)
        after = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else {}
        assert after == before, name  # nothing written, nothing changed


def test_console_script_exit_code_and_stderr(files, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_influence.cli", "audit", "--model", str(tmp_path / "x.keras"),
         "--train", files["train"], "--test", files["test"], "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"distributed-influence: error: {tmp_path / 'x.keras'}: model file not found"]
    assert not (tmp_path / "o").exists()


def test_help_documents_every_flag():
    """Every option of every command appears in its --help with a help text."""
    from distributed_influence.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, cmd in sub.choices.items():
        text = cmd.format_help()
        for action in cmd._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            for flag in action.option_strings or [action.dest]:
                assert flag in text, (name, flag)
    out = subprocess.run([sys.executable, "-m", "distributed_influence.cli", "audit", "--help"],
                         capture_output=True, text=True, timeout=60).stdout
    for flag in ("--model", "--train", "--test", "--out", "--k", "--lam", "--target", "--shards", "--address",
                 "--feature-layer", "--logit-layer", "--batch-size", "--gpus-per-worker"):
        assert flag in out


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_cluster_address_fails_fast_with_one_line(files, tmp_path):
    """Ray itself retries an address that does not answer for minutes; the audit says so at once."""
    import time

    from distributed_influence.cluster.runtime import start_ray
    from distributed_influence.errors import ConfigError

    port = _free_port()  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="no Ray cluster answers there"):
        start_ray(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 30
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "distributed_influence.cli", "audit", "--model", files["model"],
         "--train", files["train"], "--test", files["test"], "--out", str(tmp_path / "o"),
         "--address", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--address 127.0.0.1:{port}: no Ray cluster answers there" in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_an_address_that_is_not_a_ray_gcs_is_refused_in_bounded_time():
    import socket
    import time

    from distributed_influence.cluster.runtime import probe_cluster
    from distributed_influence.errors import ConfigError

    with socket.socket() as listener:  # accepts connections, never speaks Ray's protocol
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match="not a Ray cluster's GCS"):
            probe_cluster("127.0.0.1", listener.getsockname()[1], timeout=3.0)
        assert time.monotonic() - t0 < 6


@pytest.mark.parametrize("command,flag,value,message", [
    ("audit", "--test-block", "0", "--test-block must be an integer >= 1, got 0"),
    ("audit", "--workers", "0", "--workers must be an integer >= 1, got 0"),
    ("audit", "--input-shape", "28,0", "--input-shape must be positive integers, got (28, 0)"),
    ("explain", "--k", "0", "--k must be an integer >= 1, got 0"),
    ("explain", "--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("explain", "--test-block", "-1", "--test-block must be an integer >= 1, got -1"),
])
def test_a_bad_setting_exits_2_with_the_same_line_in_audit_and_explain(tmp_path, capsys, command, flag, value,
                                                                       message):
    """Both commands check a setting they share with the same rule, before any file is read."""
    paths = {"--model": str(tmp_path / "m.keras"), "--test": str(tmp_path / "t.npz"), "--out": str(tmp_path / "o")}
    paths.update({"--train": str(tmp_path / "tr.npz")} if command == "audit" else {"--index": str(tmp_path)})
    argv = [command, *[x for pair in paths.items() for x in pair], flag, value]
    assert main(argv + (["--in-process"] if command == "audit" else [])) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"distributed-influence: error: {message}"]
    assert not (tmp_path / "o").exists()
