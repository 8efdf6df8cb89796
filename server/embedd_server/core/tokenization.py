"""Turning texts into the token ids a model's engine is fed.

Where the GGUF carries the model's Hugging Face ``tokenizer.json`` we tokenize with the
``tokenizers`` library: llama.cpp's built-in BERT tokenizer differs from it on some scripts
(a Korean sentence: 14 ids instead of 30, cosine 0.61 against sentence-transformers). GGUF
files without it fall back to llama.cpp's own tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizerImpl

from embedd_server.core.catalog import ModelInfo
from embedd_server.core.errors import InputTooLong, InvalidInput


class Tokenizer(Protocol):
    """What the service needs of a tokenizer."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids with special tokens, not truncated."""

    def encode_truncated(self, text: str, max_tokens: int) -> list[int]:
        """Ids with special tokens, cut to at most max_tokens the way the model was trained."""

    def id_to_token(self, token_id: int) -> str:
        """The token's text, for reading."""


class HuggingFaceTokenizer:
    """The model's own tokenizer.json through the Rust ``tokenizers`` library."""

    def __init__(self, tokenizer_json: str) -> None:
        self._full = HFTokenizerImpl.from_str(tokenizer_json)
        self._full.no_truncation()
        self._full.no_padding()
        self._truncating: dict[int, HFTokenizerImpl] = {}
        self._json = tokenizer_json

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._full.encode_batch(list(texts))
        return [encoding.ids for encoding in encodings]

    def encode_truncated(self, text: str, max_tokens: int) -> list[int]:
        # tokenizers truncates inside the template, so [SEP] stays at the end, exactly as
        # sentence-transformers does.
        tokenizer = self._truncating.get(max_tokens)
        if tokenizer is None:
            tokenizer = HFTokenizerImpl.from_str(self._json)
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_tokens)
            self._truncating[max_tokens] = tokenizer
        return list(tokenizer.encode(text).ids)

    def id_to_token(self, token_id: int) -> str:
        return self._full.id_to_token(token_id) or ""


class LlamaTokenizer:
    """llama.cpp's built-in tokenizer, for GGUF files without tokenizer.json."""

    def __init__(
        self,
        tokenize: Callable[[bytes], list[int]],
        detokenize: Callable[[int], str],
    ) -> None:
        self._tokenize = tokenize
        self._detokenize = detokenize

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._tokenize(text.encode("utf-8", "replace")) for text in texts]

    def encode_truncated(self, text: str, max_tokens: int) -> list[int]:
        ids = self._tokenize(text.encode("utf-8", "replace"))
        if len(ids) <= max_tokens:
            return ids
        # Keep the closing special token (e.g. [SEP]/EOS) as a trained model expects it.
        return [*ids[: max_tokens - 1], ids[-1]]

    def id_to_token(self, token_id: int) -> str:
        return self._detokenize(token_id)


@dataclass(frozen=True)
class Tokenized:
    """The ids fed to the engine and the count billed as usage."""

    sequences: list[list[int]]

    @property
    def token_count(self) -> int:
        return sum(len(ids) for ids in self.sequences)


def too_long(index: int, tokens: int, limit: int) -> InputTooLong:
    """The error for an over-long input when truncation is off."""
    return InputTooLong(
        f"Input {index} has {tokens} tokens, more than the model's limit of {limit}; "
        "shorten it or enable truncation.",
        param=f"input[{index}]",
    )


def tokenize_texts(
    tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int, truncate: bool
) -> Tokenized:
    """Tokenizes texts, truncating over-long ones or failing with InputTooLong."""
    sequences = tokenizer.encode_batch(texts)
    for index, ids in enumerate(sequences):
        if len(ids) <= max_tokens:
            continue
        if not truncate:
            raise too_long(index, len(ids), max_tokens)
        sequences[index] = tokenizer.encode_truncated(texts[index], max_tokens)
    return Tokenized(sequences)


def check_token_ids(
    sequences: Sequence[Sequence[int]], vocab_size: int, max_tokens: int, truncate: bool
) -> Tokenized:
    """Validates pre-tokenized input: ids in the vocabulary, lengths within the limit."""
    checked: list[list[int]] = []
    for index, ids in enumerate(sequences):
        if not ids:
            raise InvalidInput(f"Input {index} has no token ids.", param=f"input[{index}]")
        bad = next((i for i in ids if i < 0 or (vocab_size and i >= vocab_size)), None)
        if bad is not None:
            raise InvalidInput(
                f"Input {index} has token id {bad}, outside the model's vocabulary "
                f"(0..{vocab_size - 1}).",
                param=f"input[{index}]",
            )
        if len(ids) > max_tokens and not truncate:
            raise too_long(index, len(ids), max_tokens)
        checked.append(list(ids[:max_tokens]))
    return Tokenized(checked)


def tokenizer_kind(info: ModelInfo) -> str:
    """The tokenizer kind: "exact" (the model's tokenizer.json) or "llama.cpp" (the fallback)."""
    return "exact" if info.hf_tokenizer_json else "llama.cpp"
