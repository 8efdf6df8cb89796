"""Compact vectors from the Python client (``embed_compact``, sync and asyncio) over a real
gRPC channel to an in-process fake-engine server: the bytes of ``Embedding.data`` as numpy
rows, the same as sentence-transformers' quantize_embeddings gives for the float vectors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import embedd
from embedd import AsyncClient, Client
from tests.servers import ServerThread

TEXTS = ["hello world", "the cat sat", "a dog runs fast"]


def test_binary_and_ubinary_are_the_sign_bits_of_the_float_vectors(
    fake_server: ServerThread,
) -> None:
    with Client(fake_server.target, timeout=30) as client:
        floats = client.embed(TEXTS)
        ubinary = client.embed_compact(TEXTS, "ubinary")
        binary = client.embed_compact(TEXTS, "binary")
        cut = client.embed_compact(TEXTS, "ubinary", dimensions=4)
    expected = np.packbits(floats > 0, axis=-1)
    assert ubinary.dtype == np.uint8 and binary.dtype == np.int8
    assert ubinary.shape == (3, 1)  # 8 dimensions a byte
    np.testing.assert_array_equal(ubinary, expected)
    np.testing.assert_array_equal(binary, (expected.astype(np.int16) - 128).astype(np.int8))
    np.testing.assert_array_equal(cut, np.packbits(floats[:, :4] > 0, axis=-1))


def test_int8_and_uint8_are_one_byte_a_dimension_from_the_same_ranges(
    fake_server: ServerThread,
) -> None:
    with Client(fake_server.target, timeout=30) as client:
        int8 = client.embed_compact(TEXTS, "int8", model="fake")
        uint8 = client.embed_compact(TEXTS, "uint8", model="fake")
        with pytest.raises(ValueError, match="output_type must be one of"):
            client.embed_compact(TEXTS, "int4")
        with pytest.raises(embedd.NotFound):
            client.embed_compact(TEXTS, "int8", model="nope")
    assert int8.dtype == np.int8 and uint8.dtype == np.uint8
    assert int8.shape == uint8.shape == (3, 8)
    # One scale: uint8 is int8 shifted by 128 wherever neither was clipped, but for the cast's
    # truncation toward zero (sentence-transformers' astype), which can differ by one.
    inside = (uint8 > 0) & (uint8 < 255)
    shifted = uint8.astype(np.int16) - 128
    assert np.abs(shifted[inside] - int8.astype(np.int16)[inside]).max() <= 1


def test_the_async_client_gives_the_same_bytes(fake_server: ServerThread) -> None:
    async def compact(output_type: str) -> np.ndarray:
        async with AsyncClient(fake_server.target, timeout=30) as client:
            return await client.embed_compact(TEXTS, output_type)

    with Client(fake_server.target, timeout=30) as client:
        for output_type in ("int8", "binary"):
            np.testing.assert_array_equal(
                asyncio.run(compact(output_type)), client.embed_compact(TEXTS, output_type)
            )
