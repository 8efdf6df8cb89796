"""MPNet (``MPNetModel``, ``MPNetForMaskedLM``; all-mpnet-base-v2 and its kin) to GGUF.

llama.cpp has no MPNet, so the file's architecture is ``mpnet``, a name of ours, laid out as
:mod:`embedd_server.model.mpnet_layout` says; ONNX Runtime serves it
(:mod:`embedd_server.engines.onnx_mpnet`). MPNet is BERT's post-LayerNorm encoder without
token types, whose attention scores get a bias by the bucket of each pair's relative position
(one table for all layers), and whose positions count from ``padding_idx + 1`` as RoBERTa's.
The vocabulary is WordPiece with a ``<s> A </s>`` template, written in llama.cpp's ``bert``
form (the file describes itself) besides the whole tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from embedd_server.convert.families import Family, Plan, Shape
from embedd_server.convert.files import Array, config_float, config_int
from embedd_server.convert.st_settings import FamilyDefault
from embedd_server.convert.vocab import HfTokenizer, add_wordpiece_vocab
from embedd_server.errors import ModelImportError
from embedd_server.model import mpnet_layout as layout

# transformers' exact (erf) GELU: what the ONNX graph computes.
_GELU = frozenset({"gelu", "gelu_python"})


class MPNet(Family):
    """``MPNetModel`` (also ``mpnet.``-prefixed weights, as ``MPNetForMaskedLM`` saves them)."""

    name = "mpnet"
    arch = layout.ARCH
    tokenizer_kind = "WordPiece"
    default = FamilyDefault(
        pooling="mean",
        normalize=False,
        why="what sentence-transformers does with a plain transformers model",
    )
    # Small tables read by index: kept exact in every file type.
    always_f32 = frozenset({"position_embd.weight", f"{layout.RELATIVE_BIAS_TENSOR}.weight"})
    unused = ("pooler.", "lm_head.", "embeddings.position_ids")

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        path = config_path
        if (act := config.get("hidden_act", "gelu")) not in _GELU:
            raise ModelImportError(
                f"{path}: hidden_act {act!r} is not supported (MPNet's exact gelu only)"
            )
        if self.n_embd % self.n_head:
            raise ModelImportError(
                f"{path}: hidden_size {self.n_embd} is not a multiple of "
                f"num_attention_heads {self.n_head}"
            )
        self.eps = config_float(config, "layer_norm_eps", path, 1e-12)
        self.n_buckets = config_int(
            config, "relative_attention_num_buckets", path, layout.NUM_BUCKETS, minimum=1
        )
        if self.n_buckets < layout.NUM_BUCKETS:
            raise ModelImportError(
                f"{path}: relative_attention_num_buckets {self.n_buckets} is fewer than the "
                f"{layout.NUM_BUCKETS} buckets transformers' MPNet computes positions into; "
                "such a model fails in transformers too"
            )
        if self.usable_positions < 1:
            raise ModelImportError(
                f"{path}: max_position_embeddings {self.max_position_embeddings} leaves no "
                f"positions after padding_idx + 1 = {layout.PADDING_IDX + 1}"
            )

    @property
    def usable_positions(self) -> int:
        """Positions from padding_idx + 1 to the end of the table."""
        return self.max_position_embeddings - layout.PADDING_IDX - 1

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(self.n_layer)
        writer.add_context_length(self.usable_positions)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_layer_norm_eps(self.eps)
        writer.add_causal_attention(False)
        writer.add_uint32(layout.RELATIVE_BUCKETS_KEY, layout.NUM_BUCKETS)
        writer.add_uint32(layout.RELATIVE_MAX_DISTANCE_KEY, layout.MAX_DISTANCE)
        writer.add_uint32(layout.PADDING_IDX_KEY, layout.PADDING_IDX)

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        add_wordpiece_vocab(writer, tk, model_dir, self.n_vocab)
        return []

    def tensors(self, loaded: dict[str, Array], src: Path) -> list[tuple[str, Array]]:
        loaded = {name.removeprefix("mpnet."): data for name, data in loaded.items()}
        d, ff = self.n_embd, self.n_ff
        embedding_shapes: dict[str, Shape] = {
            "token_embd": (self.n_vocab, d),
            "position_embd": (self.max_position_embeddings, d),
        }
        plan: Plan = [
            (f"{hf}.weight", f"{gg}.weight", embedding_shapes.get(gg, (d,)))
            for hf, gg in layout.EMBEDDING_TENSORS.items()
        ]
        plan.append(("embeddings.LayerNorm.bias", "token_embd_norm.bias", (d,)))
        plan.append(
            (
                f"{layout.RELATIVE_BIAS_HF}.weight",
                f"{layout.RELATIVE_BIAS_TENSOR}.weight",
                (self.n_buckets, self.n_head),
            )
        )
        weights: dict[str, Shape] = {"intermediate.dense": (ff, d), "output.dense": (d, ff)}
        for i in range(self.n_layer):
            for hf, gg in layout.BLOCK_TENSORS.items():
                weight = (d,) if hf.endswith("LayerNorm") else weights.get(hf, (d, d))
                bias = (ff,) if hf == "intermediate.dense" else (d,)
                plan.append((f"encoder.layer.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", weight))
                plan.append((f"encoder.layer.{i}.{hf}.bias", f"blk.{i}.{gg}.bias", bias))
        return list(self._pick(loaded, plan, self.unused, src).items())
