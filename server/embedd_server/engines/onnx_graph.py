"""ONNX graphs of BERT sentence encoders, built from the model's own weights.

The graph is built here with the ``onnx`` package: no torch, no exporter, no network. The
weights come from a GGUF file in llama.cpp's BERT layout (``token_embd``, ``blk.N.attn_q``,
...; the catalogue's unit: f32 and f16 read as is, quantized types dequantized by ``gguf``'s
reference code) or from a Hugging Face / sentence-transformers directory
(``model.safetensors``, ``BertModel`` names, an optional ``bert.`` prefix).

The graph computes ``BertModel`` (word + position + token-type embeddings, LayerNorm, N
post-LayerNorm encoder layers with a padding mask and exact (erf) GELU) and pools inside the
graph: the masked mean of the last hidden state, or its first ([CLS]) row. Vectors are NOT
normalized: dimensions and normalization are the service's business. Which ONNX Runtime
optimizations keep them exact was measured (docs/design.md, "Engines").

A cross-encoder or sequence classifier (GGUF pooling type 4, ``rank``) gets its classifier
head instead of a pooling: the first token's state -> dense (``cls``) -> tanh, or the file's
``embedd.head_activation`` (DistilBERT's ReLU) -> dense (``cls.output``), and the graph's output
is the raw logits ``[batch, labels]`` (what ``BertForSequenceClassification``'s pooler +
classifier, the ``RobertaForSequenceClassification`` family's classification head and
``DistilBertForSequenceClassification``'s pre_classifier + classifier compute).

The same layout holds DistilBERT (no token type table: the graph adds no type embedding),
RoBERTa and CamemBERT (positions from ``padding_idx + 1``: the importer drops the table's
first rows, so the graph numbers from 0 as for BERT) whatever their vocabulary: the graph
takes token ids.

A SPLADE sparse encoder (``embedd.task`` ``sparse``: ``BertForMaskedLM`` + ``SpladePooling``)
gets its MLM head (``cls.predictions``: dense -> GELU -> LayerNorm -> decoder) and SPLADE's
pooling: ``log(1 + relu(logits))`` (once more for ``log1p_relu``) over the text's tokens, by max
or sum; the output is ``[batch, vocabulary]`` (mostly zeros).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from embedd_server.model.catalog import (
    ENCODER_BLOCK_TENSORS,
    ENCODER_EMBEDDING_TENSORS,
    HEAD_ACTIVATION_KEY,
    HEAD_ACTIVATIONS,
    SPARSE,
    TANH,
    TASK_KEY,
)
from embedd_server.model.dense import DenseLayer, check_stack, read_dense_gguf
from embedd_server.model.sparse import MLM_HEAD_TENSORS, SPLADE_ACTIVATION_KEY, SPLADE_POOLING_KEY

Pooling = Literal["mean", "cls", "rank", "splade"]
Array = npt.NDArray[Any]

OPSET = 17  # LayerNormalization is a standard op from 17 on
OUTPUT_NAME = "sentence_embedding"
HIDDEN_OUTPUT_NAME = "last_hidden_state"
POOLING_MASK_NAME = "pooling_mask"  # the mean's own mask, where it differs from attention's
# A packed graph's inputs (see build_bert_model's ``packed``): where each token sits in its
# sequence, which sequence it belongs to, and each sequence's pooling weights over the tokens.
POSITION_IDS_NAME = "position_ids"
SEQUENCE_IDS_NAME = "sequence_ids"
POOLING_WEIGHTS_NAME = "pooling_weights"
# Metadata written into the graph, read back by OnnxEngine (survives fusion and quantization).
META_POOLING = "embedd.pooling"
META_MAX_POSITIONS = "embedd.max_position_embeddings"
META_VOCAB_SIZE = "embedd.vocab_size"
META_TOKEN_TYPES = "embedd.type_vocab_size"

# llama.cpp's enum llama_pooling_type
GGUF_POOLING: dict[int, Pooling] = {1: "mean", 2: "cls", 4: "rank"}
# A cross-encoder's head, by the names the graph uses (XLM-RoBERTa's), and its GGUF names.
HEAD_TENSORS = {"classifier.dense": "cls", "classifier.out_proj": "cls.output"}
_GELU = frozenset({"gelu", "gelu_python"})  # exact (erf) GELU; the tanh forms would differ
MLM_DECODER = "cls.predictions.decoder.weight"  # a SPLADE model's MLM decoder (vocab x hidden)


@dataclass(frozen=True)
class BertConfig:
    """The hyper-parameters a BERT graph needs that its weight shapes don't tell."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.num_attention_heads, self.num_hidden_layers) <= 0:
            raise ValueError(f"invalid BERT config {self}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> BertConfig:
        """From a Hugging Face ``config.json`` dict; refuses what the graph doesn't compute."""
        act = config.get("hidden_act", "gelu")
        if act not in _GELU:
            raise ValueError(f"hidden_act {act!r} is not supported (only exact gelu)")
        position = config.get("position_embedding_type", "absolute")
        if position != "absolute":
            raise ValueError(f"position_embedding_type {position!r} is not supported")
        return cls(
            hidden_size=int(config["hidden_size"]),
            num_attention_heads=int(config["num_attention_heads"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        )


class GraphSource(Protocol):
    """A model read from a GGUF file, ready to become an ONNX graph: what OnnxRuntime needs.

    Every family's graph takes int64 ``input_ids`` and ``attention_mask`` ``[batch, seq]``
    (optionally ``token_type_ids`` and ``pooling_mask``) and gives float32
    ``sentence_embedding`` ``[batch, dimensions]``: the pooled, not normalized vector (after
    any sentence-transformers ``Dense`` modules), a classifier's raw logits, or a sparse
    encoder's vocabulary-wide weights.
    """

    @property
    def pooling(self) -> str: ...

    @property
    def token_types(self) -> int: ...

    @property
    def dimensions(self) -> int: ...

    @property
    def max_seq_length(self) -> int: ...

    @property
    def normalize(self) -> bool: ...

    def build(
        self,
        *,
        token_type_input: bool = False,
        hidden_output: bool = False,
        pooling_mask_input: bool = False,
    ) -> onnx.ModelProto: ...


@dataclass(frozen=True)
class ModelSource:
    """Weights (HF names, float32) and what the model's files say about using them."""

    weights: Mapping[str, Array]
    config: BertConfig
    pooling: Pooling
    max_seq_length: int
    normalize: bool
    head_activation: str = TANH  # between a classifier head's two layers
    # A SPLADE model's SpladePooling: "max" or "sum" over the tokens, "relu" or "log1p_relu".
    splade_pooling: str = "max"
    splade_activation: str = "relu"
    dense: tuple[DenseLayer, ...] = ()  # sentence-transformers Dense modules after pooling

    @property
    def labels(self) -> int:
        """A cross-encoder's outputs (rows of its output projection); 0 for an encoder."""
        head = self.weights.get("classifier.out_proj.weight")
        return 0 if head is None else int(head.shape[0])

    @property
    def token_types(self) -> int:
        """Rows of the token type table: 2 for BERT (a pair's document is type 1), 0 for a
        model without one (DistilBERT)."""
        table = self.weights.get(TOKEN_TYPE_TABLE)
        return 0 if table is None else int(table.shape[0])

    @property
    def dimensions(self) -> int:
        """Width of the graph's output: a cross-encoder's labels, a SPLADE model's
        vocabulary, else the hidden size or the last Dense module's width."""
        if self.pooling == "splade":
            return int(self.weights[MLM_DECODER].shape[0])
        if self.pooling == "rank":
            return self.labels
        return dense_width(self.dense, self.config.hidden_size)

    def build(
        self,
        *,
        token_type_input: bool = False,
        hidden_output: bool = False,
        pooling_mask_input: bool = False,
        packed: bool = False,
    ) -> onnx.ModelProto:
        """The ONNX graph of this model (see :func:`build_bert_model`)."""
        return build_bert_model(
            self.weights,
            self.config,
            pooling=self.pooling,
            token_type_input=token_type_input,
            hidden_output=hidden_output,
            pooling_mask_input=pooling_mask_input,
            packed=packed,
            head_activation=self.head_activation,
            splade=(self.splade_pooling, self.splade_activation),
            dense=self.dense,
        )


# --------------------------------------------------------------------------- weights

TOKEN_TYPE_TABLE = "embeddings.token_type_embeddings.weight"  # optional: DistilBERT has none


def canonical_weights(weights: Mapping[str, Array], config: BertConfig) -> dict[str, Array]:
    """The encoder's tensors as contiguous float32, HF names without ``bert.``; shapes checked.

    Old checkpoints' LayerNorm ``gamma``/``beta`` are renamed ``weight``/``bias``. Tensors the
    encoder doesn't use (pooler, MLM head, ``position_ids``) are dropped. A cross-encoder's
    head (``classifier.dense``, ``classifier.out_proj``) is kept when it is there, and so is
    the token type table (a model without one, DistilBERT, adds no type embedding).
    """
    renamed = {_hf_name(name): value for name, value in weights.items()}
    expected = _expected_shapes(renamed, config)
    out: dict[str, Array] = {}
    for name, shape in expected.items():
        if name not in renamed:
            raise ValueError(f"tensor {name!r} is missing; is this a BERT encoder?")
        value = np.ascontiguousarray(renamed[name], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {value.shape}, expected {shape}")
        out[name] = value
    return out


def _hf_name(name: str) -> str:
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        return name.removesuffix(".gamma") + ".weight"
    if name.endswith(".beta"):
        return name.removesuffix(".beta") + ".bias"
    return name


def _expected_shapes(
    weights: Mapping[str, Array], config: BertConfig
) -> dict[str, tuple[int, ...]]:
    d = config.hidden_size
    try:
        vocab = weights["embeddings.word_embeddings.weight"].shape[0]
        positions = weights["embeddings.position_embeddings.weight"].shape[0]
        ff = weights["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"tensor {exc.args[0]!r} is missing; is this a BERT encoder?") from None
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, d),
        "embeddings.position_embeddings.weight": (positions, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
    }
    if TOKEN_TYPE_TABLE in weights:
        shapes[TOKEN_TYPE_TABLE] = (weights[TOKEN_TYPE_TABLE].shape[0], d)
    if "classifier.out_proj.weight" in weights:
        labels = weights["classifier.out_proj.weight"].shape[0]
        shapes["classifier.dense.weight"] = (d, d)
        shapes["classifier.dense.bias"] = (d,)
        shapes["classifier.out_proj.weight"] = (labels, d)
        shapes["classifier.out_proj.bias"] = (labels,)
    if MLM_DECODER in weights:
        shapes[MLM_DECODER] = (vocab, d)
        shapes["cls.predictions.decoder.bias"] = (vocab,)
        shapes["cls.predictions.transform.dense.weight"] = (d, d)
        for name in (
            "transform.dense.bias",
            "transform.LayerNorm.weight",
            "transform.LayerNorm.bias",
        ):
            shapes[f"cls.predictions.{name}"] = (d,)
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for square in ("self.query", "self.key", "self.value", "output.dense"):
            shapes[f"{p}attention.{square}.weight"] = (d, d)
            shapes[f"{p}attention.{square}.bias"] = (d,)
        shapes[f"{p}intermediate.dense.weight"] = (ff, d)
        shapes[f"{p}intermediate.dense.bias"] = (ff,)
        shapes[f"{p}output.dense.weight"] = (d, ff)
        shapes[f"{p}output.dense.bias"] = (d,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{p}{norm}.weight"] = (d,)
            shapes[f"{p}{norm}.bias"] = (d,)
    return shapes


def load_hf_dir(path: str | os.PathLike[str], pooling: Pooling | None = None) -> ModelSource:
    """Reads a Hugging Face / sentence-transformers BERT model directory.

    Weights from ``model.safetensors`` (or the shards of ``model.safetensors.index.json``);
    pooling from the Pooling module's config (classic ``pooling_mode_*`` flags or the newer
    ``pooling_mode``) unless given; the maximum length from ``sentence_bert_config.json`` or
    else ``tokenizer_config.json``, capped by the position table.
    """
    from safetensors.numpy import load_file

    src = Path(path)
    config = BertConfig.from_hf(_read_json(src / "config.json"))
    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    raw: dict[str, Array] = {}
    for shard in shards:
        raw.update(load_file(str(src / shard)))
    weights = canonical_weights(raw, config)
    positions = weights["embeddings.position_embeddings.weight"].shape[0]
    modules = _read_json(src / "modules.json") if (src / "modules.json").is_file() else []
    return ModelSource(
        weights=weights,
        config=config,
        pooling=pooling or _hf_pooling(src, modules),
        max_seq_length=min(_hf_max_length(src) or positions, positions),
        normalize=any(str(m.get("type", "")).endswith("Normalize") for m in modules),
    )


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _hf_pooling(src: Path, modules: list[dict[str, Any]]) -> Pooling:
    folder = next(
        (str(m.get("path")) for m in modules if str(m.get("type", "")).endswith("Pooling")),
        "1_Pooling",
    )
    path = src / folder / "config.json"
    if not path.is_file():
        return "mean"  # what sentence-transformers gives a plain transformers checkpoint
    config = _read_json(path)
    mode = config.get("pooling_mode")
    if config.get("pooling_mode_mean_tokens") or mode == "mean":
        return "mean"
    if config.get("pooling_mode_cls_token") or mode == "cls":
        return "cls"
    raise ValueError(f"{path}: pooling {config} is not supported (only mean and cls)")


def _hf_max_length(src: Path) -> int | None:
    for name, key in (
        ("sentence_bert_config.json", "max_seq_length"),
        ("tokenizer_config.json", "model_max_length"),
    ):
        if (src / name).is_file():
            value = _read_json(src / name).get(key)
            if isinstance(value, int) and 0 < value < 1_000_000:
                return value
    return None


def gguf_tensors(reader: Any) -> dict[str, Array]:
    """Every tensor of a GGUF file as float32 in numpy (row-major) shapes, by GGUF name.

    GGUF lists dimensions fastest-first (``[384, 30522]`` for a ``(30522, 384)`` embedding
    table); f32 and f16 are read as is, quantized types dequantized by ``gguf``'s reference
    code (numpy, slow but exact).
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    tensors: dict[str, Array] = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = np.asarray(tensor.data, dtype=np.float32)
        else:
            data = dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)
        tensors[tensor.name] = data.reshape(shape)
    return tensors


def read_bert_gguf(reader: Any, path: Path) -> ModelSource:
    """Reads a GGUF file in llama.cpp's BERT layout; every tensor is returned as float32.

    GGUF lists dimensions fastest-first (``[384, 30522]`` for a ``(30522, 384)`` embedding
    table); ``GGUFReader`` already gives numpy (row-major) shapes, and quantized tensors are
    dequantized to them. The shapes are checked against the HF layout either way.
    """
    config = BertConfig(
        hidden_size=int(gguf_field(reader, "bert.embedding_length")),
        num_attention_heads=int(gguf_field(reader, "bert.attention.head_count")),
        num_hidden_layers=int(gguf_field(reader, "bert.block_count")),
        layer_norm_eps=float(gguf_field(reader, "bert.attention.layer_norm_epsilon", 1e-12)),
    )
    tensors = gguf_tensors(reader)
    named = _from_gguf_names(tensors, config.num_hidden_layers)
    if gguf_field(reader, TASK_KEY, "") == SPARSE:
        return _splade_source(reader, path, named, config)
    weights = canonical_weights(named, config)
    pooling_type = int(gguf_field(reader, "bert.pooling_type", 1))
    if pooling_type not in GGUF_POOLING:
        raise ValueError(
            f"{path}: pooling type {pooling_type} is not supported (mean, cls or rank)"
        )
    if GGUF_POOLING[pooling_type] == "rank" and "classifier.out_proj.weight" not in weights:
        raise ValueError(f"{path}: a cross-encoder (pooling rank) without its cls.output tensors")
    positions = weights["embeddings.position_embeddings.weight"].shape[0]
    max_len = int(gguf_field(reader, "sentence_transformers.max_seq_length", positions))
    activation = str(gguf_field(reader, HEAD_ACTIVATION_KEY, TANH))
    if activation not in HEAD_ACTIVATIONS:
        raise ValueError(
            f"{path}: head activation {activation!r} is not supported "
            f"({', '.join(HEAD_ACTIVATIONS)})"
        )
    dense = read_dense_gguf(reader)
    check_stack(dense, config.hidden_size)
    return ModelSource(
        weights=weights,
        config=config,
        pooling=GGUF_POOLING[pooling_type],
        max_seq_length=min(max_len, positions),
        normalize=bool(gguf_field(reader, "sentence_transformers.normalize", False)),
        head_activation=activation,
        dense=dense,
    )


def _splade_source(
    reader: Any, path: Path, named: dict[str, Array], config: BertConfig
) -> ModelSource:
    """A SPLADE model's GGUF: the encoder, its MLM head (a tied decoder is the word
    embeddings) and its SpladePooling settings."""
    named.setdefault(MLM_DECODER, named["embeddings.word_embeddings.weight"])
    if "cls.predictions.decoder.bias" not in named:
        raise ValueError(f"{path}: a sparse encoder without its MLM head (mlm.* tensors)")
    weights = canonical_weights(named, config)
    positions = weights["embeddings.position_embeddings.weight"].shape[0]
    max_len = int(gguf_field(reader, "sentence_transformers.max_seq_length", positions))
    return ModelSource(
        weights=weights,
        config=config,
        pooling="splade",
        max_seq_length=min(max_len, positions),
        normalize=False,
        splade_pooling=str(gguf_field(reader, SPLADE_POOLING_KEY, "max")),
        splade_activation=str(gguf_field(reader, SPLADE_ACTIVATION_KEY, "relu")),
    )


def load_bert_gguf(path: str | os.PathLike[str]) -> ModelSource:
    """A GGUF file in llama.cpp's BERT layout, with its weights and config in HF terms."""
    from gguf import GGUFReader

    return read_bert_gguf(GGUFReader(str(path)), Path(path))


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """A GGUF metadata value; ``default`` when absent (None: the key is required)."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF key {key!r} is missing")
        return default
    return field.contents()


def _from_gguf_names(tensors: Mapping[str, Array], n_layers: int) -> dict[str, Array]:
    names = {
        f"{gg}.{part}": f"{hf}.{part}"
        for hf, gg in ENCODER_EMBEDDING_TENSORS.items()
        for part in ("weight", "bias")
    }
    for hf, gg in (*HEAD_TENSORS.items(), *MLM_HEAD_TENSORS.items()):
        for part in ("weight", "bias"):
            names[f"{gg}.{part}"] = f"{hf}.{part}"
    for i in range(n_layers):
        for hf, gg in ENCODER_BLOCK_TENSORS.items():
            for part in ("weight", "bias"):
                names[f"blk.{i}.{gg}.{part}"] = f"encoder.layer.{i}.{hf}.{part}"
    return {names[name]: value for name, value in tensors.items() if name in names}


# --------------------------------------------------------------------------- graph


class Graph:
    """Collects nodes and initializers; every value gets a fresh, readable name. Every
    family's graph builder uses it."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._count = 0

    def const(self, name: str, value: Array) -> str:
        """An initializer; a name used before keeps its first value (shared scalars)."""
        if name not in self._names:
            self._names.add(name)
            self.initializers.append(numpy_helper.from_array(np.asarray(value, order="C"), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], name: str, **attrs: Any) -> str:
        """A node ``op_type(inputs)`` with attributes ``attrs``; returns its output's name."""
        self._count += 1
        out = f"{name}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def linear(self, x: str, weights: Mapping[str, Array], prefix: str) -> str:
        """``x @ W.T + b`` as MatMul + Add (the pattern ORT's BERT fusions look for)."""
        w = self.const(f"{prefix}.weight_t", weights[f"{prefix}.weight"].T)
        b = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("Add", [self.op("MatMul", [x, w], prefix), b], prefix)

    def layer_norm(self, x: str, weights: Mapping[str, Array], prefix: str, eps: float) -> str:
        """LayerNormalization over the last axis with ``prefix``'s weight and bias."""
        gamma = self.const(f"{prefix}.weight", weights[f"{prefix}.weight"])
        beta = self.const(f"{prefix}.bias", weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", [x, gamma, beta], prefix, axis=-1, epsilon=eps)


def build_bert_model(
    weights: Mapping[str, Array],
    config: BertConfig,
    *,
    pooling: Pooling = "mean",
    token_type_input: bool = False,
    hidden_output: bool = False,
    pooling_mask_input: bool = False,
    head_activation: str = TANH,
    splade: tuple[str, str] = ("max", "relu"),
    dense: Sequence[DenseLayer] = (),
    packed: bool = False,
) -> onnx.ModelProto:
    """The ONNX graph (opset 17) of ``BertModel`` followed by pooling (and ``dense``, the
    sentence-transformers Dense modules, on the pooled vector).

    Inputs: ``input_ids`` and ``attention_mask``, int64 ``[batch, seq]``, and with
    ``token_type_input`` also ``token_type_ids`` (otherwise every token has type 0, as
    sentence-transformers gives a bi-encoder). Output ``sentence_embedding`` float32
    ``[batch, hidden]``: the masked mean (``"mean"``) or the first row (``"cls"``) of the
    last hidden state, not normalized; with ``hidden_output`` also ``last_hidden_state``.
    ``"rank"`` (a cross-encoder, whose weights hold ``classifier.dense`` and
    ``classifier.out_proj``): the output is instead the raw logits ``[batch, labels]`` of
    the first row -> dense -> ``head_activation`` (tanh, or DistilBERT's relu) -> dense.
    Weights without a token type table (DistilBERT) add no type embedding.
    With ``pooling_mask_input`` the mean is masked by another input, ``pooling_mask``
    (int64 ``[batch, seq]``): sentence-transformers' ``include_prompt: false`` attends to the
    prompt's tokens but leaves them out of the mean.
    ``"splade"`` (weights with ``cls.predictions``): the MLM head's logits pooled as
    ``SpladePooling`` with ``splade`` = (pooling strategy, activation) pools them; the output
    is ``[batch, vocabulary]``.
    ``packed`` (not for SPLADE): a row may hold several sequences end to end, so that short
    ones share a row instead of each being padded to the longest: inputs ``input_ids``,
    ``position_ids`` (each token's place in its sequence), ``sequence_ids`` (which sequence
    it belongs to; padding -1), optionally ``token_type_ids``, int64 ``[rows, width]``, and
    ``pooling_weights`` float32 ``[sequences, rows * width]``. A token attends to its own
    sequence's tokens only (the others get float32's minimum, as padding does); the pooled
    rows are ``pooling_weights @ hidden`` over the flattened tokens (a mean's weights are 1/n
    over the pooled tokens, cls's and a cross-encoder's a 1 at each sequence's first
    token), and ``last_hidden_state`` is ``[rows * width, hidden]``.
    The operations follow transformers' eager ``BertModel`` in order (the additions of the
    embeddings, division of the scores by sqrt(head size), mask bias of float32's minimum,
    erf GELU), so float32 results agree to rounding.
    """
    if pooling not in ("mean", "cls", "rank", "splade"):
        raise ValueError(f"pooling {pooling!r} is not supported (mean, cls, rank or splade)")
    w = canonical_weights(weights, config)
    _check_heads(w, pooling, head_activation, token_type_input=token_type_input, packed=packed)
    g = Graph()
    if packed:
        inputs = packed_inputs(token_type_input=token_type_input)
        pooling_mask = POOLING_WEIGHTS_NAME
        bias = sequence_mask_bias(g)
    else:
        inputs, pooling_mask = graph_inputs(
            token_type_input=token_type_input,
            pooling_mask_input=pooling_mask_input and pooling == "mean",
        )
        bias = attention_mask_bias(g)
    hidden = _embeddings(g, w, config, token_type_input, packed=packed)
    for i in range(config.num_hidden_layers):
        hidden = encoder_layer(g, w, config, hidden, p=f"encoder.layer.{i}", mask_bias=bias)
    d = config.hidden_size
    if packed:  # [rows, width, hidden] -> [rows * width, hidden]: pooled by the weights
        flat = g.const("flat_shape", np.array([-1, config.hidden_size], np.int64))
        hidden = g.op("Reshape", [hidden, flat], "packed")
        pooled = g.op("MatMul", [POOLING_WEIGHTS_NAME, hidden], "pool")
        if pooling == "rank":  # the weights pick each sequence's first token
            pooled = _classifier_head(g, w, pooled, head_activation)
    elif pooling == "rank":
        pooled = _classify(g, w, hidden, head_activation)
    elif pooling == "splade":
        pooled = _splade(g, _mlm_logits(g, w, hidden, config.layer_norm_eps), *splade)
    else:
        pooled = pool_hidden(g, hidden, pooling, pooling_mask)
    if pooling in ("rank", "splade"):
        width = w["classifier.out_proj.weight" if pooling == "rank" else MLM_DECODER].shape[0]
    else:
        pooled, width = append_dense(g, pooled, dense), dense_width(dense, d)
    return finish_model(
        g,
        "bert_encoder",
        inputs,
        (pooled, width),
        hidden=(hidden, d) if hidden_output else None,
        packed=packed,
        meta={
            META_POOLING: pooling,
            META_MAX_POSITIONS: str(w["embeddings.position_embeddings.weight"].shape[0]),
            META_VOCAB_SIZE: str(w["embeddings.word_embeddings.weight"].shape[0]),
            META_TOKEN_TYPES: str(w[TOKEN_TYPE_TABLE].shape[0] if TOKEN_TYPE_TABLE in w else 0),
        },
    )


def _check_heads(
    w: Mapping[str, Array],
    pooling: str,
    head_activation: str,
    *,
    token_type_input: bool,
    packed: bool,
) -> None:
    """ValueError when the weights lack what ``pooling`` and the inputs asked for need."""
    if pooling == "rank" and "classifier.out_proj.weight" not in w:
        raise ValueError("pooling rank needs a cross-encoder's classifier head")
    if head_activation not in HEAD_ACTIVATIONS:
        raise ValueError(f"head activation {head_activation!r} is not supported")
    if token_type_input and TOKEN_TYPE_TABLE not in w:
        raise ValueError("token_type_ids need a token type table; this model has none")
    if pooling == "splade" and MLM_DECODER not in w:
        raise ValueError("pooling splade needs a masked language model's head (cls.predictions)")
    if packed and pooling == "splade":
        raise ValueError("a SPLADE graph pools its logits per sequence: it is not packed")


_BATCH_SEQ = ["batch", "sequence"]


def graph_inputs(
    *, token_type_input: bool, pooling_mask_input: bool
) -> tuple[list[onnx.ValueInfoProto], str]:
    """An encoder graph's inputs (int64 ``[batch, seq]``: ``input_ids``, ``attention_mask``,
    optionally ``token_type_ids`` and ``pooling_mask``) and the name of the mean's mask."""
    names = ["input_ids", "attention_mask"]
    if token_type_input:
        names.append("token_type_ids")
    if pooling_mask_input:
        names.append(POOLING_MASK_NAME)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, _BATCH_SEQ) for n in names]
    return inputs, POOLING_MASK_NAME if pooling_mask_input else "attention_mask"


def packed_inputs(*, token_type_input: bool) -> list[onnx.ValueInfoProto]:
    """A packed graph's inputs: int64 ``[rows, width]`` ids, positions, sequence ids (and
    token types), float32 ``[sequences, rows * width]`` pooling weights."""
    names = ["input_ids", POSITION_IDS_NAME, SEQUENCE_IDS_NAME]
    if token_type_input:
        names.append("token_type_ids")
    shape = ["rows", "width"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, shape) for n in names]
    weights = helper.make_tensor_value_info(
        POOLING_WEIGHTS_NAME, TensorProto.FLOAT, ["sequences", "slots"]
    )
    return [*inputs, weights]


def finish_model(
    g: Graph,
    name: str,
    inputs: list[onnx.ValueInfoProto],
    output: tuple[str, int],
    *,
    hidden: tuple[str, int] | None,
    meta: Mapping[str, str],
    packed: bool = False,
) -> onnx.ModelProto:
    """The checked opset-17 model of ``g``: ``output`` (value, width) becomes
    ``sentence_embedding`` ``[batch, width]``, ``hidden`` (value, width), when given,
    ``last_hidden_state`` (``[slots, width]`` in a ``packed`` graph); ``meta`` goes into
    the model's properties for OnnxEngine."""
    pooled, width = output
    g.nodes.append(helper.make_node("Identity", [pooled], [OUTPUT_NAME], name=OUTPUT_NAME))
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", width])]
    if hidden is not None:
        g.nodes.append(helper.make_node("Identity", [hidden[0]], [HIDDEN_OUTPUT_NAME]))
        shape: list[str | int] = ["slots", hidden[1]] if packed else [*_BATCH_SEQ, hidden[1]]
        outputs.append(helper.make_tensor_value_info(HIDDEN_OUTPUT_NAME, TensorProto.FLOAT, shape))
    graph = helper.make_graph(g.nodes, name, inputs, outputs, g.initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="embedd"
    )
    model.ir_version = 8  # opset 17's IR; older runtimes refuse newer IR versions
    helper.set_model_props(model, dict(meta))
    onnx.checker.check_model(model)
    return model


def _embeddings(
    g: Graph, w: Mapping[str, Array], config: BertConfig, token_types: bool, *, packed: bool
) -> str:
    """word + token type, + position (transformers' order), then LayerNorm; without a token
    type table (DistilBERT) word + position. A packed graph's positions are its input's."""
    p = "embeddings"
    words = g.op("Gather", [g.const(f"{p}.word", w[f"{p}.word_embeddings.weight"]), "input_ids"], p)
    types_table = w.get(TOKEN_TYPE_TABLE)
    if types_table is None:
        types = None
    elif token_types:
        types = g.op("Gather", [g.const(f"{p}.token_type", types_table), "token_type_ids"], p)
    else:
        types = g.const(f"{p}.token_type_0", types_table[0])
    positions_table = g.const(f"{p}.position", w[f"{p}.position_embeddings.weight"])
    if packed:
        positions = g.op("Gather", [positions_table, POSITION_IDS_NAME], p)
    else:
        # The first `seq` rows of the position table, as a Slice: Range + Gather would compute
        # the same, but ORT 1.32's GatherToSliceFusion rewrites that into a Slice it then fails
        # to run ("Starts must be a 1-D array") at the extended and all optimization levels.
        seq_len = g.op("Shape", ["input_ids"], p, start=1, end=2)  # [1]
        zero = g.const("zero_1d", np.array([0], np.int64))
        positions = g.op("Slice", [positions_table, zero, seq_len, zero], p)  # axes [0]
    typed = words if types is None else g.op("Add", [words, types], p)
    summed = g.op("Add", [typed, positions], p)
    return g.layer_norm(summed, w, f"{p}.LayerNorm", config.layer_norm_eps)


def attention_mask_bias(g: Graph) -> str:
    """``(1 - mask) * float32.min`` as ``[batch, 1, 1, seq]``, added to attention scores.

    Two Unsqueezes, then Cast, Sub, Mul: the exact pattern ORT's Attention fusion matches.
    """
    mask = "attention_mask"
    for axis in (1, 2):
        axes = g.const(f"axes_{axis}", np.array([axis], np.int64))
        mask = g.op("Unsqueeze", [mask, axes], "mask")
    mask = g.op("Cast", [mask], "mask", to=TensorProto.FLOAT)
    inverted = g.op("Sub", [g.const("f_one", np.array(1.0, np.float32)), mask], "mask")
    minimum = g.const("f_min", np.array(np.finfo(np.float32).min, np.float32))
    return g.op("Mul", [inverted, minimum], "mask")


def sequence_mask_bias(g: Graph) -> str:
    """A packed batch's ``[rows, 1, width, width]`` bias: 0 where two tokens of a row belong
    to the same sequence, float32's minimum elsewhere (what padding gets in a padded batch)."""
    ids = SEQUENCE_IDS_NAME
    rows = g.op("Unsqueeze", [ids, g.const("axes_2", np.array([2], np.int64))], "mask")
    columns = g.op("Unsqueeze", [ids, g.const("axes_1", np.array([1], np.int64))], "mask")
    same = g.op("Equal", [rows, columns], "mask")  # [rows, width, width]
    zero = g.const("f_zero", np.array(0.0, np.float32))
    minimum = g.const("f_min", np.array(np.finfo(np.float32).min, np.float32))
    bias = g.op("Where", [same, zero, minimum], "mask")
    return g.op("Unsqueeze", [bias, g.const("axes_1", np.array([1], np.int64))], "mask")


def encoder_layer(
    g: Graph,
    w: Mapping[str, Array],
    config: BertConfig,
    x: str,
    *,
    p: str,
    mask_bias: str,
    position_bias: str | None = None,
) -> str:
    """One post-LayerNorm encoder layer: self-attention, then the GELU feed-forward.

    Weights by BERT's Hugging Face names under ``p``. ``position_bias`` (MPNet's relative
    position bias, ``[1 or batch, heads, seq, seq]``) is added to the scaled scores before the
    mask, as transformers' ``MPNetSelfAttention`` adds it."""
    heads, head_size = config.num_attention_heads, config.head_size
    split = g.const(f"{p}.split_shape", np.array([0, 0, heads, head_size], np.int64))

    def heads_of(name: str, perm: list[int]) -> str:
        projected = g.linear(x, w, f"{p}.attention.self.{name}")
        return g.op("Transpose", [g.op("Reshape", [projected, split], p)], p, perm=perm)

    q = heads_of("query", [0, 2, 1, 3])  # [batch, heads, seq, head_size]
    k = heads_of("key", [0, 2, 3, 1])  # [batch, heads, head_size, seq]
    v = heads_of("value", [0, 2, 1, 3])
    scale = g.const(f"{p}.scale", np.array(math.sqrt(head_size), np.float32))
    scores = g.op("Div", [g.op("MatMul", [q, k], p), scale], p)
    if position_bias is not None:
        scores = g.op("Add", [scores, position_bias], p)
    probs = g.op("Softmax", [g.op("Add", [scores, mask_bias], p)], p, axis=-1)
    context = g.op("Transpose", [g.op("MatMul", [probs, v], p)], p, perm=[0, 2, 1, 3])
    merge = g.const(f"{p}.merge_shape", np.array([0, 0, config.hidden_size], np.int64))
    context = g.op("Reshape", [context, merge], p)
    attended = g.linear(context, w, f"{p}.attention.output.dense")
    eps = config.layer_norm_eps
    h = g.layer_norm(g.op("Add", [attended, x], p), w, f"{p}.attention.output.LayerNorm", eps)
    up = g.linear(h, w, f"{p}.intermediate.dense")
    down = g.linear(_gelu(g, up, p), w, f"{p}.output.dense")
    return g.layer_norm(g.op("Add", [down, h], p), w, f"{p}.output.LayerNorm", eps)


def _gelu(g: Graph, x: str, p: str) -> str:
    """Exact GELU, x * 0.5 * (1 + erf(x / sqrt 2)), in the form ORT's Gelu fusion recognises."""
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2), np.float32))
    one = g.const("f_one", np.array(1.0, np.float32))
    half = g.const("half", np.array(0.5, np.float32))
    erf = g.op("Erf", [g.op("Div", [x, sqrt2], p)], p)
    return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, one], p)], p), half], p)


