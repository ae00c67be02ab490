"""Resumable runs: partial results persisted under ``OUT/_work/<run key>/``.

A full-dataset audit on preemptible nodes must survive a driver crash without starting over.
The run key hashes everything that changes the numbers (configuration, model bytes, source
fingerprints, shard plan), so a re-run of the same command finds and reuses its own finished
work, and a run with different settings can never mix its partials with old ones.

What is kept: the fitted head, every shard's scored partials (the top-k candidates and
per-train rows, which the worker writes under ``partials/``, and the per-row vectors the driver
keeps), and every finished reduce range (its part files under ``tables/`` and its summary).
Test features are cheap to recompute and are not kept. Every file is written under a temporary
name and renamed (:func:`distributed_influence.store.storage.write_atomic`), so a crash mid-write
leaves no half file that could be mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Dict, Iterable, Optional

import numpy as np

from distributed_influence.errors import ConfigError
from distributed_influence.store import storage, tables

WORK_DIR = "_work"


def fingerprint(spec: str) -> str:
    """Identifies a source's content cheaply: size and modification time of its file."""
    try:
        st = storage.stat(spec)
    except (OSError, ValueError):  # not a file (e.g. `digits`)
        st = None
    return spec if st is None else f"{spec}|{st[0]}|{st[1]}"


def run_key(config_digest: str, model_bytes: bytes, train: str, test: str, shard_bounds: Iterable) -> str:
    """Hash of everything a partial result depends on: the name of the run's work directory.

    A re-run finds its finished work under this name, so the key must stay the same for the same
    job across versions of the package: the bytes hashed here, and
    :meth:`~distributed_influence.config.AuditConfig.digest`, do not change with the code
    (tests/config/test_config.py pins both).

    Args:
        config_digest: ``AuditConfig.digest()``: the settings that change the numbers.
        model_bytes: the model file's bytes.
        train, test: the source specs, fingerprinted by size and modification time.
        shard_bounds: (start, stop) of every shard, in order.

    Returns:
        20 hex digits.
    """
    h = hashlib.sha256()
    h.update(config_digest.encode())
    h.update(hashlib.sha256(model_bytes).digest())
    for spec in (train, test):
        h.update(fingerprint(spec).encode())
    h.update(json.dumps([list(b) for b in shard_bounds]).encode())
    return h.hexdigest()[:20]


def flatten(tree: dict, prefix: str = "") -> Dict[str, np.ndarray]:
    """Nested dict of arrays/scalars → flat ``a/b/c`` keys, storable without pickling."""
    flat = {}
    for key, val in tree.items():
        name = f"{prefix}{key}"
        if isinstance(val, dict):
            flat.update(flatten(val, name + "/"))
        else:
            flat[name] = np.asarray(val)
    return flat


def unflatten(flat: Dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, val in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = val[()] if val.ndim == 0 else val
    return tree


class WorkStore:
    """The partial results of one run, in ``OUT/_work/<key>/``."""

    def __init__(self, out_dir: str, key: str):
        self.out_dir = out_dir
        self.key = key
        self.path = storage.join(storage.join(out_dir, WORK_DIR), key)

    @classmethod
    def open(cls, out_dir: str, key: str, overwrite: bool) -> "WorkStore":
        """Opens the store of this run, refusing to mix with another job's results.

        Raises:
            ConfigError: ``out_dir`` holds results or partials of a different job and
                ``overwrite`` is False.
        """
        work = storage.join(out_dir, WORK_DIR)
        others = [d for d in storage.list_names(work) if d != key]
        old_key = None
        if storage.exists(storage.join(out_dir, tables.MANIFEST)):
            try:
                old_key = tables.read_manifest(out_dir).get("run_key")
            except (OSError, ValueError):
                old_key = "unreadable"
        conflict = others or (old_key is not None and old_key != key)
        if conflict and not overwrite:
            what = "partial results" if others else "results"
            raise ConfigError(
                f"{out_dir}: holds {what} of a different job (other settings or inputs); "
                f"use --overwrite to replace them, or choose another --out"
            )
        if overwrite:
            for d in others:
                storage.remove_tree(storage.join(work, d))
        return cls(out_dir, key)

    def _file(self, name: str) -> str:
        return storage.join(self.path, name + ".npz")

    def has(self, name: str) -> bool:
        return storage.exists(self._file(name))

    def save(self, name: str, tree: dict) -> None:
        """Persists a small result (the fit, a shard's per-row vectors, a reduce summary)."""
        buf = io.BytesIO()  # the big partials are Parquet files the workers write themselves
        np.savez(buf, **flatten(tree))
        storage.write_atomic(self._file(name), lambda fh: fh.write(buf.getvalue()))

    def load(self, name: str) -> Optional[dict]:
        if not self.has(name):
            return None
        path = self._file(name)
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
        with np.load(source, allow_pickle=False) as data:
            return unflatten({k: data[k] for k in data.files})

    def remove(self) -> None:
        """Drops this run's partials after its tables were written."""
        storage.remove_tree(self.path)
        work = storage.dirname(self.path)
        if not storage.list_names(work):
            storage.remove_tree(work)
