"""The texts every leg of the benchmark sends: STS-B sentences and ~200-token passages.

Sentences are read from ``../shared`` (beside the repository root), never copied into it.
Token ids come from the server's tokenizer for the model (``HuggingFaceTokenizer`` on the
``tokenizer.huggingface.json`` inside the GGUF), special tokens included, as the server
counts them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from embedd_server.core.tokenization import HuggingFaceTokenizer
from embedd_server.model.catalog import read_model_info

REPO = Path(__file__).resolve().parents[1]
STSB_TEST = REPO.parent / "shared" / "data" / "stsbenchmark" / "sts-test.csv"

PASSAGE_TARGET_TOKENS = 200
PASSAGE_LIMIT_TOKENS = 256  # the model's maximum: a passage is never truncated
SPECIAL_TOKENS = 2  # [CLS] ... [SEP]


@dataclass(frozen=True)
class TextSet:
    """Texts with their token ids (special tokens included)."""

    name: str
    texts: list[str]
    token_ids: list[list[int]]

    @property
    def token_counts(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    @property
    def mean_tokens(self) -> float:
        counts = self.token_counts
        return sum(counts) / len(counts) if counts else 0.0

    def head(self, count: int) -> TextSet:
        """The first ``count`` texts (all of them if there are fewer)."""
        return TextSet(self.name, self.texts[:count], self.token_ids[:count])


def read_sentences(path: Path = STSB_TEST) -> list[str]:
    """STS-B's sentences in file order (sentence1 then sentence2 of each pair), non-empty."""
    sentences: list[str] = []
    with path.open(encoding="utf-8", newline="") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            sentences.extend(text.strip() for text in row[5:7] if text.strip())
    return sentences


def build_passages(
    sentences: Sequence[str],
    content_tokens: Sequence[int],
    target: int = PASSAGE_TARGET_TOKENS,
    limit: int = PASSAGE_LIMIT_TOKENS,
    specials: int = SPECIAL_TOKENS,
) -> list[str]:
    """Joins consecutive sentences with a space into passages of about ``target`` tokens.

    ``content_tokens[i]`` is the token count of ``sentences[i]`` without special tokens.
    BERT's pre-tokenizer splits on whitespace, so a joined passage has the sum of its
    sentences' counts plus ``specials``. A passage is emitted once it reaches ``target``; a
    sentence that would push it past ``limit`` starts the next one. A sentence too long on its
    own is skipped, and an unfinished tail shorter than ``target`` is dropped.
    """
    if len(sentences) != len(content_tokens):
        raise ValueError("one token count per sentence")
    passages: list[str] = []
    current: list[str] = []
    tokens = specials
    for sentence, count in zip(sentences, content_tokens, strict=True):
        if count + specials > limit:
            continue
        if tokens + count > limit:
            current, tokens = [], specials  # below target but full: start again
        current.append(sentence)
        tokens += count
        if tokens >= target:
            passages.append(" ".join(current))
            current, tokens = [], specials
    return passages


def model_tokenizer(model_path: Path) -> HuggingFaceTokenizer:
    """The server's tokenizer for the model: its Hugging Face tokenizer, read from the GGUF."""
    tokenizer_json = read_model_info(model_path).hf_tokenizer_json
    if tokenizer_json is None:
        raise RuntimeError(f"{model_path} carries no tokenizer.huggingface.json")
    return HuggingFaceTokenizer(tokenizer_json)


def load_text_sets(
    model_path: Path, stsb_path: Path = STSB_TEST
) -> tuple[TextSet, TextSet, HuggingFaceTokenizer]:
    """(sentences, passages, tokenizer) for the benchmark."""
    tokenizer = model_tokenizer(model_path)
    sentences = read_sentences(stsb_path)
    sentence_ids = tokenizer.encode_batch(sentences)
    passages = build_passages(sentences, [len(ids) - SPECIAL_TOKENS for ids in sentence_ids])
    return (
        TextSet("sentences", sentences, sentence_ids),
        TextSet("passages", passages, tokenizer.encode_batch(passages)),
        tokenizer,
    )
