"""A worker's scoring memory is its shard plus one test block, whatever the number of test examples.

Measured as the peak resident set size of a fresh process (ru_maxrss) scoring a 20,000-row shard
against 1,000 and then 8,000 test examples: the full 8,000 × 20,000 float32 matrix would be 640 MB.
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # large scoring runs in fresh processes: the inner loop skips it

SCRIPT = r"""
import resource, sys
import numpy as np
from distributed_influence.method import representer as rp
from distributed_influence.method import scoring

m, block = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
s, d, C = 20000, 63, 10
x = rp.augment(rng.normal(size=(s, d)).astype(np.float32))
alpha = rng.normal(size=(s, C)) * 1e-3
ids = np.arange(s)
xt = rp.augment(rng.normal(size=(m, d)).astype(np.float32))
pred = rng.integers(0, C, size=m)
scoring.score_shard(x, ids, alpha, xt[:256], pred[:256], 10, 256, method='dense')  # warm up: TF, traces, buffers
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = scoring.score_shard(x, ids, alpha, xt, pred, 10, block, method='dense')
assert out["topk"]["proponent"]["ids"].shape == (m, 10)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def _growth_kb(m: int, block: int) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(m), str(block)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


def test_scoring_memory_does_not_grow_with_test_set():
    small = _growth_kb(1000, 256)
    large = _growth_kb(8000, 256)
    full_matrix_kb = 8000 * 20000 * 4 // 1024
    # Allowed: the larger test inputs and outputs (a few MB), not the m × n matrix.
    assert large - small < 48 * 1024, (small, large)
    assert large < full_matrix_kb / 8, (small, large, full_matrix_kb)


def test_the_measurement_sees_an_unblocked_matrix():
    """The same measurement with one block of all 8,000 test examples does see the big matrix."""
    assert _growth_kb(8000, 8000) > 8000 * 20000 * 4 // 1024 // 2