def _mlm_logits(g: Graph, w: Mapping[str, Array], hidden: str, eps: float) -> str:
    """``BertOnlyMLMHead``: dense -> GELU -> LayerNorm -> decoder, ``[batch, seq, vocab]``."""
    p = "cls.predictions"
    dense = g.linear(hidden, w, f"{p}.transform.dense")
    transformed = g.layer_norm(_gelu(g, dense, p), w, f"{p}.transform.LayerNorm", eps)
    return g.linear(transformed, w, f"{p}.decoder")


def _log1p(g: Graph, x: str) -> str:
    """log(1 + x) to float32's precision for x >= 0, also where 1 + x rounds to 1 (ONNX has no
    Log1p; log(1 + x) would turn a weight below 6e-8 into 0): log(u) * x / (u - 1) with
    u = 1 + x, and x itself where u - 1 is 0 (Goldberg's formula)."""
    one = g.const("f_one", np.array(1.0, np.float32))
    u = g.op("Add", [x, one], "log1p")
    d = g.op("Sub", [u, one], "log1p")
    ratio = g.op("Div", [g.op("Mul", [g.op("Log", [u], "log1p"), x], "log1p"), d], "log1p")
    zero = g.op("Equal", [d, g.const("f_zero", np.array(0.0, np.float32))], "log1p")
    return g.op("Where", [zero, x, ratio], "log1p")


