"""Remote storage: sources, model and outputs on a real S3-compatible server on loopback
(moto's server mode, see tests/moto_s3.py), reached by pyarrow's own S3 client as a user would."""

import gzip
import io
import os
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import RANGES, assert_same_results
from moto_s3 import BUCKET, moto_s3

from distributed_influence.cluster.runtime import start_ray
from distributed_influence.config import AuditConfig
from distributed_influence.data.inputs import prepare_inputs
from distributed_influence.data.model import read_model_bytes
from distributed_influence.data.sources import open_source
from distributed_influence.data.sources.npz import _RemoteRows
from distributed_influence.engine.job import run_audit
from distributed_influence.errors import ConfigError, ModelError, SourceError
from distributed_influence.store import storage, tables


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port; credentials and region from the environment."""
    yield from moto_s3()


def _same_rows(remote, local):
    assert remote.n_rows == local.n_rows and remote.example_shape == local.example_shape
    np.testing.assert_array_equal(remote.labels(), local.labels())
    np.testing.assert_array_equal(remote.ids(), local.ids())
    for a, b in RANGES:
        r, loc = remote.read(a, b), local.read(a, b)
        np.testing.assert_array_equal(r.x, loc.x)
        np.testing.assert_array_equal(r.y, loc.y)
        np.testing.assert_array_equal(r.ids, loc.ids)


# ------------------------------------------------------------------------------- names, URIs


def test_names_of_uris_keep_their_options():
    uri = "s3://b/dir/train-images-idx3-ubyte.gz?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.is_uri(uri) and not storage.is_uri("/data/x.npz") and not storage.is_uri("x.npz")
    assert storage.basename(uri) == "train-images-idx3-ubyte.gz"
    assert storage.dirname(uri) == "s3://b/dir?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("s3://b/out/?region=eu-west-1", "m.json") == "s3://b/out/m.json?region=eu-west-1"
    assert storage.join("s3://b", "m.json") == "s3://b/m.json"
    assert storage.basename("dir/model.keras") == "model.keras"
    assert storage.join("dir", "m.json") == os.path.join("dir", "m.json")


def test_resolve_local_paths_and_file_uris(tmp_path):
    fs, path = storage.resolve("relative/x.npz")
    assert storage.is_local(fs) and path == os.path.abspath("relative/x.npz")
    fs, path = storage.resolve(f"file://{tmp_path}/x.npz")
    assert storage.is_local(fs) and path == f"{tmp_path}/x.npz"


def test_endpoint_from_aws_environment_variable(s3, monkeypatch):
    """`AWS_ENDPOINT_URL` points plain `s3://bucket/key` URIs at another S3 server."""
    s3.put("env/hello.txt", b"hello")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3.port}")
    assert storage.read_bytes(f"s3://{BUCKET}/env/hello.txt") == b"hello"


# -------------------------------------------------------------------------------------- sources


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_on_s3_reads_the_same_rows(s3, tmp_path, arrays, compressed):
    x, y, ids = arrays
    local = str(tmp_path / "d.npz")
    (np.savez_compressed if compressed else np.savez)(local, x=x, y=y, id=ids)
    remote = open_source(s3.upload(local, f"npz-{compressed}/d.npz"))
    _same_rows(remote, open_source(local))
    # Uncompressed: only a shard's own rows are fetched, by byte range.
    assert isinstance(remote._x, _RemoteRows) != compressed


def test_npz_on_s3_in_fortran_order(s3, tmp_path, arrays):
    x, y, _ = arrays
    local = str(tmp_path / "f.npz")
    np.savez(local, x=np.asfortranarray(x), y=y)
    _same_rows(open_source(s3.upload(local, "fortran/f.npz")), open_source(local))


def test_npz_object_array_on_s3_is_refused_not_unpickled(s3):
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    with pytest.raises(SourceError, match="refusing to unpickle|corrupt"):
        open_source(s3.put("obj/obj.npz", buf.getvalue()))


def test_parquet_on_s3_reads_the_same_rows(s3, tmp_path, arrays):
    x, y, ids = arrays
    local = str(tmp_path / "d.parquet")
    table = pa.table({"id": ids, "label": y, "x": [row.ravel().tolist() for row in x]})
    pq.write_table(table, local, row_group_size=8)  # ranges cross row-group borders
    _same_rows(open_source(s3.upload(local, "pq/d.parquet")), open_source(local))


def test_idx_on_s3_finds_its_labels_beside_it(s3):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(30, 5, 5), dtype=np.uint8)
    lab = rng.integers(0, 10, size=30).astype(np.uint8)

    def idx(arr):
        head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
        return gzip.compress(head + arr.tobytes())

    s3.put("idx/train-labels-idx1-ubyte.gz", idx(lab))
    src = open_source(s3.put("idx/train-images-idx3-ubyte.gz", idx(img)))
    np.testing.assert_allclose(src.read(0, 30).x, img[..., None] / np.float32(255.0), rtol=1e-6)
    np.testing.assert_array_equal(src.labels(), lab)


# ------------------------------------------------------------------------------------- errors


def test_missing_remote_files_are_one_line_input_errors(s3):
    for uri in (s3.uri("absent/train.npz"), s3.uri("absent/train.parquet"),
                s3.uri("absent/train-images-idx3-ubyte"),
                f"s3://no-such-bucket/train.npz?endpoint_override=127.0.0.1:{s3.port}&scheme=http"):
        with pytest.raises(SourceError) as err:
            open_source(uri)
        assert str(err.value) == f"{uri}: file not found"
    uri = s3.uri("absent/model.keras")
    with pytest.raises(ModelError) as err:
        read_model_bytes(uri)
    assert str(err.value) == f"{uri}: model file not found"


def test_uris_pyarrow_cannot_use_are_input_errors(s3):
    with pytest.raises(SourceError, match="cannot be opened.*Unexpected query parameter"):
        open_source(f"s3://{BUCKET}/x.npz?endpoint_overide=127.0.0.1:{s3.port}")
    with pytest.raises(SourceError, match="cannot be opened.*Unrecognized filesystem"):
        open_source("nosuchfs://bucket/x.csv")
    with pytest.raises(ModelError, match="cannot be read.*Unrecognized filesystem"):
        read_model_bytes("nosuchfs://bucket/m.keras")
    cfg = AuditConfig(model=s3.uri("m.keras"), train="digits", test="digits:test",
                      out=f"s3://{BUCKET}/out?bad_option=1")
    with pytest.raises(ConfigError, match="cannot write results there"):
        prepare_inputs(cfg)  # before any work is done


# ------------------------------------------------------------------------------------ outputs


def test_outputs_written_to_s3_appear_whole_manifest_last(s3):
    table = pa.table({"a": pa.array([1, 2, 3], pa.int64())})
    out = s3.uri("written")
    tables.write_outputs(out, {"t": table}, {"n": np.int64(3)}, rows_per_part=2)
    # no staging or temporary file left behind
    files = [p for p in s3.listing("written") if p != "t"]  # "t": the directory's own entry
    assert files == ["manifest.json", "t/part-00000.parquet", "t/part-00001.parquet"]
    assert tables.read_manifest(out) == {"n": 3, "tables": {"t": ["t/part-00000.parquet", "t/part-00001.parquet"]}}
    assert tables.read_table(out, "t", tables.read_manifest(out)).equals(table)


# ---------------------------------------------------------------------------------- the audit


@pytest.fixture(scope="module")
def inputs_local_and_on_s3(files, tmp_path_factory, s3):
    """The same model, Parquet training set (several row groups) and npz test set, twice."""
    root = tmp_path_factory.mktemp("s3-inputs")
    d = np.load(files["train"])
    train = str(root / "train.parquet")
    pq.write_table(pa.table({"id": np.arange(60, dtype=np.int64) * 3 + 1, "label": d["y"],
                             "x": [r.tolist() for r in d["x"]]}), train, row_group_size=16)
    local = {"model": files["model"], "train": train, "test": files["test"]}
    remote = {"model": s3.upload(files["model"], "in/model.keras"),
              "train": s3.upload(train, "in/train.parquet"),
              "test": s3.upload(files["test"], "in/test.npz")}
    return local, remote


@pytest.fixture(scope="module")
def local_reference(inputs_local_and_on_s3, tmp_path_factory):
    local, _ = inputs_local_and_on_s3
    out = str(tmp_path_factory.mktemp("s3-ref") / "out")
    run_audit(AuditConfig(out=out, k=4, shards=3, **local), use_ray=False)
    return out


def _assert_published(listing):
    assert tables.MANIFEST in listing
    assert all(f"{name}/part-00000.parquet" in listing for name in tables.TABLES)
    assert not [p for p in listing if ".staging-" in p]


@pytest.fixture(scope="module")
def empty_cwd(tmp_path_factory):
    """An empty working directory for the driver and its Ray workers: a URI mistaken for a
    relative path would leave files here (and not in the repository)."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield cwd


