"""Real image datasets as users keep them: PNG/JPEG bytes in Parquet, TFRecord files of
tf.train.Example, image folders. Each is written from the same scikit-learn digits (8×8 grey,
pixels as uint8) with independent writers (Pillow, pyarrow, TensorFlow's TFRecordWriter), and
the audit's tables must equal those of the same rows given as `.npz`: exactly for PNG and raw
bytes, within JPEG's decoding tolerance of the top-k."""

from __future__ import annotations

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from distributed_influence import load_results
from distributed_influence.cli import main
from distributed_influence.config import AuditConfig
from distributed_influence.data.sources import open_source
from distributed_influence.errors import SourceError

N_TRAIN, N_TEST, K = 150, 40, 4
KEY_COLUMNS = ("train_key", "test_key")


def png(pixels: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 else pixels)
    img.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels[..., 0]).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def tf_example(feature: dict) -> bytes:
    import tensorflow as tf

    def one(v):
        if isinstance(v, bytes):
            return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v)]))

    return tf.train.Example(features=tf.train.Features(feature={k: one(v) for k, v in feature.items()})
                            ).SerializeToString()


def write_tfrecord(path: str, examples: list) -> str:
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as w:
        for e in examples:
            w.write(e)
    return path


@pytest.fixture(scope="module")
def digits():
    """Train and test rows of the bundled digits as uint8 (8, 8, 1) pixels, each split sorted by
    label so an image folder (class by class) lists them in the same order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    tr = np.argsort(y[:N_TRAIN], kind="stable")
    te = N_TRAIN + np.argsort(y[N_TRAIN:N_TRAIN + N_TEST], kind="stable")
    return pixels[tr], y[tr], pixels[te], y[te]


def as_x(pixels: np.ndarray) -> np.ndarray:
    """What every image source must give for these pixels: uint8 × float32(1/255)."""
    return pixels.astype(np.float32) * np.float32(1.0 / 255.0)


@pytest.fixture(scope="module")
def formats(digits, tmp_path_factory):
    """The model, the npz reference inputs, and every format written from the same rows."""
    import keras

    px_tr, y_tr, px_te, y_te = digits
    root = tmp_path_factory.mktemp("formats")
    keras.utils.set_random_seed(7)
    inp = keras.Input((8, 8, 1))
    f = keras.layers.Dense(12, activation="relu", name="features")(keras.layers.Flatten()(inp))
    z = keras.layers.Dense(10, name="logits")(f)
    p = keras.layers.Activation("softmax")(z)
    trainable = keras.Model(inp, p)
    trainable.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    trainable.fit(as_x(px_tr), y_tr, epochs=20, batch_size=32, verbose=0)
    model = str(root / "model.keras")
    keras.Model(inp, [f, z, p]).save(model)

    paths = {"model": model, "root": root}
    for role, px, y in (("train", px_tr, y_tr), ("test", px_te, y_te)):
        names = [f"{c}/{i:04d}.png" for i, c in enumerate(y)]
        paths[f"{role}_names"] = names
        paths[f"{role}_npz"] = str(root / f"{role}.npz")
        np.savez(paths[f"{role}_npz"], x=as_x(px), y=y)
        # PNG bytes in a binary column, in two row groups.
        t = pa.table({"image": pa.array([png(p) for p in px], pa.binary()), "label": y})
        paths[f"{role}_png_parquet"] = str(root / f"{role}_png.parquet")
        pq.write_table(t, paths[f"{role}_png_parquet"], row_group_size=64)
        # The Hugging Face layout: struct<bytes, path>, with a string id column (keys).
        hf = pa.table({"image": pa.array([{"bytes": png(p), "path": n} for p, n in zip(px, names)],
                                         pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                       "label": y, "id": pa.array(names, pa.string())})
        paths[f"{role}_hf"] = str(root / f"{role}_hf.parquet")
        pq.write_table(hf, paths[f"{role}_hf"], row_group_size=50)
        # JPEG bytes.
        paths[f"{role}_jpeg"] = str(root / f"{role}_jpeg.parquet")
        pq.write_table(pa.table({"image": pa.array([jpeg(p) for p in px], pa.binary()), "label": y}),
                       paths[f"{role}_jpeg"])
        # TFRecord: raw pixel bytes in one file; PNG in three shards with an id feature.
        paths[f"{role}_raw_tfr"] = write_tfrecord(
            str(root / f"{role}-raw.tfrecord"),
            [tf_example({"image": p.tobytes(), "label": c}) for p, c in zip(px, y)])
        bounds = np.linspace(0, len(y), 4).astype(int)
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            write_tfrecord(str(root / f"{role}-{s:05d}-of-00003.tfrecord"),
                           [tf_example({"image/encoded": png(px[i]), "image/class/label": y[i],
                                        "id": names[i].encode()}) for i in range(a, b)])
        paths[f"{role}_png_tfr"] = str(root / f"{role}-*-of-00003.tfrecord")
        # An image folder, class by class.
        folder = root / f"{role}_folder"
        for p, n in zip(px, names):
            os.makedirs(folder / os.path.dirname(n), exist_ok=True)
            (folder / n).write_bytes(png(p))
        paths[f"{role}_folder"] = str(folder)
    return paths


def audit(formats, train, test, out, use_ray=False, **kw):
    from distributed_influence.engine.job import run_audit

    cfg = AuditConfig(model=formats["model"], train=train, test=test, out=str(out), k=K, **kw)
    return run_audit(cfg, use_ray=use_ray)


@pytest.fixture(scope="module")
def reference(formats, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    audit(formats, formats["train_npz"], formats["test_npz"], out)
    return load_results(str(out))


def tables_of(results) -> dict:
    return {"influence_topk": results.influence_topk, "train_scores": results.train_scores,
            "test_scores": results.test_scores}


def assert_equal_tables(results, reference, rtol: float = 0.0) -> None:
    """Every table of ``results`` without its key columns equals the reference's."""
    for name, table in tables_of(results).items():
        ref = tables_of(reference)[name]
        table = table.drop_columns([c for c in KEY_COLUMNS if c in table.column_names])
        assert table.schema == ref.schema, name
        for col in ref.column_names:
            a = table.column(col).to_numpy(zero_copy_only=False)
            b = ref.column(col).to_numpy(zero_copy_only=False)
            if rtol and a.dtype.kind == "f" and col != "decomposition_error":
                np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=f"{name}:{col}")
            elif a.dtype.kind == "f" and col == "decomposition_error" and rtol:
                assert a.max() < 1e-4
            else:
                np.testing.assert_array_equal(a, b, err_msg=f"{name}:{col}")


