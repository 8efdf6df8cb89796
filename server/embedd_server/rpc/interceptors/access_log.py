"""Request ids, the access log line and the request metrics of every RPC, as one interceptor.

Every RPC gets a request id: the caller's ``x-request-id`` (Envoy sets one on every call it
forwards; native callers may send their own) or a new UUID. It is kept in a contextvar while
the call runs, so every log record emitted on its behalf carries it
(:class:`embedd_server.logs.RequestIdFilter`). An id made up here is sent back as
``x-request-id`` trailing metadata, which rides with the status at no cost; initial metadata
would need a write of its own on every call, would break the trailers-only error
replies Envoy's Lua filter turns into REST bodies, and would make a call whose replica dies
impossible to retry. A caller's own id is not sent back: it knows it, and Envoy returns the ids
it passes on itself (``always_set_request_id_in_response``). Errors carry their own trailers.

When the call ends, it is counted (``embedd_requests_total``, its duration observed) and one
access log line is written, just after the answer has gone out. The core adds what only it
knows (the resolved model, inputs, tokens) with :func:`note_model` and :func:`note_inputs`; no
text and no key is ever logged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from embedd_server.core.request_info import RequestInfo, set_current_request
from embedd_server.metrics import Metrics
from embedd_server.rpc.interceptors.handlers import (
    Handler,
    WrappingInterceptor,
    behaviour_of,
    same_kind,
)

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
# How many of the call's inputs were cut to the model's limit (calls that embedded something);
# Envoy passes trailers on as HTTP response headers of the same name.
TRUNCATED_INPUTS_KEY = "x-embedd-truncated-inputs"
# The vector cache's answer to a call that embedded something: "hits=H misses=M" (a trailer,
# as the truncated count: Envoy passes it on as a response header of the same name).
CACHE_KEY = "x-embedd-cache"
# The scheduler lane a caller asks for (interactive or bulk); Envoy forwards REST request
# headers as metadata, so every route takes it. The core checks its value where it is used.
LANE_KEY = "x-embedd-lane"
MAX_ID_CHARS = 128  # a caller's id goes into logs: keep it a reasonable size
QUIET_PREFIX = "/grpc.health.v1.Health/"  # probes every second: logged at DEBUG only
QUIET_METHODS = frozenset({"/embedd.v1.Embedder/Health"})  # GET /health: a probe too
Context = aio.ServicerContext[Any, Any]


def callers_request_id(metadata: Any) -> str | None:
    """The x-request-id the call carries (cut to MAX_ID_CHARS), if any."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value:
            return value[:MAX_ID_CHARS]
    return None


def callers_lane(metadata: Any) -> str:
    """The x-embedd-lane the call carries ("" if none), cut to a reasonable size."""
    for key, value in metadata or ():
        if key == LANE_KEY and isinstance(value, str):
            return value[:MAX_ID_CHARS] or " "  # an empty header is a bad value, not none
    return ""


class RequestContextInterceptor(WrappingInterceptor):
    """Gives each RPC a request id, then counts, times and logs it. Goes first in the chain,
    so calls that later interceptors refuse are logged and counted too."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        full_method = details.method
        given = callers_request_id(details.invocation_metadata)
        info = RequestInfo(given or str(uuid.uuid4()), full_method.rsplit("/", 1)[-1])
        info.lane = callers_lane(details.invocation_metadata)
        quiet = full_method.startswith(QUIET_PREFIX) or full_method in QUIET_METHODS
        level = logging.DEBUG if quiet else logging.INFO
        return _wrapped(handler, _Call(info, self._metrics, level, echo=given is None))


@dataclass
class _Call:
    """One RPC from its arrival to its end."""

    info: RequestInfo
    metrics: Metrics
    log_level: int
    echo: bool  # send the id back: only a new one, which the caller cannot know

    def begin(self, context: Context) -> None:
        set_current_request(self.info)
        if self.echo:  # an error's own trailers replace these
            context.set_trailing_metadata(((REQUEST_ID_KEY, self.info.request_id),))

    def succeeded(self, context: Context) -> None:
        """Adds what the answer of a call that embedded inputs reports: how many were cut."""
        if not self.info.inputs:
            return
        trailers = [(TRUNCATED_INPUTS_KEY, str(self.info.truncated))]
        if self.info.cache_hits or self.info.cache_misses:
            cache = f"hits={self.info.cache_hits} misses={self.info.cache_misses}"
            trailers.append((CACHE_KEY, cache))
        if self.echo:
            trailers.append((REQUEST_ID_KEY, self.info.request_id))
        context.set_trailing_metadata(tuple(trailers))

    def end(self, context: Context, failure: BaseException | None) -> None:
        seconds = time.perf_counter() - self.info.started
        code = _code_name(context, failure)
        try:
            # Counted and logged in the loop's next turn, once the answer is on its way:
            # formatting the log line stays off the caller's critical path.
            asyncio.get_running_loop().call_soon(self._record, code, seconds)
        except RuntimeError:  # no loop running (a stream finalized late): record now
            self._record(code, seconds)

    def _record(self, code: str, seconds: float) -> None:
        info = self.info
        self.metrics.request_done(info.method, info.model, code, seconds)
        if not log.isEnabledFor(self.log_level):
            return
        fields: dict[str, Any] = {
            "method": info.method,
            "code": code,
            "duration_ms": round(seconds * 1000, 2),
            "request_id": info.request_id,
        }
        if info.model:
            fields["model"] = info.model
        if info.inputs:
            fields.update(inputs=info.inputs, tokens=info.tokens, truncated=info.truncated)
        log.log(self.log_level, "%s %s", info.method, code, extra=fields)


def _code_name(context: Context, failure: BaseException | None) -> str:
    if isinstance(failure, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return "DEADLINE_EXCEEDED" if expired else "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return "UNKNOWN" if failure is not None else "OK"  # grpcio answers UNKNOWN to a raise


def _wrapped(handler: Handler, call: _Call) -> Handler:
    """A handler of the same kind as ``handler`` that runs it inside ``call``."""
    original = behaviour_of(handler)

    async def single(request: Any, context: Context) -> Any:
        # Unary answers, and streams written with context.write() (the health Watch).
        call.begin(context)
        try:
            response = await original(request, context)
        except BaseException as exc:
            call.end(context, exc)
            raise
        call.succeeded(context)
        call.end(context, None)
        return response

    async def streaming(request: Any, context: Context) -> Any:
        call.begin(context)
        failure: BaseException | None = None
        try:
            async for response in original(request, context):
                yield response
            call.succeeded(context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            call.end(context, failure)

    return same_kind(handler, streaming if inspect.isasyncgenfunction(original) else single)
