"""Mistral as a decoder embedder (``MistralModel`` / ``MistralForCausalLM``: e5-mistral,
SFR-Embedding), written as llama.cpp's converter writes ``MistralForCausalLM``: architecture
``llama`` (causal attention, grouped-query heads, RMSNorm, RoPE, SiLU-gated feed-forward).

As that converter does for the ``llama`` architecture, the query and key projections are
permuted (``LlamaModel.permute``): Hugging Face rotates the two halves of each head
(``rotate_half``), llama.cpp's ``llama`` RoPE rotates adjacent pairs; the permutation
reorders each head's rows so that both compute the same attention.

The vocabulary is SentencePiece BPE with byte fallback (Mistral's own ``tokenizer.model``,
written as llama.cpp's ``llama`` tokenizer model) or byte-level BPE (``gpt2``), whichever the
model's tokenizer.json is; the server tokenizes with that tokenizer.json either way.

Mistral's ``sliding_window`` (4096 in v0.1, null later) restricts each token to the window
before it; llama.cpp's ``llama`` graph attends to every earlier token, which is the same for
inputs no longer than the window. A model whose maximum input length is longer than its
window is refused (:meth:`Mistral.check_max_seq_length`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

from embedd_server.convert.families import Plan, Qwen3, Shape, _strip
from embedd_server.convert.files import Array, config_int
from embedd_server.convert.st_settings import FamilyDefault
from embedd_server.convert.vocab import HfTokenizer, add_llama_vocab, is_sentencepiece_bpe
from embedd_server.errors import ModelImportError

_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute_for_llama_rope(weights: Array, n_head: int) -> Array:
    """llama.cpp's ``LlamaModel.permute``: each head's rows from Hugging Face's half-split
    RoPE order to the interleaved order of llama.cpp's ``llama`` RoPE."""
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


class Mistral(Qwen3):
    """``MistralModel``: Qwen3's decoder without the q/k norms, as llama.cpp's ``llama``."""

    name = "mistral"
    arch = "llama"
    default = FamilyDefault(
        pooling="lasttoken",
        normalize=True,
        why="e5-mistral's and SFR-Embedding's documented use: the last token's state, "
        "L2-normalized",
    )

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        window = config.get("sliding_window")
        self.sliding_window = (
            None if window is None else config_int(config, "sliding_window", config_path, 0)
        )
        if self.head_dim % 2:
            raise ModelImportError(f"{config_path}: head_dim {self.head_dim} must be even (RoPE)")

    def check_max_seq_length(self, max_seq_length: int) -> None:
        window = self.sliding_window
        if window is not None and 0 < window < max_seq_length:
            raise ModelImportError(
                f"{self.config_path}: sliding_window {window} is shorter than the maximum input "
                f"length {max_seq_length}; llama.cpp's llama graph attends to every earlier "
                "token, which equals Mistral's sliding window only up to the window's length. "
                f"Set max_seq_length to at most {window} in sentence_bert_config.json and "
                "import it again"
            )

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        super().add_hparams(writer)
        writer.add_vocab_size(self.n_vocab)
        writer.add_rope_dimension_count(self.head_dim)

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        if not is_sentencepiece_bpe(tk):
            return super().add_vocab(writer, tk, model_dir)  # byte-level BPE, as gpt2
        add_llama_vocab(writer, tk, model_dir, self.n_vocab)
        return []

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
            "ffn_norm": (d,),
            "ffn_gate": (ff, d),
            "ffn_up": (ff, d),
            "ffn_down": (d, ff),
        }
        plan: Plan = [("embed_tokens.weight", "token_embd.weight", (self.n_vocab, d))]
        for i in range(self.n_layer):
            for hf, gg in _BLOCK.items():
                plan.append((f"layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", shapes[gg]))
        plan.append(("norm.weight", "output_norm.weight", (d,)))
        # The language-model head is not needed for embeddings (llama.cpp ties to token_embd).
        picked = self._pick(loaded, plan, ("lm_head.",), src)
        for i in range(self.n_layer):
            for gg, heads in (("attn_q", self.n_head), ("attn_k", self.n_head_kv)):
                name = f"blk.{i}.{gg}.weight"
                picked[name] = permute_for_llama_rope(np.asarray(picked[name]), heads)
        return list(picked.items())
