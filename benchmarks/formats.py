"""Featurizing encoded images through the job: PNG in Parquet and TFRecord against `.npz`.

Why this exists: users keep image datasets as encoded files, and the job must read them at
nearly the speed of model-ready arrays (the target: featurizing from PNG Parquet or TFRecord
costs at most 1.5× featurizing from `.npz`). This script writes Fashion-MNIST (60,000 train +
10,000 test = 70,000 images) three ways from the same pixels — `.npz` float32 arrays, Parquet
with a PNG-bytes `image` column, and sharded TFRecords of `tf.train.Example` with
`image/encoded` PNG bytes — runs the full audit (`distributed-influence audit`, Ray started
locally) on each, side by side in one run, and prints per source:

* the featurize stage's wall time from the manifest (train and test, including the start of
  the worker actors, as a user waits for it), and its ratio to `.npz`;
* the workers' own time to read + decode + featurize their training shards (the sum of the
  manifest's per-shard ``featurize_seconds``), a stricter measure without the fixed costs;
* the driver's validate stage (opening the sources; TFRecords are counted there) and the total.

It also checks that the three runs' tables are identical (PNG is lossless), so the speed is
not bought with different numbers. The machine may be shared: compare the ratios of one run,
and see the contention line each job prints.

Usage::

    python benchmarks/formats.py                       # Fashion-MNIST, 70,000 images
    python benchmarks/formats.py --rounds 2            # each source twice, interleaved
    python benchmarks/formats.py --n-train 6000 --n-test 1000
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import load_data, run_benchmark, run_job, train_model, write_npz  # noqa: E402

TARGET_RATIO = 1.5
#: Rows per Parquet row group (a worker reads the groups covering its shard).
ROW_GROUP = 5000
#: TFRecord shards of the training set (the test set gets a quarter as many, at least 1).
TRAIN_SHARDS = 8


def to_pixels(x: np.ndarray) -> np.ndarray:
    """float32 images in [0, 1] back to the uint8 pixels they were scaled from (checked exact)."""
    px = np.round(x * 255.0).astype(np.uint8)
    if not np.array_equal(px.astype(np.float32) * np.float32(1.0 / 255.0), x):
        raise SystemExit("the images are not uint8 pixels scaled by 1/255; PNG would not be lossless")
    return px


def encode_pngs(px: np.ndarray) -> list:
    from PIL import Image

    out = []
    for p in px:
        buf = io.BytesIO()
        Image.fromarray(p[..., 0]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_png_parquet(path: str, blobs: list, y: np.ndarray) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(y, pa.int64())}),
                   path, row_group_size=ROW_GROUP)
    return path


def write_tfrecords(folder: str, stem: str, blobs: list, y: np.ndarray, shards: int) -> str:
    """``stem-0000i-of-0000N.tfrecord`` files of tf.train.Example; returns their glob."""
    from distributed_influence.tfimport import import_tensorflow

    tf = import_tensorflow()
    bounds = np.linspace(0, len(blobs), shards + 1).astype(int)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        with tf.io.TFRecordWriter(os.path.join(folder, f"{stem}-{s:05d}-of-{shards:05d}.tfrecord")) as w:
            for i in range(a, b):
                feat = {"image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[blobs[i]])),
                        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(y[i])]))}
                w.write(tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString())
    return os.path.join(folder, f"{stem}-*-of-{shards:05d}.tfrecord")


def read_table(out: str, name: str):
    """A result table, as one file or as a directory of part files."""
    import pyarrow.parquet as pq

    for path in (os.path.join(out, name), os.path.join(out, name.replace(".parquet", ""))):
        if os.path.exists(path):
            return pq.read_table(path)
    raise SystemExit(f"{out}: no table {name}")


def same_tables(out_a: str, out_b: str) -> bool:
    return all(read_table(out_a, n).equals(read_table(out_b, n))
               for n in ("influence_topk.parquet", "train_scores.parquet", "test_scores.parquet"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files "
                                                     "(default: the Debian package's)")
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--n-test", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=1, help="training epochs of the CNN (default 1)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each source, interleaved (default 1)")
    ap.add_argument("--work-dir", default=None, help="where inputs and outputs go (default: a temp dir)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the jobs with --in-process (no Ray: every shard in the CLI's process)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the model and inputs a previous run wrote to --work-dir")
    args = ap.parse_args(argv)

    t_all = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="formats_bench_")
    os.makedirs(work, exist_ok=True)
    train, test = load_data(args.data_dir, args.n_train, args.n_test)
    print(f"data: {train.origin} and {test.origin}: {len(train.y)} train + {len(test.y)} test images")
    model = os.path.join(work, "model.keras")
    sources = {"npz": (os.path.join(work, "train.npz"), os.path.join(work, "test.npz")),
               "png parquet": (os.path.join(work, "train_png.parquet"), os.path.join(work, "test_png.parquet")),
               "tfrecord (png)": (os.path.join(work, f"train-*-of-{TRAIN_SHARDS:05d}.tfrecord"),
                                  os.path.join(work, f"test-*-of-{max(1, TRAIN_SHARDS // 4):05d}.tfrecord"))}
    if args.reuse and os.path.exists(model) and os.path.exists(sources["png parquet"][1]):
        print(f"reusing the model and inputs in {work} (--reuse)")
    else:
        info = train_model(train, test, args.epochs, 0, model, seed=0)
        print(f"model: CNN trained {args.epochs} epoch(s) in {info['seconds']:.1f} s, "
              f"test accuracy {info['test_accuracy']:.3f}")
        t0 = time.perf_counter()
        write_npz(sources["npz"][0], train.x, train.y)
        write_npz(sources["npz"][1], test.x, test.y)
        blobs_tr, blobs_te = encode_pngs(to_pixels(train.x)), encode_pngs(to_pixels(test.x))
        write_png_parquet(sources["png parquet"][0], blobs_tr, train.y)
        write_png_parquet(sources["png parquet"][1], blobs_te, test.y)
        write_tfrecords(work, "train", blobs_tr, train.y, TRAIN_SHARDS)
        write_tfrecords(work, "test", blobs_te, test.y, max(1, TRAIN_SHARDS // 4))
        mb = sum(len(b) for b in blobs_tr + blobs_te) / 1e6
        print(f"inputs written in {time.perf_counter() - t0:.1f} s (PNG bytes: {mb:.1f} MB, "
              f"{mb * 1e6 / (len(blobs_tr) + len(blobs_te)):.0f} B per image)")

    runs = {name: [] for name in sources}
    outs = {}
    for r in range(args.rounds):
        for name, (tr, te) in sources.items():
            out = os.path.join(work, f"out_{name.split()[0]}_{r}")
            job = run_job(model, tr, te, out, os.path.join(work, f"job_{name.split()[0]}_{r}.log"),
                          extra=("--in-process",) if args.in_process else ())
            m = job.manifest
            shard_secs = sum(s.get("featurize_seconds") or 0.0 for s in m["shards"])
            runs[name].append({"featurize": m["timings"]["featurize"], "validate": m["timings"]["validate"],
                               "shards": shard_secs, "wall": job.wall})
            outs[name] = out
            print(f"  round {r + 1} {name}: featurize {m['timings']['featurize']:.2f} s, workers' "
                  f"train featurize {shard_secs:.2f} s, validate {m['timings']['validate']:.2f} s, "
                  f"job wall {job.wall:.1f} s; {job.contention.text()}", flush=True)

    print(f"\nFashion-MNIST from three sources, {len(train.y) + len(test.y)} images, side by side in one "
          f"run ({'single-process engine' if args.in_process else 'Ray, local'}; medians of {args.rounds} "
          f"round(s); the machine may be shared with other work):")
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    base = med["npz"]
    print(f"{'source':<16}{'featurize stage':>17}{'ratio':>8}{'workers (train)':>17}{'ratio':>8}"
          f"{'validate':>10}{'job wall':>10}")
    ok = True
    for name, v in med.items():
        ratio, ratio_w = v["featurize"] / base["featurize"], v["shards"] / base["shards"]
        if name != "npz":
            ok &= ratio <= TARGET_RATIO
        print(f"{name:<16}{v['featurize']:>15.2f} s{ratio:>7.2f}×{v['shards']:>15.2f} s{ratio_w:>7.2f}×"
              f"{v['validate']:>8.2f} s{v['wall']:>8.1f} s")
    equal = {name: same_tables(outs["npz"], outs[name]) for name in sources if name != "npz"}
    for name, same in equal.items():
        print(f"tables from {name} identical to those from npz: {'yes' if same else 'NO'}")
    print(f"target: featurize stage <= {TARGET_RATIO}× npz for PNG Parquet and TFRecord: "
          f"{'PASS' if ok else 'FAIL'}")
    print(f"benchmark total {time.perf_counter() - t_all:.0f} s; work dir {work}")
    return 0 if ok and all(equal.values()) else 1


if __name__ == "__main__":
    sys.exit(run_benchmark("formats", main))
