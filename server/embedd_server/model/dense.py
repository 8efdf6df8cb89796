"""sentence-transformers ``Dense`` modules after pooling, as a GGUF file carries them.

A ``Dense`` module is ``activation(x @ W.T + b)`` on the pooled vector (EmbeddingGemma's two
projections; LaBSE's and distiluse's dense + tanh). Any stack of them sits between Pooling and
Normalize. llama.cpp applies two of them itself, for ``gemma-embedding`` only, from its own
tensors (``dense_2`` / ``dense_3``, no bias, no activation); for every other stack the file
carries them under keys of ours, which both engines apply after pooling:

- ``embedd.dense.count``: the number of modules, in order;
- ``embedd.dense.N.in_features`` / ``.out_features`` / ``.activation`` (one of
  :data:`ACTIVATIONS`);
- ``embedd.dense.N.weight`` (``[out_features, in_features]``) and, with a bias,
  ``embedd.dense.N.bias``: float32 little-endian, row-major, base64 text.

The weights are metadata, not tensors, because llama.cpp refuses a file with a tensor its
architecture doesn't load; and text, not a GGUF array, because ``gguf``'s reader parses an
array element by element (seconds for LaBSE's 768 x 768) where it reads a string as one slice.
They stay float32 in every file type.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

DENSE_COUNT_KEY = "embedd.dense.count"
_PREFIX = "embedd.dense"

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# The activations a Dense module may have, by our name: what each computes, in float64.
ACTIVATIONS: dict[str, Callable[[F64], F64]] = {
    "identity": lambda x: x,
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0.0),
}


def dense_key(index: int, field: str) -> str:
    """The GGUF key of one field of the ``index``-th Dense module."""
    return f"{_PREFIX}.{index}.{field}"


@dataclass(frozen=True)
class DenseLayer:
    """One Dense module: ``activation(x @ weight.T + bias)``."""

    weight: F32  # [out_features, in_features]
    bias: F32 | None  # [out_features]
    activation: str  # a key of ACTIVATIONS

    def __post_init__(self) -> None:
        if self.weight.ndim != 2:
            raise ValueError(f"a Dense weight must be 2-D, not {self.weight.shape}")
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ValueError(f"a Dense bias must have {self.out_features} values")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"Dense activation {self.activation!r} is not supported ({', '.join(ACTIVATIONS)})"
            )

    @property
    def in_features(self) -> int:
        """Width of the vector the module takes."""
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        """Width of the vector it gives."""
        return int(self.weight.shape[0])


def check_stack(layers: Sequence[DenseLayer], width: int) -> None:
    """Refuses a stack whose modules don't chain from a ``width``-wide pooled vector."""
    for index, layer in enumerate(layers):
        if layer.in_features != width:
            raise ValueError(
                f"Dense module {index} takes {layer.in_features} features, but the vector "
                f"before it has {width}"
            )
        width = layer.out_features


def apply_dense(vectors: npt.NDArray[Any], layers: Sequence[DenseLayer]) -> F32:
    """The stack applied to pooled ``vectors`` ``[n, in]``, computed in float64."""
    x: F64 = np.asarray(vectors, dtype=np.float64)
    for layer in layers:
        x = x @ layer.weight.astype(np.float64).T
        if layer.bias is not None:
            x = x + layer.bias.astype(np.float64)
        x = ACTIVATIONS[layer.activation](x)
    return x.astype(np.float32)


def dense_metadata(layers: Sequence[DenseLayer]) -> dict[str, int | str]:
    """The GGUF keys (key -> uint32 or string value) that carry ``layers``."""
    fields: dict[str, int | str] = {DENSE_COUNT_KEY: len(layers)}
    for index, layer in enumerate(layers):
        fields[dense_key(index, "in_features")] = layer.in_features
        fields[dense_key(index, "out_features")] = layer.out_features
        fields[dense_key(index, "activation")] = layer.activation
        fields[dense_key(index, "weight")] = _encode(layer.weight)
        if layer.bias is not None:
            fields[dense_key(index, "bias")] = _encode(layer.bias)
    return fields


def read_dense(fields: Mapping[str, Any]) -> tuple[DenseLayer, ...]:
    """The stack a GGUF file's metadata carries (``fields``: key -> scalar or text), in
    order; empty when it carries none. Malformed keys raise ValueError."""
    count = int(fields.get(DENSE_COUNT_KEY, 0))
    layers: list[DenseLayer] = []
    for index in range(count):
        try:
            rows = int(fields[dense_key(index, "out_features")])
            cols = int(fields[dense_key(index, "in_features")])
            weight = _decode(str(fields[dense_key(index, "weight")]), rows * cols)
            activation = str(fields[dense_key(index, "activation")])
        except KeyError as exc:
            raise ValueError(f"GGUF key {exc.args[0]!r} is missing") from None
        bias_text = fields.get(dense_key(index, "bias"))
        bias = None if bias_text is None else _decode(str(bias_text), rows)
        layers.append(DenseLayer(weight.reshape(rows, cols), bias, activation))
    return tuple(layers)


def read_dense_gguf(reader: Any) -> tuple[DenseLayer, ...]:
    """:func:`read_dense` of an open ``gguf.GGUFReader``."""
    fields = {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith(_PREFIX + ".")
    }
    return read_dense(fields)


def _encode(values: npt.NDArray[Any]) -> str:
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return base64.b64encode(data).decode("ascii")


def _decode(text: str, count: int) -> F32:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("a Dense weight is not base64 text") from None
    if len(data) != 4 * count:
        raise ValueError(f"a Dense weight holds {len(data) // 4} values, expected {count}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
