"""TFRecord files of tf.train.Example written by TensorFlow's own writer (the independent writer
the reader is checked against), plain or GZIP-compressed as TFDS and Beam write them."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def example(x: np.ndarray, label: Optional[int] = None, key: Optional[str] = None) -> bytes:
    """One record: the row as a float list ``image`` (used as is), an int64 ``label``, a bytes ``id``."""
    import tensorflow as tf

    feature = {"image": tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(x).tolist()))}
    if label is not None:
        feature["label"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
    if key is not None:
        feature["id"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[key.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write(path: str, records: Sequence[bytes], gzip: bool = False) -> str:
    """Writes ``records`` to ``path`` (``compression_type="GZIP"`` when ``gzip``); returns the path."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path), options="GZIP" if gzip else None) as w:
        for r in records:
            w.write(r)
    return str(path)


def write_rows(folder, stem: str, x: np.ndarray, y: Optional[np.ndarray], keys: Optional[Sequence[str]] = None,
               files: int = 1, gzip: bool = False, suffix: str = ".tfrecord") -> list:
    """Rows ``x`` (and labels, keys) over ``files`` files ``STEM-0000N-of-0000M.tfrecord[.gz]``,
    in row order; returns their paths."""
    bounds = np.linspace(0, len(x), files + 1).round().astype(int)
    paths = []
    for f, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        name = f"{stem}-{f:05d}-of-{files:05d}{suffix}"
        paths.append(write(str(folder / name), [
            example(x[i], None if y is None else y[i], None if keys is None else keys[i]) for i in range(a, b)
        ], gzip=gzip))
    return paths
