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
import logging
from typing import Dict, Iterable, Optional

import numpy as np

import distributed_influence
from distributed_influence.errors import ConfigError
from distributed_influence.store import storage, tables

log = logging.getLogger(__name__)

WORK_DIR = "_work"
#: The layout and meaning of everything a run keeps under ``OUT/_work/<run key>/``: the saved
#: fit and shard records, the partials the workers write, the train index, the reduce's parts
#: and summaries. Bump it whenever any of these changes meaning or layout (a field added,
#: renamed or read differently), even within one version: the run key hashes it, so a work
#: directory written under another format is never resumed, and it is refused by name.
PARTIALS_FORMAT = 2
#: The file in a work directory that records the version and format that wrote it.
FORMAT_FILE = "format.json"


def fingerprint(spec: str) -> str:
    """Identifies a source's content cheaply, from listings only (no byte of data is read).

    A single file: its size and modification time. An image folder, a TFRecord glob or a comma
    list: the sorted (relative path, size, modification time) of every file it reads, hashed,
    so that a folder that gained, lost or rewrote a file gets another run key, and its old
    partials are never resumed as if the rows were the same. Anything else (``digits``, a
    path that does not exist): the spec alone.

    The fingerprint of a single file is the string it has always been (size and modification
    time), pinned by tests/config/test_config.py: within one version, the run key of the same job
    never moves.

    Raises:
        SourceError: a file or directory of the source cannot be listed.
    """
    try:
        st = storage.stat(spec)
    except (OSError, ValueError):  # not a file (e.g. `digits`)
        st = None
    if st is not None:
        return f"{spec}|{st[0]}|{st[1]}"
    # Imported here: only a run's start needs it, and the work store is otherwise storage only.
    from distributed_influence.data.sources import content_listing

    files = content_listing(spec)
    if files is None:
        return spec
    listed = hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return f"{spec}|{len(files)} files|{listed}"


def run_key(config_digest: str, model_bytes: bytes, train: str, test: str, shard_bounds: Iterable,
            fingerprints: Optional[Dict[str, str]] = None) -> str:
    """Hash of everything a partial result depends on: the name of the run's work directory.

    A re-run of the same job by the same version finds its finished work under this name, so
    the bytes hashed for the inputs, and :meth:`~distributed_influence.config.AuditConfig.digest`,
    must not change with the code (tests/config/test_config.py pins both). The package version and
    :data:`PARTIALS_FORMAT` are hashed too: partials written by another version may lack what this
    one reads, or mean something else, so they are never resumed, by design.

    Args:
        config_digest: ``AuditConfig.digest()``: the settings that change the numbers.
        model_bytes: the model file's bytes.
        train, test: the source specs, fingerprinted by :func:`fingerprint`.
        shard_bounds: (start, stop) of every shard, in order.
        fingerprints: ``{"train": ..., "test": ...}`` from :func:`fingerprint` if already taken
            (a folder's is a listing: taken once per run).

    Returns:
        20 hex digits.
    """
    fingerprints = fingerprints or {"train": fingerprint(train), "test": fingerprint(test)}
    h = hashlib.sha256()
    h.update(config_digest.encode())
    h.update(hashlib.sha256(model_bytes).digest())
    for role in ("train", "test"):
        h.update(fingerprints[role].encode())
    h.update(json.dumps([list(b) for b in shard_bounds]).encode())
    h.update(json.dumps(work_format(), sort_keys=True).encode())
    return h.hexdigest()[:20]


#: What :func:`input_record` names, in the words of the refusal: "the <name> changed".
INPUT_NAMES = {"settings": "settings", "model": "model file", "train": "training source",
               "test": "test source", "shards": "shard plan"}


