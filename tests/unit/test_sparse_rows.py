"""core.sparse.sparse_rows: a SPLADE engine's dense rows as (indices, values) pairs."""

from __future__ import annotations

import numpy as np
import pytest

from embedd_server.model.sparse import sparse_rows


def test_keeps_exactly_the_non_zeros_in_ascending_order() -> None:
    dense = np.array(
        [[0.0, 1.5, 0.0, 2.25, 0.0], [3.0, 0.0, 0.0, 0.0, 1e-30], [0.0] * 5], dtype=np.float32
    )
    rows = sparse_rows(dense)
    assert len(rows) == 3
    (i0, v0), (i1, v1), (i2, v2) = rows
    assert i0.tolist() == [1, 3] and v0.tolist() == [1.5, 2.25]
    assert i1.tolist() == [0, 4] and v1.tolist() == [3.0, np.float32(1e-30)]  # no threshold
    assert i2.size == 0 and v2.size == 0
    for indices, values in rows:
        assert indices.dtype == np.int64 and values.dtype == np.float32


def test_round_trips_random_rows() -> None:
    rng = np.random.default_rng(7)
    dense = rng.standard_normal((4, 300)).astype(np.float32)
    dense[dense < 1.0] = 0.0
    rebuilt = np.zeros_like(dense)
    for row, (indices, values) in enumerate(sparse_rows(dense)):
        assert np.all(np.diff(indices) > 0)
        rebuilt[row, indices] = values
    np.testing.assert_array_equal(rebuilt, dense)


def test_float64_rows_become_float32_values() -> None:
    ((indices, values),) = sparse_rows(np.array([[0.0, 0.5]], dtype=np.float64))
    assert indices.tolist() == [1] and values.dtype == np.float32


def test_refuses_what_is_not_a_matrix() -> None:
    with pytest.raises(ValueError, match="rows, vocabulary"):
        sparse_rows(np.zeros(5, dtype=np.float32))
