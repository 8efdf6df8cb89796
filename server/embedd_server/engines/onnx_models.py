"""Which ONNX graph a GGUF file becomes: its architecture's reader.

Each family that ONNX Runtime serves has a module with a reader ``(GGUFReader, path) ->
GraphSource`` (``engines/onnx_graph.py`` for BERT's layout, which holds BERT, XLM-RoBERTa
and the other llama.cpp ``bert`` files; ``engines/onnx_mpnet.py`` for MPNet); this table
lists them (docs/extending.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedd_server.engines.onnx_gemma3 import read_gemma3_gguf
from embedd_server.engines.onnx_graph import GraphSource, gguf_field, read_bert_gguf
from embedd_server.engines.onnx_modernbert import read_modernbert_gguf
from embedd_server.engines.onnx_mpnet import read_mpnet_gguf

# GGUF general.architecture -> the reader of such a file.
GGUF_READERS: dict[str, Callable[[Any, Path], GraphSource]] = {
    "bert": read_bert_gguf,
    "gemma-embedding": read_gemma3_gguf,
    "modern-bert": read_modernbert_gguf,
    "mpnet": read_mpnet_gguf,  # an architecture of ours: llama.cpp has no MPNet
}


def load_gguf(path: str | os.PathLike[str]) -> GraphSource:
    """The GGUF file at ``path`` as a GraphSource, read by its architecture's reader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = str(gguf_field(reader, "general.architecture"))
    read = GGUF_READERS.get(arch)
    if read is None:
        known = ", ".join(sorted(GGUF_READERS))
        raise ValueError(f"{path}: architecture {arch!r}; ONNX Runtime serves {known}")
    return read(reader, Path(path))