def assert_keys(results, formats, train_keys: bool, test_keys: bool) -> None:
    """Key columns where the sources have keys, each the name of its row's file; none elsewhere."""
    topk, train, test = results.influence_topk, results.train_scores, results.test_scores
    assert ("train_key" in topk.column_names) == train_keys and ("train_key" in train.column_names) == train_keys
    assert ("test_key" in topk.column_names) == test_keys and ("test_key" in test.column_names) == test_keys
    names_tr, names_te = np.array(formats["train_names"]), np.array(formats["test_names"])
    if train_keys:
        assert train.schema.field("train_key").type == pa.string()
        np.testing.assert_array_equal(train.column("train_key").to_pylist(), names_tr[train.column("train_id").to_numpy()])
        np.testing.assert_array_equal(topk.column("train_key").to_pylist(), names_tr[topk.column("train_id").to_numpy()])
    if test_keys:
        np.testing.assert_array_equal(test.column("test_key").to_pylist(), names_te[test.column("test_id").to_numpy()])
        np.testing.assert_array_equal(topk.column("test_key").to_pylist(), names_te[topk.column("test_id").to_numpy()])


# -------------------------------------------------------------------------- source level


@pytest.mark.parametrize("kind", ["png_parquet", "hf", "raw_tfr", "png_tfr", "folder"])
def test_every_format_reads_the_npz_rows_exactly(formats, digits, kind):
    px_tr, y_tr, _, _ = digits
    src = open_source(formats[f"train_{kind}"])
    assert src.n_rows == N_TRAIN and src.has_labels
    for a, b in [(0, N_TRAIN), (0, 1), (45, 105), (149, 150), (10, 10)]:
        rows = src.read(a, b, (8, 8, 1))
        np.testing.assert_array_equal(rows.x, as_x(px_tr[a:b]))  # bit for bit
        np.testing.assert_array_equal(rows.y, y_tr[a:b])
        np.testing.assert_array_equal(rows.ids, np.arange(a, b))
    keyed = kind in ("hf", "png_tfr", "folder")
    assert src.has_keys == keyed
    if keyed:
        np.testing.assert_array_equal(src.read(45, 105).keys, formats["train_names"][45:105])