def input_record(config_digest: str, model_bytes: bytes, fingerprints: Dict[str, str],
                 shard_bounds: Iterable) -> Dict[str, str]:
    """Short hashes of each part of the run key, recorded in :data:`FORMAT_FILE`, so that a run
    refused (or started afresh) because its key changed can say which input changed."""
    def short(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:16]

    return {"settings": short(config_digest.encode()), "model": short(model_bytes),
            "train": short(fingerprints["train"].encode()), "test": short(fingerprints["test"].encode()),
            "shards": short(json.dumps([list(b) for b in shard_bounds]).encode())}


def work_format() -> dict:
    """What gives a work directory's content its meaning: this package's version and partials format.

    Read at each call (not at import), so that the version a run reports is the one it hashes.
    """
    return {"version": distributed_influence.__version__, "partials_format": PARTIALS_FORMAT}


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

    def __init__(self, out_dir: str, key: str, inputs: Optional[Dict[str, str]] = None):
        self.out_dir = out_dir
        self.key = key
        self.inputs = inputs
        self.path = storage.join(storage.join(out_dir, WORK_DIR), key)
        self._format_recorded = False
        self._stale: list = []  # other jobs' work directories that --overwrite replaces

    @classmethod
    def open(cls, out_dir: str, key: str, overwrite: bool, inputs: Optional[Dict[str, str]] = None) -> "WorkStore":
        """Opens the store of this run, refusing to mix with another job's results.

        A work directory is this run's only if it has this run's key and records this version
        and partials format, or none yet (:data:`FORMAT_FILE`, written with the first result).

        Args:
            inputs: :func:`input_record` of this run: recorded with the first result, and
                compared with another directory's record to say which input changed.

        Raises:
            ConfigError: ``out_dir`` holds results or partials of a different job, or of another
                version or partials format, and ``overwrite`` is False. One line: what is there,
                why it is not reused, and what to do.
        """
        work = storage.join(out_dir, WORK_DIR)
        mine = work_format()
        names = storage.list_names(work)
        # Each directory's recorded format: None when it records none (written before formats
        # were recorded). Ours, with the right key, can differ only if edited or corrupt.
        records = {d: _read_record(storage.join(work, d)) for d in names}
        recorded = {d: _format_of(r) for d, r in records.items()}
        stale = [d for d in names if d != key or (recorded[d] is not None and recorded[d] != mine)]
        old = _published(out_dir)
        conflict = stale or (old is not None and old.get("run_key") != key)
        changed = _changed_inputs([records[d] for d in stale], inputs)
        if conflict and not overwrite:
            raise ConfigError(_refusal(out_dir, work, [recorded[d] for d in stale], old, mine, changed))
        if overwrite and changed:
            log.warning("starting afresh: the %s changed since the work in %s was started", changed,
                        storage.redact(work))
        store = cls(out_dir, key, inputs)
        if overwrite and key in stale:  # this run's own name, written by another format: never read
            storage.remove_tree(store.path)
        # The others are removed with this run's first result, not now: a run refused later (a
        # repeated key a worker finds) must leave --out as it found it, even with --overwrite.
        store._stale = [storage.join(work, d) for d in stale if d != key] if overwrite else []
        store._format_recorded = recorded.get(key) == mine
        return store

    def _record_format(self) -> None:
        """Writes :data:`FORMAT_FILE` before the first result this store saves.

        Not when the store is opened: a job that fails on its inputs before the fit (a bad row
        found by a worker) must leave nothing in ``--out``. The fit is always the first result of
        a work directory, saved before any worker writes partials or index files into it, so every
        directory holding partials records what wrote them.
        """
        self._drop_stale()
        record = {**work_format(), "run_key": self.key}
        if self.inputs:
            record["inputs"] = self.inputs
        record = json.dumps(record, sort_keys=True).encode()
        storage.write_atomic(storage.join(self.path, FORMAT_FILE), lambda fh: fh.write(record))
        self._format_recorded = True

    def _drop_stale(self) -> None:
        """Removes the work directories ``--overwrite`` replaces (see :meth:`open`)."""
        for path in self._stale:
            storage.remove_tree(path)
        self._stale = []

    def _file(self, name: str) -> str:
        return storage.join(self.path, name + ".npz")

    def has(self, name: str) -> bool:
        return storage.exists(self._file(name))

    def save(self, name: str, tree: dict) -> None:
        """Persists a small result (the fit, a shard's per-row vectors, a reduce summary)."""
        if not self._format_recorded:
            self._record_format()
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
        """Drops this run's partials (and what ``--overwrite`` replaces) after its tables were written."""
        self._drop_stale()
        storage.remove_tree(self.path)
        work = storage.dirname(self.path)
        if not storage.list_names(work):
            storage.remove_tree(work)


