"""What a shard's ``scoring`` record says, as plain constants.

Kept apart from :mod:`distributed_influence.method.scoring` (which loads TensorFlow) because the
driver reads these records to write the manifest, and the driver does not load TensorFlow.
"""

#: The scoring paths: the same tables; pruned skips most (test, train) pairs.
METHODS = ("pruned", "dense")

#: How a shard's ``influence_abs_sum`` was obtained (its record's ``abs_sum``).
ABS_CLOSED = "closed form"  # every feature ≥ 0: |r| = |α|·(x_i·x_t), summed by linearity
ABS_PAIRS = "every pair"  # asked for with negative features (--abs-sums): scored densely
ABS_SKIPPED = "not computed"  # negative features and not asked for: a null column
ABS_NOT_ASKED = "not asked"  # no per-train sums wanted at all (explain)

#: Why a pruned request ran dense: Σ_t |r| was asked for (--abs-sums) and a feature is negative.
REASON_NEGATIVE = ("--abs-sums with features that take negative values: influence_abs_sum needs every "
                   "(test, train) pair, so this shard was scored densely")
#: Why ``influence_abs_sum`` is null: no closed form with negative features, and not asked for.
ABS_SUM_SKIPPED = ("features take negative values: influence_abs_sum has no closed form and would need "
                   "every (test, train) pair, so it is not computed (null); --abs-sums computes it by "
                   "scoring every pair")

#: How a shard's ``error_influence`` was obtained (its record's ``error_sum``).
ERR_CLOSED = "closed form"  # Σ_c α_ic (x_i·E_c), by linearity, like influence_sum
ERR_NO_LABELS = "not computed"  # the test source has no labels: no test row is known to be wrong
#: Why ``error_influence`` is null.
ERR_SKIPPED = "the test source has no labels, so no test prediction is known to be wrong: error_influence is null"
