"""Sparse (SPLADE) vectors: what a sparse encoder's GGUF says about its pooling, and the
vocabulary-wide rows its engine returns turned into (indices, values) pairs.

A SPLADE model (sentence-transformers' ``SparseEncoder``: an MLM transformer followed by
``SpladePooling``) scores every vocabulary entry of a text: ``log(1 + relu(MLM logits))``
(``activation relu``; ``log1p_relu`` takes log1p once more, as OpenSearch's models do), pooled
over the text's tokens by ``max`` (SPLADE v2 and later) or ``sum`` (the first SPLADE). Most
entries are exactly 0; the engine returns the dense row and the service keeps its non-zeros.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# `embedd import` writes a sparse encoder's SpladePooling settings under these keys.
SPLADE_POOLING_KEY = "embedd.splade.pooling_strategy"  # "max" or "sum" over the tokens
SPLADE_ACTIVATION_KEY = "embedd.splade.activation"  # "relu" or "log1p_relu"
SPLADE_POOLINGS = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")
# A SPLADE model's MLM head (BertForMaskedLM's cls.predictions), each with .weight and .bias,
# by its Hugging Face module and the GGUF name embedd gives it (llama.cpp has none). A decoder
# tied to the word embeddings has no mlm.output.weight: it is token_embd.
MLM_HEAD_TENSORS = {
    "cls.predictions.transform.dense": "mlm.dense",
    "cls.predictions.transform.LayerNorm": "mlm.norm",
    "cls.predictions.decoder": "mlm.output",
}

SparseRow = tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]


def sparse_rows(dense: npt.NDArray[np.floating]) -> list[SparseRow]:
    """Each row of ``dense`` ``[n, vocab]`` as (indices, values) of its non-zero entries.

    Indices are int64 in ascending order, values float32 (exactly the row's, no threshold):
    an entry is left out only when it is 0.
    """
    matrix = np.asarray(dense)
    if matrix.ndim != 2:
        raise ValueError(f"expected a [rows, vocabulary] matrix, got shape {matrix.shape}")
    rows: list[SparseRow] = []
    for row in matrix:
        (indices,) = np.nonzero(row)
        rows.append((indices.astype(np.int64), row[indices].astype(np.float32)))
    return rows
