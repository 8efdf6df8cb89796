"""DistilBERT, RoBERTa and CamemBERT: BERT's encoder under other names, in llama.cpp's ``bert``
layout, as its converter writes ``DistilBertModel`` and ``RobertaModel``.

- ``distilbert`` (``DistilBertModel``, ``DistilBertForMaskedLM`` with the ``distilbert.``
  prefix): config.json names ``dim``, ``n_layers``, ``n_heads``, ``hidden_dim``,
  ``activation``; LayerNorm epsilon 1e-12 (fixed in transformers' code); no token type table
  (llama.cpp adds none: ``token_types`` is optional in its BERT graph; the token type count
  stays 1, which it requires). WordPiece vocabulary, as BERT's.
- ``roberta`` (``RobertaModel``, ``RobertaForMaskedLM``) and ``camembert`` (``CamembertModel``,
  model_type ``camembert``: RoBERTa's layout): BERT's tensors under ``roberta.``, the position
  table without its first ``padding_idx + 1`` rows (as for XLM-RoBERTa), one token type. The
  vocabulary is written in the form of the tokenizer the model has: byte-level BPE as ``gpt2``
  (RoBERTa), Unigram as ``t5`` (CamemBERT's SentencePiece), WordPiece as ``bert``
  (CamemBERT 2.0).

Their ``*ForSequenceClassification`` heads go where llama.cpp's rank pooling reads a head
(``cls``, ``cls.output``): RoBERTa's ``classifier.dense`` / ``classifier.out_proj`` (tanh
between them, what llama.cpp computes), DistilBERT's ``pre_classifier`` / ``classifier``
(a ReLU between them, which llama.cpp's graph cannot apply: the file says so under
``embedd.head_activation`` and only ONNX Runtime serves it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from embedd_server.convert.families import XlmRoberta, _Encoder, _Reranker
from embedd_server.convert.files import config_int
from embedd_server.convert.vocab import (
    HfTokenizer,
    add_bpe_vocab,
    add_unigram_vocab,
    add_wordpiece_vocab,
    bpe_pre_tokenizer,
    load_tokenizer,
)
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import RELU

# transformers' gelu (erf) and its aliases: the GELU llama.cpp's and ONNX Runtime's graphs run.
_GELU = frozenset({"gelu", "gelu_python"})

# --- DistilBERT -------------------------------------------------------------------------------

# DistilBERT's module names -> llama.cpp's (the same tensors as BERT's, renamed).
_DISTILBERT_EMBEDDINGS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
_DISTILBERT_BLOCK = {  # per layer: transformer.layer.N.<module> -> blk.N.<name>
    "attention.q_lin": "attn_q",
    "attention.k_lin": "attn_k",
    "attention.v_lin": "attn_v",
    "attention.out_lin": "attn_output",
    "sa_layer_norm": "attn_output_norm",
    "ffn.lin1": "ffn_up",
    "ffn.lin2": "ffn_down",
    "output_layer_norm": "layer_output_norm",
}


class DistilBert(_Encoder):
    """``DistilBertModel``: BERT's post-LayerNorm encoder without token types."""

    name = "distilbert"
    tokenizer_kind = "WordPiece"
    prefix = "distilbert."
    always_f32 = frozenset({"position_embd.weight"})
    unused: tuple[str, ...] = (
        "embeddings.position_ids",
        "vocab_transform.",  # DistilBertForMaskedLM's head
        "vocab_layer_norm.",
        "vocab_projector.",
        "pre_classifier.",
        "classifier.",
    )
    embedding_tensors = _DISTILBERT_EMBEDDINGS
    block_tensors = _DISTILBERT_BLOCK
    layer_prefix = "transformer.layer"

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        # DistilBertConfig's own names, with its defaults (distilbert-base-uncased's).
        path = config_path
        self.config_path = path
        self.n_vocab = config_int(config, "vocab_size", path, 30522, minimum=1)
        self.n_embd = config_int(config, "dim", path, 768, minimum=1)
        self.n_layer = config_int(config, "n_layers", path, 6, minimum=1)
        self.n_head = config_int(config, "n_heads", path, 12, minimum=1)
        self.n_ff = config_int(config, "hidden_dim", path, 4 * 768, minimum=1)
        self.max_position_embeddings = config_int(
            config, "max_position_embeddings", path, 512, minimum=1
        )
        if (act := config.get("activation", "gelu")) not in _GELU:
            raise ModelImportError(f"{path}: activation {act!r} is not supported (gelu)")
        if self.n_embd % self.n_head:
            raise ModelImportError(f"{path}: dim {self.n_embd} is not a multiple of n_heads")
        # A sinusoidal position table is stored in the weights like a learned one: read as is.
        self.n_token_types = 1  # llama.cpp needs a count; the model adds no type embedding
        self.eps = 1e-12  # transformers' DistilBERT hard-codes it (llama.cpp's converter too)
        self.position_offset = 0

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        writer.add_token_type_count(self.n_token_types)
        add_wordpiece_vocab(writer, tk, model_dir, self.n_vocab)
        return []


