"""Reference data and metrics shared by the acceptance tests (STS-B, reference vectors)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class StsB:
    """The STS-B test split: sentence pairs and their gold similarity scores."""

    firsts: list[str]
    seconds: list[str]
    scores: npt.NDArray[np.float64]


def read_stsb(path: Path) -> StsB:
    """Reads the tab-separated STS-B file (genre, file, year, id, score, s1, s2)."""
    firsts, seconds, scores = [], [], []
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            scores.append(float(row[4]))
            firsts.append(row[5])
            seconds.append(row[6])
    return StsB(firsts, seconds, np.array(scores))


def average_ranks(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Ranks 1..n, ties sharing their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, group, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(group, weights=ranks)
    averaged: npt.NDArray[np.float64] = sums[group] / counts[group]
    return averaged


def spearman(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    """Spearman's rank correlation."""
    return float(np.corrcoef(average_ranks(a), average_ranks(b))[0, 1])


def stsb_score(
    first_vectors: Matrix, second_vectors: Matrix, gold: npt.NDArray[np.float64]
) -> float:
    """Cosine Spearman x100, the figure MTEB reports for STS-B."""
    a = first_vectors / np.linalg.norm(first_vectors, axis=1, keepdims=True)
    b = second_vectors / np.linalg.norm(second_vectors, axis=1, keepdims=True)
    cosine = (a.astype(np.float64) * b).sum(axis=1)
    return spearman(cosine, gold) * 100


def read_reference(directory: Path) -> tuple[list[dict[str, Any]], Matrix]:
    """The reference texts (with token counts) and sentence-transformers' vectors."""
    texts: list[dict[str, Any]] = json.loads((directory / "texts.json").read_text("utf-8"))
    vectors: Matrix = np.load(directory / "embeddings.npy")
    return texts, vectors


def row_cosines(a: Matrix, b: Matrix) -> npt.NDArray[np.float64]:
    """Cosine similarity of each row of a with the same row of b."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    dots: npt.NDArray[np.float64] = (a64 * b64).sum(axis=1)
    norms: npt.NDArray[np.float64] = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    cosines: npt.NDArray[np.float64] = dots / norms
    return cosines


def assert_same_vectors(actual: Matrix, expected: Matrix) -> None:
    """Equal up to the float noise of packing inputs into one decode.

    llama.cpp sums in a different order when an input shares a decode with others, so the
    same input's vector varies in the last f16-significant digits with its batch-mates.
    """
    assert actual.shape == expected.shape
    assert row_cosines(actual, expected).min() >= 0.99999
    np.testing.assert_allclose(actual, expected, atol=5e-4)
