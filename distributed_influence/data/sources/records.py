"""TFRecord files as streams of records: their names, compression, files, counts and bytes.

The byte-level half of the TFRecord source (:mod:`.tfrecord` parses the records). A record is a
little-endian uint64 length, a CRC of it, the data and a CRC of the data, so records can be
counted and skipped by their headers without parsing them.

A GZIP file (written with ``compression_type="GZIP"``, as TFDS and Beam pipelines do) is one
gzip stream of the same records. It is read through pyarrow's decompressing stream, so the
counting and the skipping work on the decompressed records. A compressed stream cannot seek:
counting a GZIP file decompresses all of it, and a worker skipping records to reach its rows
decompresses those too. The data of a skipped record is never parsed. A file is GZIP when its
name ends in ``.gz`` (``train.tfrecord.gz``, ``train-00000-of-00010.gz``), or when asked for all
files (``--compression gzip``).
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import os
import posixpath
import struct
from typing import List, Optional, Tuple

from distributed_influence.config.audit import COMPRESSIONS
from distributed_influence.data.sources.base import resolve
from distributed_influence.errors import SourceError
from distributed_influence.store import storage

#: The compressed kind among ``--compression``'s values (COMPRESSIONS); without the flag, each
#: file's name decides.
GZIP = "gzip"
_GZIP_SUFFIXES = (".gz", ".gzip")
_GZIP_MAGIC = b"\x1f\x8b"
_HEADER = 12  # uint64 length, uint32 masked CRC of the length
_FOOTER = 4  # uint32 masked CRC of the data
#: No record is longer: a tf.train.Example is a protocol buffer, which cannot exceed 2 GiB. A
#: longer length is a damaged header, refused before it becomes a read of that many bytes.
_MAX_LENGTH = 2**31


def is_gzip_name(name: str) -> bool:
    """Whether a file name says GZIP (``.gz``), which TensorFlow's own readers expect too."""
    return storage.basename(name).lower().endswith(_GZIP_SUFFIXES)


def is_tfrecord_name(name: str) -> bool:
    """Whether a file name looks like a TFRecord (``x.tfrecord``, ``x.tfrecords``, ``x.tfr``,
    ``x.tfrecord-00000-of-00010``), compressed or not (``x.tfrecord.gz``, ``x.tfr.gz``)."""
    low = name.lower()
    for suffix in _GZIP_SUFFIXES:
        if low.endswith(suffix):
            low = low[: -len(suffix)]
    return ".tfrecord" in low or low.endswith(".tfr")


