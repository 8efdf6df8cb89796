"""The Hugging Face tokenizer rebuilt from a GGUF file's own vocabulary.

A GGUF written by llama.cpp's converter (or pulled by Ollama) has no tokenizer.json, but its
vocabulary and settings are those the converter read from it. For the three tokenizer models
llama.cpp's converter writes for embedding families, the tokenizer.json is rebuilt from them:
WordPiece ("bert", BERT), Unigram ("t5", XLM-RoBERTa) and byte-level BPE ("gpt2", Qwen).

What a file tokenizes with is a fact of the file, read by the core (the request tokenizer) and
by the engines (a vocabulary), so it lives here, beside the rest of what a model file says.
"""

from __future__ import annotations

import base64
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizerImpl

from embedd_server.model.catalog import ModelInfo

EXACT = "exact"
LLAMA_CPP = "llama.cpp"

# llama.cpp's token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# The Split regex of Qwen2/Qwen3's tokenizer.json: llama.cpp's pre-tokenizer "qwen2".
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The normalization (a unicode form) `embedd import` records for a Unigram tokenizer whose
# tokenizer.json normalizes without a sentencepiece charsmap.
UNICODE_NORMALIZATION_KEY = "embedd.tokenizer.unicode_normalization"
_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


@dataclass(frozen=True)
class GgufTokenizer:
    """The tokenizer a GGUF file without tokenizer.json gets: a rebuilt tokenizer.json
    (``json``), or None and why not (``reason``)."""

    json: str | None
    reason: str = ""

    @property
    def kind(self) -> str:
        return EXACT if self.json is not None else LLAMA_CPP


def tokenizer_kind(info: ModelInfo) -> str:
    """``"exact"`` when the model tokenizes as its Hugging Face tokenizer.json does (stored
    in the file, or rebuilt from its vocabulary), ``"llama.cpp"`` when llama.cpp's own
    tokenizer is used. ``info`` is a :class:`~embedd_server.model.catalog.ModelInfo`."""
    if info.hf_tokenizer_json:
        return EXACT
    return gguf_tokenizer(info.path).kind


def gguf_tokenizer(path: Path) -> GgufTokenizer:
    """The tokenizer.json rebuilt from the GGUF file at ``path`` (cached per file version)."""
    try:
        stat = path.stat()
    except OSError as exc:
        return GgufTokenizer(None, f"cannot read {path}: {exc.strerror}")
    return _gguf_tokenizer_cached(path, stat.st_size, int(stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _gguf_tokenizer_cached(path: Path, size: int, mtime_ns: int) -> GgufTokenizer:
    del size, mtime_ns  # part of the cache key only
    try:
        fields = _tokenizer_fields(path)
        built = build_tokenizer_json(fields)
    except Exception as exc:  # any surprise in a foreign file means "not exact"
        return GgufTokenizer(None, f"its vocabulary could not be read ({exc})")
    if isinstance(built, _Unsupported):
        return GgufTokenizer(None, built.reason)
    return GgufTokenizer(built)


def _tokenizer_fields(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader  # heavy import, only where needed

    reader = GGUFReader(path, "r")
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") or key in (
            "general.architecture",
            UNICODE_NORMALIZATION_KEY,
        ):
            fields[key.removeprefix("tokenizer.ggml.")] = field.contents()
    return fields


@dataclass(frozen=True)
class _Unsupported:
    reason: str


def build_tokenizer_json(fields: dict[str, Any]) -> str | _Unsupported:
    """A tokenizer.json from a GGUF's ``tokenizer.ggml.*`` fields (keys without that prefix,
    plus ``general.architecture``), or why that cannot be done exactly."""
    model = str(fields.get("model", ""))
    tokens = fields.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        return _Unsupported("it has no token list")
    types = fields.get("token_type") or [_NORMAL] * len(tokens)
    if model == "bert":
        return _wordpiece(fields, tokens, types)
    if model == "t5":
        return _unigram(fields, tokens, types)
    if model in ("gpt2", "gpt-2"):
        return _byte_level_bpe(fields, tokens, types)
    return _Unsupported(f"its tokenizer model {model!r} is not bert, t5 or gpt2")


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == _CONTROL,
        }
        for i, (token, kind) in enumerate(zip(tokens, types, strict=True))
        if kind in (_CONTROL, _USER_DEFINED)
    ]


def _template(fields: dict[str, Any], tokens: list[str], default_add: bool) -> dict[str, Any]:
    """The post-processor: BOS and EOS around the sequence where the file says they are added
    (``add_bos_token``/``add_eos_token``, else ``default_add``)."""
    first: list[dict[str, Any]] = []
    last: list[dict[str, Any]] = []
    specials: dict[str, Any] = {}
    for key, where in (("bos", first), ("eos", last)):
        token_id = fields.get(f"{key}_token_id")
        if not bool(fields.get(f"add_{key}_token", default_add)) or token_id is None:
            continue
        token = tokens[int(token_id)]
        where.append({"SpecialToken": {"id": token, "type_id": 0}})
        specials[token] = {"id": token, "ids": [int(token_id)], "tokens": [token]}

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        return [{"Sequence": {"id": name, "type_id": type_id}}]

    def typed(parts: list[dict[str, Any]], type_id: int) -> list[dict[str, Any]]:
        return [{"SpecialToken": {**p["SpecialToken"], "type_id": type_id}} for p in parts]

    return {
        "type": "TemplateProcessing",
        "single": [*first, *seq("A", 0), *last],
        "pair": [*first, *seq("A", 0), *last, *seq("B", 1), *typed(last, 1)],
        "special_tokens": specials,
    }


