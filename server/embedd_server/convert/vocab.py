"""The tokenizer part of a GGUF file, from the model's Hugging Face ``tokenizer.json``.

Each family's vocabulary goes in the form llama.cpp's ``convert_hf_to_gguf.py`` writes for it,
so that llama.cpp's own tokenizer works on the file: WordPiece as ``bert`` (the "phantom
space" form), Unigram as ``t5`` (pieces, scores, token types), byte-level BPE as ``gpt2``
(tokens and merges), SentencePiece BPE with byte fallback as ``llama`` (pieces, scores from the
merge order, byte pieces). The whole ``tokenizer.json`` goes in too, under
``tokenizer.huggingface.json``: the server tokenizes with it, exactly as the reference does.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Tokenizer

from embedd_server.convert.files import optional_object, read_object
from embedd_server.errors import ModelImportError
from embedd_server.model.gguf_tokenizer import QWEN2_REGEX, UNICODE_NORMALIZATION_KEY

TokenType = gguf.TokenType


@dataclass(frozen=True)
class HfTokenizer:
    """A model's tokenizer.json: its text (stored whole), parsed JSON and loaded tokenizer."""

    path: Path
    text: str
    json: dict[str, Any]
    tokenizer: Tokenizer

    @property
    def kind(self) -> str:
        return str(self.json.get("model", {}).get("type"))

    def by_id(self) -> dict[int, str]:
        return {i: t for t, i in self.tokenizer.get_vocab(with_added_tokens=True).items()}


def load_tokenizer(model_dir: Path, family: str, kind: str | tuple[str, ...]) -> HfTokenizer:
    """``model_dir/tokenizer.json``, which must be of the ``kind`` (or one of the kinds) the
    family uses."""
    path = model_dir / "tokenizer.json"
    parsed = read_object(path, "the model's Hugging Face tokenizer is needed")
    found = parsed.get("model", {}).get("type")
    kinds = (kind,) if isinstance(kind, str) else kind
    if found not in kinds:
        raise ModelImportError(
            f"{path}: a {family} model's tokenizer must be {' or '.join(kinds)}, "
            f"this one is {found}"
        )
    text = path.read_text(encoding="utf-8")
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:
        raise ModelImportError(f"{path} cannot be loaded by tokenizers: {exc}") from exc
    return HfTokenizer(path, text, parsed, tokenizer)


def template_specials(post: Any) -> tuple[str | None, str | None]:
    """First and last special token a post-processor puts around one sequence."""
    if not isinstance(post, dict):
        return None, None
    if post.get("type") == "Sequence":
        for sub in post.get("processors", []):
            found = template_specials(sub)
            if found != (None, None):
                return found
        return None, None
    if post.get("type") in ("BertProcessing", "RobertaProcessing"):
        return post["cls"][0], post["sep"][0]
    single = post.get("single") or [{}]
    first = single[0].get("SpecialToken", {}).get("id")
    last = single[-1].get("SpecialToken", {}).get("id")
    return first, last


def _check_ids(tk: HfTokenizer, n_vocab: int) -> dict[int, str]:
    by_id = tk.by_id()
    if by_id and max(by_id) >= n_vocab:
        raise ModelImportError(
            f"{tk.path} has token ids up to {max(by_id)}, beyond config.json's vocab_size {n_vocab}"
        )
    return by_id


# --- WordPiece (BERT) ------------------------------------------------------------------------


def _token_content(tc: dict[str, Any], key: str) -> str | None:
    value = tc.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _wordpiece_special_ids(model_dir: Path, tk: HfTokenizer) -> dict[str, int]:
    tc = optional_object(model_dir / "tokenizer_config.json")
    first, last = template_specials(tk.json.get("post_processor"))
    contents = {
        "cls": _token_content(tc, "cls_token") or first or "[CLS]",
        "sep": _token_content(tc, "sep_token") or last or "[SEP]",
        "unk": _token_content(tc, "unk_token") or tk.json["model"].get("unk_token") or "[UNK]",
        "pad": _token_content(tc, "pad_token") or "[PAD]",
        "mask": _token_content(tc, "mask_token") or "[MASK]",
    }
    ids: dict[str, int] = {}
    for kind, content in contents.items():
        token_id = tk.tokenizer.token_to_id(content)
        if token_id is None and kind in ("cls", "sep", "unk"):
            raise ModelImportError(f"{tk.path} has no {kind} token {content!r}")
        if token_id is not None:
            ids[kind] = token_id
    return ids