def check_compression(compression: Optional[str]) -> None:
    """Refuses a compression the reader does not know (the flag's choices check it too)."""
    if compression is not None and compression not in COMPRESSIONS:
        raise SourceError(f"compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


def compression_of(path: str, compression: Optional[str]) -> Optional[str]:
    """``"gzip"`` or None (uncompressed) for one file: ``compression`` when given, else its name."""
    if compression is None:
        return GZIP if is_gzip_name(path) else None
    return GZIP if compression == GZIP else None


def expand(spec: str) -> List[str]:
    """The files of a spec: a list separated by commas, each a file or a glob pattern."""
    files: List[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name = storage.basename(part)
        if not any(c in name for c in "*?["):
            files.append(part)
            continue
        if storage.is_uri(part):
            folder = storage.dirname(part)
            matched = [storage.join(folder, n) for n in storage.list_names(folder) if fnmatch.fnmatch(n, name)]
        else:
            matched = sorted(globlib.glob(part))
        if not matched:
            raise SourceError(f"{part}: no TFRecord files match")
        files.extend(sorted(matched))
    if not files:
        raise SourceError(f"{spec}: no TFRecord files given")
    return files


def listing(files: List[str]) -> List[Tuple[str, int, int]]:
    """(path, size, modification time in ns) of each file, sorted, from one listing per directory.

    What the run key fingerprints a glob or a list by: listing the directory is one request
    on an object store, where asking for each file would be one request per file, and nothing
    is read.

    Raises:
        SourceError: a file is gone, or its directory cannot be listed.
    """
    import pyarrow.fs as pafs

    by_folder: dict = {}
    for f in files:
        by_folder.setdefault(storage.dirname(f), []).append(f)
    found = []
    for folder, members in by_folder.items():
        fs, path = resolve(folder or ".")
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as exc:
            raise SourceError(f"{folder}: cannot be listed ({storage.reason(exc)})") from None
        by_name = {posixpath.basename(i.path): i for i in infos if i.type == pafs.FileType.File}
        for f in members:
            info = by_name.get(storage.basename(f))
            if info is None:
                raise SourceError(f"{f}: file not found")
            found.append((f, int(info.size), int(info.mtime_ns or 0)))
    return sorted(found)


class Reader:
    """Sequential reading of one TFRecord file: headers walked, data read only when asked.

    Args:
        spec: the file (path or URI).
        compression: ``"gzip"`` or None, as :func:`compression_of` decided.
    """

    def __init__(self, spec: str, compression: Optional[str] = None):
        self.spec = spec
        self.gzip = compression == GZIP
        fs, path = resolve(spec)
        self._seekable = storage.is_local(fs) and not self.gzip
        try:
            if self._seekable:
                self._fh = open(path, "rb")
            else:
                self._fh = fs.open_input_stream(path, compression=GZIP if self.gzip else None)
        except FileNotFoundError:
            raise SourceError(f"{spec}: file not found") from None
        except OSError as exc:
            raise SourceError(f"{spec}: cannot be opened ({storage.reason(exc)})") from None
        self._size = os.fstat(self._fh.fileno()).st_size if self._seekable else None
        self._first = None  # the file's first bytes, to tell a GZIP file read as uncompressed
        self.record = 0  # index of the next record

    def close(self) -> None:
        self._fh.close()

    def _read(self, n: int) -> bytes:
        try:
            data = self._fh.read(n)
        except OSError as exc:  # pyarrow's inflate errors: a corrupt or truncated GZIP stream
            what = "corrupt or truncated GZIP file" if self.gzip else "cannot be read"
            raise SourceError(f"{self.spec}: {what} ({storage.reason(exc)})") from None
        if self._first is None:
            self._first = bytes(data[:2])
        return data

    def _broken(self, what: str) -> SourceError:
        """The error of a malformed record; a GZIP file read as uncompressed says so, since
        that, not a damaged file, is then the likely cause."""
        hint = ""
        if not self.gzip and self._first == _GZIP_MAGIC:
            hint = " (the file looks GZIP-compressed: name it *.gz or pass --compression gzip)"
        return SourceError(f"{self.spec}: record {self.record}: {what}{hint}")

    def _length(self) -> Optional[int]:
        head = self._read(_HEADER)
        if not head:
            return None
        if len(head) < _HEADER:
            raise self._broken("truncated header (not a TFRecord file?)")
        n = struct.unpack("<Q", head[:8])[0]
        if self._seekable:
            # Checked against the file's size before anything reads n bytes: a damaged header
            # would otherwise ask for up to 2^64 bytes at once.
            if self._fh.tell() + n + _FOOTER > self._size:
                raise self._broken(f"truncated (length {n} past the end of the file)")
        elif n > _MAX_LENGTH:
            raise self._broken(f"truncated or damaged (length {n})")
        return n

    def skip(self) -> bool:
        """Passes over the next record; False at the end of the file."""
        n = self._length()
        if n is None:
            return False
        if self._seekable:  # the length is within the file (checked by _length)
            self._fh.seek(self._fh.tell() + n + _FOOTER)
        elif len(self._read(n + _FOOTER)) < n + _FOOTER:
            raise self._broken("truncated")
        self.record += 1
        return True

    def next(self) -> Optional[bytes]:
        """The data of the next record, or None at the end of the file."""
        n = self._length()
        if n is None:
            return None
        data = self._read(n + _FOOTER)
        if len(data) < n + _FOOTER:
            raise self._broken("truncated")
        self.record += 1
        return data[:n]


def count_records(spec: str, compression: Optional[str] = None) -> int:
    """The number of records of one file, walking their headers (decompressing a GZIP file)."""
    reader = Reader(spec, compression)
    try:
        while reader.skip():
            pass
        return reader.record
    finally:
        reader.close()
