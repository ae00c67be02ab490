"""Image folders: ``DIR/class_name/**/*.png|jpg|jpeg|bmp|gif``, one sub-directory per class.

The layout of ``keras.utils.image_dataset_from_directory``: classes are the sub-directories in
sorted order (label 0 is the first), files with other endings and files directly in ``DIR``
are ignored, and so are hidden entries (names starting with ``.``). Rows are in a stable order,
class by class and by sorted relative path within a class; ids are those row numbers and keys
the relative paths (``class_name/file.png``), which the tables carry as ``train_key``/``test_key``.

A test folder is labelled with the training folder's classes (by name), so a test set holding
only some of the classes keeps the labels the model learnt.
"""

from __future__ import annotations

import posixpath
from typing import List, Optional, Sequence, Tuple

import numpy as np

from distributed_influence.data.sources.base import Rows, Source, reshape_to, resolve
from distributed_influence.data.sources.images import IMAGE_EXTENSIONS, decode_many, target_of
from distributed_influence.errors import SourceError
from distributed_influence.store import storage


def _listing(fs, path: str, recursive: bool):
    import pyarrow.fs as pafs

    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except FileNotFoundError:
        raise SourceError(f"{path}: directory not found") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot be listed ({storage.reason(exc)})") from None


def _is_image(rel: str) -> bool:
    """Whether a path relative to the root is an image the source reads: below a class folder,
    with an image ending, and hidden nowhere along the way."""
    parts = rel.split("/")
    return len(parts) > 1 and rel.lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in parts)


def _images(fs, root: str, under: str) -> list:
    """(path relative to ``root``, file info) of every image the source reads below ``under``."""
    import pyarrow.fs as pafs

    found = []
    for info in _listing(fs, under, True):
        rel = info.path[len(root) + 1:].replace("\\", "/")
        if info.type == pafs.FileType.File and _is_image(rel):
            found.append((rel, info))
    return found


def listing(path: str) -> List[Tuple[str, int, int]]:
    """(relative path, size, modification time in ns) of every image the source reads, sorted.

    What the run key fingerprints a folder by: one recursive listing, no file read, so a
    folder of a million images costs its listing, not its bytes. Files the source ignores
    (other endings, hidden ones, files directly in the root) are left out, so adding a README
    does not make a run start afresh.
    """
    fs, root = resolve(path)
    root = root.rstrip("/")
    return sorted((rel, int(info.size), int(info.mtime_ns or 0)) for rel, info in _images(fs, root, root))


class ImageFolderSource(Source):
    """A directory of class sub-directories of image files."""

    decodes_images = True

    def __init__(self, path: str, scale: Optional[float] = None, resize: bool = False,
                 classes: Optional[Sequence[str]] = None):
        import pyarrow.fs as pafs

        self.name = path
        self.scale = scale
        self.resize = resize
        self._fs, self._root = resolve(path)
        self._local = storage.is_local(self._fs)
        info = self._fs.get_file_info(self._root)
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{path}: directory not found")
        if info.type != pafs.FileType.Directory:
            raise SourceError(f"{path}: not a directory of class folders")
        root = self._root.rstrip("/")
        found = sorted(posixpath.basename(i.path) for i in _listing(self._fs, root, False)
                       if i.type == pafs.FileType.Directory and not posixpath.basename(i.path).startswith("."))
        if not found:
            raise SourceError(f"{path}: no class folders (expected {path}/CLASS_NAME/IMAGE files)")
        if classes is None:
            self.classes: List[str] = found
        else:
            self.classes = list(classes)
            extra = [c for c in found if c not in self.classes]
            if extra:
                raise SourceError(f"{path}: class folder {extra[0]!r} is not a class of the training "
                                  f"set ({', '.join(self.classes)})")
        files: List[str] = []
        labels: List[int] = []
        for name in found:
            folder = f"{root}/{name}"
            rel = sorted(r for r, _ in _images(self._fs, root, folder))
            if not rel:
                raise SourceError(f"{storage.join(path, name)}: class folder has no images "
                                  f"({', '.join(IMAGE_EXTENSIONS)})")
            files.extend(rel)
            labels.extend([self.classes.index(name)] * len(rel))
        self.n_rows = len(files)
        self._keys = np.array(files, dtype=object)
        self._y = np.asarray(labels, dtype=np.int64)
        self._ids = np.arange(self.n_rows, dtype=np.int64)

    def layout(self) -> dict:
        return {"classes": list(self.classes), "rows": int(self.n_rows)}

    def describe(self) -> dict:
        return {**super().describe(), "kind": "image folder", "classes": list(self.classes)}

    @property
    def example_shape(self):
        return tuple(self._read_x(0, min(1, self.n_rows)).shape[1:])

    def _bytes(self, rel: str) -> bytes:
        full = f"{self._root.rstrip('/')}/{rel}"
        try:
            if self._local:
                with open(full, "rb") as fh:
                    return fh.read()
            with self._fs.open_input_stream(full, compression=None) as fh:
                return fh.readall()
        except OSError as exc:
            raise SourceError(f"{storage.join(self.name, rel)}: cannot be read ({storage.reason(exc)})") from None

    def _decode(self, start: int, stop: int, input_shape, resize: bool) -> np.ndarray:
        rel = self._keys[start:stop]
        return decode_many([self._bytes(r) for r in rel], lambda i: storage.join(self.name, rel[i]),
                           target_of(input_shape), resize, self.scale)

    def _read_x(self, start, stop):
        return self._decode(start, stop, None, False)

    def read(self, start: int, stop: int, input_shape: Optional[Sequence[int]] = None) -> Rows:
        self.check_range(start, stop)
        x = self._decode(start, stop, input_shape, self.resize)
        if input_shape is not None:
            x = reshape_to(x, input_shape, self.name)
        return Rows(x=x, y=self._y[start:stop], ids=self._ids[start:stop], keys=self._keys[start:stop])
