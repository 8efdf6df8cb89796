"""Packs of token sequences: one token array, lengths and two per-sequence token offsets, and
their int32 wire form.

A pack travels to a worker process as int32 values
``[n, len_1 .. len_n, pool_1 .. pool_n, type_1 .. type_n, tokens ...]``:

- ``pool_i``, the first token of sequence i that pooling counts: 0, except for a model that
  pools without its prompt's tokens (sentence-transformers' ``include_prompt: false``), where
  it is the prompt's length;
- ``type_i``, the first token of sequence i whose token type is 1: a cross-encoder's pair
  ``[CLS] query [SEP] document [SEP]`` has type 0 up to the first ``[SEP]``, 1 after it; a
  single text has no second segment (``type_i`` = its length).

A negative count (``-n``) asks for every token's last hidden state instead of pooled vectors
(TEI's /embed_all); the rest of the pack is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import NamedTuple

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


class Pack(NamedTuple):
    """A decoded pack (see the module's docstring)."""

    tokens: Int32Array
    lengths: Int32Array
    pooling_starts: Int32Array
    token_type_starts: Int32Array
    token_states: bool = False  # every token's hidden state, not pooled vectors


def starts_array(
    starts: Sequence[int] | None, lengths: Int32Array, default: Int32Array | None = None
) -> Int32Array:
    """``starts`` as an int32 array checked against ``lengths`` (None: ``default``, else
    all zero)."""
    if starts is None:
        return np.zeros(len(lengths), dtype=np.int32) if default is None else default
    array = np.asarray(starts, dtype=np.int32)
    if array.shape != lengths.shape or (array < 0).any() or (array > lengths).any():
        raise ValueError("pooling starts must lie in [0, length] of each sequence")
    return array


def encode_pack(
    sequences: Sequence[Sequence[int]],
    pooling_starts: Sequence[int] | None = None,
    token_type_starts: Sequence[int] | None = None,
    *,
    token_states: bool = False,
) -> bytes:
    """A pack as the int32 message ``[n, lengths..., pool..., type..., tokens...]``
    (pooling starts default to 0, token type starts to each length: one segment; ``-n``
    with ``token_states``)."""
    tokens, lengths = flatten(sequences)
    pool = starts_array(pooling_starts, lengths)
    types = starts_array(token_type_starts, lengths, default=lengths)
    return (
        b"".join(
            (
                np.int32(-len(lengths) if token_states else len(lengths)).tobytes(),
                lengths.tobytes(),
                pool.tobytes(),
                types.tobytes(),
            )
        )
        + tokens.tobytes()
    )


def decode_pack(message: bytes) -> Pack:
    """The :class:`Pack` of an :func:`encode_pack` message; ValueError when malformed."""
    if len(message) < 4 or len(message) % 4:
        raise ValueError("malformed pack")
    values = np.frombuffer(message, dtype=np.int32)
    token_states = int(values[0]) < 0
    count = abs(int(values[0]))
    if count < 1 or len(values) < 1 + 3 * count:
        raise ValueError("malformed pack")
    lengths = values[1 : 1 + count]
    pool = values[1 + count : 1 + 2 * count]
    types = values[1 + 2 * count : 1 + 3 * count]
    tokens = values[1 + 3 * count :]
    if int(lengths.sum()) != len(tokens) or (lengths < 1).any():
        raise ValueError("malformed pack")
    for starts in (pool, types):
        if (starts < 0).any() or (starts > lengths).any():
            raise ValueError("malformed pack")
    return Pack(tokens, lengths, pool, types, token_states)


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
