"""A real S3-compatible server on loopback for the tests: moto's server mode.

It speaks the S3 protocol over HTTP on 127.0.0.1; pyarrow's own S3 client talks to it,
configured the way a user would (URI query parameters, AWS environment variables), so nothing
in the package is patched. Shared by the storage tests and the head-loss test.
"""

from __future__ import annotations

import logging

import pyarrow.fs as pafs
import pytest

BUCKET = "influence"


class S3:
    """The loopback S3 server: a client for the test's own setup, and URIs for the package."""

    def __init__(self, port: int):
        self.port = port
        self.fs = pafs.S3FileSystem(endpoint_override=f"http://127.0.0.1:{port}", scheme="http",
                                    region="us-east-1", allow_bucket_creation=True)

    def uri(self, key: str) -> str:
        """How a user names an object on a non-AWS endpoint: options in the query string."""
        return f"s3://{BUCKET}/{key}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def put(self, key: str, data: bytes) -> str:
        with self.fs.open_output_stream(f"{BUCKET}/{key}", compression=None) as fh:
            fh.write(data)
        return self.uri(key)

    def get(self, key: str) -> bytes:
        with self.fs.open_input_stream(f"{BUCKET}/{key}", compression=None) as fh:
            return fh.readall()

    def upload(self, local_path: str, key: str) -> str:
        with open(local_path, "rb") as fh:
            return self.put(key, fh.read())

    def download_dir(self, key: str, local_dir: str) -> str:
        pafs.copy_files(f"{BUCKET}/{key}", local_dir, source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    def listing(self, key: str) -> list:
        infos = self.fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{key}", recursive=True, allow_not_found=True))
        return sorted(i.path[len(BUCKET) + len(key) + 2:] for i in infos)


def moto_s3():
    """A moto S3 server on a free loopback port, its bucket created; credentials and region in
    the environment (inherited by Ray's processes and subprocesses started meanwhile). A generator
    for module fixtures."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a cloud metadata service
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            store = S3(server.get_host_and_port()[1])
            store.fs.create_dir(BUCKET)
            yield store
        finally:
            server.stop()