def _vocab_entries(tk: HfTokenizer, n_vocab: int) -> Iterator[tuple[str, TokenType]]:
    """Each id's token and llama.cpp token type, ids without a token padded as UNUSED."""
    by_id = _check_ids(tk, n_vocab)
    added = tk.tokenizer.get_added_tokens_decoder()
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            yield f"[PAD{i}]", TokenType.UNUSED
        elif i in added:
            yield token, TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
        else:
            yield token, TokenType.NORMAL


def _phantom_space(piece: str) -> str:
    """A WordPiece token as llama.cpp stores it: "##ing" -> "ing", "word" -> "\u2581word"."""
    return piece[2:] if piece.startswith("##") else "\u2581" + piece


def add_wordpiece_vocab(
    writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path, n_vocab: int
) -> None:
    """BERT's vocabulary in llama.cpp's phantom-space form, as its converter writes it."""
    entries = list(_vocab_entries(tk, n_vocab))
    tokens = [
        token if kind == TokenType.CONTROL else _phantom_space(token) for token, kind in entries
    ]
    types = [int(kind) for _, kind in entries]
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("jina-v2-en")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = _wordpiece_special_ids(model_dir, tk)
    writer.add_bos_token_id(ids["cls"])
    writer.add_eos_token_id(ids["sep"])
    writer.add_unk_token_id(ids["unk"])
    writer.add_sep_token_id(ids["sep"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    if "mask" in ids:
        writer.add_mask_token_id(ids["mask"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    _add_bert_normalizer(writer, tk.json.get("normalizer"))


def _add_bert_normalizer(writer: gguf.GGUFWriter, normalizer: Any) -> None:
    """BertNormalizer flags, under the keys llama.cpp reads (as newer converters write them)."""
    if not isinstance(normalizer, dict):
        return
    if normalizer.get("type") == "Sequence":
        for sub in normalizer.get("normalizers", []):
            _add_bert_normalizer(writer, sub)
    elif normalizer.get("type") == "BertNormalizer":
        for flag in ("lowercase", "strip_accents"):
            if isinstance(value := normalizer.get(flag), bool):
                writer.add_bool(f"tokenizer.ggml.normalizer.{flag}", value)


# --- Unigram (XLM-RoBERTa) -------------------------------------------------------------------


def _walk(node: Any, key: str) -> list[dict[str, Any]]:
    """``node`` and its nested parts (Sequence ``key`` lists), flattened."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [part for sub in node.get(key, []) for part in _walk(sub, key)]
    return [node]


def add_unigram_vocab(
    writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path, n_vocab: int
) -> None:
    """A Unigram (sentencepiece) vocabulary as llama.cpp's ``t5`` tokenizer model."""
    _check_ids(tk, n_vocab)
    model = tk.json["model"]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for i, (piece, score) in enumerate(model.get("vocab") or []):
        tokens[i], scores[i], types[i] = piece, float(score), int(TokenType.NORMAL)
    for i, added in tk.tokenizer.get_added_tokens_decoder().items():
        tokens[i] = added.content
        types[i] = int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)
        if scores[i] == -10000.0:
            scores[i] = 0.0
    if isinstance(unk_id := model.get("unk_id"), int) and 0 <= unk_id < n_vocab:
        types[unk_id] = int(TokenType.UNKNOWN)
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    pre = _walk(tk.json.get("pre_tokenizer"), "pretokenizers")
    metaspace = [p for p in pre if p.get("type") == "Metaspace"]
    add_prefix = True
    if metaspace:
        scheme = metaspace[0].get("prepend_scheme")
        add_prefix = scheme != "never" if scheme else bool(metaspace[0].get("add_prefix_space"))
    writer.add_add_space_prefix(add_prefix)
    normalizers = _walk(tk.json.get("normalizer"), "normalizers")
    # sentencepiece's remove_extra_whitespaces, as Hugging Face's converters write it
    collapse = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
    writer.add_remove_extra_whitespaces(
        any(all(n.get(k) == v for k, v in collapse.items()) for n in normalizers)
    )
    charsmaps = [
        n["precompiled_charsmap"]
        for n in normalizers
        if n.get("type") == "Precompiled" and n.get("precompiled_charsmap")
    ]
    for charsmap in charsmaps:
        writer.add_precompiled_charsmap(base64.b64decode(charsmap))
    forms = [n["type"] for n in normalizers if n.get("type") in ("NFC", "NFD", "NFKC", "NFKD")]
    if forms and not charsmaps:
        # A tokenizer trained with `tokenizers` normalizes by a unicode form, not by a
        # sentencepiece charsmap: recorded so that the tokenizer rebuilt from the vocabulary
        # (a copy without tokenizer.huggingface.json) normalizes as it does.
        writer.add_string(UNICODE_NORMALIZATION_KEY, forms[0])
    _add_special_vocab(writer, tk, model_dir, n_vocab, merges=False)


# --- byte-level BPE (Qwen) -------------------------------------------------------------------


def bpe_pre_tokenizer(tk: HfTokenizer) -> str | None:
    """llama.cpp's name for the tokenizer's pre-tokenizer, or None when it has none."""
    parts = _walk(tk.json.get("pre_tokenizer"), "pretokenizers")
    if [p.get("type") for p in parts] == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if [p.get("type") for p in parts] == ["Split", "ByteLevel"]:
        pattern = parts[0].get("pattern") or {}
        if pattern.get("Regex") == QWEN2_REGEX and not parts[1].get("use_regex", True):
            return "qwen2"
    return None


def add_bpe_vocab(
    writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path, n_vocab: int, pre: str
) -> None:
    """A byte-level BPE vocabulary as llama.cpp's ``gpt2`` tokenizer model, with merges."""
    entries = list(_vocab_entries(tk, n_vocab))
    tokens = [token for token, _ in entries]
    types = [int(kind) for _, kind in entries]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    _add_special_vocab(writer, tk, model_dir, n_vocab, merges=True)


def _add_special_vocab(
    writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path, n_vocab: int, *, merges: bool
) -> None:
    """Special token ids, add-BOS/EOS flags and merges, by gguf's own SpecialVocab (what
    llama.cpp's converter uses); the flags follow the template the tokenizer applies."""

    def quiet(record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING

    vocab_log = logging.getLogger("gguf.vocab")
    vocab_log.addFilter(quiet)  # its template guesses warn on ordinary pair templates
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=merges, n_vocab=n_vocab)
    finally:
        vocab_log.removeFilter(quiet)
    if merges and not special.merges:
        raise ModelImportError(f"{tk.path} has no BPE merges")
    first, last = template_specials(tk.json.get("post_processor"))
    special.add_special_token.setdefault("bos", first is not None)
    special.add_special_token.setdefault("eos", last is not None)
    special.special_token_ids.pop("cls", None)  # no GGUF key: llama.cpp uses BOS
    special.add_to_gguf(writer, quiet=True)


# --- SentencePiece BPE with byte fallback (Mistral, Llama 2) ---------------------------------

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def is_sentencepiece_bpe(tk: HfTokenizer) -> bool:
    """Whether a BPE tokenizer.json is SentencePiece's (byte fallback, "\u2581" for spaces), as
    Mistral's and Llama 2's are, rather than byte-level BPE (GPT-2's, Qwen's)."""
    model = tk.json.get("model") or {}
    pre = _walk(tk.json.get("pre_tokenizer"), "pretokenizers")
    return bool(model.get("byte_fallback")) or any(p.get("type") == "Metaspace" for p in pre)


def _merge_scores(model: dict[str, Any]) -> dict[str, float]:
    """Each merged piece's score as SentencePiece's BPE gives it: the earlier its merge, the
    higher (llama.cpp's ``llama`` tokenizer merges the highest-scoring pair first)."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _adds_space_prefix(tk: HfTokenizer) -> bool:
    """Whether the tokenizer puts "\u2581" before the text (a Prepend normalizer, or a
    Metaspace pre-tokenizer that prepends), as SentencePiece's add_dummy_prefix does."""
    normalizers = _walk(tk.json.get("normalizer"), "normalizers")
    if any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581" for n in normalizers):
        return True
    for pre in _walk(tk.json.get("pre_tokenizer"), "pretokenizers"):
        if pre.get("type") == "Metaspace":
            scheme = pre.get("prepend_scheme")
            return scheme != "never" if scheme else bool(pre.get("add_prefix_space", True))
    return False


def add_llama_vocab(
    writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path, n_vocab: int
) -> None:
    """A SentencePiece BPE vocabulary (byte fallback) as llama.cpp's ``llama`` tokenizer
    model: pieces, scores from the merge order, byte pieces ``<0xXX>`` typed BYTE, as
    llama.cpp's converter writes a ``tokenizer.model``."""
    entries = list(_vocab_entries(tk, n_vocab))
    scores = _merge_scores(tk.json["model"])
    unk = tk.json["model"].get("unk_token")
    tokens = [token for token, _ in entries]
    types: list[int] = []
    for token, kind in entries:
        if _BYTE_TOKEN.fullmatch(token):
            # Byte pieces whatever tokenizer.json calls them (Gemma's are special added
            # tokens): llama.cpp's byte fallback needs them typed BYTE.
            types.append(int(TokenType.BYTE))
        elif token == unk:
            types.append(int(TokenType.UNKNOWN))
        else:
            types.append(int(kind))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([scores.get(token, 0.0) for token in tokens])
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(tk))
    _add_special_vocab(writer, tk, model_dir, n_vocab, merges=False)
