"""The model families ``embedd import`` converts, each to the GGUF layout llama.cpp loads.

- ``bert``: ``BertModel`` (also ``bert.``-prefixed weights), as llama.cpp's converter writes
  ``BertModel``: architecture ``bert``, WordPiece vocabulary.
- ``xlm-roberta``: ``XLMRobertaModel``, as the converter writes ``XLMRobertaModel``:
  architecture ``bert``, the position table without its first ``padding_idx + 1`` rows
  (Hugging Face numbers positions from there; llama.cpp from 0), a Unigram vocabulary
  (``t5``), one token type.
- ``qwen3``: ``Qwen3Model`` / ``Qwen3ForCausalLM``, as the converter writes ``Qwen3Model``:
  architecture ``qwen3`` (causal attention, grouped-query heads, RMSNorm, RoPE), byte-level
  BPE vocabulary (``gpt2``), no output head (an embedding model doesn't use it).

Cross-encoders (rerankers) of the two encoder families, in the layout llama.cpp 0.3.36's BERT
graph scores with pooling ``rank`` (the first token's state -> ``cls`` -> tanh ->
``cls.output``, one output per label of ``bert.classifier.output_labels``):

- ``BertForSequenceClassification`` (ms-marco-MiniLM style): ``cls`` is BERT's pooler
  (``bert.pooler.dense``, followed by tanh in transformers too) and ``cls.output`` its
  ``classifier``. llama.cpp's own converter drops the pooler and maps ``classifier`` alone,
  which skips the pooler's dense + tanh: wrong scores. Such a model has two token types
  (the document is type 1), which llama.cpp's graph cannot give: ONNX Runtime serves it.
- ``XLMRobertaForSequenceClassification`` (bge-reranker style): ``classifier.dense`` ->
  ``cls``, ``classifier.out_proj`` -> ``cls.output``; one token type, so either engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from embedd_server.convert.files import Array, config_float, config_int
from embedd_server.convert.st_settings import FamilyDefault
from embedd_server.convert.vocab import (
    HfTokenizer,
    add_bpe_vocab,
    add_unigram_vocab,
    add_wordpiece_vocab,
    bpe_pre_tokenizer,
    load_tokenizer,
    template_specials,
)
from embedd_server.core.classes import REGRESSION, SINGLE_LABEL
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import (
    CLASSIFY,
    EMBED,
    ENCODER_BLOCK_TENSORS,
    ENCODER_EMBEDDING_TENSORS,
    MULTI_LABEL,
    RERANK,
    TANH,
)
from embedd_server.model.dense import DenseLayer

Shape = tuple[int, ...]
Plan = list[tuple[str, str, Shape]]  # (Hugging Face name, GGUF name, expected shape)


@dataclass(frozen=True)
class NativeDense:
    """Dense modules in an architecture's own layout: tensors (GGUF name, data) and uint32
    keys."""

    tensors: list[tuple[str, Array]]
    keys: dict[str, int]


_GELU = frozenset({"gelu", "gelu_new", "gelu_python", "gelu_pytorch_tanh"})
_ST_DEFAULT = FamilyDefault(
    pooling="mean",
    normalize=False,
    why="what sentence-transformers does with a plain transformers model",
)
_QWEN3_DEFAULT = FamilyDefault(
    pooling="lasttoken",
    normalize=True,
    why="Qwen3-Embedding's documented use: the last token's state, L2-normalized",
)


class Family(ABC):
    """One family's reading of config.json, tokenizer.json and weights, and its GGUF layout."""

    name: str  # the family, as users know it
    arch: str  # GGUF general.architecture
    tokenizer_kind: str  # tokenizer.json's model type
    default: FamilyDefault  # for a directory without modules.json
    always_f32: frozenset[str] = frozenset()  # 2-D tensors kept in f32 whatever the type
    # A cross-encoder's output label names, in id order (empty for an embedding model).
    labels: tuple[str, ...] = ()

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        self.config_path = config_path
        self.n_vocab = config_int(config, "vocab_size", config_path, minimum=1)
        self.n_embd = config_int(config, "hidden_size", config_path, minimum=1)
        self.n_layer = config_int(config, "num_hidden_layers", config_path, minimum=1)
        self.n_head = config_int(config, "num_attention_heads", config_path, minimum=1)
        self.n_ff = config_int(config, "intermediate_size", config_path, minimum=1)
        self.max_position_embeddings = config_int(
            config, "max_position_embeddings", config_path, minimum=1
        )

    @property
    def usable_positions(self) -> int:
        """The context length llama.cpp gets: positions an input can really take."""
        return self.max_position_embeddings

    # A classifier's problem_type (config.json; for one label, a reranker, "regression").
    problem_type = ""
    # The activation between the head's two layers (``cls`` and ``cls.output``).
    head_activation = TANH

    @property
    def reranker(self) -> bool:
        """Whether this model scores with a classifier head instead of embedding a text: a
        cross-encoder (one label, :data:`RERANK`) or a sequence classifier (:data:`CLASSIFY`)."""
        return bool(self.labels)

    @property
    def task(self) -> str:
        """What the model is for: one label is a reranker (as TEI decides), more labels a
        sequence classifier, none an embedding model."""
        if not self.labels:
            return EMBED
        return RERANK if len(self.labels) == 1 else CLASSIFY

    def check_max_seq_length(self, max_seq_length: int) -> None:
        """Refuses a maximum input length the family's llama.cpp graph can't compute exactly
        (e.g. longer than a sliding window it doesn't apply); every length by default."""
        del max_seq_length

    def load_tokenizer(self, model_dir: Path) -> HfTokenizer:
        return load_tokenizer(model_dir, self.name, self.tokenizer_kind)

    @abstractmethod
    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        """The architecture's hyperparameters (everything but the pooling type)."""

    @abstractmethod
    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        """The tokenizer keys llama.cpp reads; returns notes for the user."""

    @abstractmethod
    def tensors(self, loaded: dict[str, Array], src: Path) -> list[tuple[str, Array]]:
        """(GGUF name, data) of every tensor llama.cpp needs, in writing order, checked."""

    def native_dense(self, layers: tuple[DenseLayer, ...]) -> NativeDense | None:
        """sentence-transformers Dense modules as the architecture's own tensors and keys,
        which llama.cpp applies itself; None (the default) where llama.cpp has no such
        tensors: the file then carries them under embedd's keys (model/dense.py)."""
        return None

    def _pick(
        self,
        loaded: dict[str, Array],
        plan: Plan,
        unused: tuple[str, ...],
        src: Path,
    ) -> dict[str, Array]:
        """The tensors of ``plan`` ((HF name, GGUF name, shape)) by GGUF name, after checking
        that each is there with its shape and that nothing unknown is left over."""
        picked: dict[str, Array] = {}
        for hf, gg, shape in plan:
            if hf not in loaded:
                raise ModelImportError(
                    f"tensor {hf!r} is missing from the weights in {src}; the files are "
                    f"incomplete or the model is not a plain {self.name} model"
                )
            if tuple(loaded[hf].shape) != shape:
                raise ModelImportError(
                    f"tensor {hf!r} in {src} has shape {tuple(loaded[hf].shape)}, but "
                    f"config.json implies {shape}; the weights do not match the config"
                )
            picked[gg] = loaded[hf]
        known = {hf for hf, _, _ in plan}
        extra = sorted(n for n in loaded if n not in known and not n.startswith(unused))
        if extra:
            raise ModelImportError(
                f"unexpected tensors in {src} ({', '.join(extra[:3])}); "
                f"only plain {self.name} models can be imported"
            )
        return picked


