"""The vector cache on its own: keys, the byte bound, LRU order, a model's rows dropped."""

from __future__ import annotations

import numpy as np
import pytest

from embedd_server.core.vector_cache import (
    ENTRY_OVERHEAD,
    VectorCache,
    model_key,
    row_key,
    row_keys,
)

MODEL = model_key("m.gguf", 1000, 1, 7, None, "onnxruntime")


def row(value: float, width: int = 4) -> np.ndarray:
    return np.full(width, value, dtype=np.float32)


def test_each_thing_the_engine_reads_changes_the_key() -> None:
    base = row_key(MODEL, [101, 7, 102], 0, 3)
    assert row_key(MODEL, [101, 7, 102], 0, 3) == base
    assert row_key(MODEL, [101, 8, 102], 0, 3) != base  # another text or prompt
    assert row_key(MODEL, [101, 7], 0, 2) != base  # cut shorter
    assert row_key(MODEL, [101, 7, 102], 1, 3) != base  # pooling without the prompt
    assert row_key(MODEL, [101, 7, 102], 0, 2) != base  # a pair's second segment
    other_file = model_key("m.gguf", 1000, 2, 7, None, "onnxruntime")  # rewritten: new mtime
    assert row_key(other_file, [101, 7, 102], 0, 3) != base
    other_pooling = model_key("m.gguf", 1000, 1, 7, "cls", "onnxruntime")
    assert row_key(other_pooling, [101, 7, 102], 0, 3) != base


def test_row_keys_read_missing_starts_as_the_engines_do() -> None:
    sequences = [[1, 2, 3], [4, 5]]
    assert row_keys(MODEL, sequences, None, None) == row_keys(MODEL, sequences, [0, 0], [3, 2])


def test_a_hit_returns_the_stored_bytes_read_only() -> None:
    cache = VectorCache(1 << 20)
    stored = row(0.25)
    cache.put(MODEL, b"k", stored)
    stored[:] = 9  # the caller's array may change afterwards
    hit = cache.get(b"k")
    assert hit is not None and hit.tobytes() == row(0.25).tobytes()
    with pytest.raises(ValueError):
        hit[0] = 1.0
    assert cache.get(b"other") is None


def test_bounded_in_bytes_least_recently_used_first_out() -> None:
    entry = row(0).nbytes + ENTRY_OVERHEAD
    cache = VectorCache(3 * entry)
    for name in (b"a", b"b", b"c"):
        cache.put(MODEL, name, row(1))
    assert cache.get(b"a") is not None  # a is now the most recent
    cache.put(MODEL, b"d", row(1))
    assert cache.get(b"b") is None  # the least recently used went
    assert all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    assert cache.size_bytes == 3 * entry == cache.max_bytes and len(cache) == 3


def test_a_row_larger_than_the_cache_and_a_disabled_cache_store_nothing() -> None:
    cache = VectorCache(10)
    cache.put(MODEL, b"k", row(1))
    assert len(cache) == 0 and cache.size_bytes == 0
    off = VectorCache(0)
    assert not off.enabled
    off.put(MODEL, b"k", row(1))
    assert off.get(b"k") is None
    with pytest.raises(ValueError):
        VectorCache(-1)


def test_forget_model_drops_only_its_rows() -> None:
    other = model_key("n.gguf")
    cache = VectorCache(1 << 20)
    cache.put(MODEL, b"a", row(1))
    cache.put(other, b"b", row(2))
    assert cache.forget_model(MODEL) == 1
    assert cache.get(b"a") is None and cache.get(b"b") is not None
    assert cache.size_bytes == row(2).nbytes + ENTRY_OVERHEAD
