"""Go-style durations ("30s", "5m", "1h30m", "250ms", "-1m"), as Ollama's keep_alive takes them."""

from __future__ import annotations

import math
import re

from embedd_server.errors import InvalidInput, shorten

FOREVER = math.inf
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds of a Go-style duration ("1h30m", "-1m", "45s"); a bare number is seconds."""
    stripped = text.strip()
    sign = -1.0 if stripped.startswith("-") else 1.0
    body = stripped.lstrip("+-")
    try:
        return sign * float(body)
    except ValueError:
        pass
    parts = _PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise InvalidInput(
            f"keep_alive '{shorten(text)}' is not a duration; "
            'use e.g. "5m", "1h", "30s", 0 or -1.',
            param="keep_alive",
        )
    return sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
