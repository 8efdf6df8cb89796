"""Class probabilities from a classifier's logits (core/classes.py), as transformers' pipeline
computes them: softmax over the labels, a sigmoid per label for multi-label and one-label
models, raw regression."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embedd_server.core.classes import class_probabilities


def test_softmax_per_row_in_float64() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    probabilities = class_probabilities(logits, "single_label_classification")
    assert probabilities.dtype == np.float64
    exp = [math.exp(1.0), math.exp(2.0), math.exp(3.0)]
    np.testing.assert_allclose(probabilities[0], [e / sum(exp) for e in exp], rtol=1e-15)
    np.testing.assert_allclose(probabilities[1], [1 / 3] * 3, rtol=1e-15)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-15)


def test_softmax_is_the_default_and_survives_huge_logits() -> None:
    # Without subtracting the maximum, exp(1000) overflows to inf and the row becomes nan.
    probabilities = class_probabilities(np.array([1000.0, 999.0, -1000.0]), "")
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(
        probabilities, [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1)), 0.0], atol=1e-15
    )


def test_multi_label_is_a_sigmoid_per_label() -> None:
    logits = np.array([[-800.0, -2.0, 0.0, 2.0, 800.0]])
    probabilities = class_probabilities(logits, "multi_label_classification")
    expected = [0.0, 1 / (1 + math.exp(2.0)), 0.5, 1 / (1 + math.exp(-2.0)), 1.0]
    np.testing.assert_allclose(probabilities[0], expected, atol=1e-15)
    assert probabilities.shape == (1, 5)


def test_one_label_is_a_sigmoid_whatever_the_problem_type() -> None:
    """transformers' pipeline: a single label (a cross-encoder's relevance) gets a sigmoid,
    not a softmax (which would give 1.0 whatever the logit)."""
    for problem_type in ("", "single_label_classification"):
        probabilities = class_probabilities(np.array([[2.0], [-1.0]]), problem_type)
        np.testing.assert_allclose(
            probabilities[:, 0], [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))], rtol=1e-15
        )


def test_regression_returns_the_logits() -> None:
    logits = np.array([[0.25, -3.5]], dtype=np.float32)
    out = class_probabilities(logits, "regression")
    np.testing.assert_array_equal(out, logits.astype(np.float64))
    out[0, 0] = 7.0  # a copy: the caller's logits are left alone
    assert logits[0, 0] == np.float32(0.25)


@pytest.mark.parametrize("shape", [(), (2, 0), (1, 2, 3)])
def test_other_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"logits must be \[labels\] or \[texts, labels\]"):
        class_probabilities(np.zeros(shape), "single_label_classification")
