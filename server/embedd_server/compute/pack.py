"""The :class:`Pack`: a worker batch's token sequences, built once by the core, validated
once, and handed as is to an engine (in a thread, or as its int32 wire form to a process).

A pack is one int32 array ``[n, len_1 .. len_n, pool_1 .. pool_n, type_1 .. type_n, tokens ...]``
whose parts the pack's fields view (no copies):

- ``pool_i``, the first token of sequence i that pooling counts: 0, except for a model that
  pools without its prompt's tokens (sentence-transformers' ``include_prompt: false``), where
  it is the prompt's length;
- ``type_i``, the first token of sequence i whose token type is 1: a cross-encoder's pair
  ``[CLS] query [SEP] document [SEP]`` has type 0 up to the first ``[SEP]``, 1 after it; a
  single text has no second segment (``type_i`` = its length).

A negative count (``-n``) asks for every token's last hidden state instead of pooled vectors
(TEI's /embed_all); the rest of the pack is the same. The array is also what travels to a
worker process (:attr:`Pack.wire`), so sending a pack rebuilds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import numpy.typing as npt

Int32Array = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]


def flatten(sequences: Sequence[Sequence[int]]) -> tuple[Int32Array, Int32Array]:
    """Token sequences as (all tokens in one array, each sequence's length)."""
    if any(len(ids) == 0 for ids in sequences):
        raise ValueError("empty token sequence")
    lengths = np.fromiter(map(len, sequences), dtype=np.int32, count=len(sequences))
    tokens = np.fromiter(chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum()))
    return tokens, lengths


def _starts(starts: Sequence[int] | None, lengths: Int32Array, default: Int32Array) -> Int32Array:
    """``starts`` as int32 values checked against ``lengths`` (None: ``default``)."""
    if starts is None:
        return default
    array = np.asarray(starts, dtype=np.int32)
    if array.shape != lengths.shape or (array < 0).any() or (array > lengths).any():
        raise ValueError("pooling and token type starts must lie in [0, length] of each sequence")
    return array


class Pack:
    """Token sequences with their pooling and token type starts, as one int32 array.

    Made by :meth:`of` (from the core's token lists) or :meth:`from_wire` (in a worker
    process); both validate, so an engine takes a pack as is. ``ends`` (each sequence's end
    in ``tokens``: the cumulative lengths) is computed once here for every engine.
    """

    __slots__ = (
        "ends",
        "lengths",
        "pooling_starts",
        "token_states",
        "token_type_starts",
        "tokens",
        "values",
    )

    def __init__(self, values: Int32Array) -> None:
        """A view of checked ``values`` (use :meth:`of` or :meth:`from_wire`)."""
        count = abs(int(values[0]))
        self.values = values
        self.lengths: Int32Array = values[1 : 1 + count]
        self.pooling_starts: Int32Array = values[1 + count : 1 + 2 * count]
        self.token_type_starts: Int32Array = values[1 + 2 * count : 1 + 3 * count]
        self.tokens: Int32Array = values[1 + 3 * count :]
        self.ends: Int64Array = np.cumsum(self.lengths, dtype=np.int64)
        self.token_states = int(values[0]) < 0  # every token's hidden state, not pooled vectors

    @classmethod
    def of(
        cls,
        sequences: Sequence[Sequence[int]],
        pooling_starts: Sequence[int] | None = None,
        token_type_starts: Sequence[int] | None = None,
        *,
        token_states: bool = False,
    ) -> Pack:
        """The pack of token sequences (pooling starts default to 0, token type starts to
        each length: one segment); ValueError for an empty sequence or a start outside its
        sequence."""
        tokens, lengths = flatten(sequences)
        pool = _starts(pooling_starts, lengths, np.zeros_like(lengths))
        types = _starts(token_type_starts, lengths, lengths)
        count = np.array([-len(lengths) if token_states else len(lengths)], dtype=np.int32)
        return cls(np.concatenate((count, lengths, pool, types, tokens)))

    @classmethod
    def from_wire(cls, message: bytes) -> Pack:
        """The pack of a :attr:`wire` message; ValueError ("malformed pack") when it is not
        one (a worker process checks what it reads)."""
        if len(message) < 4 or len(message) % 4:
            raise ValueError("malformed pack")
        values = np.frombuffer(message, dtype=np.int32)
        count = abs(int(values[0]))
        if count < 1 or len(values) < 1 + 3 * count:
            raise ValueError("malformed pack")
        lengths = values[1 : 1 + count]
        starts = values[1 + count : 1 + 3 * count].reshape(2, count)
        if (
            int(lengths.sum(dtype=np.int64)) != len(values) - 1 - 3 * count
            or (lengths < 1).any()
            or (starts < 0).any()
            or (starts > lengths).any()
        ):
            raise ValueError("malformed pack")
        return cls(values)

    @property
    def wire(self) -> memoryview:
        """The pack's int32 values as bytes to send (a view: nothing is copied)."""
        return self.values.data.cast("B")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def offsets(self) -> Int64Array:
        """Each sequence's first token in ``tokens``."""
        return self.ends - self.lengths

    @property
    def pools_from_starts(self) -> bool:
        """Whether some sequence's pooling leaves out its first tokens."""
        return bool(self.pooling_starts.any())

    @property
    def two_segments(self) -> bool:
        """Whether some sequence has tokens of type 1 (a cross-encoder's pair)."""
        return bool((self.token_type_starts < self.lengths).any())

    def sequences(self) -> list[list[int]]:
        """The token sequences as lists (for fakes and tests; engines read the arrays)."""
        return [part.tolist() for part in np.split(self.tokens, self.ends[:-1])]

    def split_rows(self, token_rows: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        """Per-token rows (a token states answer) cut into each sequence's, in order."""
        return np.split(token_rows, self.ends[:-1])


def masked_means(token_vectors: npt.NDArray[np.float32], pack: Pack) -> npt.NDArray[np.float32]:
    """Per sequence of the pack, the mean of its token vectors from its pooling start on, as
    sentence-transformers pools (a sequence with no token left gets the zero vector: its sum
    over a count clamped to 1e-9). ``token_vectors`` holds the pack's tokens, one row each."""
    out = np.empty((len(pack), token_vectors.shape[1]), dtype=np.float32)
    firsts = pack.offsets + pack.pooling_starts
    for row, (first, end) in enumerate(zip(firsts.tolist(), pack.ends.tolist(), strict=True)):
        summed = token_vectors[first:end].sum(axis=0, dtype=np.float32)
        out[row] = summed / np.float32(max(end - first, 1e-9))
    return out
