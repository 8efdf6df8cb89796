"""A tiny causal language model GGUF (llama architecture, random weights) for tests.

It has no ``pooling_type`` key: it is what a chat model looks like to embedd, a model that
cannot produce embeddings unless it is loaded with an explicit pooling type. The weights are
f32 (llama.cpp's AMX path on these CPUs crashes on quantized types) and the tokenizer is a
byte-level BPE ("gpt2") vocabulary of the 256 byte tokens, a few merges and one control token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType

ARCH = "llama"
N_EMBD = 64
N_LAYERS = 2
N_HEADS = 4
N_FF = 128
N_CTX = 128
RMS_EPS = 1e-5

# Merges (in rank order) of the byte-level vocabulary; each result is a token too.
_MERGES = [("h", "e"), ("l", "l"), ("ll", "o"), ("Ġ", "w"), ("o", "r")]
_END_OF_TEXT = "<|endoftext|>"


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    mapping = {byte: chr(byte) if byte in printable else chr(next(extra)) for byte in range(256)}
    return [mapping[byte] for byte in range(256)]


def _vocabulary() -> tuple[list[str], list[int], list[str]]:
    tokens = _byte_tokens()
    tokens += [left + right for left, right in _MERGES]
    types = [int(TokenType.NORMAL)] * len(tokens)
    tokens.append(_END_OF_TEXT)
    types.append(int(TokenType.CONTROL))
    return tokens, types, [f"{left} {right}" for left, right in _MERGES]


def write_tiny_causal_lm(path: Path, seed: int = 0) -> Path:
    """Writes the model to ``path`` (about 0.3 MB, a few milliseconds) and returns ``path``."""
    tokens, token_types, merges = _vocabulary()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEADS
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        # numpy order is llama.cpp's ne reversed: (rows=outputs, columns=inputs).
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    writer = GGUFWriter(path, ARCH)
    writer.add_name("tiny-causal-lm")
    writer.add_file_type(int(LlamaFileType.ALL_F32))
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEADS)
    writer.add_head_count_kv(N_HEADS)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(n_vocab - 1)
    writer.add_eos_token_id(n_vocab - 1)
    writer.add_add_bos_token(False)

    tensors: dict[str, np.ndarray] = {"token_embd.weight": weight(n_vocab, N_EMBD)}
    for layer in range(N_LAYERS):
        block = f"blk.{layer}"
        tensors |= {
            f"{block}.attn_norm.weight": ones(N_EMBD),
            f"{block}.attn_q.weight": weight(N_HEADS * head_dim, N_EMBD),
            f"{block}.attn_k.weight": weight(N_HEADS * head_dim, N_EMBD),
            f"{block}.attn_v.weight": weight(N_HEADS * head_dim, N_EMBD),
            f"{block}.attn_output.weight": weight(N_EMBD, N_HEADS * head_dim),
            f"{block}.ffn_norm.weight": ones(N_EMBD),
            f"{block}.ffn_gate.weight": weight(N_FF, N_EMBD),
            f"{block}.ffn_up.weight": weight(N_FF, N_EMBD),
            f"{block}.ffn_down.weight": weight(N_EMBD, N_FF),
        }
    tensors["output_norm.weight"] = ones(N_EMBD)
    tensors["output.weight"] = weight(n_vocab, N_EMBD)
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=GGMLQuantizationType.F32)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
