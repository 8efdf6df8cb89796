"""The GGUF layout of ``mpnet``, an architecture name of embedd's own (llama.cpp has no MPNet).

``embedd import`` writes it (:mod:`embedd_server.convert.mpnet`) and the ONNX graph reads it
back (:mod:`embedd_server.engines.onnx_mpnet`). Tensors are named in llama.cpp's BERT style
where MPNet's modules are BERT's, plus the relative attention bias table that all layers share.
Unlike llama.cpp's BERT files, ``position_embd`` is the whole table, indexed by transformers'
position ids (which start at ``padding_idx + 1``), and ``mpnet.context_length`` is the number
of positions an input can take (the rows after ``padding_idx``).
"""

from __future__ import annotations

ARCH = "mpnet"

# Hugging Face module (after any ``mpnet.`` prefix) -> GGUF name; each with .weight and .bias
# (the position table .weight only).
EMBEDDING_TENSORS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
# encoder.relative_attention_bias (an embedding of [buckets, heads]): one for the whole model.
RELATIVE_BIAS_HF = "encoder.relative_attention_bias"
RELATIVE_BIAS_TENSOR = "attn_rel_b"
BLOCK_TENSORS = {  # per layer: encoder.layer.N.<module> -> blk.N.<name>
    "attention.attn.q": "attn_q",
    "attention.attn.k": "attn_k",
    "attention.attn.v": "attn_v",
    "attention.attn.o": "attn_output",
    "attention.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}

# The buckets the relative positions fall into, and where the logarithmic buckets end
# (``MPNetEncoder.relative_position_bucket``: bidirectional, exact below max_exact).
RELATIVE_BUCKETS_KEY = f"{ARCH}.attention.relative_buckets_count"
RELATIVE_MAX_DISTANCE_KEY = f"{ARCH}.attention.relative_max_distance"
# The padding token id: positions count the tokens that are not it, from padding_idx + 1.
PADDING_IDX_KEY = f"{ARCH}.padding_idx"

# transformers' MPNet (4.x and 5.x) fixes these whatever config.json says:
# ``MPNetEncoder.compute_position_bias`` buckets with its default num_buckets=32 (config's
# relative_attention_num_buckets only sizes the table), ``relative_position_bucket`` with
# max_distance=128, and ``MPNetEmbeddings`` sets padding_idx = 1.
NUM_BUCKETS = 32
MAX_DISTANCE = 128
PADDING_IDX = 1
