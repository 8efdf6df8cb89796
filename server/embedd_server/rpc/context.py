"""Helpers for the servicer context shared by every RPC handler."""

from __future__ import annotations

import time
from typing import Any

from grpc import aio

Context = aio.ServicerContext[Any, Any]


def deadline_of(context: Context) -> float | None:
    """The caller's deadline as a time.monotonic() instant (None when it set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