def test_tfrecord_worker_opens_only_the_files_of_its_rows(formats, tmp_path):
    """Records are counted once; a worker given that layout never touches the other files."""
    import shutil

    for name in sorted(os.listdir(formats["root"])):
        if name.startswith("train-0"):
            shutil.copy(formats["root"] / name, tmp_path / name)
    spec = str(tmp_path / "train-*-of-00003.tfrecord")
    driver = open_source(spec)
    assert [os.path.basename(f) for f in driver.files] == [f"train-{s:05d}-of-00003.tfrecord" for s in range(3)]
    assert driver.counts == [50, 50, 50] and driver.describe()["files"][2]["records"] == 50
    (tmp_path / "train-00000-of-00003.tfrecord").write_bytes(b"\x00" * 7)  # now unreadable
    worker = open_source(spec, layout=driver.layout())
    rows = worker.read(60, 140, (8, 8, 1))  # in the second and third files only
    np.testing.assert_array_equal(rows.keys, formats["train_names"][60:140])
    with pytest.raises(SourceError, match=r"train-00000-of-00003.tfrecord: record 0: truncated header"):
        worker.read(0, 10, (8, 8, 1))


def test_channels_follow_the_model(digits, tmp_path):
    """Grey images for an RGB model get three equal channels; RGB images for a grey model are
    converted by luma (exact for grey content stored as RGB)."""
    px = digits[0][:6]
    for mode in ("L", "RGB"):
        path = str(tmp_path / f"{mode}.parquet")
        pq.write_table(pa.table({"image": [png(p, mode) for p in px], "label": np.zeros(6, np.int64)}), path)
        src = open_source(path)
        np.testing.assert_array_equal(src.read(0, 6, (8, 8, 1)).x, as_x(px))
        np.testing.assert_array_equal(src.read(0, 6, (8, 8, 3)).x, np.repeat(as_x(px), 3, axis=-1))
        if mode == "L":  # a model taking flat rows gets the pixels in their own channels
            np.testing.assert_array_equal(src.read(0, 6, (64,)).x, as_x(px).reshape(6, 64))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P"])
def test_colour_to_grey_and_back_as_pillow_converts(tmp_path, mode):
    """Oracle: Pillow's own ``convert`` of each image (block decoding converts in NumPy)."""
    rng = np.random.default_rng(3)
    n = 70  # a block decoded at once (channels converted in NumPy) and single rows (by Pillow)
    imgs = [Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA").convert(mode)
            for _ in range(n)]
    blobs = []
    for img in imgs:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        blobs.append(buf.getvalue())
    path = str(tmp_path / f"{mode}.parquet")
    pq.write_table(pa.table({"image": blobs, "label": np.zeros(n, np.int64)}), path)
    src = open_source(path)
    for channels, pil_mode in ((1, "L"), (3, "RGB")):
        want = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert(pil_mode)) for b in blobs])
        want = as_x(want.reshape(n, 8, 8, channels))
        np.testing.assert_array_equal(src.read(0, n, (8, 8, channels)).x, want, err_msg=f"{mode}->{pil_mode}")
        np.testing.assert_array_equal(src.read(3, 5, (8, 8, channels)).x, want[3:5], err_msg=f"{mode}->{pil_mode}")


def test_resize_only_when_asked(digits, tmp_path):
    px = digits[0][:4]
    big = np.repeat(np.repeat(px, 2, axis=1), 2, axis=2)  # 16×16
    path = str(tmp_path / "big.parquet")
    pq.write_table(pa.table({"image": [png(p) for p in big], "label": np.zeros(4, np.int64)}), path)
    with pytest.raises(SourceError, match=r"row 0: image is 16x16 but the model takes 8x8 \(pass --resize"):
        open_source(path).read(0, 4, (8, 8, 1))
    x = open_source(path, resize=True).read(0, 4, (8, 8, 1)).x
    assert x.shape == (4, 8, 8, 1)
    # Oracle: TensorFlow's anti-aliased bilinear resize (what Keras' image loading uses), within
    # one level (Pillow resamples in uint8).
    import tensorflow as tf

    want = tf.image.resize(big.astype(np.float32), (8, 8), method="bilinear", antialias=True).numpy()
    assert np.abs(x * 255.0 - want).max() <= 1.0


