"""Packs of token sequences: one token array, lengths and pooling starts, and their int32 wire
form.

A pack travels to a worker process as int32 values
``[n, len_1 .. len_n, start_1 .. start_n, tokens ...]``. ``start_i`` is the first token of
sequence i that pooling counts: 0, except for a model that pools without its prompt's tokens
(sentence-transformers' ``include_prompt: false``), where it is the prompt's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import numpy.typing as npt

Int32Array = npt.NDArray[np.int32]


def flatten(sequences: Sequence[Sequence[int]]) -> tuple[Int32Array, Int32Array]:
    """Token sequences as (all tokens in one array, each sequence's length)."""
    if any(not ids for ids in sequences):
        raise ValueError("empty token sequence")
    lengths = np.fromiter(map(len, sequences), dtype=np.int32, count=len(sequences))
    tokens = np.fromiter(chain.from_iterable(sequences), dtype=np.int32, count=lengths.sum())
    return tokens, lengths


def starts_array(starts: Sequence[int] | None, lengths: Int32Array) -> Int32Array:
    """``starts`` as an int32 array checked against ``lengths`` (None: all zero)."""
    if starts is None:
        return np.zeros(len(lengths), dtype=np.int32)
    array = np.asarray(starts, dtype=np.int32)
    if array.shape != lengths.shape or (array < 0).any() or (array > lengths).any():
        raise ValueError("pooling starts must lie in [0, length] of each sequence")
    return array


def encode_pack(sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None) -> bytes:
    """A pack as the int32 message ``[n, lengths..., starts..., tokens...]``."""
    tokens, lengths = flatten(sequences)
    first = starts_array(starts, lengths)
    return np.int32(len(lengths)).tobytes() + lengths.tobytes() + first.tobytes() + tokens.tobytes()


def decode_pack(message: bytes) -> tuple[Int32Array, Int32Array, Int32Array]:
    """The (tokens, lengths, starts) of an :func:`encode_pack` message; ValueError when
    malformed."""
    if len(message) < 4 or len(message) % 4:
        raise ValueError("malformed pack")
    values = np.frombuffer(message, dtype=np.int32)
    count = int(values[0])
    if count < 1 or len(values) < 1 + 2 * count:
        raise ValueError("malformed pack")
    lengths = values[1 : 1 + count]
    starts = values[1 + count : 1 + 2 * count]
    tokens = values[1 + 2 * count :]
    if int(lengths.sum()) != len(tokens) or (lengths < 1).any():
        raise ValueError("malformed pack")
    if (starts < 0).any() or (starts > lengths).any():
        raise ValueError("malformed pack")
    return tokens, lengths, starts


def masked_means(
    token_vectors: npt.NDArray[np.float32], lengths: Int32Array, starts: Int32Array
) -> npt.NDArray[np.float32]:
    """Per sequence, the mean of its token vectors from ``start`` on, as sentence-transformers
    pools (a sequence with no token left gets the zero vector: its sum over a count clamped
    to 1e-9). ``token_vectors`` holds every sequence's tokens, one row each, in order."""
    ends = np.cumsum(lengths, dtype=np.int64)
    out = np.empty((len(lengths), token_vectors.shape[1]), dtype=np.float32)
    for row, (end, length, start) in enumerate(zip(ends, lengths, starts, strict=True)):
        first = int(end) - int(length) + int(start)
        count = int(end) - first
        summed = token_vectors[first : int(end)].sum(axis=0, dtype=np.float32)
        out[row] = summed / np.float32(max(count, 1e-9))
    return out
