"""Compact vectors: the formulas of sentence-transformers' quantize_embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from embedd_server.core.quantization import (
    BINARY,
    CALIBRATION_TEXTS,
    INT8,
    UBINARY,
    UINT8,
    Ranges,
    quantize,
)


def test_binary_is_packed_sign_bits_and_ubinary_minus_128() -> None:
    vectors = np.array([[0.5, -0.1, 0.0, 2.0, -3.0, 0.1, 0.2, -0.2, 1.0]], dtype=np.float32)
    ubinary = quantize(vectors, UBINARY)
    assert ubinary.dtype == np.uint8
    assert ubinary.tolist() == [[0b10010110, 0b10000000]]  # 9 dims: 2 bytes, first bit high
    assert quantize(vectors, BINARY).tolist() == [[0b10010110 - 128, 0]]


def test_int8_and_uint8_scale_each_dimension_by_its_calibration_range() -> None:
    calibration = np.array([[-1.0, 0.0], [1.0, 10.0]], dtype=np.float32)
    ranges = Ranges.of(calibration)
    vectors = np.array([[-1.0, 0.0], [1.0, 10.0], [0.0, 5.0], [5.0, -5.0]], dtype=np.float32)
    steps = np.array([2 / 255, 10 / 255], dtype=np.float32)
    # sentence-transformers: ((x - min) / steps - 128).astype(int8), here clipped to the range
    expected = np.clip((vectors - calibration[0]) / steps - 128, -128, 127).astype(np.int8)
    assert quantize(vectors, INT8, ranges).tolist() == expected.tolist()
    assert quantize(vectors, INT8, ranges)[3].tolist() == [127, -128]  # outside: clipped
    unsigned = np.clip((vectors - calibration[0]) / steps, 0, 255).astype(np.uint8)
    assert quantize(vectors, UINT8, ranges).tolist() == unsigned.tolist()
    assert unsigned[[0, 2, 3]].tolist() == [[0, 0], [127, 127], [255, 0]]
    with pytest.raises(ValueError, match="calibration"):
        quantize(vectors, INT8)


def test_a_dimension_that_never_varies_divides_by_no_zero() -> None:
    ranges = Ranges.of(np.zeros((3, 2), dtype=np.float32))
    assert np.isfinite(quantize(np.ones((1, 2), dtype=np.float32), INT8, ranges)).all()


def test_the_calibration_set_is_fixed_and_varied() -> None:
    assert len(CALIBRATION_TEXTS) == len(set(CALIBRATION_TEXTS)) == 95