# ---------------------------------------------------------------------------- full audits


@pytest.mark.parametrize("kind,keys", [("png_parquet", False), ("hf", True), ("raw_tfr", False),
                                       ("png_tfr", True), ("folder", True)])
def test_audit_tables_equal_the_npz_audit(formats, reference, tmp_path, kind, keys):
    out = tmp_path / "out"
    m = audit(formats, formats[f"train_{kind}"], formats[f"test_{kind}"], out)
    res = load_results(str(out))
    assert_equal_tables(res, reference)
    assert_keys(res, formats, keys, keys)
    assert m["sources"]["train"]["rows"] == N_TRAIN
    if kind == "png_tfr":
        assert [f["records"] for f in m["sources"]["train"]["files"]] == [50, 50, 50]
    if kind == "folder":
        assert m["sources"]["train"]["classes"] == [str(c) for c in range(10)]


def test_jpeg_within_its_decoding_tolerance(formats, reference, digits, tmp_path):
    """JPEG is lossy: pixels move by a few levels, so the top-k may reorder among near ties.
    The decoded pixels stay close, and the top-k proponents agree with the lossless run's."""
    src = open_source(formats["train_jpeg"])
    delta = np.abs(src.read(0, N_TRAIN, (8, 8, 1)).x - as_x(digits[0]))
    assert delta.max() < 0.12 and delta.mean() < 0.02, (delta.max(), delta.mean())
    out = tmp_path / "out"
    audit(formats, formats["train_jpeg"], formats["test_jpeg"], out)
    res, ref = load_results(str(out)), reference

    def sets(t):
        pro = t.filter(pa.compute.equal(t.column("kind"), "proponent")).to_pandas()
        return pro.groupby("test_id")["train_id"].apply(set)

    a, b = sets(res.influence_topk), sets(ref.influence_topk)
    overlap = np.mean([len(a[t] & b[t]) / K for t in b.index])
    assert overlap >= 0.7, overlap
    s1 = res.train_scores.column("audit_score").to_numpy()
    s2 = ref.train_scores.column("audit_score").to_numpy()
    assert np.corrcoef(s1, s2)[0, 1] > 0.95


@pytest.mark.slow  # starts Ray
def test_ray_workers_read_tfrecord_and_folder(formats, reference, tmp_path):
    """Through Ray actors: the TFRecord layout found by the driver and the keys come back (the
    keys the actors read are the ones the driver checks for repeats; the refusal itself is
    tested in process, tests/engine/test_inputs.py)."""
    import ray

    from distributed_influence.cluster.runtime import start_ray

    start_ray(num_cpus=2)
    try:
        out = tmp_path / "out"
        audit(formats, formats["train_png_tfr"], formats["test_folder"], out, use_ray=True, shards=3,
              workers=2)
    finally:
        ray.shutdown()
    res = load_results(str(out))
    assert_equal_tables(res, reference, rtol=1e-5)
    assert_keys(res, formats, True, True)


def test_explain_names_the_files_of_proponents(formats, reference, tmp_path):
    from distributed_influence.engine.explain import run_explain

    out = tmp_path / "audit"
    audit(formats, formats["train_folder"], formats["test_npz"], out)
    ex = tmp_path / "explain"
    run_explain(str(out), formats["model"], formats["test_png_tfr"], str(ex))
    topk = load_results(str(ex)).influence_topk
    assert topk.drop_columns(list(KEY_COLUMNS)).equals(reference.influence_topk)
    names_tr, names_te = np.array(formats["train_names"]), np.array(formats["test_names"])
    np.testing.assert_array_equal(topk.column("train_key").to_pylist(), names_tr[topk.column("train_id").to_numpy()])
    np.testing.assert_array_equal(topk.column("test_key").to_pylist(), names_te[topk.column("test_id").to_numpy()])


