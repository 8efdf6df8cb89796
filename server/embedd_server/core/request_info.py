"""What is known about the request being served, kept in a contextvar while it runs.

The transport sets it when a call arrives (:func:`set_current_request`); the core adds what only
it knows (the resolved model, inputs, tokens) with :func:`note_model` and :func:`note_inputs`;
log records emitted on the request's behalf carry its id
(:class:`embedd_server.logs.RequestIdFilter`).
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class RequestInfo:
    """What is known about the RPC being served; the core fills in model, inputs and tokens."""

    request_id: str
    method: str  # the RPC's name, e.g. "Embed", "CreateEmbeddings"
    started: float = field(default_factory=time.perf_counter)
    model: str = ""  # set only once the model is resolved, so labels stay few
    inputs: int = 0
    tokens: int = 0
    truncated: int = 0  # inputs cut to the model's limit
    lane: str = ""  # the lane the caller asked for (x-embedd-lane), as sent; "": none
    cache_hits: int = 0  # inputs answered from the vector cache
    cache_misses: int = 0  # inputs looked up there and computed


_current: ContextVar[RequestInfo | None] = ContextVar("embedd_request", default=None)


def current_request() -> RequestInfo | None:
    """The RPC being served by this task (None outside an RPC)."""
    return _current.get()


def note_model(model: str) -> None:
    """Records the (resolved) model of the RPC being served, if any."""
    info = _current.get()
    if info is not None:
        info.model = model


def note_inputs(model: str, inputs: int, tokens: int, truncated: int = 0) -> None:
    """Records a batch of inputs of the RPC being served (streams add theirs up)."""
    info = _current.get()
    if info is not None:
        info.model = model
        info.inputs += inputs
        info.tokens += tokens
        info.truncated += truncated


def set_current_request(info: RequestInfo) -> None:
    """Makes ``info`` the request of this task. Each RPC runs in its own asyncio task (a copy
    of the context), so the value ends with the call without a reset."""
    _current.set(info)


def note_cache(hits: int, misses: int) -> None:
    """Records vector cache look-ups of the RPC being served (streams add theirs up)."""
    info = _current.get()
    if info is not None:
        info.cache_hits += hits
        info.cache_misses += misses