def test_audit_on_s3_equals_audit_on_local_files(s3, inputs_local_and_on_s3, local_reference, empty_cwd,
                                                 tmp_path):
    _, remote = inputs_local_and_on_s3
    out = s3.uri("results/in-process")
    m = run_audit(AuditConfig(out=out, k=4, shards=3, **remote), use_ray=False)
    assert os.listdir(empty_cwd) == []  # everything went to the bucket
    assert m["n_train"] == 60 and tables.read_manifest(out)["n_train"] == 60
    _assert_published(s3.listing("results/in-process"))
    assert_same_results(local_reference, s3.download_dir("results/in-process", str(tmp_path / "dl")))


@pytest.fixture(scope="module")
def ray_local(s3, empty_cwd):
    """Ray started after the S3 fixture set the credentials, so its workers inherit them."""
    import ray

    assert start_ray(num_cpus=2), "a Ray started before the S3 fixture lacks its credentials"
    yield ray
    ray.shutdown()


@pytest.mark.slow  # starts Ray
def test_ray_workers_read_their_rows_from_s3(ray_local, s3, inputs_local_and_on_s3, local_reference,
                                             empty_cwd, tmp_path):
    """Workers get only the spec strings: the URIs' options are all they need to reach the server."""
    _, remote = inputs_local_and_on_s3
    out = s3.uri("results/ray")
    m = run_audit(AuditConfig(out=out, k=4, shards=3, gpus_per_worker=0, **remote), use_ray=True)
    assert m["workers"]["backend"] == "ray" and m["workers"]["count"] == 2
    assert os.listdir(empty_cwd) == []
    _assert_published(s3.listing("results/ray"))
    assert_same_results(local_reference, s3.download_dir("results/ray", str(tmp_path / "dl")))


def test_credentials_in_uris_are_not_recorded():
    from distributed_influence.store.storage import redact

    assert redact("s3://AKIAXX:secret@bucket/data/train.npz") == "s3://***@bucket/data/train.npz"
    assert redact("s3://bucket/data/train.npz?region=us-east-1") == "s3://bucket/data/train.npz?region=us-east-1"
    assert redact("/local/dir@2/file.npz") == "/local/dir@2/file.npz"
