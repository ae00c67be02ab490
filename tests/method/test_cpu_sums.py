"""The NumPy sums' row blocking: Hessian products whose matrix products span several blocks,
and probabilities handed over in blocks of any sizes, against the explicit Hessian."""

import numpy as np
import oracle
import pytest

from distributed_influence.method import cpu_sums
from distributed_influence.method import representer as rp


@pytest.fixture()
def grouped(monkeypatch):
    """200 rows in 30-row blocks whose Hessian products span four blocks (120 rows) at a time:
    groups of 120 and 80 rows, the last block 20 rows."""
    monkeypatch.setattr(cpu_sums, "ROWS", 30)
    monkeypatch.setattr(cpu_sums, "MAX_ROWS", 120)
    monkeypatch.setattr(cpu_sums, "HEAD_ELEMENTS", 1)
    rng = np.random.default_rng(3)
    x = rp.augment(np.abs(rng.normal(size=(200, 9))).astype(np.float32))
    labels = rng.integers(0, 6, size=200)
    theta = rng.normal(scale=0.3, size=(10, 6))
    assert cpu_sums.product_rows(10, 6) == 120
    return x, rp.one_hot(labels, 6), theta


def _explicit(x, theta, v):
    h = oracle.data_hessian(x.astype(np.float64), theta) * len(x)
    if v.ndim == 2:
        return (h @ v.ravel()).reshape(v.shape)
    return np.stack([(h @ v[:, :, j].ravel()).reshape(theta.shape) for j in range(v.shape[2])], axis=2)


def test_product_rows_grow_with_the_head_within_the_bounds():
    assert cpu_sums.product_rows(1601, 10) == cpu_sums.ROWS  # Fashion-MNIST's head
    assert cpu_sums.product_rows(1025, 100) == cpu_sums.ROWS
    assert cpu_sums.product_rows(1025, 300) == 4 * cpu_sums.ROWS
    assert cpu_sums.product_rows(2049, 1000) == cpu_sums.MAX_ROWS
    # U = X_b V of 1,000 float64 columns: within BLOCK_BYTES, so fewer rows than in float32.
    rows64 = cpu_sums.product_rows(2049, 1000, 8)
    assert rows64 < cpu_sums.MAX_ROWS and rows64 * 1000 * 8 <= cpu_sums.BLOCK_BYTES
    # A head too wide for BLOCK_BYTES even at ROWS keeps ROWS.
    assert cpu_sums.product_rows(513, 10000) == cpu_sums.ROWS


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_hessian_product_over_groups_of_blocks_equals_the_explicit_hessian(grouped, precision):
    x, t, theta = grouped
    v = np.random.default_rng(4).normal(size=theta.shape)
    want = _explicit(x, theta, v)
    tol = 1e-5 if precision == "float32" else 1e-11
    _loss, _grad, probs = cpu_sums.objective_sums_and_probs(x, t, theta, precision)
    assert [len(p) for p in probs] == [30] * 6 + [20]
    for got in (cpu_sums.hvp_sums(x, theta, v, precision),
                cpu_sums.hvp_sums(x, theta, v, precision, probs=probs)):
        assert got.shape == v.shape and got.flags.c_contiguous
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_probabilities_in_blocks_of_any_sizes_give_the_same_product(grouped):
    """The products group whatever blocks they are given (the fit hands over those of an
    evaluation); a group is at least one block, even a block longer than a group's rows."""
    x, _t, theta = grouped
    v = np.random.default_rng(5).normal(size=theta.shape)
    whole = np.concatenate(cpu_sums.softmax_blocks(x, theta, "float64"))
    ref = cpu_sums.hvp_sums(x, theta, v, "float64")
    for edges in ([0, 7, 57, 130, 131, 200], [0, 150, 200], [0, 200]):
        probs = [whole[a:b] for a, b in zip(edges[:-1], edges[1:])]
        np.testing.assert_allclose(cpu_sums.hvp_sums(x, theta, v, "float64", probs=probs), ref, rtol=1e-12,
                                   atol=1e-12 * np.abs(ref).max())


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_many_directions_in_chunks_over_groups_equal_the_explicit_hessian(grouped, precision, monkeypatch):
    x, _t, theta = grouped
    itemsize = np.dtype(precision).itemsize
    # Room for 120 rows × 6 classes × 2 directions: the 5 directions in chunks of 2, 2 and 1.
    monkeypatch.setattr(cpu_sums, "BLOCK_BYTES", 120 * 6 * 2 * itemsize)
    v = np.random.default_rng(6).normal(size=theta.shape + (5,))
    got = cpu_sums.hvp_sums(x, theta, v, precision)
    want = _explicit(x, theta, v)
    tol = 1e-5 if precision == "float32" else 1e-11
    assert got.shape == v.shape
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    # The sketch's row sample goes through the same path.
    sample = cpu_sums.hvp_sums(x, theta, v, precision, stride=3)
    want = _explicit(x[::3], theta, v) * (len(x) / len(x[::3]))
    assert np.abs(sample - want).max() <= tol * np.abs(want).max()


def test_binary_head_hessian_product_is_the_logistic_one(grouped):
    """One column: the weights P∘(U − rowsum(P∘U)) are p(1 − p)u."""
    x, _t, _theta = grouped
    rng = np.random.default_rng(8)
    w = rng.normal(scale=0.3, size=(x.shape[1], 1))
    v = rng.normal(size=w.shape)
    x64 = x.astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-(x64 @ w)))
    want = x64.T @ (p * (1 - p) * (x64 @ v))
    np.testing.assert_allclose(cpu_sums.hvp_sums(x, w, v, "float64"), want, rtol=1e-11, atol=1e-11)