def _strip(loaded: dict[str, Array], prefixes: tuple[str, ...]) -> dict[str, Array]:
    out: dict[str, Array] = {}
    for name, data in loaded.items():
        stripped = name
        for prefix in prefixes:
            stripped = stripped.removeprefix(prefix)
        out[stripped] = data
    return out


# --- BERT and XLM-RoBERTa: the same encoder ----------------------------------------------------


class _Encoder(Family):
    arch = "bert"
    default = _ST_DEFAULT
    always_f32 = frozenset({"token_types.weight", "position_embd.weight"})
    prefix = ""
    unused: tuple[str, ...] = (
        "pooler.",
        "cls.",
        "embeddings.position_ids",
        "embeddings.token_type_ids",
    )

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        if (act := config.get("hidden_act", "gelu")) not in _GELU:
            raise ModelImportError(f"{config_path}: hidden_act {act!r} is not supported (gelu)")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ModelImportError(
                f"{config_path}: only absolute position embeddings are supported "
                f"(position_embedding_type {config['position_embedding_type']!r})"
            )
        self.n_token_types = config_int(config, "type_vocab_size", config_path, 1, minimum=1)
        self.eps = config_float(config, "layer_norm_eps", config_path, 1e-12)
        self.position_offset = 0

    @property
    def usable_positions(self) -> int:
        return self.max_position_embeddings - self.position_offset

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(self.n_layer)
        writer.add_context_length(self.usable_positions)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_layer_norm_eps(self.eps)
        writer.add_causal_attention(False)

    # A cross-encoder's head, (Hugging Face module after the prefix, GGUF name): the dense
    # layer followed by ``head_activation``, then the output projection (one row per label).
    head: tuple[tuple[str, str], tuple[str, str]] | None = None
    # Hugging Face module -> GGUF name: the embeddings, and each layer's modules under
    # ``{layer_prefix}.N.`` (a family without a token type table leaves it out).
    embedding_tensors: Mapping[str, str] = ENCODER_EMBEDDING_TENSORS
    block_tensors: Mapping[str, str] = ENCODER_BLOCK_TENSORS
    layer_prefix = "encoder.layer"

    def tensors(self, loaded: dict[str, Array], src: Path) -> list[tuple[str, Array]]:
        loaded = {_gamma_beta(k): v for k, v in _strip(loaded, (self.prefix,)).items()}
        d, ff = self.n_embd, self.n_ff
        shapes: dict[str, Shape] = {
            "token_embd": (self.n_vocab, d),
            "token_types": (self.n_token_types, d),
            "position_embd": (self.max_position_embeddings, d),
        }
        plan: Plan = [
            (f"{hf}.weight", f"{gg}.weight", shapes.get(gg, (d,)))
            for hf, gg in self.embedding_tensors.items()
        ]
        norm = next(hf for hf, gg in self.embedding_tensors.items() if gg == "token_embd_norm")
        plan.append((f"{norm}.bias", "token_embd_norm.bias", (d,)))
        block: dict[str, Shape] = {
            "attn_output_norm": (d,),
            "layer_output_norm": (d,),
            "ffn_up": (ff, d),
            "ffn_down": (d, ff),
        }
        for i in range(self.n_layer):
            layer = f"{self.layer_prefix}.{i}"
            for hf, gg in self.block_tensors.items():
                weight = block.get(gg, (d, d))
                bias = (ff,) if gg == "ffn_up" else (d,)
                plan.append((f"{layer}.{hf}.weight", f"blk.{i}.{gg}.weight", weight))
                plan.append((f"{layer}.{hf}.bias", f"blk.{i}.{gg}.bias", bias))
        if self.head is not None:
            (dense, dense_gg), (out, out_gg) = self.head
            n = len(self.labels)
            plan.append((f"{dense}.weight", f"{dense_gg}.weight", (d, d)))
            plan.append((f"{dense}.bias", f"{dense_gg}.bias", (d,)))
            plan.append((f"{out}.weight", f"{out_gg}.weight", (n, d)))
            plan.append((f"{out}.bias", f"{out_gg}.bias", (n,)))
        picked = self._pick(loaded, plan, self.unused, src)
        # Hugging Face numbers positions from padding_idx + 1 (RoBERTa), llama.cpp from 0.
        picked["position_embd.weight"] = picked["position_embd.weight"][self.position_offset :]
        return list(picked.items())


