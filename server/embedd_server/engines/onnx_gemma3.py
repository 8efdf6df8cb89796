"""The ONNX graph of a Gemma3 encoder (``gemma-embedding`` GGUF: EmbeddingGemma), built from
the file's tensors with :class:`~embedd_server.engines.onnx_graph.Graph`.

It computes what transformers' ``Gemma3TextModel`` with ``use_bidirectional_attention``
computes, in its order of operations (convert/gemma3.py says where each part is stored):
token embeddings times sqrt(hidden); per layer RMSNorm (the stored weights already hold
``1 + w``), grouped-query attention with per-head RMSNorm on queries and keys, RoPE (one base
for global layers, another for sliding-window ones), scores scaled by ``1/sqrt(head_dim)`` (a
``query_pre_attn_scalar`` that differs is folded into the query norm at import, as llama.cpp
reads the file too), a padding mask and, on sliding-window layers, a symmetric window of
``sliding_window // 2`` positions; post-attention norm and residual; pre-FFN norm, GeGLU with
tanh-GELU, post-FFN norm and residual; a final RMSNorm. Then the pooling (masked mean or
first token) and the sentence-transformers Dense modules: llama.cpp's ``dense_2`` /
``dense_3`` tensors, or embedd's own keys.

Masked scores get float32's minimum (never -inf, which would turn a padded row into NaNs that
a later layer spreads), as transformers' boolean masks become.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from embedd_server.engines.onnx_graph import (
    META_MAX_POSITIONS,
    META_POOLING,
    META_VOCAB_SIZE,
    Array,
    Graph,
    Pooling,
    append_dense,
    dense_width,
    finish_model,
    gguf_field,
    gguf_tensors,
    graph_inputs,
    pool_hidden,
)
from embedd_server.model.dense import DenseLayer, check_stack, read_dense_gguf

ARCH = "gemma-embedding"
_POOLINGS: dict[int, Pooling] = {1: "mean", 2: "cls"}  # llama.cpp's enum llama_pooling_type
_DENSE = ("dense_2", "dense_3")  # llama.cpp's tensors for EmbeddingGemma's projections
_DEFAULT_SWA_PATTERN = 6  # llama.cpp's gemma-embedding default: 5 sliding layers, then 1 global


@dataclass(frozen=True)
class Gemma3Config:
    """The hyper-parameters of a Gemma3 encoder graph (GGUF keys of ``gemma-embedding``)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float  # global (full-attention) layers
    rope_theta_swa: float  # sliding-window layers
    sliding_window: int  # config.json's W: a sliding layer sees |i - j| <= W // 2
    sliding: tuple[bool, ...]  # per layer: sliding-window attention
    max_positions: int

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("the attention heads must be a multiple of the key/value heads")
        if len(self.sliding) != self.num_layers:
            raise ValueError(f"{len(self.sliding)} layer types for {self.num_layers} layers")


@dataclass(frozen=True)
class Gemma3Source:
    """A Gemma3 encoder read from its GGUF file: weights by GGUF name, float32."""

    weights: Mapping[str, Array]
    config: Gemma3Config
    pooling: Pooling
    max_seq_length: int
    normalize: bool
    dense: tuple[DenseLayer, ...] = ()

    @property
    def token_types(self) -> int:
        """Gemma has no token types."""
        return 1

    @property
    def dimensions(self) -> int:
        """Width of the output: the hidden size, or the last Dense module's width."""
        return dense_width(self.dense, self.config.hidden_size)

    def build(
        self,
        *,
        token_type_input: bool = False,
        hidden_output: bool = False,
        pooling_mask_input: bool = False,
    ) -> onnx.ModelProto:
        """The ONNX graph of this model (see :func:`build_gemma3_model`)."""
        if token_type_input:
            raise ValueError("a Gemma3 encoder has no token types")
        return build_gemma3_model(
            self.weights,
            self.config,
            pooling=self.pooling,
            hidden_output=hidden_output,
            pooling_mask_input=pooling_mask_input,
            dense=self.dense,
        )


