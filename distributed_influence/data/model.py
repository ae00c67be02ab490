"""Loading a `.keras` classifier safely and splitting it into features + a linear head.

Representer Point Selection needs the model written as ``logits = f(x) @ W + b``: the
penultimate features f and the last Dense layer (W, b). This module finds that split in the
model shapes people actually save (docs/design.md, "Models") and refuses anything else with a message that
says what was expected, because a wrong split would give plausible-looking but wrong numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Optional, Tuple

import numpy as np

from distributed_influence.errors import ModelError
from distributed_influence.store import storage

log = logging.getLogger(__name__)

#: Smallest batch the forward pass falls back to when memory runs out.
MIN_BATCH = 1
#: The automatic batch size: rows whose inputs hold about this many values (4 MB of float32),
#: a power of two within [AUTO_BATCH_MIN, AUTO_BATCH_MAX]. Larger batches amortise the per-call
#: overhead of the forward pass, so small inputs get many rows per batch.
AUTO_BATCH_VALUES = 1 << 20
AUTO_BATCH_MIN = 32
AUTO_BATCH_MAX = 1024


def auto_batch_size(input_shape) -> int:
    """Rows per forward pass when the user gave none: larger batches for smaller inputs."""
    values = int(np.prod([d for d in input_shape if d])) if input_shape else 1
    rows = AUTO_BATCH_VALUES // max(1, values)
    return int(min(AUTO_BATCH_MAX, max(AUTO_BATCH_MIN, 1 << max(0, rows.bit_length() - 1))))

# Only the Keras 3 format: its safe mode refuses embedded Python code; legacy HDF5 files are not
# covered the same way, so they are not accepted.
_MODEL_SUFFIXES = (".keras",)
_SHAPE_HELP = (
    "expected a model whose output is Dense(C) (optionally followed by a softmax Activation or "
    "Softmax layer), or Dense(C, activation='softmax'), or a binary classifier ending in "
    "Dense(1, activation='sigmoid') or Dense(1) + a sigmoid Activation, or a multi-output model "
    "such as [features, logits, softmax]; otherwise name the layers with --feature-layer/--logit-layer"
)


def _keras():
    # Deferred: importing TensorFlow costs seconds, and `--help` or a missing file should not wait.
    from distributed_influence.tfimport import import_keras

    return import_keras()


def read_model_bytes(path: str) -> bytes:
    """Reads a model file whole, so workers can load it without a shared filesystem.

    Args:
        path: a local path or a URI such as ``s3://bucket/model.keras`` (see
            :mod:`distributed_influence.store.storage`).
    """
    if not storage.basename(path).endswith(_MODEL_SUFFIXES):
        raise ModelError(f"{path}: not a Keras model file (expected a .keras file)")
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: model file not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a URI pyarrow cannot use
        raise ModelError(f"{path}: model file cannot be read ({storage.reason(exc)})") from None


def load_model(data: bytes, name: str = "model.keras"):
    """Loads a Keras model from the bytes of its file with ``safe_mode=True``.

    Safe mode refuses Python code embedded in the file (``Lambda`` layers), which would run
    on every worker of the cluster; we surface that refusal as one actionable line.

    Args:
        data: the bytes of a `.keras` file.
        name: the file's name, used in messages and for its suffix.

    Returns:
        The loaded, uncompiled ``keras.Model``.
    """
    keras = _keras()
    suffix = os.path.splitext(name)[1] or ".keras"
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model" + suffix)
        with open(local, "wb") as fh:
            fh.write(data)
        try:
            return keras.models.load_model(local, safe_mode=True, compile=False)
        except Exception as exc:  # Keras raises ValueError/TypeError/OSError/zipfile errors
            text = storage.reason(exc)
            if "safe_mode" in str(exc) or "Lambda" in str(exc):
                raise ModelError(
                    f"{name}: refused by Keras safe mode (the model contains Python code, "
                    f"e.g. a Lambda layer); rebuild it from standard layers"
                ) from None
            raise ModelError(f"{name}: cannot be loaded as a Keras model ({text})") from None


@dataclasses.dataclass
class SplitModel:
    """A classifier written as ``logits = features(x) @ kernel + bias``.

    Attributes:
        featurizer: Keras model from the input to the penultimate features.
        kernel: float32 (d, C) weights of the last Dense layer; (d, 1) for a binary classifier
            (one sigmoid output), whose logit z explains class 1 and −z class 0.
        bias: float32 (C,) bias of the last Dense layer (zeros if it has none).
        input_shape: shape of one example (without the batch axis); None for free axes.
        head_layer: name of the Dense layer taken as the head.
    """

    featurizer: object
    kernel: np.ndarray
    bias: np.ndarray
    input_shape: Tuple[Optional[int], ...]
    head_layer: str

    @property
    def n_outputs(self) -> int:
        """Columns of the head: C, or 1 for a binary classifier's single sigmoid logit."""
        return int(self.kernel.shape[1])

    @property
    def binary(self) -> bool:
        """One output: a binary classifier (labels 0/1), explained through logistic regression."""
        return self.n_outputs == 1

    @property
    def n_classes(self) -> int:
        """Classes of the labels: C, or 2 for a binary classifier."""
        return 2 if self.binary else self.n_outputs

    @property
    def feature_dim(self) -> int:
        return int(self.kernel.shape[0])

    def theta(self) -> np.ndarray:
        """The trained head with the bias folded in as the last row: (d+1, C) float64."""
        return np.vstack([self.kernel, self.bias[None, :]]).astype(np.float64)

    def info(self) -> "SplitModel":
        """The same without the featurizer: plain arrays that a worker sends to a driver which
        never loads TensorFlow (what the driver needs: the head, the input shape, the classes)."""
        return dataclasses.replace(self, featurizer=None)


