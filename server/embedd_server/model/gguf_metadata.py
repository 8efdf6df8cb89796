"""A GGUF file's metadata read in milliseconds: scalars and strings, arrays by their length.

gguf's GGUFReader builds numpy views of every element of every array, so a model's
vocabulary (30,000 to 250,000 tokens) costs it seconds, all of them holding the GIL. The
catalogue needs the scalars, the length of each array, a classifier's few label names and
the number of weights; this reader walks the file's header once with ``struct`` and skips
array contents by their size (strings by their length prefixes).

Little-endian GGUF versions 2 and 3 (what every converter writes); :class:`ForeignGguf` for a
big-endian file, which the caller reads with gguf's reader instead.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
STRING, ARRAY = 8, 9  # gguf.GGUFValueType
# gguf.GGUFValueType -> struct format of the scalar types.
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


class ForeignGguf(ValueError):
    """A GGUF file this reader does not walk (big-endian): read it with gguf's reader."""


class GgufMetadata:
    """What :func:`read_metadata` found: ``values`` by key (scalars as Python values, arrays
    as their length under ``<key>.count``, plus the arrays ``wanted`` asked for in full) and
    the total number of tensor elements."""

    def __init__(self, values: dict[str, Any], tensor_elements: int) -> None:
        self.values = values
        self.tensor_elements = tensor_elements


class _Cursor:
    """Reads little-endian values from ``data`` at a moving offset."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, layout: struct.Struct) -> Any:
        (value,) = layout.unpack_from(self.data, self.offset)
        self.offset += layout.size
        return value

    def string(self) -> str:
        length = self.unpack(_U64)
        end = self.offset + length
        if end > len(self.data):
            raise ValueError("a string runs past the end of the file")
        text = self.data[self.offset : end].decode("utf-8")
        self.offset = end
        return text

    def skip_string(self) -> None:
        length = self.unpack(_U64)  # (self.offset += self.unpack() would lose the advance)
        self.offset += length

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        layout = _layout(kind)
        return self.unpack(layout)

    def skip_array(self, kind: int, count: int) -> None:
        if kind == STRING:
            for _ in range(count):
                self.skip_string()
        elif kind == ARRAY:
            for _ in range(count):
                inner, inner_count = self.unpack(_U32), self.unpack(_U64)
                self.skip_array(inner, inner_count)
        else:
            self.offset += _layout(kind).size * count
        if self.offset > len(self.data):
            raise ValueError("an array runs past the end of the file")


_LAYOUTS = {kind: struct.Struct(fmt) for kind, fmt in _SCALARS.items()}


def _layout(kind: int) -> struct.Struct:
    layout = _LAYOUTS.get(kind)
    if layout is None:
        raise ValueError(f"unknown GGUF value type {kind}")
    return layout


def read_metadata(path: Path, wanted: Callable[[str], bool] = lambda key: False) -> GgufMetadata:
    """The metadata of the GGUF file at ``path``; arrays whose key ``wanted`` accepts are
    read in full (as lists). Raises ValueError (or OSError) for a file that is not GGUF,
    ForeignGguf for a big-endian one."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            return _walk(_Cursor(data), wanted)
        except struct.error:
            raise ValueError("the file ends inside its header") from None


def _walk(cursor: _Cursor, wanted: Callable[[str], bool]) -> GgufMetadata:
    if cursor.data[:4] != GGUF_MAGIC:
        raise ValueError("GGUF magic invalid")
    cursor.offset = 4
    version = cursor.unpack(_U32)
    if version & 0xFFFF == 0:
        raise ForeignGguf("a big-endian GGUF file")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported")
    tensor_count, kv_count = cursor.unpack(_U64), cursor.unpack(_U64)
    values: dict[str, Any] = {
        "GGUF.version": version,
        "GGUF.tensor_count": tensor_count,
        "GGUF.kv_count": kv_count,
    }
    for _ in range(kv_count):
        key = cursor.string()
        kind = cursor.unpack(_U32)
        if kind != ARRAY:
            values[key] = cursor.value(kind)
            continue
        item_kind, count = cursor.unpack(_U32), cursor.unpack(_U64)
        values[f"{key}.count"] = count
        if wanted(key) and item_kind != ARRAY:
            values[key] = [cursor.value(item_kind) for _ in range(count)]
        else:
            cursor.skip_array(item_kind, count)
    elements = 0
    for _ in range(tensor_count):
        cursor.skip_string()  # the tensor's name
        dims = [cursor.unpack(_U64) for _ in range(cursor.unpack(_U32))]
        cursor.offset += _U32.size + _U64.size  # its type and offset
        count = 1
        for dim in dims:
            count *= dim
        elements += count
    if cursor.offset > len(cursor.data):
        raise ValueError("the tensor list runs past the end of the file")
    return GgufMetadata(values, elements)
