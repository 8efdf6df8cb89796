"""ONNX graphs of MPNet sentence encoders (all-mpnet-base-v2 and its kin), from an ``mpnet`` GGUF.

llama.cpp has no MPNet; ``embedd import`` writes it under an architecture name of ours
(:mod:`embedd_server.model.mpnet_layout`) and this module builds its graph, which computes
transformers' ``MPNetModel`` followed by sentence-transformers' pooling:

- embeddings: word + position, then LayerNorm (no token types). Positions are
  ``create_position_ids_from_input_ids``'s: each token that is not the padding id counts from
  ``padding_idx + 1``; a padding id (and the engine's own padding, which the attention mask
  marks) sits at ``padding_idx``.
- each layer is BERT's post-LayerNorm layer (:func:`encoder_layer`) with a bias added to the
  scaled attention scores: ``relative_attention_bias`` (one table of [buckets, heads] for all
  layers) at the bucket of each pair's relative position. The buckets are
  ``MPNetEncoder.relative_position_bucket``'s (bidirectional, 32 buckets, exact up to 8, then
  logarithmic to a distance of 128), computed here once for every pair of positions in
  float32 as torch computes them, and sliced to the input's length in the graph.
- pooling: the masked mean (optionally by its own ``pooling_mask``) or the first token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto

from embedd_server.engines.onnx_graph import (
    GGUF_POOLING,
    META_MAX_POSITIONS,
    META_POOLING,
    META_VOCAB_SIZE,
    Array,
    BertConfig,
    Graph,
    Pooling,
    attention_mask_bias,
    encoder_layer,
    finish_model,
    gguf_field,
    gguf_tensors,
    graph_inputs,
    pool_hidden,
)
from embedd_server.model import mpnet_layout as layout
from embedd_server.model.catalog import ENCODER_BLOCK_TENSORS

WORDS = "embeddings.word_embeddings.weight"
POSITIONS = "embeddings.position_embeddings.weight"
RELATIVE_BIAS = f"{layout.RELATIVE_BIAS_HF}.weight"


def relative_position_buckets(
    length: int, num_buckets: int = layout.NUM_BUCKETS, max_distance: int = layout.MAX_DISTANCE
) -> npt.NDArray[np.int64]:
    """``[length, length]``: row i (query), column j (key) holds the bucket of ``j - i``.

    ``MPNetEncoder.relative_position_bucket`` step by step: half the buckets for keys before
    the query, half after; distances below a quarter of the buckets get one bucket each, the
    rest logarithmic buckets up to ``max_distance``, the last bucket beyond. Its float32
    arithmetic (log of ``n / max_exact``, divided by float32 log(max_distance / max_exact),
    times the logarithmic buckets, truncated) is kept, so the boundaries fall where torch's do.
    """
    offsets = np.arange(length, dtype=np.int64)
    n = offsets[:, None] - offsets[None, :]  # -(j - i)
    half = num_buckets // 2
    buckets = (n < 0).astype(np.int64) * half
    n = np.abs(n)
    max_exact = half // 2
    ratio = np.maximum(n, max_exact).astype(np.float32) / np.float32(max_exact)
    scaled = (
        np.log(ratio)
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(half - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), half - 1)
    result: npt.NDArray[np.int64] = buckets + np.where(n < max_exact, n, large)
    return result


@dataclass(frozen=True)
class MPNetSource:
    """An MPNet encoder read from its GGUF: weights by Hugging Face name (the layers' by
    BERT's, which :func:`encoder_layer` reads), float32, and how the model is used."""

    weights: Mapping[str, Array]
    config: BertConfig
    pooling: Pooling
    max_seq_length: int
    normalize: bool
    positions: int  # the positions an input can take (after padding_idx)
    padding_idx: int = layout.PADDING_IDX
    relative_buckets: int = layout.NUM_BUCKETS
    relative_max_distance: int = layout.MAX_DISTANCE

    @property
    def token_types(self) -> int:
        """MPNet has no token types."""
        return 1

    @property
    def dimensions(self) -> int:
        """Width of the pooled vector: the hidden size."""
        return self.config.hidden_size

    def build(
        self,
        *,
        token_type_input: bool = False,
        hidden_output: bool = False,
        pooling_mask_input: bool = False,
    ) -> onnx.ModelProto:
        """The ONNX graph of this model (see the module's docstring)."""
        if token_type_input:
            raise ValueError("MPNet has no token types; its graph takes none")
        return build_mpnet_model(
            self, hidden_output=hidden_output, pooling_mask_input=pooling_mask_input
        )


def build_mpnet_model(
    source: MPNetSource, *, hidden_output: bool = False, pooling_mask_input: bool = False
) -> onnx.ModelProto:
    """The ONNX graph (opset 17) of ``MPNetModel`` followed by the source's pooling.

    Inputs int64 ``[batch, seq]``: ``input_ids``, ``attention_mask`` and, with
    ``pooling_mask_input`` (mean pooling), ``pooling_mask``. Output ``sentence_embedding``
    float32 ``[batch, hidden]``, not normalized; with ``hidden_output`` also
    ``last_hidden_state``. The operations follow transformers' eager MPNet in order.
    """
    w, config = source.weights, source.config
    if source.pooling not in ("mean", "cls"):
        raise ValueError(f"pooling {source.pooling!r} is not supported for MPNet (mean or cls)")
    g = Graph()
    inputs, pooling_mask = graph_inputs(
        token_type_input=False, pooling_mask_input=pooling_mask_input and source.pooling == "mean"
    )
    hidden = _embeddings(g, source)
    position_bias = _position_bias(g, source)
    mask_bias = attention_mask_bias(g)
    for i in range(config.num_hidden_layers):
        hidden = encoder_layer(
            g,
            w,
            config,
            hidden,
            p=f"encoder.layer.{i}",
            mask_bias=mask_bias,
            position_bias=position_bias,
        )
    d = config.hidden_size
    return finish_model(
        g,
        "mpnet_encoder",
        inputs,
        (pool_hidden(g, hidden, source.pooling, pooling_mask), d),
        hidden=(hidden, d) if hidden_output else None,
        meta={
            META_POOLING: source.pooling,
            META_MAX_POSITIONS: str(source.positions),
            META_VOCAB_SIZE: str(w[WORDS].shape[0]),
        },
    )


def _embeddings(g: Graph, source: MPNetSource) -> str:
    """word + position embeddings, then LayerNorm; positions as transformers numbers them."""
    p = "embeddings"
    w = source.weights
    pad = g.const("padding_idx", np.array(source.padding_idx, np.int64))
    not_pad = g.op("Not", [g.op("Equal", ["input_ids", pad], p)], p)
    # The engine pads with id 0 under a zero mask: such a token sits at padding_idx too.
    attended = g.op("Cast", ["attention_mask"], p, to=TensorProto.BOOL)
    counts = g.op("Cast", [g.op("And", [not_pad, attended], p)], p, to=TensorProto.INT64)
    axis = g.const("axis_1", np.array(1, np.int64))
    numbered = g.op("Mul", [g.op("CumSum", [counts, axis], p), counts], p)
    positions = g.op("Add", [numbered, pad], p)
    words = g.op("Gather", [g.const(f"{p}.word", w[WORDS]), "input_ids"], p)
    placed = g.op("Gather", [g.const(f"{p}.position", w[POSITIONS]), positions], p)
    summed = g.op("Add", [words, placed], p)
    return g.layer_norm(summed, w, f"{p}.LayerNorm", source.config.layer_norm_eps)


def _position_bias(g: Graph, source: MPNetSource) -> str:
    """``[1, heads, seq, seq]``: the relative attention bias of each (query, key) pair."""
    p = "position_bias"
    table = relative_position_buckets(
        source.positions, source.relative_buckets, source.relative_max_distance
    )
    buckets_table = g.const("relative_buckets", table.astype(np.int32))
    seq = g.op("Shape", ["input_ids"], p, start=1, end=2)  # [1]
    ends = g.op("Concat", [seq, seq], p, axis=0)
    zeros = g.const("zeros_2", np.zeros(2, np.int64))
    axes = g.const("axes_01", np.array([0, 1], np.int64))
    buckets = g.op("Slice", [buckets_table, zeros, ends, axes], p)  # [seq, seq]
    bias_table = g.const("relative_attention_bias", source.weights[RELATIVE_BIAS])
    bias = g.op("Gather", [bias_table, buckets], p)  # [seq, seq, heads]
    bias = g.op("Transpose", [bias], p, perm=[2, 0, 1])
    batch_axis = g.const("axes_0", np.array([0], np.int64))
    return g.op("Unsqueeze", [bias, batch_axis], p)


# --------------------------------------------------------------------------- reading a GGUF


def _gguf_names(n_layers: int) -> dict[str, str]:
    """GGUF tensor name -> the Hugging Face name the graph uses (BERT's for the layers)."""
    names = {
        f"{gg}.{part}": f"{hf}.{part}"
        for hf, gg in layout.EMBEDDING_TENSORS.items()
        for part in ("weight", "bias")
    }
    names[f"{layout.RELATIVE_BIAS_TENSOR}.weight"] = RELATIVE_BIAS
    for i in range(n_layers):
        for hf, gg in ENCODER_BLOCK_TENSORS.items():
            for part in ("weight", "bias"):
                names[f"blk.{i}.{gg}.{part}"] = f"encoder.layer.{i}.{hf}.{part}"
    return names


def _expected_shapes(
    weights: Mapping[str, Array], config: BertConfig, buckets: int
) -> dict[str, tuple[int, ...]]:
    d, heads = config.hidden_size, config.num_attention_heads
    try:
        vocab = weights[WORDS].shape[0]
        rows = weights[POSITIONS].shape[0]
        table = weights[RELATIVE_BIAS].shape[0]
        ff = weights["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"tensor {exc.args[0]!r} is missing; is this an MPNet encoder?") from None
    if table < buckets:
        raise ValueError(f"the relative attention bias has {table} rows for {buckets} buckets")
    shapes: dict[str, tuple[int, ...]] = {
        WORDS: (vocab, d),
        POSITIONS: (rows, d),
        "embeddings.LayerNorm.weight": (d,),
        "embeddings.LayerNorm.bias": (d,),
        RELATIVE_BIAS: (table, heads),
    }
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


def mpnet_weights(
    tensors: Mapping[str, Array], config: BertConfig, buckets: int = layout.NUM_BUCKETS
) -> dict[str, Array]:
    """The encoder's tensors of a GGUF (by GGUF name) as contiguous float32 by the names the
    graph uses; every one checked to be there with its shape."""
    names = _gguf_names(config.num_hidden_layers)
    renamed = {names[name]: value for name, value in tensors.items() if name in names}
    out: dict[str, Array] = {}
    for name, shape in _expected_shapes(renamed, config, buckets).items():
        if name not in renamed:
            raise ValueError(f"tensor {name!r} is missing; is this an MPNet encoder?")
        value = np.ascontiguousarray(renamed[name], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {value.shape}, expected {shape}")
        out[name] = value
    return out


def read_mpnet_gguf(reader: Any, path: Path) -> MPNetSource:
    """Reads a GGUF file of architecture ``mpnet`` (as ``embedd import`` writes it)."""
    arch = layout.ARCH
    config = BertConfig(
        hidden_size=int(gguf_field(reader, f"{arch}.embedding_length")),
        num_attention_heads=int(gguf_field(reader, f"{arch}.attention.head_count")),
        num_hidden_layers=int(gguf_field(reader, f"{arch}.block_count")),
        layer_norm_eps=float(gguf_field(reader, f"{arch}.attention.layer_norm_epsilon", 1e-12)),
    )
    buckets = int(gguf_field(reader, layout.RELATIVE_BUCKETS_KEY, layout.NUM_BUCKETS))
    weights = mpnet_weights(gguf_tensors(reader), config, buckets)
    pooling_type = int(gguf_field(reader, f"{arch}.pooling_type", 1))
    pooling = GGUF_POOLING.get(pooling_type)
    if pooling not in ("mean", "cls"):
        raise ValueError(f"{path}: pooling type {pooling_type} is not supported (mean or cls)")
    padding_idx = int(gguf_field(reader, layout.PADDING_IDX_KEY, layout.PADDING_IDX))
    positions = int(gguf_field(reader, f"{arch}.context_length"))
    rows = weights[POSITIONS].shape[0]
    if not 0 < positions <= rows - padding_idx - 1:
        raise ValueError(
            f"{path}: {positions} positions do not fit a table of {rows} rows that starts at "
            f"padding_idx + 1 = {padding_idx + 1}"
        )
    max_len = int(gguf_field(reader, "sentence_transformers.max_seq_length", positions))
    return MPNetSource(
        weights=weights,
        config=config,
        pooling=pooling,
        max_seq_length=min(max_len, positions),
        normalize=bool(gguf_field(reader, "sentence_transformers.normalize", False)),
        positions=positions,
        padding_idx=padding_idx,
        relative_buckets=buckets,
        relative_max_distance=int(
            gguf_field(reader, layout.RELATIVE_MAX_DISTANCE_KEY, layout.MAX_DISTANCE)
        ),
    )