def _producer(tensor):
    hist = tensor._keras_history
    op = hist.operation
    return op, op._inbound_nodes[hist.node_index]


def _activation_name(layer) -> str:
    act = getattr(layer, "activation", None)
    if act is None:
        return "linear"
    return getattr(act, "__name__", str(act))


def _is_softmax(op) -> bool:
    keras = _keras()
    if isinstance(op, keras.layers.Softmax):
        return True
    return isinstance(op, keras.layers.Activation) and _activation_name(op) == "softmax"


def _is_sigmoid(op) -> bool:
    keras = _keras()
    return isinstance(op, keras.layers.Activation) and _activation_name(op) == "sigmoid"


def _units(op) -> int:
    return int(getattr(op, "units", 0) or 0)


def _head_activation_ok(op) -> bool:
    """Linear or softmax heads; sigmoid only on a single output (a binary classifier).

    A sigmoid on C > 1 outputs is a multi-label model, whose logits the softmax surrogate
    would explain wrongly: such a head is refused (name the layers to take its logits)."""
    act = _activation_name(op)
    return act in ("linear", "softmax") or (act == "sigmoid" and _units(op) == 1)


def _as_head(op, node, name: str):
    keras = _keras()
    if not isinstance(op, keras.layers.Dense):
        raise ModelError(f"{name}: layer '{op.name}' is a {type(op).__name__}, not Dense; {_SHAPE_HELP}")
    if not _head_activation_ok(op):
        raise ModelError(
            f"{name}: Dense layer '{op.name}' has activation '{_activation_name(op)}'; "
            f"the head must be linear or softmax (or sigmoid with one output)"
        )
    if _units(op) == 1 and _activation_name(op) == "softmax":
        raise ModelError(f"{name}: Dense layer '{op.name}' has one output under a softmax (always 1); "
                         f"a binary classifier needs a sigmoid")
    if len(node.input_tensors) != 1 or len(node.input_tensors[0].shape) != 2:
        raise ModelError(f"{name}: Dense layer '{op.name}' must take one rank-2 feature tensor")
    return op, node.input_tensors[0]


def _find_head(model, name: str):
    for out in reversed(list(model.outputs)):
        op, node = _producer(out)
        while _is_softmax(op):
            op, node = _producer(node.input_tensors[0])
        if _is_sigmoid(op):  # Dense(1) + sigmoid Activation: a binary classifier
            op, node = _producer(node.input_tensors[0])
            if _units(op) != 1 or _activation_name(op) != "linear":
                continue
        keras = _keras()
        if isinstance(op, keras.layers.Dense) and _head_activation_ok(op):
            return _as_head(op, node, name)
    raise ModelError(f"{name}: no linear head found; {_SHAPE_HELP}")


def _get_layer(model, layer_name: str, name: str):
    try:
        return model.get_layer(layer_name)
    except ValueError:
        names = ", ".join(layer.name for layer in model.layers)
        raise ModelError(f"{name}: no layer named '{layer_name}' (layers: {names})") from None


