"""Chunking on the wire: the ``Chunking`` request message as the core's, and the core's chunks
as the ``ChunkSpan`` messages (or, for Ollama, JSON objects) that each vector carries."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.chunking import CHUNKS, Chunk, Chunking


def requested_chunking(
    request: pb.EmbedRequest | pb.CreateEmbeddingsRequest | pb.OllamaEmbedRequest,
) -> Chunking | None:
    """The request's ``chunking`` (None: not set); the core checks its values."""
    if not request.HasField("chunking"):
        return None
    given = request.chunking
    return Chunking(size=given.size, overlap=given.overlap, pooling=given.pooling or CHUNKS)


def chunk_span(chunk: Chunk) -> pb.ChunkSpan:
    """A chunk as its ``ChunkSpan`` message."""
    return pb.ChunkSpan(
        input=chunk.text_index, start=chunk.start, end=chunk.stop, tokens=chunk.tokens
    )


def chunk_objects(chunks: Sequence[Chunk]) -> struct_pb2.ListValue:
    """The chunks as a JSON array of ``{"input", "start", "end", "tokens"}`` objects."""
    objects = struct_pb2.ListValue()
    for chunk in chunks:
        item = struct_pb2.Struct()
        item.update(
            {
                "input": chunk.text_index,
                "start": chunk.start,
                "end": chunk.stop,
                "tokens": chunk.tokens,
            }
        )
        objects.values.add().struct_value.CopyFrom(item)
    return objects
