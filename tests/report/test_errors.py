"""The report's section on the training examples behind the test errors."""

import numpy as np
import pyarrow as pa

from distributed_influence.report.errors import errors_section, top_error_rows


def _table(values, with_column=True):
    n = len(values)
    cols = {"train_id": pa.array(np.arange(100, 100 + n), pa.int64()),
            "label": pa.array(np.arange(n) % 3, pa.int32()),
            "predicted_class": pa.array((np.arange(n) + 1) % 3, pa.int32()),
            "audit_rank": pa.array(np.arange(n, 0, -1), pa.int64())}
    if with_column:
        cols["error_influence"] = pa.array(values, pa.float32(), from_pandas=True)
    return pa.table(cols)


def test_top_error_rows_are_the_largest_positive_values_with_ties_to_the_earlier_row():
    values = np.array([0.5, np.nan, 2.0, -3.0, 2.0, 0.0, 1.0])
    np.testing.assert_array_equal(top_error_rows(values, 3), [2, 4, 6])
    np.testing.assert_array_equal(top_error_rows(values, 10), [2, 4, 6, 0])  # only the positive ones


def test_section_lists_the_largest_values_with_their_share():
    html = errors_section(_table([0.5, 3.0, -1.0, 1.5]), wrong_test_rows=7, n_rows=2)
    rows = html.split("<tr>")[2:]
    assert len(rows) == 2
    assert rows[0].startswith("<td>101</td>") and "60.00%" in rows[0]  # 3.0 of 0.5 + 3.0 + 1.5
    assert rows[1].startswith("<td>103</td>") and "30.00%" in rows[1]
    assert "7 wrongly predicted test examples" in html


def test_section_says_why_when_there_is_nothing_to_list():
    assert "no labels" in errors_section(_table([None, None]))
    assert "earlier version" in errors_section(_table([1.0], with_column=False))
    assert "No training example" in errors_section(_table([-1.0, 0.0]))