def _gamma_beta(name: str) -> str:
    if name.endswith(".gamma"):
        return name.removesuffix(".gamma") + ".weight"
    if name.endswith(".beta"):
        return name.removesuffix(".beta") + ".bias"
    return name


class Bert(_Encoder):
    name = "bert"
    tokenizer_kind = "WordPiece"
    prefix = "bert."
    unused = (*_Encoder.unused, "classifier.")

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        writer.add_token_type_count(self.n_token_types)
        add_wordpiece_vocab(writer, tk, model_dir, self.n_vocab)
        return []


class _Reranker(_Encoder):
    """A cross-encoder on an encoder family: the encoder plus its classifier head."""

    default = FamilyDefault(
        pooling="rank",
        normalize=False,
        why="a cross-encoder scores a query/document pair with its classifier head",
    )
    # The head is tiny (hidden x hidden + labels x hidden): kept in f32 in every file type,
    # so an f16 file's logits differ from the reference only by the encoder's rounding.
    always_f32 = frozenset({*_Encoder.always_f32, "cls.weight", "cls.output.weight"})

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        self.labels = _label_names(config, config_path)
        self.problem_type = _problem_type(config, config_path, len(self.labels))


_PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)


def _problem_type(config: dict[str, Any], path: Path, labels: int) -> str:
    """config.json's ``problem_type``, or what transformers infers for inference: a
    regression for one label (a reranker's relevance), else a single-label classification."""
    value = config.get("problem_type")
    if value is None:
        return REGRESSION if labels == 1 else SINGLE_LABEL
    if value not in _PROBLEM_TYPES:
        raise ModelImportError(
            f"{path}: problem_type {value!r} is not one of {', '.join(_PROBLEM_TYPES)}"
        )
    return str(value)


