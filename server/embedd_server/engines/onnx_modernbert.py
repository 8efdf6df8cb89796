"""The ONNX graph of ModernBERT (llama.cpp's ``modern-bert`` GGUF layout), built from the
file's tensors with the ``onnx`` helper API (see :mod:`embedd_server.engines.onnx_graph`).

The graph computes transformers' eager ``ModernBertModel`` in its order of operations:
token embeddings -> LayerNorm (no bias); per layer a pre-norm (none on layer 0), the fused
QKV projection, RoPE with the layer type's theta (global layers one, sliding-window layers
another; ``q * cos + rotate_half(q) * sin``), scores times ``head_dim ** -0.5`` plus a mask
bias of float32's minimum, softmax, the output projection and the residual; then the GLU
feed-forward (``act(first half) * second half`` of ``mlp.Wi``: exact GELU, tanh GELU or SiLU
as the file's ``hidden_activation`` says) and its residual; the final LayerNorm. A global
layer's mask hides padding; a sliding-window layer's also every key more than
``sliding_window // 2`` positions away (transformers' and llama.cpp's window alike). Both
masks are one bias, so a padded row never sees -inf + -inf.

Pooling is inside the graph, as the BERT graph does it: the masked mean (optionally over a
``pooling_mask``) or the first token; vectors are not normalized. A cross-encoder (pooling
``rank``) ends in ``ModernBertForSequenceClassification``'s head instead: the first token or
the mean (``classifier.pooling_type``) -> ``cls`` -> activation -> ``cls.norm`` ->
``cls.output``: the raw logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from embedd_server.engines.onnx_graph import (
    META_MAX_POSITIONS,
    META_POOLING,
    META_TOKEN_TYPES,
    META_VOCAB_SIZE,
    Array,
    Graph,
    Pooling,
    finish_model,
    gguf_field,
    gguf_tensors,
    graph_inputs,
    pool_hidden,
)

ARCH = "modern-bert"
# llama.cpp's enum llama_pooling_type, as the file's pooling and its classifier's pooling.
_GGUF_POOLING: dict[int, Pooling] = {1: "mean", 2: "cls", 4: "rank"}
_CLASSIFIER_POOLING: dict[int, Pooling] = {1: "mean", 2: "cls"}
# The activations the graph computes exactly, by transformers' names.
ACTIVATIONS = frozenset({"gelu", "gelu_pytorch_tanh", "gelu_new", "silu"})
# llama.cpp's defaults for a modern-bert file without the keys.
_DEFAULT_GLOBAL_EVERY = 3
_DEFAULT_THETA = 10_000.0


@dataclass(frozen=True)
class ModernBertConfig:
    """What a ModernBERT graph needs that its weight shapes don't tell."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    max_positions: int
    sliding: tuple[bool, ...]  # per layer: attends within the window
    window: int  # transformers' local_attention: keys within window // 2 on each side
    global_theta: float
    local_theta: float
    norm_eps: float = 1e-5
    activation: str = "gelu"  # the FFN's GLU activation
    head_activation: str = "gelu"  # a cross-encoder head's
    classifier_pooling: Pooling = "cls"

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.num_attention_heads, self.num_hidden_layers) <= 0:
            raise ValueError(f"invalid ModernBERT config {self}")
        if self.hidden_size % self.num_attention_heads or self.head_size % 2:
            raise ValueError(
                f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} "
                "heads of an even size"
            )
        if len(self.sliding) != self.num_hidden_layers:
            raise ValueError(f"{len(self.sliding)} layer types for {self.num_hidden_layers} layers")
        for act in (self.activation, self.head_activation):
            if act not in ACTIVATIONS:
                raise ValueError(f"activation {act!r} is not supported ({sorted(ACTIVATIONS)})")

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModernBertSource:
    """A ModernBERT GGUF's weights (GGUF names, float32) and how the model is used."""

    weights: Mapping[str, Array]
    config: ModernBertConfig
    pooling: Pooling
    max_seq_length: int
    normalize: bool

    @property
    def token_types(self) -> int:
        """ModernBERT has no token types."""
        return 1

    @property
    def labels(self) -> int:
        """A cross-encoder's outputs (rows of ``cls.output``); 0 for an encoder."""
        head = self.weights.get("cls.output.weight")
        return 0 if head is None else int(head.shape[0])

    @property
    def dimensions(self) -> int:
        """Width of the graph's output: a cross-encoder's labels, else the hidden size."""
        return self.labels if self.pooling == "rank" else self.config.hidden_size

    def build(
        self,
        *,
        token_type_input: bool = False,
        hidden_output: bool = False,
        pooling_mask_input: bool = False,
    ) -> onnx.ModelProto:
        """The ONNX graph (see :func:`build_modernbert_model`); ``token_type_input`` is
        ignored: every token has the one type."""
        return build_modernbert_model(
            self.weights,
            self.config,
            pooling=self.pooling,
            hidden_output=hidden_output,
            pooling_mask_input=pooling_mask_input,
        )


