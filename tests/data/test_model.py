"""Every model shape the job takes (docs/design.md, "Models"), saved to and loaded from a real `.keras` file."""

import conftest
import keras
import numpy as np
import oracle
import pytest
from conftest import MODEL_FACTORIES, N_CLASSES

from distributed_influence.data.model import Featurizer, load_model, read_model_bytes, split_model
from distributed_influence.errors import ModelError


def _roundtrip(model, tmp_path, name="m.keras"):
    path = str(tmp_path / name)
    model.save(path)
    return load_model(read_model_bytes(path), name)


@pytest.mark.parametrize("factory", sorted(MODEL_FACTORIES))
def test_each_model_shape_splits_into_features_and_linear_head(factory, tmp_path, data):
    x, y, _, _ = data
    original = MODEL_FACTORIES[factory](x, y)
    loaded = _roundtrip(original, tmp_path)
    split = split_model(loaded, name="m.keras")
    assert split.n_classes == N_CLASSES
    feats, logits = Featurizer(split, batch_size=7)(x)  # 60 rows: ragged last batch
    out = original.predict(x, verbose=0)
    probs = out[-1] if isinstance(out, list) else out
    # The model's own probabilities are the softmax of our logits.
    np.testing.assert_allclose(oracle.softmax(logits.astype(np.float64)), probs, atol=1e-5)
    np.testing.assert_allclose(logits, feats @ split.kernel + split.bias, rtol=1e-5, atol=1e-5)
    if factory == "multi_output":
        np.testing.assert_allclose(feats, out[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logits, out[1], rtol=1e-5, atol=1e-5)


def test_featurizer_traces_once_for_ragged_batches(tmp_path, data):
    x, y, _, _ = data
    split = split_model(_roundtrip(conftest.multi_output_model(x, y), tmp_path))
    fz = Featurizer(split, batch_size=16)
    fz(x)  # 16, 16, 16, 12 rows
    fz(x[:5])
    assert fz.forward.experimental_get_tracing_count() == 1


def test_named_layers_select_the_head(tmp_path, data):
    x, y, _, _ = data
    loaded = _roundtrip(conftest.named_layers_model(x, y), tmp_path)
    with pytest.raises(ModelError, match="no linear head"):
        split_model(loaded, name="m.keras")
    split = split_model(loaded, feature_layer="embed", logit_layer="scores", name="m.keras")
    assert split.head_layer == "scores" and split.feature_dim == 8
    feats, logits = Featurizer(split, 32)(x)
    ref = keras.Model(loaded.inputs[0], loaded.get_layer("scores").output).predict(x, verbose=0)
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="no layer named 'nope'"):
        split_model(loaded, logit_layer="nope", name="m.keras")
    with pytest.raises(ModelError, match="not Dense"):
        split_model(loaded, logit_layer="squash", name="m.keras")
    with pytest.raises(ModelError, match="is not the input of the head"):
        split_model(loaded, feature_layer="scores", logit_layer="scores", name="m.keras")


def test_lambda_layer_is_refused_by_safe_mode(tmp_path):
    m = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda t: t * 2), keras.layers.Dense(2)])
    path = str(tmp_path / "lambda.keras")
    m.save(path)
    with pytest.raises(ModelError, match="safe mode") as err:
        load_model(read_model_bytes(path), "lambda.keras")
    assert "\n" not in str(err.value)


def test_model_without_linear_head_is_refused(tmp_path):
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="relu")])
    with pytest.raises(ModelError, match="no linear head"):
        split_model(_roundtrip(m, tmp_path), name="relu.keras")


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        read_model_bytes(str(tmp_path / "absent.keras"))
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_model(read_model_bytes(str(bad)), "bad.keras")
    with pytest.raises(ModelError, match="expected a .keras"):
        read_model_bytes(str(tmp_path / "model.pkl"))


def test_automatic_batch_size_follows_the_input_size():
    """About 2^20 input values per batch, a power of two within [32, 1024]."""
    from distributed_influence.data.model import auto_batch_size

    assert auto_batch_size((28, 28, 1)) == 1024  # 784 values: 1337 rows, capped
    assert auto_batch_size((8, 8, 1)) == 1024
    assert auto_batch_size((32, 32, 3)) == 256  # 3072 values: 341 rows
    assert auto_batch_size((224, 224, 3)) == 32  # 150,528 values: 6 rows, raised to the floor
    assert auto_batch_size((None, 128)) == 1024