def _read_record(path: str) -> Optional[dict]:
    """A work directory's :data:`FORMAT_FILE` as written; None if it has none, {} if unreadable."""
    spec = storage.join(path, FORMAT_FILE)
    if not storage.exists(spec):
        return None
    try:
        data = json.loads(storage.read_bytes(spec))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _format_of(record: Optional[dict]) -> Optional[dict]:
    """The version and partials format a record names; None if there is no record.

    An unreadable record counts as a different one (``{"version": "unknown", ...}``): what wrote
    it cannot be told, so its partials are not reused.
    """
    if record is None:
        return None
    try:
        return {"version": str(record["version"]), "partials_format": int(record["partials_format"])}
    except (KeyError, TypeError, ValueError):
        return {"version": "unknown", "partials_format": "unknown"}


def _changed_inputs(records: list, inputs: Optional[Dict[str, str]]) -> str:
    """Which inputs differ between this run and the first of ``records`` that recorded its own,
    in words ("training source", "settings and model file"); "" when that cannot be told."""
    if not inputs:
        return ""
    for record in records:
        theirs = (record or {}).get("inputs")
        if isinstance(theirs, dict):
            names = [INPUT_NAMES[k] for k in INPUT_NAMES if k in inputs and theirs.get(k) != inputs[k]]
            if names:
                return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return ""


def _published(out_dir: str) -> Optional[dict]:
    """The run key and version of the results published in ``out_dir``; None if there are none."""
    if not storage.exists(storage.join(out_dir, tables.MANIFEST)):
        return None
    try:
        manifest = tables.read_manifest(out_dir)
    except (OSError, ValueError):
        return {"run_key": "unreadable", "version": None}
    versions = manifest.get("versions") or {}
    return {"run_key": manifest.get("run_key"), "version": versions.get("distributed_influence")}


def _refusal(out_dir: str, work: str, formats: list, old: Optional[dict], mine: dict, changed: str = "") -> str:
    """The one line that says what ``out_dir`` holds, why it is not reused, and what to do.

    Args:
        formats: the recorded formats of the work directories that are not this run's (None:
            no record).
        old: the published results' run key and version, if any.
        changed: the inputs that changed since the partials were started (:func:`_changed_inputs`).
    """
    this = f"this is {mine['version']}, partials format {mine['partials_format']}"
    remedy = f"rerun with --overwrite to replace them, or delete {storage.redact(work)}"
    for fmt in formats:  # another version's partials: say so, it is not "another job"
        if fmt is None:
            return (f"{storage.redact(work)}: holds partial results of an earlier version (no partials "
                    f"format recorded; {this}): {remedy}")
        if fmt != mine:
            return (f"{storage.redact(work)}: holds partial results of another version ({fmt['version']}, "
                    f"partials format {fmt['partials_format']}; {this}): {remedy}")
    if not formats and old is not None and old.get("version") not in (None, mine["version"]):
        return (f"{storage.redact(out_dir)}: holds results of another version ({old['version']}; this is "
                f"{mine['version']}); use --overwrite to replace them, or choose another --out")
    what = "partial results" if formats else "results"
    if changed:
        return (f"{storage.redact(out_dir)}: holds partial results of a different job: the {changed} changed "
                f"since they were started; use --overwrite to start afresh, or choose another --out")
    return (f"{storage.redact(out_dir)}: holds {what} of a different job (other settings or inputs); "
            f"use --overwrite to replace them, or choose another --out")