# --------------------------------------------------------------------------- reading


def read_modernbert_gguf(reader: Any, path: Path) -> ModernBertSource:
    """A GGUF file in llama.cpp's ``modern-bert`` layout, read as llama.cpp 0.3.36 reads it:
    the sliding-window pattern is a per-layer array or every layer but each n-th (3 unless
    given; no window key: no sliding layers), the local theta 10000 unless given, a
    classifier without ``classifier.pooling_type`` pools the mean."""
    n_layer = int(gguf_field(reader, f"{ARCH}.block_count"))
    pooling_type = int(gguf_field(reader, f"{ARCH}.pooling_type", 1))
    if pooling_type not in _GGUF_POOLING:
        raise ValueError(
            f"{path}: pooling type {pooling_type} is not supported (mean, cls or rank)"
        )
    classifier_pooling = int(gguf_field(reader, f"{ARCH}.classifier.pooling_type", 1))
    if classifier_pooling not in _CLASSIFIER_POOLING:
        raise ValueError(
            f"{path}: classifier pooling type {classifier_pooling} is not supported (mean or cls)"
        )
    window = int(gguf_field(reader, f"{ARCH}.attention.sliding_window", 0))
    max_positions = int(gguf_field(reader, f"{ARCH}.context_length"))
    config = ModernBertConfig(
        hidden_size=int(gguf_field(reader, f"{ARCH}.embedding_length")),
        num_attention_heads=int(gguf_field(reader, f"{ARCH}.attention.head_count")),
        num_hidden_layers=n_layer,
        max_positions=max_positions,
        sliding=_sliding_pattern(reader, n_layer) if window > 0 else (False,) * n_layer,
        window=window,
        global_theta=float(gguf_field(reader, f"{ARCH}.rope.freq_base", _DEFAULT_THETA)),
        local_theta=float(gguf_field(reader, f"{ARCH}.rope.freq_base_swa", _DEFAULT_THETA)),
        norm_eps=float(gguf_field(reader, f"{ARCH}.attention.layer_norm_epsilon", 1e-5)),
        activation=str(gguf_field(reader, f"{ARCH}.hidden_activation", "gelu")),
        head_activation=str(gguf_field(reader, "embedd.classifier_activation", "gelu")),
        classifier_pooling=_CLASSIFIER_POOLING[classifier_pooling],
    )
    weights = gguf_tensors(reader)
    pooling = _GGUF_POOLING[pooling_type]
    if pooling == "rank" and "cls.output.weight" not in weights:
        raise ValueError(f"{path}: a cross-encoder (pooling rank) without its cls.output tensors")
    max_len = int(gguf_field(reader, "sentence_transformers.max_seq_length", max_positions))
    return ModernBertSource(
        weights=weights,
        config=config,
        pooling=pooling,
        max_seq_length=min(max_len, max_positions),
        normalize=bool(gguf_field(reader, "sentence_transformers.normalize", False)),
    )


def _sliding_pattern(reader: Any, n_layer: int) -> tuple[bool, ...]:
    field = reader.fields.get(f"{ARCH}.attention.sliding_window_pattern")
    value = None if field is None else field.contents()
    if isinstance(value, list):
        if len(value) < n_layer:
            raise ValueError(f"sliding_window_pattern has {len(value)} layers, not {n_layer}")
        return tuple(bool(v) for v in value[:n_layer])
    every = _DEFAULT_GLOBAL_EVERY if value is None else int(value)
    # llama.cpp's set_swa_pattern(n, dense_first=true): layer 0, n, 2n, ... are global.
    return tuple(every == 0 or i % every != 0 for i in range(n_layer))


