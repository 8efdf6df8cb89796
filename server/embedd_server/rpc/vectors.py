"""Vectors as protobuf messages, built from numpy buffers: no Python object per float.

A vector as a list of Python floats, then protobuf values, costs a Python object per float,
most of all as the ``google.protobuf.Value`` list the REST routes need. Here the messages' wire
bytes are written with numpy and parsed once by protobuf's C code (measurements in
docs/design.md). A response's vectors are written once, as the wire bytes of its repeated
field, and parsed straight into the response (:func:`append_rows`): no message per row that
is then copied into the response.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from embedd.v1 import embedder_pb2 as pb
from embedd_server.compute.engine import FloatMatrix

DoubleMatrix = npt.NDArray[np.float64]
_M = TypeVar("_M", bound=Message)

_MOST_DIGITS = 9  # a float32 round-trips with 9 significant digits
_DIGIT_COUNTS = np.arange(1, _MOST_DIGITS + 1, dtype=np.int64)[:, None]
# From this many values on, bisecting the digit count (4 roundings of each) beats rounding
# each to all 9 counts at once (measured: 384 values 115 us vs 143 us, 12,288: 2.4 ms vs 1.0).
_BISECT_FROM = 2048
_EXACT_POWERS = 22  # 10**22 is the largest power of ten a double holds exactly
_POWERS_OF_TEN = 10.0 ** np.arange(_EXACT_POWERS + 1, dtype=np.float64)

# Tags: (field number << 3) | wire type; 2 = length-delimited, 1 = 64-bit.
_EMBEDDING_INDEX = 0x08  # Embedding.index = 1, a varint
_EMBEDDING_VALUES = 0x12  # Embedding.values = 2, packed floats
_LIST_VALUES = 0x0A  # ListValue.values = 1 (each a Value)
_VALUE_NUMBER = 0x11  # Value.number_value = 2 (double)
_VALUE_LIST = 0x32  # Value.list_value = 6
_NUMBER_VALUE_SIZE = 9  # tag + 8 bytes
_LENGTH_DELIMITED = 2  # the wire type of a message, a string, bytes, a packed list


def _varint(number: int) -> bytes:
    out = bytearray()
    while number > 0x7F:
        out.append((number & 0x7F) | 0x80)
        number >>= 7
    out.append(number)
    return bytes(out)


def _length_delimited(tag: int, payload: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(payload)) + payload


def _message_field(message: Message, field: str) -> bytes:
    """The tag of ``message``'s length-delimited field named ``field`` (from its descriptor)."""
    number = message.DESCRIPTOR.fields_by_name[field].number
    return _varint((number << 3) | _LENGTH_DELIMITED)


def append_rows(message: _M, field: str, rows: Iterable[bytes]) -> _M:
    """``message`` with one element appended to its repeated message field ``field`` per
    row (an element's wire bytes), all parsed in one call of protobuf's C code."""
    tag = _message_field(message, field)
    message.MergeFromString(b"".join(tag + _varint(len(row)) + row for row in rows))
    return message


def with_field(heads: Iterable[Message], field: str, values: Iterable[bytes]) -> Iterator[bytes]:
    """Each head message's wire bytes with its message field ``field`` set to the matching
    value's wire bytes (a message's fields may come in any order on the wire)."""
    for head, value in zip(heads, values, strict=True):
        yield head.SerializeToString() + _message_field(head, field) + _varint(len(value)) + value


def embedding_rows(vectors: FloatMatrix) -> list[bytes]:
    """Each row's native ``Embedding`` wire bytes: its index and packed float values."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")
    return [
        # proto3 leaves a zero index off the wire; parsing gives 0 either way.
        (bytes((_EMBEDDING_INDEX,)) + _varint(index) if index else b"")
        + _length_delimited(_EMBEDDING_VALUES, row.tobytes())
        for index, row in enumerate(rows)
    ]


def embeddings(vectors: FloatMatrix) -> list[pb.Embedding]:
    """The native ``Embedding`` messages (index, packed float values) of a matrix's rows."""
    return [pb.Embedding.FromString(row) for row in embedding_rows(vectors)]


