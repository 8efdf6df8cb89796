"""Ollama's keep_alive: how long a model stays loaded after a request.

A duration string ("30s", "5m", "1h30m", "250ms"), a number of seconds, 0 (unload right after
the request) or a negative value (keep loaded forever).
"""

from __future__ import annotations

import math

from google.protobuf import struct_pb2

from embedd_server.core.durations import FOREVER, parse_duration
from embedd_server.errors import InvalidInput


def parse_keep_alive(value: struct_pb2.Value) -> float | None:
    """Seconds to keep the model loaded (inf: forever), or None when not given (null)."""
    kind = value.WhichOneof("kind")
    if kind in (None, "null_value"):
        return None
    if kind == "number_value":
        seconds = value.number_value
    elif kind == "string_value":
        seconds = parse_duration(value.string_value)
    else:
        raise InvalidInput(
            "keep_alive must be a duration string or a number of seconds.", param="keep_alive"
        )
    if math.isnan(seconds):
        raise InvalidInput("keep_alive must be a number.", param="keep_alive")
    return FOREVER if seconds < 0 else seconds