def _splade(g: Graph, logits: str, strategy: str, activation: str) -> str:
    """SpladePooling: act(relu(logits * mask)) pooled over the tokens, act = log1p (twice for
    ``log1p_relu``). For max the activation is monotonic, so it is applied to the maximum
    (the same numbers, on [batch, vocab] instead of [batch, seq, vocab])."""
    if strategy not in ("max", "sum") or activation not in ("relu", "log1p_relu"):
        raise ValueError(f"SPLADE pooling {strategy!r} with {activation!r} is not supported")
    axes = g.const("axes_last", np.array([-1], np.int64))
    mask = g.op(
        "Cast",
        [g.op("Unsqueeze", ["attention_mask", axes], "splade")],
        "splade",
        to=TensorProto.FLOAT,
    )
    masked = g.op("Mul", [logits, mask], "splade")  # padding's logits become 0, as the reference

    def act(x: str) -> str:
        weights = _log1p(g, g.op("Relu", [x], "splade"))
        return _log1p(g, weights) if activation == "log1p_relu" else weights

    if strategy == "max":
        # Opset 17's ReduceMax takes its axes as an attribute (ReduceSum as an input).
        return act(g.op("ReduceMax", [masked], "splade", axes=[1], keepdims=0))
    seq_axis = g.const("axes_seq", np.array([1], np.int64))
    return g.op("ReduceSum", [act(masked), seq_axis], "splade", keepdims=0)


