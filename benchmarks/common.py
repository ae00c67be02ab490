"""Measuring helpers shared by the benchmarks: data, the seed-shaped CNN, the machine's
matrix-product speed, a timed CLI run (with the process-tree sampler of ``sampler.py``) and the
published table.

Every benchmark imports these rather than carrying its own copy, so two scripts that report
"peak RSS of the driver" or "job wall time" mean the same measurement.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
from sampler import Contention, TreeSampler, busy_cpu_seconds, own_cpu_seconds, steal_cpu_seconds

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Proponents and opponents per test example (the package's default).
K = 10
#: Where Debian's ``dataset-fashion-mnist`` puts the IDX files (``dpkg -L`` is asked too).
DEBIAN_PACKAGE = "dataset-fashion-mnist"
STANDARD_DATA_DIRS = ("/usr/share/datasets/fashion-mnist",)
TRAIN_IMAGES = "train-images-idx3-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
#: A job run taking longer than this is killed (with its process group) and reported.
JOB_TIMEOUT = 1800
#: Repeats of the reference matrix product (best of).
MATMUL_REPEATS = 3

GiB = 1024.0 ** 3
#: The page whose benchmark sections the benchmarks write (between their marker lines).
PERFORMANCE_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                               "performance.md")
#: The flag that asks a benchmark to write its report into PERFORMANCE_DOC.
PUBLISH_FLAG = "--publish"

# ------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class Dataset:
    """Images and labels of one split plus where they came from."""

    x: np.ndarray  # (n, 28, 28, 1) float32 in [0, 1]
    y: np.ndarray  # (n,) int64
    origin: str


def dpkg_data_dirs(package: str = DEBIAN_PACKAGE) -> List[str]:
    """Directories holding the package's ``*-idx3-ubyte*`` files, as ``dpkg -L`` reports them.

    Returns:
        The directories (empty when dpkg or the package is missing).
    """
    try:
        out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    return sorted({os.path.dirname(p) for p in out.stdout.split() if "idx3-ubyte" in p})


def find_idx(directory: str, stem: str) -> Optional[str]:
    """The path of ``stem`` or ``stem.gz`` in ``directory``, or None."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def locate_fashion_mnist(data_dir: Optional[str]) -> Optional[Tuple[str, str]]:
    """Finds the train and test image files of Fashion-MNIST.

    Args:
        data_dir: the user's ``--data-dir``; when given it is the only place searched.

    Returns:
        (train images path, test images path), or None when not found anywhere.

    Raises:
        SystemExit: ``--data-dir`` was given but does not hold both files.
    """
    dirs = [data_dir] if data_dir else list(dict.fromkeys(list(STANDARD_DATA_DIRS) + dpkg_data_dirs()))
    for d in dirs:
        train, test = find_idx(d, TRAIN_IMAGES), find_idx(d, TEST_IMAGES)
        if train and test:
            return train, test
    if data_dir:
        raise SystemExit(f"--data-dir {data_dir}: no {TRAIN_IMAGES}[.gz] and {TEST_IMAGES}[.gz] there")
    return None


def read_idx_split(path: str) -> Dataset:
    """Reads an IDX images file and its labels with the package's own reader."""
    from distributed_influence.data.sources import open_source

    src = open_source(path)
    rows = src.read(0, src.n_rows)
    return Dataset(np.asarray(rows.x, np.float32), np.asarray(rows.y, np.int64), path)


def synthetic_split(n: int, seed: int) -> Dataset:
    """Learnable stand-in for Fashion-MNIST: 10 smooth class prototypes plus noise, in [0, 1]."""
    protos = np.random.default_rng(1234).random((10, 7, 7)).repeat(4, axis=1).repeat(4, axis=2)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    x = protos[y] + rng.normal(0.0, 0.35, size=(n, 28, 28))
    return Dataset(np.clip(x, 0.0, 1.0).astype(np.float32)[..., None], y, "synthetic")


def load_data(data_dir: Optional[str], n_train: int, n_test: int) -> Tuple[Dataset, Dataset]:
    """Fashion-MNIST when found (first n rows of each split), else synthetic data."""
    found = locate_fashion_mnist(data_dir)
    if found is None:
        return synthetic_split(n_train, seed=1), synthetic_split(n_test, seed=2)
    train, test = (read_idx_split(p) for p in found)
    if n_train > len(train.y) or n_test > len(test.y):
        raise SystemExit(f"asked for {n_train} x {n_test} rows; the data have {len(train.y)} x {len(test.y)}")
    return (Dataset(train.x[:n_train], train.y[:n_train], train.origin),
            Dataset(test.x[:n_test], test.y[:n_test], test.origin))


