"""Long documents in chunks: a text cut into windows of the model's own tokens, each embedded
as an ordinary input, answered per chunk or pooled back into one vector per text.

A chunk is ``size`` of the text's tokens (special tokens not counted: the model adds its own
around each chunk), the next one starting ``size - overlap`` tokens later, the last one ending
with the text. A chunk is the text's characters from its first token's start to its last
token's end, so it can be shown, stored and embedded again on its own: embedding the chunk's
text by itself gives its vector (the tests check exactly that). A text that fits in one chunk
is one chunk: the whole text, as it would be embedded without chunking.

Pooled (one vector per text), a text's vector is the mean of its chunks' raw vectors (the
engine's, before normalization and dimensions) weighted by their token counts, then
post-processed as any vector: for a mean-pooling model that is the mean over the tokens of
the chunks, overlaps counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedd_server.compute.engine import FloatMatrix
from embedd_server.core.tokenization import TokenSpan
from embedd_server.errors import InvalidInput

CHUNKS, MEAN = "chunks", "mean"  # the answers: one vector per chunk, or per text
POOLINGS = (CHUNKS, MEAN)


@dataclass(frozen=True)
class Chunking:
    """How to cut: ``size`` tokens per chunk, ``overlap`` of them shared with the next,
    answered per chunk (``chunks``) or per text (``mean``)."""

    size: int
    overlap: int = 0
    pooling: str = CHUNKS

    def check(self, window: int) -> None:
        """InvalidInput when the values are out of range; ``window`` is how many of the
        text's tokens fit in one input (the model's window less its special tokens and
        prompt)."""
        if self.size < 1:
            raise InvalidInput("chunking.size must be at least 1 token.", param="chunking.size")
        if self.size > window:
            raise InvalidInput(
                f"chunking.size is {self.size} tokens, but this model reads at most {window} "
                "tokens of text per input (its window less its special tokens and prompt); "
                f"give a size of at most {window}.",
                param="chunking.size",
            )
        if not 0 <= self.overlap < self.size:
            raise InvalidInput(
                f"chunking.overlap must be at least 0 and less than chunking.size "
                f"({self.size}); it is {self.overlap}.",
                param="chunking.overlap",
            )
        if self.pooling not in POOLINGS:
            raise InvalidInput(
                f"chunking.pooling {self.pooling!r} is not one of {', '.join(POOLINGS)}.",
                param="chunking.pooling",
            )


@dataclass(frozen=True)
class Chunk:
    """One chunk: the text it comes from (index), its characters ``start`` to ``stop`` in
    that text, and how many of the text's tokens it holds."""

    text_index: int
    start: int
    stop: int
    tokens: int


def chunk_text(
    text_index: int, text: str, spans: Sequence[TokenSpan], chunking: Chunking
) -> list[Chunk]:
    """The chunks of one text, given its tokens (special tokens are skipped)."""
    content = [span for span in spans if not span.special]
    if len(content) <= chunking.size:
        return [Chunk(text_index, 0, len(text), len(content))]
    step = chunking.size - chunking.overlap
    chunks = []
    first = 0
    while True:
        last = min(first + chunking.size, len(content)) - 1
        chunks.append(Chunk(text_index, content[first].start, content[last].stop, last - first + 1))
        if last == len(content) - 1:
            return chunks
        first += step


def chunk_strings(texts: Sequence[str], chunks: Sequence[Chunk]) -> list[str]:
    """Each chunk's characters."""
    return [texts[c.text_index][c.start : c.stop] for c in chunks]


def pool_chunks(rows: FloatMatrix, chunks: Sequence[Chunk], texts: int) -> FloatMatrix:
    """Per text, the mean of its chunks' rows weighted by their token counts (a chunk of no
    tokens, an empty text's only one, weighs 1)."""
    index = np.fromiter((c.text_index for c in chunks), dtype=np.intp, count=len(chunks))
    weights = np.fromiter((max(c.tokens, 1) for c in chunks), dtype=np.float64, count=len(chunks))
    sums = np.zeros((texts, rows.shape[1]), dtype=np.float64)
    np.add.at(sums, index, rows.astype(np.float64) * weights[:, None])
    totals = np.bincount(index, weights=weights, minlength=texts)
    return (sums / totals[:, None]).astype(np.float32)
