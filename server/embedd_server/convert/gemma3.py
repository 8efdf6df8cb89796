"""Gemma3 as an encoder (``Gemma3TextModel`` with ``use_bidirectional_attention``:
EmbeddingGemma), written as llama.cpp's converter writes ``Gemma3TextModel``: architecture
``gemma-embedding``.

What the model computes (transformers' ``modeling_gemma3``) and where each part goes:

- token embeddings scaled by sqrt(hidden_size) (llama.cpp's graph scales them itself);
- RMSNorm that multiplies by ``1 + w``: the 1 is added to every norm weight here, as the
  converter does (``Gemma3Model.norm_shift``), so llama.cpp multiplies by the stored weight;
- grouped-query attention with RMSNorm on each head's query and key, RoPE with one base for
  the global (``full_attention``) layers (``rope.freq_base``) and another for the
  sliding-window layers (``rope.freq_base_swa``), scores scaled by
  ``query_pre_attn_scalar ** -0.5``;
- bidirectional attention; a sliding-window layer attends to tokens at most
  ``sliding_window // 2`` positions away on either side (transformers turns config.json's
  ``sliding_window`` W into W // 2 + 1 and masks ``|i - j| < W // 2 + 1``; llama.cpp's
  symmetric window masks ``|i - j| > W // 2``, from the same W, written as config.json has it);
  which layers slide is ``layer_types``, written as a per-layer pattern;
- pre- and post-norms around attention and the feed-forward, which is a GeGLU with tanh-GELU
  (``gelu_pytorch_tanh``), then a final RMSNorm.

llama.cpp scales queries by ``1/sqrt(head_dim)`` whatever ``query_pre_attn_scalar`` says: where
the two differ, the query norm's weights are multiplied by ``sqrt(head_dim /
query_pre_attn_scalar)`` (RoPE is linear, so this scales the query exactly as the model does).

sentence-transformers' two Dense projections (EmbeddingGemma's ``2_Dense`` hidden -> 3072 and
``3_Dense`` 3072 -> hidden, no bias, identity) are written as the converter writes them
(``dense_2`` / ``dense_3`` and their ``*_feat_in`` / ``*_feat_out`` keys): llama.cpp applies
them after pooling. Any other Dense stack goes under embedd's keys (model/dense.py).

The tokenizer is SentencePiece-style BPE with byte fallback, ``<bos> A <eos>``: llama.cpp's
``llama`` tokenizer model (vocab.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from embedd_server.convert.families import _ST_DEFAULT, Family, NativeDense, Plan, Shape, _strip
from embedd_server.convert.files import Array, config_float, config_int
from embedd_server.convert.vocab import HfTokenizer, add_llama_vocab
from embedd_server.errors import ModelImportError
from embedd_server.model.dense import DenseLayer

ARCH = "gemma-embedding"
_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_feedforward_layernorm": "post_ffw_norm",
}
_FULL, _SLIDING = "full_attention", "sliding_attention"
_DENSE_NAMES = ("dense_2", "dense_3")  # llama.cpp's tensors for the two projections
# transformers' Gemma3TextConfig defaults
_DEFAULT_THETA = {_FULL: 1_000_000.0, _SLIDING: 10_000.0}
_DEFAULT_PATTERN = 6


class Gemma3Embedding(Family):
    """``Gemma3TextModel`` with bidirectional attention (EmbeddingGemma)."""

    name = "gemma3"
    arch = ARCH
    tokenizer_kind = "BPE"
    default = _ST_DEFAULT
    # The projections are small next to the encoder: kept f32 in every file type.
    always_f32 = frozenset(f"{name}.weight" for name in _DENSE_NAMES)

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        path = config_path
        if config.get("use_bidirectional_attention") is not True:
            raise ModelImportError(
                f"{path}: a Gemma3TextModel without use_bidirectional_attention is a decoder; "
                "embedd imports Gemma3 as an encoder (EmbeddingGemma: "
                "use_bidirectional_attention true)"
            )
        self.n_head_kv = config_int(config, "num_key_value_heads", path, self.n_head, minimum=1)
        self.head_dim = config_int(config, "head_dim", path, 256, minimum=1)
        self.eps = config_float(config, "rms_norm_eps", path, 1e-6)
        if self.n_head % self.n_head_kv:
            raise ModelImportError(
                f"{path}: num_attention_heads must be a multiple of num_key_value_heads"
            )
        act = config.get("hidden_activation", config.get("hidden_act", "gelu_pytorch_tanh"))
        if act != "gelu_pytorch_tanh":
            raise ModelImportError(
                f"{path}: hidden_activation {act!r} is not supported (gelu_pytorch_tanh, as "
                "llama.cpp's gemma-embedding computes it)"
            )
        for key in ("attention_bias", "attn_logit_softcapping"):
            if config.get(key):
                raise ModelImportError(f"{path}: {key} {config[key]!r} is not supported")
        self.query_scale = config_float(config, "query_pre_attn_scalar", path, 256.0)
        if self.query_scale <= 0:
            raise ModelImportError(f"{path}: query_pre_attn_scalar must be positive")
        window = config.get("sliding_window")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ModelImportError(f"{path} has no valid integer 'sliding_window' (got {window!r})")
        self.sliding_window = window
        self.sliding = _sliding_layers(config, self.n_layer, path)
        self.rope_theta, self.rope_theta_swa = _rope_thetas(config, path)

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(self.n_layer)
        writer.add_context_length(self.max_position_embeddings)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_layer_norm_rms_eps(self.eps)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_float32(f"{ARCH}.rope.freq_base_swa", self.rope_theta_swa)
        writer.add_sliding_window(self.sliding_window)
        # Which layers slide, one flag per layer (llama.cpp otherwise assumes 5 of every 6).
        writer.add_array(f"{ARCH}.attention.sliding_window_pattern", list(self.sliding))
        writer.add_causal_attention(False)

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        add_llama_vocab(writer, tk, model_dir, self.n_vocab)
        return []

    def tensors(self, loaded: dict[str, Array], src: Path) -> list[tuple[str, Array]]:
        loaded = _strip(loaded, ("model.",))
        d, ff, hd = self.n_embd, self.n_ff, self.head_dim
        q, kv = self.n_head * hd, self.n_head_kv * hd
        shapes: dict[str, Shape] = {
            "attn_q": (q, d),
            "attn_k": (kv, d),
            "attn_v": (kv, d),
            "attn_output": (d, q),
            "attn_q_norm": (hd,),
            "attn_k_norm": (hd,),
            "ffn_gate": (ff, d),
            "ffn_up": (ff, d),
            "ffn_down": (d, ff),
        }
        plan: Plan = [("embed_tokens.weight", "token_embd.weight", (self.n_vocab, d))]
        for i in range(self.n_layer):
            for hf, gg in _BLOCK.items():
                plan.append(
                    (f"layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", shapes.get(gg, (d,)))
                )
        plan.append(("norm.weight", "output_norm.weight", (d,)))
        picked = self._pick(loaded, plan, ("lm_head.",), src)
        return [(name, self._stored(name, data)) for name, data in picked.items()]

    def _stored(self, name: str, data: Array) -> Array:
        """A tensor as llama.cpp multiplies by it: a norm's ``1 + w`` (Gemma3RMSNorm, in
        float32), the query norm's times ``sqrt(head_dim / query_pre_attn_scalar)``."""
        if not name.endswith("norm.weight"):
            return data
        stored = np.asarray(data, dtype=np.float32) + np.float32(1.0)
        if name.endswith("attn_q_norm.weight") and self.query_scale != self.head_dim:
            stored = stored * np.float32(math.sqrt(self.head_dim / self.query_scale))
        return stored

    def native_dense(self, layers: tuple[DenseLayer, ...]) -> NativeDense | None:
        """EmbeddingGemma's pair of projections, hidden -> n -> hidden, no bias, identity:
        llama.cpp's ``dense_2`` / ``dense_3``. Any other stack: None."""
        fits = (
            len(layers) == 2
            and all(layer.bias is None and layer.activation == "identity" for layer in layers)
            and layers[0].in_features == self.n_embd
            and layers[1].out_features == self.n_embd
        )
        if not fits:
            return None
        keys: dict[str, int] = {}
        tensors: list[tuple[str, Array]] = []
        for name, layer in zip(_DENSE_NAMES, layers, strict=True):
            keys[f"{ARCH}.{name}_feat_in"] = layer.in_features
            keys[f"{ARCH}.{name}_feat_out"] = layer.out_features
            tensors.append((f"{name}.weight", layer.weight))
        return NativeDense(tensors=tensors, keys=keys)