def write_npz(path: str, x: np.ndarray, y: np.ndarray) -> str:
    """Writes a job input: ``x`` float32 (n, 28, 28, 1), ``y`` int64, ``id`` 0..n-1 (uncompressed)."""
    np.savez(path, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64),
             id=np.arange(len(y), dtype=np.int64))
    return path


# ----------------------------------------------------------------------------------- model


def build_cnn(n_classes: int, features: int, seed: int):
    """The seed's shape, sized for the time budget.

    Returns:
        (trainable model ending in softmax, functional model with outputs
        [features, logits, softmax] sharing its layers).
    """
    from distributed_influence.tfimport import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(seed)
    inp = keras.Input((28, 28, 1), name="image")
    h = keras.layers.Conv2D(32, 3, activation="relu")(inp)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(64, 3, activation="relu")(h)
    h = keras.layers.MaxPooling2D(2)(h)
    feats = keras.layers.Flatten(name="flatten")(h)  # the seed's features: d = 5*5*64 = 1600
    if features:
        feats = keras.layers.Dense(features, activation="relu", name="features")(feats)
    logits = keras.layers.Dense(n_classes, name="logits")(feats)
    probs = keras.layers.Activation("softmax", name="softmax")(logits)
    trainable = keras.Model(inp, probs)
    trainable.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    return trainable, keras.Model(inp, [feats, logits, probs], name="fashion_cnn")


def train_model(train: Dataset, test: Dataset, epochs: int, features: int, path: str, seed: int) -> dict:
    """Trains the CNN briefly and saves the [features, logits, softmax] model to ``path``.

    Returns:
        dict with ``seconds`` of training and ``test_accuracy``.
    """
    trainable, model = build_cnn(10, features, seed)
    t0 = time.perf_counter()
    trainable.fit(train.x, train.y, epochs=epochs, batch_size=128, verbose=0)
    seconds = time.perf_counter() - t0
    _, acc = trainable.evaluate(test.x, test.y, batch_size=1024, verbose=0)
    model.save(path)
    return {"seconds": seconds, "test_accuracy": float(acc)}


# ------------------------------------------------------------------------- machine matmul


def matmul_gflops(m: int, k: int, n: int, repeats: int = MATMUL_REPEATS) -> float:
    """Best-of-``repeats`` float32 ``tf.matmul`` speed of (m × k) by (k × n), in GFLOP/s."""
    from distributed_influence.tfimport import import_tensorflow

    tf = import_tensorflow()
    a = tf.random.uniform((m, k), dtype=tf.float32)
    b = tf.random.uniform((k, n), dtype=tf.float32)
    _ = tf.matmul(a, b).numpy()[0, 0]  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ = tf.matmul(a, b).numpy()[0, 0]
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best / 1e9


# -------------------------------------------------------------------------------- the job


@dataclasses.dataclass
class JobRun:
    """One run of the CLI: wall time, manifest, memory peaks, contention."""

    wall: float
    manifest: dict
    peaks: Dict[str, int]
    peak_tree_rss: int
    n_workers_seen: int
    samples: int
    contention: Contention
    stdout: str
    out_dir: str