def _classify(g: Graph, w: Mapping[str, Array], hidden: str, activation: str) -> str:
    """A cross-encoder's head on the first token: dense -> tanh (or relu) -> dense, the raw
    logits."""
    first = g.op("Gather", [hidden, g.const("zero", np.array(0, np.int64))], "head", axis=1)
    return _classifier_head(g, w, first, activation)


def _classifier_head(g: Graph, w: Mapping[str, Array], first: str, activation: str) -> str:
    """dense -> tanh (or relu) -> dense on the first tokens' rows ``[batch, hidden]``."""
    op = {"tanh": "Tanh", "relu": "Relu"}[activation]
    dense = g.op(op, [g.linear(first, w, "classifier.dense")], "head")
    return g.linear(dense, w, "classifier.out_proj")


def pool_hidden(g: Graph, hidden: str, pooling: Pooling, mask_input: str) -> str:
    """The pooled ``[batch, hidden]`` vector: the first row (``"cls"``) or the masked mean of
    ``hidden`` over ``mask_input``'s tokens (int64 ``[batch, seq]``)."""
    if pooling == "cls":
        return g.op("Gather", [hidden, g.const("zero", np.array(0, np.int64))], "pool", axis=1)
    # sentence-transformers: sum(h * mask) / clamp(sum(mask), min=1e-9)
    axes = g.const("axes_last", np.array([-1], np.int64))
    mask = g.op(
        "Cast", [g.op("Unsqueeze", [mask_input, axes], "pool")], "pool", to=TensorProto.FLOAT
    )
    seq_axis = g.const("axes_seq", np.array([1], np.int64))
    summed = g.op("ReduceSum", [g.op("Mul", [hidden, mask], "pool"), seq_axis], "pool", keepdims=0)
    counts = g.op("ReduceSum", [mask, seq_axis], "pool", keepdims=0)
    counts = g.op("Max", [counts, g.const("tiny", np.array(1e-9, np.float32))], "pool")
    return g.op("Div", [summed, counts], "pool")