def read_gemma3_gguf(reader: Any, path: Path) -> Gemma3Source:
    """A ``gemma-embedding`` GGUF file (embedd's or llama.cpp's converter) as a graph source."""

    def key(name: str, default: Any = None) -> Any:
        return gguf_field(reader, f"{ARCH}.{name}", default)

    layers = int(key("block_count"))
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    config = Gemma3Config(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=int(key("attention.key_length", hidden // heads)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 1_000_000.0)),
        rope_theta_swa=float(key("rope.freq_base_swa", 10_000.0)),
        sliding_window=int(key("attention.sliding_window")),
        sliding=_sliding(reader.fields.get(f"{ARCH}.attention.sliding_window_pattern"), layers),
        max_positions=int(key("context_length")),
    )
    pooling_type = int(key("pooling_type", 1))
    if pooling_type not in _POOLINGS:
        raise ValueError(f"{path}: pooling type {pooling_type} is not supported (mean or cls)")
    tensors = gguf_tensors(reader)
    dense = _dense(tensors) or read_dense_gguf(reader)
    check_stack(dense, hidden)
    max_len = int(gguf_field(reader, "sentence_transformers.max_seq_length", config.max_positions))
    return Gemma3Source(
        weights=tensors,
        config=config,
        pooling=_POOLINGS[pooling_type],
        max_seq_length=min(max_len, config.max_positions),
        normalize=bool(gguf_field(reader, "sentence_transformers.normalize", False)),
        dense=dense,
    )


def _sliding(field: Any, layers: int) -> tuple[bool, ...]:
    """Which layers slide: the per-layer flags, else llama.cpp's pattern (every n-th layer
    global, the others sliding)."""
    if field is not None:
        value = field.contents()
        if isinstance(value, list):
            return tuple(bool(flag) for flag in value[:layers])
        pattern = int(value)
    else:
        pattern = _DEFAULT_SWA_PATTERN
    return tuple(pattern == 0 or i % pattern < pattern - 1 for i in range(layers))


def _dense(tensors: Mapping[str, Array]) -> tuple[DenseLayer, ...]:
    """llama.cpp's ``dense_2`` / ``dense_3`` projections (no bias, no activation), if any."""
    return tuple(
        DenseLayer(np.asarray(tensors[f"{name}.weight"], np.float32), None, "identity")
        for name in _DENSE
        if f"{name}.weight" in tensors
    )


# --------------------------------------------------------------------------- graph


def build_gemma3_model(
    weights: Mapping[str, Array],
    config: Gemma3Config,
    *,
    pooling: Pooling = "mean",
    hidden_output: bool = False,
    pooling_mask_input: bool = False,
    dense: Sequence[DenseLayer] = (),
) -> onnx.ModelProto:
    """The ONNX graph (opset 17) of a Gemma3 encoder, pooling and Dense modules.

    Inputs ``input_ids`` and ``attention_mask`` (int64 ``[batch, seq]``, right-padded: a
    token's position is its index), with ``pooling_mask_input`` also ``pooling_mask`` (the
    mean's own mask: ``include_prompt: false``). Output ``sentence_embedding`` float32
    ``[batch, dimensions]``, not normalized; with ``hidden_output`` also ``last_hidden_state``.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling {pooling!r} is not supported (mean or cls)")
    w = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
    _check_shapes(w, config)
    g = Graph()
    inputs, pooling_mask = graph_inputs(
        token_type_input=False, pooling_mask_input=pooling_mask_input and pooling == "mean"
    )
    table = g.const("token_embd", w["token_embd.weight"])
    scale = g.const("embed_scale", np.array(math.sqrt(config.hidden_size), np.float32))
    x = g.op("Mul", [g.op("Gather", [table, "input_ids"], "embd"), scale], "embd")
    masks = _masks(g, config)
    ropes = {theta: _rope(g, config, theta) for theta in {config.rope_theta, config.rope_theta_swa}}
    for i in range(config.num_layers):
        theta = config.rope_theta_swa if config.sliding[i] else config.rope_theta
        x = _layer(g, w, config, x, i, mask=masks[config.sliding[i]], rope=ropes[theta])
    hidden = _rms_norm(g, x, w, "output_norm.weight", config.rms_norm_eps)
    pooled = append_dense(g, pool_hidden(g, hidden, pooling, pooling_mask), dense)
    width = dense_width(dense, config.hidden_size)
    return finish_model(
        g,
        "gemma3_encoder",
        inputs,
        (pooled, width),
        hidden=(hidden, config.hidden_size) if hidden_output else None,
        meta={
            META_POOLING: pooling,
            META_MAX_POSITIONS: str(config.max_positions),
            META_VOCAB_SIZE: str(w["token_embd.weight"].shape[0]),
        },
    )


def _check_shapes(w: Mapping[str, Array], config: Gemma3Config) -> None:
    d, hd = config.hidden_size, config.head_dim
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    ff = w["blk.0.ffn_up.weight"].shape[0] if "blk.0.ffn_up.weight" in w else 0
    expected: dict[str, tuple[int, ...]] = {"output_norm.weight": (d,)}
    for i in range(config.num_layers):
        p = f"blk.{i}."
        expected |= {
            f"{p}attn_norm.weight": (d,),
            f"{p}attn_q.weight": (q, d),
            f"{p}attn_k.weight": (kv, d),
            f"{p}attn_v.weight": (kv, d),
            f"{p}attn_output.weight": (d, q),
            f"{p}attn_q_norm.weight": (hd,),
            f"{p}attn_k_norm.weight": (hd,),
            f"{p}post_attention_norm.weight": (d,),
            f"{p}ffn_norm.weight": (d,),
            f"{p}ffn_gate.weight": (ff, d),
            f"{p}ffn_up.weight": (ff, d),
            f"{p}ffn_down.weight": (d, ff),
            f"{p}post_ffw_norm.weight": (d,),
        }
    if "token_embd.weight" not in w or w["token_embd.weight"].shape[1:] != (d,):
        raise ValueError(f"tensor 'token_embd.weight' must be [vocab, {d}]")
    for name, shape in expected.items():
        if name not in w:
            raise ValueError(f"tensor {name!r} is missing; is this a Gemma3 encoder?")
        if w[name].shape != shape:
            raise ValueError(f"tensor {name!r} has shape {w[name].shape}, expected {shape}")


def _rms_norm(g: Graph, x: str, w: Mapping[str, Array], name: str, eps: float) -> str:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis (ORT's
    SimplifiedLayerNormalization pattern); the weight already holds Gemma's ``1 + w``."""
    two = g.const("f_two", np.array(2.0, np.float32))
    mean = g.op("ReduceMean", [g.op("Pow", [x, two], name)], name, axes=[-1], keepdims=1)
    eps_c = g.const(f"eps_{eps}", np.array(eps, np.float32))
    normed = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [mean, eps_c], name)], name)], name)
    return g.op("Mul", [normed, g.const(name, w[name])], name)