def shortest_float32(vectors: FloatMatrix) -> DoubleMatrix:
    """Each float32 as the double nearest its shortest round-trip decimal.

    Protobuf's JSON printer writes a double's shortest repr: a float32 widened to double
    prints as -0.30000001192092896, the double nearest -0.3 prints as -0.3 (half the bytes).
    Rounded to k significant digits in double arithmetic (exact: an integer times or divided
    by an exact power of ten is correctly rounded), a float32 round-trips for every k from its
    shortest count on (the nearest k+1-digit decimal is at least as near as the nearest
    k-digit one), so the fewest of 1 to 9 digits is found by bisection: four roundings per
    value instead of nine. Values too large or too small for exact powers of ten take the
    string round trip (the same result, slower).
    """
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):  # NaN, inf pass through
        source = np.asarray(vectors, dtype=np.float32)
        flat = source.reshape(-1)
        result = flat.astype(np.float64)
        pick = np.isfinite(flat) & (flat != 0)
        values = result[pick]
        if values.size:
            floats = flat[pick]
            exponent = np.floor(np.log10(np.abs(values)))
            # The powers of ten for 1..9 digits: 0 - exponent .. 8 - exponent.
            slow = (np.abs(exponent) > _EXACT_POWERS) | (np.abs(8 - exponent) > _EXACT_POWERS)
            exponent[slow] = 0  # any exact power: their result comes from the strings
            if values.size < _BISECT_FROM:  # few values: numpy's per-call cost dominates
                every = _rounded(values, _DIGIT_COUNTS, exponent)  # a row per digit count
                fits = every.astype(np.float32) == floats
                best = every[fits.argmax(axis=0), np.arange(values.size)]
            else:
                best = _bisected(values, floats, exponent)
            slow |= best.astype(np.float32) != floats  # not even 9 digits round-trip
            if slow.any():
                best[slow] = floats[slow].astype(str).astype(np.float64)
            result[pick] = best
    return result.reshape(source.shape)


def _bisected(values: DoubleMatrix, floats: FloatMatrix, exponent: DoubleMatrix) -> DoubleMatrix:
    """Each value rounded to the fewest significant digits that round-trip to ``floats``
    (9 where none do), found by bisection."""
    low = np.ones(values.size, dtype=np.int64)
    high = np.full(values.size, _MOST_DIGITS, dtype=np.int64)
    while (open_ := low < high).any():
        middle = (low + high) // 2
        fits = _rounded(values, middle, exponent).astype(np.float32) == floats
        high = np.where(open_ & fits, middle, high)
        low = np.where(open_ & ~fits, middle + 1, low)
    return _rounded(values, low, exponent)


def _rounded(
    values: DoubleMatrix, digits: npt.NDArray[np.int64], exponent: DoubleMatrix
) -> DoubleMatrix:
    """Each value rounded to its count of significant ``digits`` (``exponent``: its decimal
    exponent), as the double nearest that decimal; ``digits`` of shape ``(k, 1)`` give a
    row per count."""
    power = digits - 1 - exponent
    scale = _POWERS_OF_TEN[np.abs(power).astype(np.int64)]
    upward = power >= 0
    rounded: DoubleMatrix = np.where(
        upward, np.rint(values * scale) / scale, np.rint(values / scale) * scale
    )
    return rounded


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


def float_value_rows(vectors: FloatMatrix) -> list[bytes]:
    """Each row's wire bytes as a ``Value`` holding a list of numbers in shortest float32
    form."""
    return [_length_delimited(_VALUE_LIST, row) for row in _list_values(shortest_float32(vectors))]


def float_list_values(vectors: FloatMatrix) -> list[struct_pb2.Value]:
    """Each row as a ``Value`` holding a list of numbers in shortest float32 form."""
    return [struct_pb2.Value.FromString(row) for row in float_value_rows(vectors)]


def nested_list_value(vectors: FloatMatrix) -> struct_pb2.ListValue:
    """The matrix as a ``ListValue`` of rows, each a list of numbers (Ollama's shape)."""
    rows = (
        _length_delimited(_LIST_VALUES, _length_delimited(_VALUE_LIST, row))
        for row in _list_values(shortest_float32(vectors))
    )
    return struct_pb2.ListValue.FromString(b"".join(rows))


def integer_value_rows(rows: npt.NDArray[np.generic]) -> list[bytes]:
    """Each row of an integer matrix (compact vectors) as a ``Value`` list of numbers' wire
    bytes."""
    return [
        _length_delimited(_VALUE_LIST, row)
        for row in _list_values(np.asarray(rows, dtype=np.float64))
    ]


def integer_list_values(rows: npt.NDArray[np.generic]) -> list[struct_pb2.Value]:
    """Each row of an integer matrix (compact vectors) as a ``Value`` list of numbers."""
    return [struct_pb2.Value.FromString(row) for row in integer_value_rows(rows)]


def nested_integer_list_value(rows: npt.NDArray[np.generic]) -> struct_pb2.ListValue:
    """An integer matrix as a ``ListValue`` of rows, each a list of numbers."""
    return struct_pb2.ListValue.FromString(
        b"".join(
            _length_delimited(_LIST_VALUES, _length_delimited(_VALUE_LIST, row))
            for row in _list_values(np.asarray(rows, dtype=np.float64))
        )
    )