_DENSE_OPS = {"tanh": "Tanh", "sigmoid": "Sigmoid", "relu": "Relu"}


def append_dense(g: Graph, x: str, layers: Sequence[DenseLayer]) -> str:
    """sentence-transformers Dense modules on the pooled vector ``x``, in order:
    ``activation(x @ W.T + b)`` each (model/dense.py). Every family's graph ends with it."""
    for index, layer in enumerate(layers):
        p = f"dense.{index}"
        x = g.op("MatMul", [x, g.const(f"{p}.weight_t", np.ascontiguousarray(layer.weight.T))], p)
        if layer.bias is not None:
            x = g.op("Add", [x, g.const(f"{p}.bias", layer.bias)], p)
        if layer.activation != "identity":
            x = g.op(_DENSE_OPS[layer.activation], [x], p)
    return x


def dense_width(layers: Sequence[DenseLayer], width: int) -> int:
    """The width of a vector of ``width`` features after ``layers``."""
    return layers[-1].out_features if layers else width


# --------------------------------------------------------------------------- opt-in int8


def quantize_int8(
    model: onnx.ModelProto, *, per_channel: bool = True, keep_float: str | None = None
) -> onnx.ModelProto:
    r"""Dynamic int8 quantization of the weight matrices (opt-in: vectors change).

    MatMuls by a weight (Q/K/V, attention output, FFN up and down) become MatMulInteger with
    int8 weights.
    The products of two activations (scores, context) and the embeddings stay float32:
    ``quantize_dynamic`` leaves a MatMul without a weight alone anyway. ``per_channel``
    gives each output column its own scale (much closer to float32 on MiniLM).
    Nodes whose name matches the regular expression ``keep_float`` stay float32 (e.g.
    ``r"layer\.\d+\.output\.dense"`` for the FFN down projections). Activations are
    quantized per call over the whole batch tensor, so a text's vector depends slightly on
    the other texts (and padding) of its batch.
    """
    import re

    from onnxruntime.quantization import QuantType, quantize_dynamic

    weights = {t.name for t in model.graph.initializer}
    nodes = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul"
        and weights & set(n.input)
        and not (keep_float and re.search(keep_float, n.name))
    ]
    root = logging.getLogger()
    advice = _DropAdvice()  # ORT's advice to pre-process, logged on the root logger each time
    root.addFilter(advice)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "int8.onnx"
            quantize_dynamic(
                model,
                out,
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=nodes,
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
            )
            return onnx.load(str(out))
    finally:
        root.removeFilter(advice)


class _DropAdvice(logging.Filter):
    """Drops onnxruntime.quantization's "please pre-process" advice (a link, every load)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()