def _masks(g: Graph, config: Gemma3Config) -> dict[bool, str]:
    """Score biases by layer kind: global layers mask padding only (``[batch, 1, 1, 1,
    seq]``); sliding layers also keys more than ``W // 2`` positions away (``[batch, 1, 1,
    seq, seq]``). 0 where attended, float32's minimum where masked."""
    axes = g.const("axes_1_2_3", np.array([1, 2, 3], np.int64))
    valid = g.op("Cast", ["attention_mask"], "mask", to=TensorProto.BOOL)
    valid = g.op("Unsqueeze", [valid, axes], "mask")  # [batch, 1, 1, 1, seq]
    zero = g.const("f_zero", np.array(0.0, np.float32))
    minimum = g.const("f_min", np.array(np.finfo(np.float32).min, np.float32))
    masks = {False: g.op("Where", [valid, zero, minimum], "mask")}
    if any(config.sliding):
        seq = g.op("Shape", ["input_ids"], "window", start=1, end=2)
        seq = g.op("Squeeze", [seq, g.const("axes_0", np.array([0], np.int64))], "window")
        i0, i1 = g.const("i_zero", np.array(0, np.int64)), g.const("i_one", np.array(1, np.int64))
        pos = g.op("Range", [i0, seq, i1], "window")
        rows = g.op("Unsqueeze", [pos, g.const("axes_1", np.array([1], np.int64))], "window")
        cols = g.op("Unsqueeze", [pos, g.const("axes_0", np.array([0], np.int64))], "window")
        distance = g.op("Abs", [g.op("Sub", [rows, cols], "window")], "window")
        half = g.const("window_half", np.array(config.sliding_window // 2, np.int64))
        near = g.op("LessOrEqual", [distance, half], "window")  # [seq, seq]
        allowed = g.op("And", [valid, near], "window")  # [batch, 1, 1, seq, seq]
        masks[True] = g.op("Where", [allowed, zero, minimum], "window")
    return masks


def _rope(g: Graph, config: Gemma3Config, theta: float) -> tuple[str, str]:
    """(cos, sin) ``[seq, head_dim]`` of RoPE with base ``theta`` for positions 0..seq-1:
    tables over every position, sliced to the input's length. The frequencies are computed
    in float32 as transformers computes them."""
    hd = config.head_dim
    exponent = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    inv_freq = (1.0 / np.power(np.float64(theta), exponent.astype(np.float64))).astype(np.float32)
    positions = np.arange(config.max_positions, dtype=np.float32)
    freqs = (positions[:, None] * inv_freq[None, :]).astype(np.float32)
    angles = np.concatenate([freqs, freqs], axis=1).astype(np.float64)
    seq = g.op("Shape", ["input_ids"], "rope", start=1, end=2)
    zero = g.const("zero_1d", np.array([0], np.int64))
    tables = []
    for name, values in (("cos", np.cos(angles)), ("sin", np.sin(angles))):
        table = g.const(f"rope_{theta:g}.{name}", values.astype(np.float32))
        tables.append(g.op("Slice", [table, zero, seq, zero], "rope"))
    return tables[0], tables[1]


def _heads(g: Graph, x: str, heads: int, head_dim: int, p: str) -> str:
    """``[batch, seq, heads * head_dim]`` -> ``[batch, seq, heads, head_dim]``."""
    shape = g.const(f"shape_heads_{heads}_{head_dim}", np.array([0, 0, heads, head_dim], np.int64))
    return g.op("Reshape", [x, shape], p)


def _rotate(g: Graph, x: str, rope: tuple[str, str], head_dim: int, p: str) -> str:
    """``x * cos + rotate_half(x) * sin`` on ``[batch, heads, seq, head_dim]``."""
    halves = g.const(f"halves_{head_dim}", np.array([head_dim // 2, head_dim // 2], np.int64))
    first, second = f"{p}.x1_{len(g.nodes)}", f"{p}.x2_{len(g.nodes)}"
    g.nodes.append(helper.make_node("Split", [x, halves], [first, second], name=first, axis=-1))
    rotated = g.op("Concat", [g.op("Neg", [second], p), first], p, axis=-1)
    cos, sin = rope
    return g.op("Add", [g.op("Mul", [x, cos], p), g.op("Mul", [rotated, sin], p)], p)


def _matmul_t(g: Graph, x: str, w: Mapping[str, Array], name: str) -> str:
    """``x @ W.T`` (no bias in Gemma)."""
    return g.op("MatMul", [x, g.const(f"{name}_t", np.ascontiguousarray(w[name].T))], name)


def _layer(
    g: Graph,
    w: Mapping[str, Array],
    config: Gemma3Config,
    x: str,
    i: int,
    *,
    mask: str,
    rope: tuple[str, str],
) -> str:
    p, eps, hd = f"blk.{i}.", config.rms_norm_eps, config.head_dim
    heads, kv_heads = config.num_heads, config.num_kv_heads
    groups = heads // kv_heads
    h = _rms_norm(g, x, w, f"{p}attn_norm.weight", eps)

    def projected(name: str, count: int, norm: str | None) -> str:
        out = _heads(g, _matmul_t(g, h, w, f"{p}{name}.weight"), count, hd, p)
        if norm is not None:
            out = _rms_norm(g, out, w, f"{p}{norm}.weight", eps)
        return g.op("Transpose", [out], p, perm=[0, 2, 1, 3])  # [batch, heads, seq, hd]

    q = _rotate(g, projected("attn_q", heads, "attn_q_norm"), rope, hd, p)
    k = _rotate(g, projected("attn_k", kv_heads, "attn_k_norm"), rope, hd, p)
    v = projected("attn_v", kv_heads, None)
    # Grouped-query attention without copying keys: queries as [batch, kv, group, seq, hd]
    # against keys [batch, kv, 1, hd, seq] (query head h uses key head h // group).
    q5 = g.op(
        "Reshape",
        [
            q,
            g.const(
                f"shape_q5_{kv_heads}_{groups}_{hd}",
                np.array([0, kv_heads, groups, -1, hd], np.int64),
            ),
        ],
        p,
    )
    axis2 = g.const("axes_2", np.array([2], np.int64))
    k5 = g.op("Transpose", [g.op("Unsqueeze", [k, axis2], p)], p, perm=[0, 1, 2, 4, 3])
    v5 = g.op("Unsqueeze", [v, axis2], p)
    scale = g.const(f"attn_scale_{hd}", np.array(hd**-0.5, np.float32))
    scores = g.op("Mul", [g.op("MatMul", [q5, k5], p), scale], p)
    probs = g.op("Softmax", [g.op("Add", [scores, mask], p)], p, axis=-1)
    context = g.op("MatMul", [probs, v5], p)  # [batch, kv, group, seq, hd]
    context = g.op(
        "Reshape",
        [context, g.const(f"shape_h4_{heads}_{hd}", np.array([0, heads, -1, hd], np.int64))],
        p,
    )
    context = g.op("Transpose", [context], p, perm=[0, 2, 1, 3])
    merge = g.const(f"shape_merge_{heads * hd}", np.array([0, 0, heads * hd], np.int64))
    attended = _matmul_t(g, g.op("Reshape", [context, merge], p), w, f"{p}attn_output.weight")
    attended = _rms_norm(g, attended, w, f"{p}post_attention_norm.weight", eps)
    x = g.op("Add", [x, attended], p)
    h = _rms_norm(g, x, w, f"{p}ffn_norm.weight", eps)
    gate = _matmul_t(g, h, w, f"{p}ffn_gate.weight")
    up = _matmul_t(g, h, w, f"{p}ffn_up.weight")
    down = _matmul_t(g, g.op("Mul", [_gelu_tanh(g, gate, p), up], p), w, f"{p}ffn_down.weight")
    down = _rms_norm(g, down, w, f"{p}post_ffw_norm.weight", eps)
    return g.op("Add", [x, down], p)


def _gelu_tanh(g: Graph, x: str, p: str) -> str:
    """``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`` (gelu_pytorch_tanh)."""
    cube = g.op("Mul", [g.op("Mul", [x, x], p), x], p)
    coefficient = g.const("gelu_c", np.array(0.044715, np.float32))
    inner = g.op("Add", [x, g.op("Mul", [cube, coefficient], p)], p)
    root = g.const("gelu_sqrt_2_pi", np.array(math.sqrt(2.0 / math.pi), np.float32))
    tanh = g.op("Tanh", [g.op("Mul", [inner, root], p)], p)
    one = g.const("f_one", np.array(1.0, np.float32))
    half = g.const("half", np.array(0.5, np.float32))
    return g.op("Mul", [g.op("Mul", [x, half], p), g.op("Add", [tanh, one], p)], p)
