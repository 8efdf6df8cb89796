"""Vectors as protobuf messages, built from numpy buffers: no Python object per float.

A vector as a list of Python floats, then protobuf values, costs a Python object per float,
most of all as the ``google.protobuf.Value`` list the REST routes need. Here the messages' wire
bytes are written with numpy and parsed once by protobuf's C code (measurements in
docs/design.md).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.compute.engine import FloatMatrix

DoubleMatrix = npt.NDArray[np.float64]

_SIGNIFICANT_DIGITS = np.arange(1, 10, dtype=np.float64)[:, None]  # a float32 needs <= 9
_EXACT_POWERS = 22  # 10**22 is the largest power of ten a double holds exactly

# Tags: (field number << 3) | wire type; 2 = length-delimited, 1 = 64-bit.
_EMBEDDING_VALUES = 0x12  # Embedding.values = 2, packed floats
_LIST_VALUES = 0x0A  # ListValue.values = 1 (each a Value)
_VALUE_NUMBER = 0x11  # Value.number_value = 2 (double)
_VALUE_LIST = 0x32  # Value.list_value = 6
_NUMBER_VALUE_SIZE = 9  # tag + 8 bytes


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _length_delimited(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def embeddings(vectors: FloatMatrix) -> list[pb.Embedding]:
    """The native ``Embedding`` messages (index, packed float values) of a matrix's rows."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    messages = []
    for index, row in enumerate(rows):
        message = pb.Embedding.FromString(_length_delimited(_EMBEDDING_VALUES, row.tobytes()))
        message.index = index
        messages.append(message)
    return messages


def shortest_float32(vectors: FloatMatrix) -> DoubleMatrix:
    """Each float32 as the double nearest its shortest round-trip decimal.

    Protobuf's JSON printer writes a double's shortest repr: a float32 widened to double
    prints as -0.30000001192092896, the double nearest -0.3 prints as -0.3 (half the bytes).
    For 1 to 9 significant digits the float32 is rounded to that many digits in double
    arithmetic (exact: an integer times or divided by an exact power of ten is correctly
    rounded); the fewest digits that round-trip win. Values too large or too small for exact
    powers of ten take the string round trip (the same result, slower).
    """
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and inf pass through
        source = np.asarray(vectors, dtype=np.float32)
        flat = source.reshape(-1)
        result = flat.astype(np.float64)
        pick = np.isfinite(flat) & (flat != 0)
        values = result[pick]
        if values.size:
            exponent = np.floor(np.log10(np.abs(values)))
            power = _SIGNIFICANT_DIGITS - 1 - exponent  # one row per digit count
            scale = 10.0 ** np.abs(power)
            upward = power >= 0
            digits = np.rint(np.where(upward, values * scale, values / scale))
            candidates = np.where(upward, digits / scale, digits * scale)
            round_trips = candidates.astype(np.float32) == flat[pick]
            fewest = round_trips.argmax(axis=0)
            best = candidates[fewest, np.arange(values.size)]
            slow = ~round_trips.any(axis=0) | (np.abs(power) > _EXACT_POWERS).any(axis=0)
            if slow.any():
                best[slow] = flat[pick][slow].astype(str).astype(np.float64)
            result[pick] = best
    return result.reshape(source.shape)


def _list_values(rows: DoubleMatrix) -> list[bytes]:
    """Each row's ``ListValue`` wire bytes: one number ``Value`` per element."""
    count, width = rows.shape
    cells = np.empty((count, width, 2 + _NUMBER_VALUE_SIZE), dtype=np.uint8)
    cells[:, :, 0] = _LIST_VALUES
    cells[:, :, 1] = _NUMBER_VALUE_SIZE
    cells[:, :, 2] = _VALUE_NUMBER
    cells[:, :, 3:] = (
        np.ascontiguousarray(rows, dtype="<f8").view(np.uint8).reshape(count, width, 8)
    )
    return [row.tobytes() for row in cells]


def float_list_values(vectors: FloatMatrix) -> list[struct_pb2.Value]:
    """Each row as a ``Value`` holding a list of numbers in shortest float32 form."""
    return [
        struct_pb2.Value.FromString(_length_delimited(_VALUE_LIST, row))
        for row in _list_values(shortest_float32(vectors))
    ]


def nested_list_value(vectors: FloatMatrix) -> struct_pb2.ListValue:
    """The matrix as a ``ListValue`` of rows, each a list of numbers (Ollama's shape)."""
    rows = (
        _length_delimited(_LIST_VALUES, _length_delimited(_VALUE_LIST, row))
        for row in _list_values(shortest_float32(vectors))
    )
    return struct_pb2.ListValue.FromString(b"".join(rows))


def integer_list_values(rows: npt.NDArray[np.generic]) -> list[struct_pb2.Value]:
    """Each row of an integer matrix (compact vectors) as a ``Value`` list of numbers."""
    return [
        struct_pb2.Value.FromString(_length_delimited(_VALUE_LIST, row))
        for row in _list_values(np.asarray(rows, dtype=np.float64))
    ]


def nested_integer_list_value(rows: npt.NDArray[np.generic]) -> struct_pb2.ListValue:
    """An integer matrix as a ``ListValue`` of rows, each a list of numbers."""
    return struct_pb2.ListValue.FromString(
        b"".join(
            _length_delimited(_LIST_VALUES, _length_delimited(_VALUE_LIST, row))
            for row in _list_values(np.asarray(rows, dtype=np.float64))
        )
    )
