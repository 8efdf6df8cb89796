"""Vectors as protobuf messages built from numpy: the same messages as the slow way."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import json_format, struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.rpc import vectors as vector_messages


def _unit_rows(count: int, width: int = 384, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)
    unit: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


def _by_strings(values: np.ndarray) -> np.ndarray:
    """The reference: numpy's shortest float32 repr, parsed as a double."""
    return values.astype(str).astype(np.float64)


def test_embeddings_equal_messages_built_from_python_floats() -> None:
    vectors = _unit_rows(3)
    expected = [pb.Embedding(index=i, values=row) for i, row in enumerate(vectors.tolist())]
    assert vector_messages.embeddings(vectors) == expected


@pytest.mark.parametrize("scale", [1.0, 0.05, 1e-3, 1e3, 1e-9, 1e20, 1e-38])
def test_shortest_float32_matches_the_string_round_trip(scale: float) -> None:
    values = (_unit_rows(20, seed=int(abs(np.log10(scale)))) * scale).astype(np.float32)
    assert np.array_equal(vector_messages.shortest_float32(values), _by_strings(values))


def test_shortest_float32_on_every_kind_of_bit_pattern() -> None:
    bits = np.random.default_rng(7).integers(0, 2**32, size=100_000, dtype=np.uint32)
    values = bits.view(np.float32)
    finite = np.isfinite(values)
    shortest = vector_messages.shortest_float32(values)
    assert np.array_equal(shortest[finite], _by_strings(values[finite]))
    assert np.array_equal(shortest.astype(np.float32)[finite], values[finite])  # round-trips


@pytest.mark.parametrize("size", [1, 384, vector_messages._BISECT_FROM - 1])
def test_shortest_float32_of_few_values_matches_the_strings_too(size: int) -> None:
    """Few values take all nine roundings at once, many the bisection: both give the
    strings' shortest form."""
    bits = np.random.default_rng(size).integers(0, 2**32, size=(50, size), dtype=np.uint32)
    for row in bits.view(np.float32):
        finite = row[np.isfinite(row)]
        assert np.array_equal(vector_messages.shortest_float32(finite), _by_strings(finite))


def test_shortest_float32_prints_short_json() -> None:
    values = np.array([-0.3, 0.1, 0.0, -0.0, 0.5, 1 / 3, 1e-45, 3.4e38], dtype=np.float32)
    printed = [
        json_format.MessageToJson(struct_pb2.Value(number_value=v))
        for v in vector_messages.shortest_float32(values)
    ]
    assert printed == ["-0.3", "0.1", "0.0", "-0.0", "0.5", "0.33333334", "1e-45", "3.4e+38"]


def test_float_list_values_equal_values_built_one_float_at_a_time() -> None:
    vectors = _unit_rows(2)
    expected = []
    for row in _by_strings(vectors).tolist():
        value = struct_pb2.Value()
        value.list_value.extend(row)
        expected.append(value)
    assert vector_messages.float_list_values(vectors) == expected


def test_nested_list_value_equals_lists_built_one_float_at_a_time() -> None:
    vectors = _unit_rows(3, width=8)
    expected = struct_pb2.ListValue()
    for row in _by_strings(vectors).tolist():
        expected.add_list().extend(row)
    assert vector_messages.nested_list_value(vectors) == expected


def test_long_vectors_need_multi_byte_lengths() -> None:
    vectors = _unit_rows(1, width=4096)  # > 2**14 bytes: a three-byte length varint
    assert vector_messages.float_list_values(vectors)[0].list_value.values[
        4095
    ].number_value == float(str(vectors[0, 4095]))
    assert list(vector_messages.embeddings(vectors)[0].values) == pytest.approx(vectors[0].tolist())


# --- responses: the rows parsed straight into them, the same bytes as copied messages -----------


@pytest.mark.parametrize("count", [1, 3, 200])
def test_native_responses_are_the_bytes_of_copied_messages(count: int) -> None:
    """EmbedResponse with its rows appended as wire bytes serializes as the one built from
    an Embedding message per row (index 0 included), which is what callers got before."""
    vectors = _unit_rows(count)
    usage = pb.Usage(prompt_tokens=7, total_tokens=7)
    copied = pb.EmbedResponse(
        model="m",
        embeddings=[pb.Embedding(index=i, values=row) for i, row in enumerate(vectors.tolist())],
        usage=usage,
        request_id="r",
    )
    appended = vector_messages.append_rows(
        pb.EmbedResponse(model="m", usage=usage, request_id="r"),
        "embeddings",
        vector_messages.embedding_rows(vectors),
    )
    assert appended == copied
    assert appended.SerializeToString() == copied.SerializeToString()


@pytest.mark.parametrize("count", [1, 3, 200])
def test_openai_responses_are_the_bytes_and_json_of_copied_messages(count: int) -> None:
    """CreateEmbeddingsResponse with each value written once (as wire bytes, beside the
    element's object and index) is the response built from a Value and an OpenAIEmbedding
    message per row: the same bytes, so the same JSON numbers from Envoy."""
    vectors = _unit_rows(count)
    integers = (vectors * 127).astype(np.int8)
    for rows, values in (
        (vector_messages.float_value_rows(vectors), vector_messages.float_list_values(vectors)),
        (
            vector_messages.integer_value_rows(integers),
            vector_messages.integer_list_values(integers),
        ),
    ):
        copied = pb.CreateEmbeddingsResponse(
            object="list",
            data=[
                pb.OpenAIEmbedding(object="embedding", index=i, embedding=value)
                for i, value in enumerate(values)
            ],
            model="m",
            usage=pb.Usage(prompt_tokens=0, total_tokens=0),
        )
        heads = (pb.OpenAIEmbedding(object="embedding", index=i) for i in range(count))
        appended = vector_messages.append_rows(
            pb.CreateEmbeddingsResponse(
                object="list", model="m", usage=pb.Usage(prompt_tokens=0, total_tokens=0)
            ),
            "data",
            vector_messages.with_field(heads, "embedding", rows),
        )
        assert appended.SerializeToString() == copied.SerializeToString()
        assert json_format.MessageToJson(appended) == json_format.MessageToJson(copied)
        assert appended.HasField("usage")
