"""Where files live: local paths, or any URI that :mod:`pyarrow.fs` understands.

A cluster worker opens its source itself from the spec string it is given, and the reducer
writes wherever ``--out`` points, so every location is one string that means the same thing on
every node: a local path (on shared storage), or a URI such as ``s3://bucket/key``,
``gs://bucket/key`` or ``file:///abs/path``. Endpoints and credentials are configured the ways
pyarrow users already know (the URI's query parameters, such as
``s3://bucket/key?endpoint_override=host:9000&scheme=http``, and the standard AWS environment
variables), so nothing here is specific to one store.

Errors are the built-in ones, so callers can word them as their own one-line input errors:
``ValueError`` for a URI pyarrow cannot use, ``FileNotFoundError`` for a missing file, and
``OSError`` for any other storage failure.
"""

from __future__ import annotations

import os
import posixpath
import re
import urllib.parse
import uuid
from typing import BinaryIO, Callable, List, Optional, Tuple

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_uri(spec: str) -> bool:
    """Whether ``spec`` names its filesystem (``scheme://...``) rather than being a local path."""
    return bool(_SCHEME.match(spec))


def resolve(spec: str) -> Tuple[pafs.FileSystem, str]:
    """The filesystem of a path or URI, and the path inside it.

    Raises:
        ValueError: an unknown scheme or an option pyarrow does not accept in the URI.
    """
    if is_uri(spec):
        return pafs.FileSystem.from_uri(spec)
    return pafs.LocalFileSystem(), os.path.abspath(spec)


def is_local(fs: pafs.FileSystem) -> bool:
    """Whether files of ``fs`` are on this machine (and so can be memory-mapped)."""
    return isinstance(fs, pafs.LocalFileSystem)


def basename(spec: str) -> str:
    """The file name of a path or URI, without a URI's query string (which holds options)."""
    if is_uri(spec):
        return posixpath.basename(urllib.parse.urlsplit(spec).path)
    return os.path.basename(spec)


def join(spec: str, name: str) -> str:
    """``name`` inside the directory ``spec``, keeping a URI's options (query string)."""
    if not is_uri(spec):
        return os.path.join(spec, name)
    parts = urllib.parse.urlsplit(spec)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def dirname(spec: str) -> str:
    """The directory holding ``spec``, keeping a URI's options (query string)."""
    if not is_uri(spec):
        return os.path.dirname(spec)
    parts = urllib.parse.urlsplit(spec)
    return urllib.parse.urlunsplit(parts._replace(path=posixpath.dirname(parts.path)))


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]+@")


def redact(spec: str) -> str:
    """A location safe to record or log: credentials in a URI (``s3://KEY:SECRET@bucket``) hidden."""
    return _USERINFO.sub(r"\1***@", spec) if isinstance(spec, str) else spec


def reason(exc: BaseException) -> str:
    """The first line of an error's message: pyarrow's storage errors run over several lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def exists(spec: str) -> bool:
    """Whether there is a file or directory at ``spec``."""
    fs, path = resolve(spec)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def stat(spec: str) -> Optional[Tuple[int, int]]:
    """Size and modification time (ns) of a file, or None if there is none."""
    fs, path = resolve(spec)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    return info.size, info.mtime_ns or 0


def list_names(spec: str) -> List[str]:
    """Names of the entries directly inside a directory; none if it does not exist."""
    fs, path = resolve(spec)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos)


def read_bytes(spec: str) -> bytes:
    """The whole content of a file, as stored (pyarrow would otherwise un-gzip ``.gz`` files)."""
    fs, path = resolve(spec)
    with fs.open_input_stream(path, compression=None) as fh:
        return fh.readall()


def open_output(spec: str):
    """A new file for writing, replacing any file of that name; a context manager.

    Bytes are written as given (pyarrow would otherwise gzip a ``.gz`` name). On object stores
    the file appears only when it is closed, whole.
    """
    fs, path = resolve(spec)
    return fs.open_output_stream(path, compression=None)


def makedirs(spec: str) -> None:
    """Creates a directory and its parents; nothing to do if it exists."""
    fs, path = resolve(spec)
    fs.create_dir(path, recursive=True)


def move(src: str, dst: str) -> None:
    """Moves a file within one filesystem, replacing ``dst``.

    A local move is a rename, so ``dst`` changes atomically; on an object store it is a copy
    and a delete, and ``dst`` still only ever holds a whole file.
    """
    fs, src_path = resolve(src)
    fs.move(src_path, resolve(dst)[1])


def write_atomic(spec: str, write: Callable[[BinaryIO], None]) -> None:
    """Writes a file whole or not at all: under a hidden temporary name beside it, then moved.

    Every writer of the project goes through here (tables, train index, partial results), so
    a crash mid-write never leaves a half file that a reader, or a resumed run, could take for
    a finished one. The temporary name starts with a dot, which dataset readers (pyarrow,
    DuckDB globs of ``*.parquet``) skip.

    Args:
        spec: the final path or URI.
        write: called with the open output stream; writes the content.
    """
    folder = dirname(spec)
    makedirs(folder)
    tmp = join(folder, f".{basename(spec)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open_output(tmp) as fh:
            write(fh)
        move(tmp, spec)
    except BaseException:
        fs, path = resolve(tmp)
        try:
            fs.delete_file(path)
        except OSError:
            pass
        raise


def move_tree(src: str, dst: str) -> None:
    """Moves a directory within one filesystem (``dst`` must not exist).

    A local move is one rename; object stores have no directories to rename, so there every
    file is moved on its own.
    """
    fs, src_path = resolve(src)
    dst_path = resolve(dst)[1]
    if is_local(fs):
        fs.move(src_path, dst_path)
        return
    for info in fs.get_file_info(pafs.FileSelector(src_path, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.move(info.path, dst_path + info.path[len(src_path):])
    fs.delete_dir(src_path)


def remove_tree(spec: str) -> None:
    """Deletes a directory and everything in it, best effort.

    It cleans up after work that already succeeded or failed on its own, so a failure here
    (the directory already gone, a store refusing) must not replace that outcome.
    """
    fs, path = resolve(spec)
    try:
        fs.delete_dir(path)
    except OSError:
        pass