# --------------------------------------------------------------------------- graph


def build_modernbert_model(
    weights: Mapping[str, Array],
    config: ModernBertConfig,
    *,
    pooling: Pooling = "mean",
    hidden_output: bool = False,
    pooling_mask_input: bool = False,
) -> onnx.ModelProto:
    """The ONNX graph (opset 17) of ``ModernBertModel`` followed by pooling, or with pooling
    ``rank`` of ``ModernBertForSequenceClassification`` (raw logits).

    Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``), with
    ``pooling_mask_input`` also ``pooling_mask`` (the mean's own mask, for
    ``include_prompt: false``). Output ``sentence_embedding`` float32 ``[batch, width]``; with
    ``hidden_output`` also ``last_hidden_state``.
    """
    if pooling not in _GGUF_POOLING.values():
        raise ValueError(f"pooling {pooling!r} is not supported (mean, cls or rank)")
    w = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in weights.items()}
    if pooling == "rank" and "cls.output.weight" not in w:
        raise ValueError("pooling rank needs a cross-encoder's cls.output tensors")
    g = Graph()
    inputs, pooling_mask = graph_inputs(
        token_type_input=False, pooling_mask_input=pooling_mask_input and pooling == "mean"
    )
    words = g.op("Gather", [g.const("token_embd", w["token_embd.weight"]), "input_ids"], "embd")
    hidden = _norm(g, w, words, "token_embd_norm", config.norm_eps)
    seq_len = g.op("Shape", ["input_ids"], "seq", start=1, end=2)  # [1]
    biases = _mask_biases(g, config, seq_len)
    rope = {theta: _rope_tables(g, config, theta, seq_len) for theta in _thetas(config)}
    for i in range(config.num_hidden_layers):
        theta = config.local_theta if config.sliding[i] else config.global_theta
        bias = biases[config.sliding[i]]
        hidden = _layer(g, w, config, hidden, i=i, mask_bias=bias, rope=rope[theta])
    hidden = _norm(g, w, hidden, "output_norm", config.norm_eps)
    if pooling == "rank":
        pooled = _classify(g, w, config, hidden)
        width = w["cls.output.weight"].shape[0]
    else:
        pooled, width = pool_hidden(g, hidden, pooling, pooling_mask), config.hidden_size
    return finish_model(
        g,
        "modernbert_encoder",
        inputs,
        (pooled, width),
        hidden=(hidden, config.hidden_size) if hidden_output else None,
        meta={
            META_POOLING: pooling,
            META_MAX_POSITIONS: str(config.max_positions),
            META_VOCAB_SIZE: str(w["token_embd.weight"].shape[0]),
            META_TOKEN_TYPES: "1",
        },
    )


def _thetas(config: ModernBertConfig) -> set[float]:
    return {config.local_theta if s else config.global_theta for s in config.sliding}


def _norm(g: Graph, w: Mapping[str, Array], x: str, name: str, eps: float) -> str:
    """LayerNorm without bias (ModernBERT's norm_bias false); with one when the file has it."""
    inputs = [x, g.const(f"{name}.weight", w[f"{name}.weight"])]
    if f"{name}.bias" in w:
        inputs.append(g.const(f"{name}.bias", w[f"{name}.bias"]))
    return g.op("LayerNormalization", inputs, name, axis=-1, epsilon=eps)


def _matmul(g: Graph, w: Mapping[str, Array], x: str, name: str) -> str:
    """``x @ W.T`` (+ the bias where the file has one)."""
    out = g.op("MatMul", [x, g.const(f"{name}.weight_t", w[f"{name}.weight"].T)], name)
    if f"{name}.bias" in w:
        out = g.op("Add", [out, g.const(f"{name}.bias", w[f"{name}.bias"])], name)
    return out


