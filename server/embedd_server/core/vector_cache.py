"""The vector cache: an engine's raw row for a token sequence, kept so that the same input
costs nothing the next time.

What the engine computes from is exactly what the key holds: the loaded model (its file's
identity, load options and engine: :func:`model_key`), the token ids after the prompt was
prepended and the text cut to the window, and the sequence's pooling and token-type starts.
So a changed prompt, truncation, task, option or model file is a different key, and a hit
returns the bytes a miss computed. Rows are stored before the transport's post-processing
(normalization, dimensions, compact forms), which runs on hits and misses alike.

One cache serves every loaded model and is bounded in bytes (``cache_mb``), least recently
used first out; unloading a model drops its rows. It lives on the event loop (looked up before
a job is queued, filled when its rows arrive), so it takes no lock.

An engine whose row depends on the rest of its batch is not cached: int8 dynamic quantization
scales activations over the whole batch, so the service caches nothing under ``int8``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedd_server.compute.engine import FloatMatrix

KEY_BYTES = 16  # BLAKE2b digest size: 128 bits, no collision among any cache's contents
ENTRY_OVERHEAD = 160  # the dict slot, the key object and the array header, per entry (bytes)


def model_key(*identity: object) -> bytes:
    """A loaded model's part of every key: a digest of what makes its rows what they are
    (its file's path, size, mtime and inode, its load options, its engine)."""
    return hashlib.blake2b(repr(identity).encode(), digest_size=KEY_BYTES).digest()


def row_key(model: bytes, token_ids: Sequence[int], pooling_start: int, type_start: int) -> bytes:
    """The key of one input: the model's key, its token ids and its two starts."""
    digest = hashlib.blake2b(model, digest_size=KEY_BYTES)
    digest.update(np.asarray(token_ids, dtype=np.int32).tobytes())
    digest.update(np.array((pooling_start, type_start), dtype=np.int32).tobytes())
    return digest.digest()


def row_keys(
    model: bytes,
    sequences: Sequence[Sequence[int]],
    pooling_starts: Sequence[int] | None,
    token_type_starts: Sequence[int] | None,
) -> list[bytes]:
    """Each input's key (starts default as the engines read them: pooling from 0, one
    segment)."""
    return [
        row_key(
            model,
            ids,
            0 if pooling_starts is None else pooling_starts[i],
            len(ids) if token_type_starts is None else token_type_starts[i],
        )
        for i, ids in enumerate(sequences)
    ]


@dataclass
class _Entry:
    model: bytes
    row: FloatMatrix  # one row, read-only


class VectorCache:
    """A byte-bounded LRU map from :func:`row_key` to an engine's raw row."""

    def __init__(self, max_bytes: int) -> None:
        """``max_bytes`` 0 disables the cache (every lookup misses, nothing is stored)."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def size_bytes(self) -> int:
        """What the stored rows take, with each entry's overhead."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> FloatMatrix | None:
        """The row stored under ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.row

    def put(self, model: bytes, key: bytes, row: FloatMatrix) -> None:
        """Stores a copy of ``row``, evicting the least recently used rows beyond the bound.
        A row larger than the whole cache is not stored."""
        size = row.nbytes + ENTRY_OVERHEAD
        if size > self.max_bytes or key in self._entries:
            return
        stored = np.array(row, dtype=np.float32, copy=True)
        stored.flags.writeable = False
        self._entries[key] = _Entry(model, stored)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.row.nbytes + ENTRY_OVERHEAD

    def forget_model(self, model: bytes) -> int:
        """Drops every row of one model (unloaded); how many."""
        stale = [key for key, entry in self._entries.items() if entry.model == model]
        for key in stale:
            self._bytes -= self._entries.pop(key).row.nbytes + ENTRY_OVERHEAD
        return len(stale)