class DistilBertClassifier(_Reranker, DistilBert):
    """``DistilBertForSequenceClassification``: the first token -> pre_classifier -> ReLU ->
    classifier."""

    name = "distilbert"
    head = (("pre_classifier", "cls"), ("classifier", "cls.output"))
    head_activation = RELU
    unused = tuple(u for u in DistilBert.unused if u not in ("pre_classifier.", "classifier."))


# --- RoBERTa and CamemBERT --------------------------------------------------------------------


class _RobertaLayout(XlmRoberta):
    """RoBERTa's layout (XLM-RoBERTa's): positions from ``padding_idx + 1``, one token type,
    any of the tokenizers the family's models ship."""

    tokenizer_kinds: tuple[str, ...] = ("BPE", "Unigram", "WordPiece")

    def load_tokenizer(self, model_dir: Path) -> HfTokenizer:
        return load_tokenizer(model_dir, self.name, self.tokenizer_kinds)

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        writer.add_token_type_count(self.n_token_types)
        if tk.kind == "Unigram":
            add_unigram_vocab(writer, tk, model_dir, self.n_vocab)
            return []
        if tk.kind == "WordPiece":
            add_wordpiece_vocab(writer, tk, model_dir, self.n_vocab)
            return []
        notes: list[str] = []
        pre = bpe_pre_tokenizer(tk)
        if pre is None:
            notes.append(
                f"{tk.path}: llama.cpp knows no pre-tokenizer like this one; its own tokenizer "
                "(used only for GGUF files without tokenizer.json) may split text differently"
            )
        add_bpe_vocab(writer, tk, model_dir, self.n_vocab, pre or "default")
        return notes


class Roberta(_RobertaLayout):
    """``RobertaModel`` / ``RobertaForMaskedLM`` (all-roberta-large-v1, stsb-roberta)."""

    name = "roberta"
    tokenizer_kind = "BPE"  # the usual one; tokenizer_kinds lists what is accepted


class RobertaClassifier(_Reranker, Roberta):
    """``RobertaForSequenceClassification``: ``<s>`` -> classifier.dense -> tanh ->
    classifier.out_proj."""

    name = "roberta"
    head = (("classifier.dense", "cls"), ("classifier.out_proj", "cls.output"))


class Camembert(_RobertaLayout):
    """``CamembertModel`` / ``CamembertForMaskedLM``: RoBERTa's layout, SentencePiece."""

    name = "camembert"
    tokenizer_kind = "Unigram"


class CamembertClassifier(_Reranker, Camembert):
    """``CamembertForSequenceClassification``: RoBERTa's classification head."""

    name = "camembert"
    head = (("classifier.dense", "cls"), ("classifier.out_proj", "cls.output"))