def _slice_last(g: Graph, x: str, start: int, end: int, name: str) -> str:
    starts = g.const(f"i64_{start}", np.array([start], np.int64))
    ends = g.const(f"i64_{end}", np.array([end], np.int64))
    axes = g.const("axes_last", np.array([-1], np.int64))
    return g.op("Slice", [x, starts, ends, axes], name)


def _rope_tables(g: Graph, config: ModernBertConfig, theta: float, seq_len: str) -> tuple[str, str]:
    """cos and sin ``[seq, head_size]`` of positions 0..seq-1, as transformers computes them
    in float32: ``inv_freq = 1 / theta ** (arange(0, d, 2) / d)``, ``emb = cat(f, f)``."""
    d = config.head_size
    inv_freq = np.float32(1.0) / (
        np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))
    )
    positions = np.arange(config.max_positions, dtype=np.float32)
    freqs = positions[:, None] * inv_freq[None, :].astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float32)
    zero = g.const("zero_1d", np.array([0], np.int64))
    tables = []
    for fn, table in (("cos", np.cos(emb)), ("sin", np.sin(emb))):
        const = g.const(f"rope_{fn}_{theta:g}", table.astype(np.float32))
        tables.append(g.op("Slice", [const, zero, seq_len, zero], f"rope_{fn}"))  # axes [0]
    return tables[0], tables[1]


def _mask_biases(g: Graph, config: ModernBertConfig, seq_len: str) -> dict[bool, str]:
    """The attention biases, by whether the layer slides: ``(1 - allowed) * float32.min``,
    global ``[batch, 1, 1, seq]`` (padding), sliding ``[batch, 1, seq, seq]`` (padding and
    the window, combined before the bias so no score gets two minima)."""
    mask = "attention_mask"
    for axis in (1, 2):
        mask = g.op("Unsqueeze", [mask, g.const(f"axes_{axis}", np.array([axis], np.int64))], "m")
    keys = g.op("Cast", [mask], "mask", to=TensorProto.FLOAT)  # [batch, 1, 1, seq]
    one = g.const("f_one", np.array(1.0, np.float32))
    minimum = g.const("f_min", np.array(np.finfo(np.float32).min, np.float32))

    def bias(allowed: str) -> str:
        return g.op("Mul", [g.op("Sub", [one, allowed], "mask"), minimum], "mask")

    biases = {False: bias(keys)}
    if any(config.sliding):
        n = g.op("Squeeze", [seq_len, g.const("axes_0", np.array([0], np.int64))], "win")
        zero = g.const("i64_scalar_0", np.array(0, np.int64))
        step = g.const("i64_scalar_1", np.array(1, np.int64))
        positions = g.op("Range", [zero, n, step], "win")
        rows = g.op("Unsqueeze", [positions, g.const("axes_1", np.array([1], np.int64))], "win")
        cols = g.op("Unsqueeze", [positions, g.const("axes_0", np.array([0], np.int64))], "win")
        distance = g.op("Abs", [g.op("Sub", [rows, cols], "win")], "win")
        half = g.const("window_half", np.array(config.window // 2, np.int64))
        near = g.op(
            "Cast", [g.op("LessOrEqual", [distance, half], "win")], "win", to=TensorProto.FLOAT
        )
        biases[True] = bias(g.op("Mul", [keys, near], "win"))  # [batch, 1, seq, seq]
    return biases


def _rotate(g: Graph, x: str, rope: tuple[str, str], *, d: int, p: str) -> str:
    """RoPE: ``x * cos + rotate_half(x) * sin``, ``rotate_half(x) = cat(-x2, x1)``."""
    cos, sin = rope
    x1 = _slice_last(g, x, 0, d // 2, p)
    x2 = _slice_last(g, x, d // 2, d, p)
    rotated = g.op("Concat", [g.op("Neg", [x2], p), x1], p, axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], p), g.op("Mul", [rotated, sin], p)], p)


def _activation(g: Graph, x: str, name: str, p: str) -> str:
    """transformers' ACT2FN[name]: exact (erf) GELU, tanh GELU or SiLU."""
    half = g.const("half", np.array(0.5, np.float32))
    one = g.const("f_one", np.array(1.0, np.float32))
    if name == "gelu":  # x * 0.5 * (1 + erf(x / sqrt 2))
        sqrt2 = g.const("sqrt2", np.array(math.sqrt(2), np.float32))
        erf = g.op("Erf", [g.op("Div", [x, sqrt2], p)], p)
        return g.op("Mul", [g.op("Mul", [x, g.op("Add", [erf, one], p)], p), half], p)
    if name in ("gelu_pytorch_tanh", "gelu_new"):  # 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
        beta = g.const("gelu_beta", np.array(math.sqrt(2 / math.pi), np.float32))
        kappa = g.const("gelu_kappa", np.array(0.044715, np.float32))
        cube = g.op("Mul", [g.op("Mul", [x, x], p), x], p)
        inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, kappa], p)], p), beta], p)
        return g.op(
            "Mul", [g.op("Mul", [x, half], p), g.op("Add", [g.op("Tanh", [inner], p), one], p)], p
        )
    return g.op("Mul", [x, g.op("Sigmoid", [x], p)], p)  # silu


