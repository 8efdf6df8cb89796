"""Sparse vectors (SPLADE): an engine gives each text's weights over the whole vocabulary;
callers get the non-zero ones, by token id."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

SparseRow = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]


def sparse_rows(dense: npt.NDArray[np.float32]) -> list[SparseRow]:
    """Each row's non-zero entries: (indices ascending, their float32 values)."""
    rows: list[SparseRow] = []
    for row in dense:
        indices = np.flatnonzero(row)
        rows.append((indices.astype(np.int64), row[indices].astype(np.float32)))
    return rows
