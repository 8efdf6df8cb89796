"""What every RPC handler gets first: the core's service and the settings the edge reads."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from embedd_server.core.service import EmbeddingService
from embedd_server.rpc.context import Context


def _always_serving() -> bool:
    return True


@dataclass(frozen=True)
class Backend:
    """The service core behind every API's handlers.

    ``serving`` says whether the server serves (the gRPC health service's state), for the REST
    health routes; ``openai_truncate`` is /v1/embeddings' default for ``truncate``;
    ``max_answer_bytes`` the largest message the server sends (its max_message_mb);
    ``stream_window`` how many EmbedStream batches are read and not yet answered.
    """

    service: EmbeddingService
    stream_window: int
    serving: Callable[[], bool] = _always_serving
    openai_truncate: bool = False
    max_answer_bytes: int = 64 * 1024 * 1024


# A handler: (backend, request, context) -> response; a streaming one yields its responses.
Handler = Callable[[Backend, Any, Context], Awaitable[Any]]
Handlers = dict[str, Callable[..., Any]]
