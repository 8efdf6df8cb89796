"""Packs of token sequences: one token array plus lengths, and its int32 wire form.

A pack travels to a worker process as int32 values ``[n, len_1 .. len_n, tokens ...]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import numpy.typing as npt


def flatten(
    sequences: Sequence[Sequence[int]],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """Token sequences as (all tokens in one array, each sequence's length)."""
    if any(not ids for ids in sequences):
        raise ValueError("empty token sequence")
    lengths = np.fromiter(map(len, sequences), dtype=np.int32, count=len(sequences))
    tokens = np.fromiter(chain.from_iterable(sequences), dtype=np.int32, count=lengths.sum())
    return tokens, lengths


def encode_pack(sequences: Sequence[Sequence[int]]) -> bytes:
    """A pack of token sequences as the int32 message ``[n, lengths..., tokens...]``."""
    tokens, lengths = flatten(sequences)
    return np.int32(len(lengths)).tobytes() + lengths.tobytes() + tokens.tobytes()


def decode_pack(message: bytes) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """The (tokens, lengths) of an :func:`encode_pack` message; ValueError when malformed."""
    if len(message) < 4 or len(message) % 4:
        raise ValueError("malformed pack")
    values = np.frombuffer(message, dtype=np.int32)
    count = int(values[0])
    if count < 1 or len(values) < 1 + count:
        raise ValueError("malformed pack")
    lengths = values[1 : 1 + count]
    tokens = values[1 + count :]
    if int(lengths.sum()) != len(tokens) or (lengths < 1).any():
        raise ValueError("malformed pack")
    return tokens, lengths
