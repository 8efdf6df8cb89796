"""A model as Ollama describes it: details and times (for /api/tags, /api/show, /api/ps); its
digest comes from the model index (core/model_index.py), hashed off the event loop."""

from __future__ import annotations

import datetime

from embedd.v1 import embedder_pb2 as pb
from embedd_server.model.catalog import ModelInfo


def ollama_details(info: ModelInfo) -> pb.RunningModelDetails:
    """Ollama's ``details`` object of a model."""
    return pb.RunningModelDetails(
        format="gguf",
        family=info.family,
        families=[info.family],
        parameter_size=parameter_size(info.parameters),
        quantization_level=info.quantization.upper(),
    )


def parameter_size(count: int) -> str:
    """A parameter count as Ollama prints it: 22.6M, 1.5B ("" when unknown)."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count) if count else ""


def rfc3339(unix_seconds: int) -> str:
    """A Unix time as RFC 3339 in UTC, with milliseconds (as Ollama prints times)."""
    when = datetime.datetime.fromtimestamp(unix_seconds, datetime.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")