def run_job(model: str, train: str, test: str, out: str, log_path: str, extra: Tuple[str, ...] = ()) -> JobRun:
    """Runs ``distributed-influence audit`` as a subprocess (Ray started locally) and measures it.

    Raises:
        SystemExit: the job failed (its log is printed).
    """
    # A fresh output directory: the job resumes from results it finds there, which would
    # make the timings meaningless.
    shutil.rmtree(out, ignore_errors=True)
    # The previous run's outputs (~400 MB for the full audit) are still being written back to
    # disk for up to 30 s after it ends; that kernel work would land in this run's time.
    os.sync()
    exe = os.path.join(os.path.dirname(sys.executable), "distributed-influence")
    cmd = [exe, "-v", "audit", "--model", model, "--train", train, "--test", test,
           "--out", out, "--k", str(K), *extra]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # default Ray local mode: the job starts its own Ray
    # A private Ray temp dir keeps the job's session files (logs, sockets) apart from any other
    # Ray instance on this machine, e.g. one a test suite starts meanwhile.
    ray_tmp = tempfile.mkdtemp(prefix="fa_ray_", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    print("$ " + " ".join(cmd), flush=True)
    busy0, own0, steal0 = busy_cpu_seconds(), own_cpu_seconds(), steal_cpu_seconds()
    t0 = time.perf_counter()
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                    start_new_session=True)
            sampler = TreeSampler(proc.pid)
            sampler.start()
            try:
                stdout, _ = proc.communicate(timeout=JOB_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group only
                proc.communicate()
                raise SystemExit(f"the job did not finish in {JOB_TIMEOUT} s (log: {log_path})")
            finally:
                wall = time.perf_counter() - t0
                sampler.stop()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    foreign = busy_cpu_seconds() - busy0 - (own_cpu_seconds() - own0) - sampler.tree_cpu_seconds()
    steal = steal_cpu_seconds() - steal0
    if proc.returncode != 0:
        with open(log_path) as fh:
            sys.stderr.write(fh.read()[-5000:])
        raise SystemExit(f"the job failed with exit code {proc.returncode} (log: {log_path})")
    with open(os.path.join(out, "manifest.json")) as fh:
        manifest = json.load(fh)
    return JobRun(wall, manifest, sampler.peaks(), sampler.peak_tree_rss, sampler.count("worker"),
                  sampler.samples, Contention(wall, max(0.0, foreign), steal), stdout, out)


# ------------------------------------------------------------------------ the published table


class _Tee(io.TextIOBase):
    """Writes to the terminal and keeps a copy, so a report is printed and published alike."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def _without_local_paths(text: str) -> str:
    """Absolute paths of the machine that ran the benchmark reduced to their last component: the
    page is about the measurement, not about where its files were."""
    return re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+([\w.+-]+)", r".../\1", text)


def machine_line() -> str:
    """CPU model and count, memory, OS: what a reader needs to compare a table with their machine."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    return f"{os.cpu_count()} CPUs ({model}), {mem:.1f} GiB, {platform.system()} {platform.release()}"


def git_revision() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + (" with uncommitted changes" if dirty else "")


def write_section(stem: str, command: List[str], report: str, seconds: float) -> None:
    """Replaces the text between ``<!-- BEGIN stem -->`` and ``<!-- END stem -->`` in
    PERFORMANCE_DOC with this run's command, machine, revision and report."""
    begin, end = f"<!-- BEGIN {stem} -->", f"<!-- END {stem} -->"
    with open(PERFORMANCE_DOC, encoding="utf-8") as fh:
        doc = fh.read()
    if begin not in doc or end not in doc:
        raise SystemExit(f"{PERFORMANCE_DOC}: no {begin} ... {end} section to write")
    shown = " ".join(["python", f"benchmarks/{stem}.py", *command])
    section = (f"{begin}\n"
               f"Command: `{_without_local_paths(shown)}`  \n"
               f"Machine: {machine_line()}  \n"
               f"Revision: {git_revision()}; run on {datetime.date.today().isoformat()}, "
               f"{seconds / 60:.1f} min in all.\n\n"
               f"```text\n{_without_local_paths(report).rstrip()}\n```\n{end}")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(PERFORMANCE_DOC, "w", encoding="utf-8") as fh:
        fh.write(head + section + tail)


def run_benchmark(stem: str, main, argv: Optional[List[str]] = None) -> int:
    """Runs a benchmark's ``main(argv)``; with PUBLISH_FLAG in ``argv`` (taken out before ``main``
    sees it), a run that returns 0 also writes its printed report into PERFORMANCE_DOC, so that
    the page's figures are the benchmark's own, never copied by hand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    publish = PUBLISH_FLAG in argv
    argv = [a for a in argv if a != PUBLISH_FLAG]
    if not publish:
        return main(argv)
    t0 = time.perf_counter()
    tee = _Tee(sys.stdout)
    saved, sys.stdout = sys.stdout, tee
    try:
        code = main(argv)
    finally:
        sys.stdout = saved
    if code == 0:
        write_section(stem, argv, tee.copy.getvalue(), time.perf_counter() - t0)
        print(f"wrote the report into {os.path.relpath(PERFORMANCE_DOC)}")
    return code