def _sliding_layers(config: dict[str, Any], n_layer: int, path: Path) -> tuple[bool, ...]:
    """Per layer, whether it is a sliding-window layer: ``layer_types``, else transformers'
    default pattern (every ``sliding_window_pattern``-th layer global)."""
    types = config.get("layer_types")
    if types is None:
        pattern = config.get("sliding_window_pattern", _DEFAULT_PATTERN)
        if not isinstance(pattern, int) or pattern < 1:
            raise ModelImportError(f"{path}: sliding_window_pattern must be a positive integer")
        return tuple(bool((i + 1) % pattern) for i in range(n_layer))
    if not isinstance(types, list) or len(types) != n_layer:
        raise ModelImportError(
            f"{path}: layer_types must list the type of each of the {n_layer} layers"
        )
    unknown = sorted({str(t) for t in types} - {_FULL, _SLIDING})
    if unknown:
        raise ModelImportError(
            f"{path}: layer type {unknown[0]!r} is not supported ({_FULL}, {_SLIDING})"
        )
    return tuple(t == _SLIDING for t in types)


def _rope_thetas(config: dict[str, Any], path: Path) -> tuple[float, float]:
    """(global layers' RoPE base, sliding layers' base), from ``rope_parameters`` (per layer
    type, transformers 5) or ``rope_theta`` / ``rope_local_base_freq`` (transformers 4)."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    per_type: dict[str, dict[str, Any]] = {}
    if isinstance(params, dict) and (_FULL in params or _SLIDING in params):
        per_type = {k: v for k, v in params.items() if isinstance(v, dict)}
    elif isinstance(params, dict):
        per_type = {_FULL: params}
    elif params is not None:
        raise ModelImportError(f"{path}: rope_parameters must be an object")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ModelImportError(f"{path}: rope_scaling must be an object or null")
        per_type[_FULL] = {**per_type.get(_FULL, {}), **scaling}
    legacy = {_FULL: config.get("rope_theta"), _SLIDING: config.get("rope_local_base_freq")}
    thetas: list[float] = []
    for layer_type in (_FULL, _SLIDING):
        rope = per_type.get(layer_type, {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelImportError(
                f"{path}: RoPE type {rope_type!r} for {layer_type} layers is not supported "
                "(only default RoPE, as EmbeddingGemma has)"
            )
        theta = rope.get("rope_theta", legacy[layer_type])
        value = {"rope_theta": _DEFAULT_THETA[layer_type] if theta is None else theta}
        thetas.append(config_float(value, "rope_theta", path, _DEFAULT_THETA[layer_type]))
    return thetas[0], thetas[1]