def split_model(
    model, feature_layer: Optional[str] = None, logit_layer: Optional[str] = None, name: str = "model"
) -> SplitModel:
    """Splits a loaded classifier into a featurizer and its linear head.

    Args:
        model: a loaded ``keras.Model`` (functional or Sequential).
        feature_layer: optional name of the layer whose output is the feature vector.
        logit_layer: optional name of the Dense layer that produces the logits.
        name: the model's file name, for messages.

    Returns:
        The :class:`SplitModel`.

    Raises:
        ModelError: the model has no single input or no linear head on rank-2 features.
    """
    keras = _keras()
    if len(model.inputs) != 1:
        raise ModelError(f"{name}: the model must have exactly one input, it has {len(model.inputs)}")
    if logit_layer is not None:
        op = _get_layer(model, logit_layer, name)
        if not op._inbound_nodes:
            raise ModelError(f"{name}: layer '{logit_layer}' is not connected in the model graph")
        head, feats = _as_head(op, op._inbound_nodes[0], name)
    else:
        head, feats = _find_head(model, name)
    if feature_layer is not None:
        fl = _get_layer(model, feature_layer, name)
        if fl.output is not feats:
            raise ModelError(
                f"{name}: the output of layer '{feature_layer}' is not the input of the head "
                f"'{head.name}'; the head must be a Dense layer applied to the feature layer"
            )
    inp = model.inputs[0]
    featurizer = keras.Model(inp, feats, name="featurizer")
    weights = head.get_weights()
    kernel = np.asarray(weights[0], dtype=np.float32)
    bias = (
        np.asarray(weights[1], dtype=np.float32)
        if head.use_bias
        else np.zeros(kernel.shape[1], dtype=np.float32)
    )
    return SplitModel(
        featurizer=featurizer,
        kernel=kernel,
        bias=bias,
        input_shape=tuple(inp.shape[1:]),
        head_layer=head.name,
    )


class Featurizer:
    """Batched forward pass: input rows to (features, model logits), one trace for all batches.

    The ``tf.function`` has a batch axis of ``None`` in its signature, so the ragged last
    batch runs the same graph as the others instead of tracing a new one. Like every
    ``tf.function`` of the project it is traced without AutoGraph (nothing in them branches on
    a tensor): AutoGraph writes the code it generates to the temporary directory and removes it
    at the process's exit, which a Ray worker, stopped by Ray, never reaches.
    """

    def __init__(self, split: SplitModel, batch_size: Optional[int]):
        from distributed_influence.tfimport import import_tensorflow

        tf = import_tensorflow()

        self.split = split
        self.batch_size = int(batch_size) if batch_size else auto_batch_size(split.input_shape)
        kernel = tf.constant(split.kernel)
        bias = tf.constant(split.bias)
        fe = split.featurizer
        spec = tf.TensorSpec((None,) + tuple(split.input_shape), tf.float32)

        @tf.function(input_signature=[spec], autograph=False)
        def forward(x):
            f = tf.cast(fe(x, training=False), tf.float32)
            return f, tf.matmul(f, kernel) + bias

        self.forward = forward

    def __call__(self, x: np.ndarray, augment: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Returns float32 features (n, d) and model logits (n, C) of the rows of ``x``.

        ``augment``: features (n, d+1) with the constant 1 that folds the head's bias in, written
        in place batch by batch (a separate concatenation would copy a shard's features once
        more).

        A batch that runs out of device memory (TensorFlow's ResourceExhaustedError) is retried
        at half the size, down to :data:`MIN_BATCH`; the smaller size is kept for later calls.
        """
        from distributed_influence.tfimport import import_tensorflow

        oom = import_tensorflow().errors.ResourceExhaustedError
        n, d = len(x), self.split.feature_dim
        feats = np.empty((n, d + 1 if augment else d), dtype=np.float32)
        if augment:
            feats[:, d] = 1.0
        logits = np.empty((n, self.split.n_outputs), dtype=np.float32)
        start = 0
        while start < n:
            stop = min(n, start + self.batch_size)
            try:
                f, z = self.forward(np.asarray(x[start:stop], dtype=np.float32))
            except oom:
                if self.batch_size <= MIN_BATCH:
                    raise
                self.batch_size = max(MIN_BATCH, self.batch_size // 2)
                log.warning("out of memory in the forward pass: batch size now %d", self.batch_size)
                continue
            feats[start:stop, :d] = np.asarray(f)
            logits[start:stop] = np.asarray(z)
            start = stop
        return feats, logits