def _layer(
    g: Graph,
    w: Mapping[str, Array],
    config: ModernBertConfig,
    x: str,
    *,
    i: int,
    mask_bias: str,
    rope: tuple[str, str],
) -> str:
    """One pre-norm ModernBERT layer: attention with RoPE, then the GLU feed-forward."""
    p = f"blk.{i}"
    heads, d = config.num_attention_heads, config.head_size
    h = _norm(g, w, x, f"{p}.attn_norm", config.norm_eps) if f"{p}.attn_norm.weight" in w else x
    qkv = _matmul(g, w, h, f"{p}.attn_qkv")  # [batch, seq, 3 * hidden]: Q, K, V rows
    split = g.const(f"{p}.qkv_shape", np.array([0, 0, 3, heads, d], np.int64))
    qkv = g.op("Transpose", [g.op("Reshape", [qkv, split], p)], p, perm=[2, 0, 3, 1, 4])

    def part(index: int) -> str:  # [batch, heads, seq, head_size]
        return g.op("Gather", [qkv, g.const(f"i64_scalar_{index}", np.array(index, np.int64))], p)

    q = _rotate(g, part(0), rope, d=d, p=p)
    k = _rotate(g, part(1), rope, d=d, p=p)
    scale = g.const(f"scale_{d}", np.array(d**-0.5, np.float32))
    scores = g.op(
        "Mul", [g.op("MatMul", [q, g.op("Transpose", [k], p, perm=[0, 1, 3, 2])], p), scale], p
    )
    probs = g.op("Softmax", [g.op("Add", [scores, mask_bias], p)], p, axis=-1)
    context = g.op("Transpose", [g.op("MatMul", [probs, part(2)], p)], p, perm=[0, 2, 1, 3])
    merge = g.const("merge_shape", np.array([0, 0, config.hidden_size], np.int64))
    attended = _matmul(g, w, g.op("Reshape", [context, merge], p), f"{p}.attn_output")
    x = g.op("Add", [x, attended], p)
    h = _norm(g, w, x, f"{p}.ffn_norm", config.norm_eps)
    up = _matmul(g, w, h, f"{p}.ffn_up")  # [batch, seq, 2 * ff]: the activated half, the gate
    ff = w[f"{p}.ffn_up.weight"].shape[0] // 2
    act = _activation(g, _slice_last(g, up, 0, ff, p), config.activation, p)
    glu = g.op("Mul", [act, _slice_last(g, up, ff, 2 * ff, p)], p)
    return g.op("Add", [x, _matmul(g, w, glu, f"{p}.ffn_down")], p)


def _classify(g: Graph, w: Mapping[str, Array], config: ModernBertConfig, hidden: str) -> str:
    """ModernBertForSequenceClassification's head: pooled -> dense -> activation -> norm ->
    classifier, each part where the file has it (as llama.cpp's rank pooling takes them)."""
    x = pool_hidden(g, hidden, config.classifier_pooling, "attention_mask")
    if "cls.weight" in w:
        x = _activation(g, _matmul(g, w, x, "cls"), config.head_activation, "head")
        if "cls.norm.weight" in w:
            x = _norm(g, w, x, "cls.norm", config.norm_eps)
    return _matmul(g, w, x, "cls.output")