def _label_names(config: dict[str, Any], path: Path) -> tuple[str, ...]:
    """config.json's ``id2label`` names in id order (transformers' default: 2 labels)."""
    id2label = config.get("id2label")
    if id2label is None:
        count = config_int(config, "num_labels", path, 2, minimum=1)
        return tuple(f"LABEL_{i}" for i in range(count))
    if not isinstance(id2label, dict) or not id2label:
        raise ModelImportError(f"{path}: id2label must be an object of label ids to names")
    try:
        by_id = {int(key): str(name) for key, name in id2label.items()}
    except ValueError:
        raise ModelImportError(f"{path}: id2label keys must be label ids 0, 1, ...") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise ModelImportError(f"{path}: id2label must number its labels 0 to {len(by_id) - 1}")
    return tuple(by_id[i] for i in range(len(by_id)))


class BertReranker(_Reranker, Bert):
    """``BertForSequenceClassification``: pooler dense + tanh, then the classifier."""

    name = "bert"
    head = (("pooler.dense", "cls"), ("classifier", "cls.output"))


class XlmRoberta(_Encoder):
    name = "xlm-roberta"
    tokenizer_kind = "Unigram"
    prefix = "roberta."
    unused = (*_Encoder.unused, "lm_head.")

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        pad = config_int(config, "pad_token_id", config_path, 1)
        self.position_offset = pad + 1
        if self.usable_positions < 1:
            raise ModelImportError(
                f"{config_path}: max_position_embeddings {self.max_position_embeddings} leaves "
                f"no positions after padding_idx + 1 = {self.position_offset}"
            )

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        writer.add_token_type_count(self.n_token_types)
        add_unigram_vocab(writer, tk, model_dir, self.n_vocab)
        return []