def _tokenizer(
    *,
    model: dict[str, Any],
    added: list[dict[str, Any]],
    normalizer: dict[str, Any] | None,
    pre_tokenizer: dict[str, Any],
    post_processor: dict[str, Any],
    decoder: dict[str, Any] | None,
) -> str:
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": decoder,
        "model": model,
    }
    text = json.dumps(spec, ensure_ascii=False)
    HFTokenizerImpl.from_str(text)  # fails here, not at load, when the spec is wrong
    return text


def _wordpiece(fields: dict[str, Any], tokens: list[str], types: list[int]) -> str | _Unsupported:
    """BERT: llama.cpp's converter writes WordPiece in the "phantom space" form (a word-initial
    piece gets "▁", a "##" continuation loses its "##"); undone here."""
    vocab: dict[str, int] = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind in (_CONTROL, _UNUSED):
            piece = token
        elif token.startswith("\u2581"):
            piece = token[1:]
        else:
            piece = "##" + token
        vocab.setdefault(piece, i)
    unk_id = fields.get("unknown_token_id")
    if unk_id is None:
        return _Unsupported("its BERT vocabulary names no unknown token")
    if "normalizer.lowercase" in fields:
        lowercase = bool(fields["normalizer.lowercase"])
    else:
        # Older converters wrote no flag: a cased vocabulary has upper-case word pieces.
        lowercase = not any(
            kind == _NORMAL and token != token.lower()
            for token, kind in zip(tokens, types, strict=True)
        )
    strip_accents = fields.get("normalizer.strip_accents")
    normalizer = {
        "type": "BertNormalizer",
        "clean_text": True,
        "handle_chinese_chars": True,
        "strip_accents": None if strip_accents is None else bool(strip_accents),
        "lowercase": lowercase,
    }
    model = {
        "type": "WordPiece",
        "unk_token": tokens[int(unk_id)],
        "continuing_subword_prefix": "##",
        "max_input_chars_per_word": 100,
        "vocab": vocab,
    }
    return _tokenizer(
        model=model,
        added=_added_tokens(tokens, types),
        normalizer=normalizer,
        pre_tokenizer={"type": "BertPreTokenizer"},
        post_processor=_template(fields, tokens, default_add=True),
        decoder={"type": "WordPiece", "prefix": "##", "cleanup": True},
    )


def _unigram(fields: dict[str, Any], tokens: list[str], types: list[int]) -> str | _Unsupported:
    """XLM-RoBERTa: sentencepiece's Unigram pieces and scores, its charsmap (when the file
    has one) and whitespace handling, Metaspace."""
    scores = fields.get("scores")
    if not isinstance(scores, list) or len(scores) != len(tokens):
        return _Unsupported("its Unigram vocabulary has no scores")
    normalizers: list[dict[str, Any]] = []
    charsmap = fields.get("precompiled_charsmap")
    if charsmap:
        data = bytes(int(b) & 0xFF for b in charsmap)
        normalizers.append(
            {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(data).decode()}
        )
    elif (form := fields.get(UNICODE_NORMALIZATION_KEY)) in _UNICODE_FORMS:
        normalizers.append({"type": form})
    if bool(fields.get("remove_extra_whitespaces", False)):
        normalizers.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    unk_id = fields.get("unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, kind in enumerate(types) if kind == _UNKNOWN), None)
    prepend = "always" if bool(fields.get("add_space_prefix", True)) else "never"
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": prepend}
    model = {
        "type": "Unigram",
        "unk_id": None if unk_id is None else int(unk_id),
        "vocab": [[t, float(s)] for t, s in zip(tokens, scores, strict=True)],
        "byte_fallback": any(kind == _BYTE for kind in types),
    }
    return _tokenizer(
        model=model,
        added=_added_tokens(tokens, types),
        normalizer={"type": "Sequence", "normalizers": normalizers} if normalizers else None,
        pre_tokenizer={**metaspace, "split": True},
        post_processor=_template(fields, tokens, default_add=True),
        decoder=metaspace,
    )


def _byte_level_bpe(
    fields: dict[str, Any], tokens: list[str], types: list[int]
) -> str | _Unsupported:
    """Qwen (and GPT-2): byte-level BPE tokens and merges, with the file's pre-tokenizer."""
    merges = fields.get("merges")
    if not isinstance(merges, list) or not merges:
        return _Unsupported("its BPE vocabulary has no merges")
    pre = str(fields.get("pre", "default"))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False}
    normalizer: dict[str, Any] | None = None
    if pre == "qwen2":
        normalizer = {"type": "NFC"}  # Qwen2/Qwen3's tokenizer.json
        pre_tokenizer: dict[str, Any] = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {**byte_level, "use_regex": False},
            ],
        }
    elif pre in ("gpt-2", "gpt2"):
        pre_tokenizer = {**byte_level, "use_regex": True}
    else:
        return _Unsupported(f"its BPE pre-tokenizer {pre!r} is not qwen2 or gpt-2")
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": False,
        "ignore_merges": False,
        "vocab": {token: i for i, token in enumerate(tokens)},
        "merges": [str(m).split(" ", 1) for m in merges],
    }
    return _tokenizer(
        model=model,
        added=_added_tokens(tokens, types),
        normalizer=normalizer,
        pre_tokenizer=pre_tokenizer,
        post_processor=_template(fields, tokens, default_add=False),
        decoder={**byte_level, "use_regex": True},
    )
