"""Opening and checking the inputs of an audit before any row is featurized.

Everything that can be checked cheaply (the model's head, shapes, labels, ids, k) is checked
first, so a bad input costs a user one clear line and nothing else: no output. In a Ray run the
driver checks what needs no TensorFlow (paths, the output location, the sources' sizes, k) before
Ray starts, and the first worker, which loads the model anyway, checks the model and the sources
against it (``ShardWorker.describe``): the driver does not load the model. Per-row checks that
need the data (NaN/inf) run in the workers as they read their rows.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import numpy as np

from distributed_influence.config import AuditConfig
from distributed_influence.data.model import SplitModel, load_model, read_model_bytes, split_model
from distributed_influence.data.sources import ImageFolderSource, Source, open_source, options_from, reshape_to
from distributed_influence.errors import ConfigError, SourceError
from distributed_influence.store import storage


@dataclasses.dataclass
class Inputs:
    """The opened, checked inputs of one audit."""

    model_bytes: bytes
    model_name: str
    split: SplitModel
    train: Source
    test: Source
    input_shape: Tuple[Optional[int], ...]

    @property
    def n_classes(self) -> int:
        return self.split.n_classes


def _check_not_empty(src: Source, role: str) -> None:
    if src.n_rows == 0:
        raise SourceError(f"{src.name}: the {role} set is empty")


def check_source(src: Source, role: str, n_classes: int, input_shape, need_labels: bool) -> None:
    _check_not_empty(src, role)
    if need_labels and not src.has_labels:
        raise SourceError(f"{src.name}: the {role} set has no labels ('y' in .npz, 'label' in Parquet)")
    y = src.labels()
    if y is not None and len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= n_classes:
            bad = int(np.argmax((y < 0) | (y >= n_classes)))
            raise SourceError(
                f"{src.name}: label {int(y[bad])} at row {bad} is outside 0..{n_classes - 1} "
                f"(the model has {n_classes} classes)"
            )
    if src.decodes_images:
        # One image through the same decoding the workers use: corrupt bytes, a size the model
        # does not take without --resize, or an unusable channel count stop the job here.
        src.read(0, 1, input_shape)
        return
    # Shape: one row through the same reshape the workers use.
    x0 = np.asarray(src._read_x(0, 1), dtype=np.float32)
    try:
        reshape_to(x0, input_shape, src.name)
    except SourceError:
        raise SourceError(
            f"{src.name}: {role} examples of shape {tuple(x0.shape[1:])} do not fit the model "
            f"input {tuple(input_shape)}"
        ) from None


def _check_out(out: str) -> None:
    """Refuses an output location pyarrow cannot use now, rather than after all the work."""
    try:
        storage.resolve(out)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{out}: cannot write results there ({storage.reason(exc)})") from None
    if not storage.is_uri(out):
        # The nearest existing directory must be writable: checked without creating anything.
        probe = os.path.abspath(out)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            raise ConfigError(f"{out}: cannot write results there ({probe} is not a writable directory)")


def open_sources(train_spec: str, test_spec: str, options: dict) -> Tuple[Source, Source]:
    """Opens the training and test sources; a test image folder takes the training folder's
    classes, so its labels mean what the model learnt."""
    train = open_source(train_spec, **options)
    classes = train.classes if isinstance(train, ImageFolderSource) else None
    return train, open_source(test_spec, classes=classes, **options)


@dataclasses.dataclass
class Opened:
    """What the driver has before loading the model: enough to start the workers."""

    model_bytes: bytes
    model_name: str
    train: Source
    test: Source


def open_inputs(config: AuditConfig) -> Opened:
    """The checks and reads that need no TensorFlow: the output location, the model file's
    bytes, the sources opened (their sizes and layouts, which the workers need), and k.

    Raises:
        InputError: the output location, the model file, a source or ``--k`` cannot be used.
    """
    _check_out(config.out)
    model_bytes = read_model_bytes(config.model)
    train, test = open_sources(config.train, config.test, options_from(config))
    _check_not_empty(train, "training")
    _check_not_empty(test, "test")
    if config.k > train.n_rows:
        raise ConfigError(f"--k {config.k} exceeds the {train.n_rows} training examples")
    return Opened(model_bytes, storage.basename(config.model), train, test)


def check_sources(split: SplitModel, train: Source, test: Source, input_shape=None) -> tuple:
    """Checks both sources against the model (labels within its classes, examples that fit its
    input; see :func:`check_source`).

    Args:
        input_shape: the shape asked for (``--input-shape``), else None: the model's own.

    Returns:
        The input shape the examples are read at.
    """
    input_shape = tuple(input_shape) if input_shape else split.input_shape
    check_source(train, "training", split.n_classes, input_shape, need_labels=True)
    check_source(test, "test", split.n_classes, input_shape, need_labels=False)
    return input_shape


def prepare_inputs(config: AuditConfig, opened: Optional[Opened] = None,
                   split: Optional[SplitModel] = None) -> Inputs:
    """Opens the model and sources (unless ``opened`` already holds them) and checks them
    against each other.

    Args:
        split: the model as a worker described it (its sources checked there, see
            ``ShardWorker.describe``): then this process loads neither the model nor TensorFlow.

    Raises:
        InputError: any input that cannot give a correct result, with one clear message.
    """
    opened = opened or open_inputs(config)
    name, train, test = opened.model_name, opened.train, opened.test
    if split is None:
        model = load_model(opened.model_bytes, name)
        split = split_model(model, config.feature_layer, config.logit_layer, name)
        input_shape = check_sources(split, train, test, config.input_shape)
    else:
        input_shape = tuple(config.input_shape) if config.input_shape else split.input_shape
    return Inputs(opened.model_bytes, name, split, train, test, input_shape)