class XlmRobertaReranker(_Reranker, XlmRoberta):
    """``XLMRobertaForSequenceClassification``: first token -> classifier.dense -> tanh ->
    classifier.out_proj."""

    name = "xlm-roberta"
    head = (("classifier.dense", "cls"), ("classifier.out_proj", "cls.output"))


# --- Qwen3 ------------------------------------------------------------------------------------

_QWEN3_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


class Qwen3(Family):
    name = "qwen3"
    arch = "qwen3"
    tokenizer_kind = "BPE"
    default = _QWEN3_DEFAULT

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        path = config_path
        self.n_head_kv = config_int(config, "num_key_value_heads", path, self.n_head, minimum=1)
        self.head_dim = config_int(config, "head_dim", path, self.n_embd // self.n_head, minimum=1)
        self.eps = config_float(config, "rms_norm_eps", path, 1e-6)
        if self.n_head % self.n_head_kv:
            raise ModelImportError(
                f"{path}: num_attention_heads must be a multiple of num_key_value_heads"
            )
        if (act := config.get("hidden_act", "silu")) != "silu":
            raise ModelImportError(f"{path}: hidden_act {act!r} is not supported (silu)")
        if config.get("attention_bias"):
            raise ModelImportError(
                f"{path}: attention_bias true is not supported (llama.cpp's qwen3 has no "
                "output-projection bias)"
            )
        sliding = config.get("use_sliding_window") or any(
            t != "full_attention" for t in config.get("layer_types") or []
        )
        if sliding:
            raise ModelImportError(f"{path}: sliding-window attention is not supported")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ModelImportError(f"{path}: rope_parameters must be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelImportError(
                f"{path}: RoPE type {rope_type!r} is not supported (only default RoPE)"
            )
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        self.rope_theta = config_float({"rope_theta": theta}, "rope_theta", path, 10000.0)

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(self.n_layer)
        writer.add_context_length(self.max_position_embeddings)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_layer_norm_rms_eps(self.eps)

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        notes: list[str] = []
        pre = bpe_pre_tokenizer(tk)
        if pre is None:
            notes.append(
                f"{tk.path}: llama.cpp knows no pre-tokenizer like this one; its own tokenizer "
                "(used only for GGUF files without tokenizer.json) may split text differently"
            )
        add_bpe_vocab(writer, tk, model_dir, self.n_vocab, pre or "default")
        if template_specials(tk.json.get("post_processor"))[1] is None:
            notes.append(
                f"{tk.path} appends no end-of-text token: last-token pooling takes each "
                "text's own last token (as sentence-transformers does with this tokenizer)"
            )
        return notes

    def tensors(self, loaded: dict[str, Array], src: Path) -> list[tuple[str, Array]]:
        loaded = _strip(loaded, ("model.",))
        d, ff, hd = self.n_embd, self.n_ff, self.head_dim
        q, kv = self.n_head * hd, self.n_head_kv * hd
        shapes: dict[str, Shape] = {
            "attn_norm": (d,),
            "attn_q": (q, d),
            "attn_k": (kv, d),
            "attn_v": (kv, d),
            "attn_output": (d, q),
            "attn_q_norm": (hd,),
            "attn_k_norm": (hd,),
            "ffn_norm": (d,),
            "ffn_gate": (ff, d),
            "ffn_up": (ff, d),
            "ffn_down": (d, ff),
        }
        plan: Plan = [("embed_tokens.weight", "token_embd.weight", (self.n_vocab, d))]
        for i in range(self.n_layer):
            for hf, gg in _QWEN3_BLOCK.items():
                plan.append((f"layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", shapes[gg]))
        plan.append(("norm.weight", "output_norm.weight", (d,)))
        # The language-model head is not needed for embeddings (llama.cpp ties to token_embd).
        return list(self._pick(loaded, plan, ("lm_head.",), src).items())