def test_report_draws_pictures_from_tfrecord_and_folder(formats, digits, tmp_path):
    from distributed_influence.report.pictures import load_pictures

    config = {"train": formats["train_png_tfr"], "test": formats["test_folder"], "input_shape": [8, 8, 1]}
    pictures, note = load_pictures(config, np.array([3, 77]), np.array([5]))
    assert note is None
    np.testing.assert_array_equal(pictures["train"][77], as_x(digits[0][77])[..., 0])
    np.testing.assert_array_equal(pictures["test"][5], as_x(digits[2][5])[..., 0])


# ------------------------------------------------------------------------------ bad input


def bad_cases(formats, digits, tmp_path) -> dict:
    px, y = digits[0][:20], digits[1][:20]
    blobs = [png(p) for p in px]
    corrupt = str(tmp_path / "corrupt.parquet")
    pq.write_table(pa.table({"image": [b if i != 13 else b[:40] for i, b in enumerate(blobs)], "label": y}),
                   corrupt)
    # 80 records: a block parsed at once by TensorFlow, which fails and falls back to the
    # record-by-record parse that names the record.
    missing = str(tmp_path / "missing.tfrecord")
    write_tfrecord(missing, [tf_example({"image": png(digits[0][i]), **({"label": digits[1][i]} if i != 66 else {})})
                             for i in range(80)])
    empty = tmp_path / "empty_class"
    mixed = tmp_path / "mixed"
    for root in (empty, mixed):
        for i in range(20):
            os.makedirs(root / str(y[i]), exist_ok=True)
            (root / str(y[i]) / f"{i:03d}.png").write_bytes(blobs[i])
    os.makedirs(empty / "zz_empty")
    (empty / "zz_empty" / "notes.txt").write_text("no images here")
    big = np.repeat(np.repeat(px[9], 2, axis=0), 2, axis=1)
    (mixed / str(y[9]) / f"{9:03d}.png").write_bytes(png(big))
    return {
        "corrupt image": (corrupt, f"{corrupt}: row 13: corrupt or unreadable image"),
        "missing feature": (missing, f"{missing}: record 66: no single value in label feature 'label'"),
        "class folder without images": (str(empty), f"{empty / 'zz_empty'}: class folder has no images"),
        "mixed sizes": (str(mixed), f"{mixed / str(y[9]) / '009.png'}: image is 16x16 but the model takes 8x8"),
    }


def test_bad_inputs_exit_2_with_one_line_naming_the_file(formats, digits, tmp_path, capsys):
    for name, (train, needle) in bad_cases(formats, digits, tmp_path).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        code = main(["audit", "--in-process", "--model", formats["model"], "--train", train,
                     "--test", formats["test_npz"], "--out", str(out), "--k", "3"])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert len(err.splitlines()) == 1 and needle in err, (name, err)
        assert not out.exists(), name  # nothing written


def test_source_level_refusals(formats, digits, tmp_path):
    """Duplicate string keys, a test folder with a class the training folder lacks, a file that
    is not a TFRecord, and a glob that matches nothing: one line each, naming the file."""
    px, y = digits[0][:4], digits[1][:4]
    dup = str(tmp_path / "dup.parquet")
    pq.write_table(pa.table({"image": [png(p) for p in px], "label": y, "id": ["a", "b", "a", "c"]}), dup)
    with pytest.raises(SourceError, match=r"dup.parquet: duplicate key 'a'"):
        open_source(dup)
    with pytest.raises(SourceError, match=r"class folder 'extra' is not a class of the training set"):
        os.makedirs(tmp_path / "test_folder" / "extra")
        (tmp_path / "test_folder" / "extra" / "a.png").write_bytes(png(px[0]))
        open_source(str(tmp_path / "test_folder"), classes=["0", "1"])
    garbage = tmp_path / "garbage.tfrecord"
    garbage.write_bytes(b"\x05" * 30)
    with pytest.raises(SourceError, match=r"garbage.tfrecord: record 0: truncated"):
        open_source(str(garbage))
    with pytest.raises(SourceError, match=r"no TFRecord files match"):
        open_source(str(tmp_path / "nothing-*.tfrecord"))
