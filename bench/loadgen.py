"""Closed-loop load generators: ghz for gRPC, and cheap asyncio ones for gRPC and HTTP/1.1.

Each caller sends a request, waits for its answer, and sends the next, until the leg's
duration is up; calls in flight then finish and count. Messages are built once before the
leg (serialized protobuf bytes, or whole HTTP requests as bytes) and taken in turn, so the
generator spends its CPU on the network, not on building requests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBED_METHOD = "/embedd.v1.Embedder/Embed"
REQUEST_TIMEOUT_S = 60.0
GHZ_GRACE_S = 90.0  # beyond the leg's duration before ghz is killed
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class LoadResult:
    """What one leg of closed-loop load gave."""

    requests: int  # answered OK
    errors: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds, sorted, OK calls only
    first_error: str = ""
    generator: str = ""


# --- ghz ----------------------------------------------------------------------------------


def parse_ghz_json(text: str) -> LoadResult:
    """ghz's ``-O json`` report: counts by status, total time and every call's latency.

    Durations are nanoseconds. Percentiles are computed from the per-call ``details`` (OK
    calls) when present, else ghz's own ``latencyDistribution`` is used for p50/p99 only.
    """
    report: dict[str, Any] = json.loads(text)
    statuses: dict[str, int] = report.get("statusCodeDistribution") or {}
    ok = int(statuses.get("OK", 0))
    total = int(report.get("count", 0))
    errors_by_text: dict[str, int] = report.get("errorDistribution") or {}
    details = report.get("details") or []
    latencies = sorted(
        detail["latency"] / 1e9 for detail in details if detail.get("status") == "OK"
    )
    if not latencies and ok:
        by_percent = {
            entry["percentage"]: entry["latency"] / 1e9
            for entry in report.get("latencyDistribution") or []
        }
        # Two points stand for the distribution: enough for p50 and p99.
        latencies = sorted(value for key, value in by_percent.items() if key in (50, 99))
    first_error = next(iter(errors_by_text), "")
    return LoadResult(
        requests=ok,
        errors=max(0, total - ok),
        seconds=int(report.get("total", 0)) / 1e9,
        latencies=latencies,
        first_error=first_error,
        generator="ghz",
    )


def ghz_command(
    ghz: Path,
    target: str,
    data_file: Path,
    *,
    concurrency: int,
    duration_s: float,
    call: str = "embedd.v1.Embedder.Embed",
    rps: float | None = None,
) -> list[str]:
    """ghz over server reflection, closed loop for ``duration_s`` (or paced at ``rps``
    requests per second), JSON report on stdout."""
    pacing = ["--rps", f"{max(1, round(rps))}"] if rps else []
    return [
        str(ghz),
        "--insecure",
        "--call",
        call,
        "--data-file",
        str(data_file),
        "--concurrency",
        str(concurrency),
        "--duration",
        f"{duration_s:g}s",
        "--duration-stop",
        "wait",  # calls in flight at the end finish and count
        "--timeout",
        f"{REQUEST_TIMEOUT_S:g}s",
        "--max-recv-message-size",
        f"{MAX_MESSAGE_BYTES}",
        "--disable-template-data",
        "--disable-template-functions",
        *pacing,
        "--format",
        "json",
        target,
    ]


def run_ghz(
    ghz: Path,
    target: str,
    data_file: Path,
    concurrency: int,
    duration_s: float,
    *,
    rps: float | None = None,
) -> LoadResult:
    command = ghz_command(
        ghz, target, data_file, concurrency=concurrency, duration_s=duration_s, rps=rps
    )
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=duration_s + GHZ_GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return LoadResult(0, 1, duration_s, first_error="ghz timed out", generator="ghz")
    if not done.stdout.strip().startswith("{"):
        message = (done.stderr or done.stdout).strip()[-300:]
        return LoadResult(0, 1, duration_s, first_error=f"ghz failed: {message}", generator="ghz")
    return parse_ghz_json(done.stdout)


def ghz_data(messages: Sequence[Sequence[str]]) -> str:
    """ghz's data file: a JSON array of EmbedRequest messages, sent in turn."""
    return json.dumps([{"texts": list(texts)} for texts in messages], ensure_ascii=False)


# --- asyncio closed loops ---------------------------------------------------------------


class _ClosedLoop:
    """What the callers of one asyncio leg share: the requests, taken in turn until the
    leg's time is up, and what the calls gave."""

    def __init__(self, requests: Sequence[bytes], duration_s: float) -> None:
        self._requests = itertools.cycle(requests)
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + duration_s
        self.latencies: list[float] = []  # seconds, OK calls only
        self.errors: list[str] = []

    def next_request(self) -> bytes | None:
        """The next request to send, or None once the leg's time is up."""
        return next(self._requests) if self._loop.time() < self._deadline else None

    async def run(
        self, callers: int, caller: Callable[[], Awaitable[None]], generator: str
    ) -> LoadResult:
        """Runs ``callers`` copies of ``caller`` until each sees the end of the leg."""
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        seconds = time.perf_counter() - started
        self.latencies.sort()
        first_error = self.errors[0] if self.errors else ""
        return LoadResult(
            len(self.latencies), len(self.errors), seconds, self.latencies, first_error, generator
        )


# --- asyncio gRPC -------------------------------------------------------------------------


def embed_requests(messages: Sequence[Sequence[str]]) -> list[bytes]:
    """Serialized EmbedRequest messages, built once."""
    from embedd.v1 import embedder_pb2

    return [embedder_pb2.EmbedRequest(texts=list(texts)).SerializeToString() for texts in messages]


def grpc_load(
    target: str,
    requests: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    *,
    method: str = EMBED_METHOD,
) -> LoadResult:
    """Closed-loop unary calls of ``method`` (Embed by default) with pre-serialized bytes
    (answers are not parsed)."""
    return asyncio.run(_grpc_load(target, requests, concurrency, duration_s, method))


async def _grpc_load(
    target: str,
    requests: Sequence[bytes],
    concurrency: int,
    duration_s: float,
    method: str = EMBED_METHOD,
) -> LoadResult:
    import grpc
    from grpc import aio

    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call: Any = channel.unary_unary(method)  # no (de)serializers: bytes in, bytes out
        leg = _ClosedLoop(requests, duration_s)

        async def caller() -> None:
            while (message := leg.next_request()) is not None:
                started = time.perf_counter()
                try:
                    await call(message, timeout=REQUEST_TIMEOUT_S)
                except grpc.RpcError as error:
                    leg.errors.append(str(error.code()))
                    continue
                leg.latencies.append(time.perf_counter() - started)

        return await leg.run(concurrency, caller, "asyncio grpc")


# --- asyncio HTTP/1.1 ---------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a REST server takes OpenAI-shaped embedding requests."""

    base_url: str  # http://127.0.0.1:PORT
    route: str  # /v1/embeddings, or /embeddings (Infinity)
    model: str  # the request's "model"

    @property
    def host(self) -> str:
        return self.base_url.removeprefix("http://").rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def request(self, texts: Sequence[str]) -> bytes:
        """The whole HTTP request embedding ``texts``, as bytes."""
        return http_post(self.host, self.port, self.route, openai_embedding_body(texts, self.model))


def http_post(host: str, port: int, path: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 keep-alive POST request as bytes."""
    head = (
        f"POST {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


def openai_embedding_body(texts: Sequence[str], model: str) -> bytes:
    """OpenAI's POST /v1/embeddings body; one text is sent as a string."""
    payload: dict[str, Any] = {
        "model": model,
        "input": texts[0] if len(texts) == 1 else list(texts),
        "encoding_format": "float",
    }
    return json.dumps(payload, ensure_ascii=False).encode()


@dataclass(frozen=True)
class ResponseHead:
    status: int
    content_length: int | None
    chunked: bool
    close: bool


def parse_response_head(head: bytes) -> ResponseHead:
    """The status line and the framing headers of an HTTP/1.1 response head."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ValueError(f"not an HTTP response: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip().lower()
    length = headers.get("content-length")
    return ResponseHead(
        status=int(parts[1]),
        content_length=int(length) if length is not None else None,
        chunked="chunked" in headers.get("transfer-encoding", ""),
        close=headers.get("connection") == "close" or parts[0] == "HTTP/1.0",
    )


async def read_response(reader: asyncio.StreamReader) -> ResponseHead:
    """Reads one response (head and body, which is discarded)."""
    head = parse_response_head(await reader.readuntil(b"\r\n\r\n"))
    if head.chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif head.content_length is not None:
        await reader.readexactly(head.content_length)
    else:
        await reader.read()  # body until the server closes
        return ResponseHead(head.status, head.content_length, head.chunked, True)
    return head


def http_load(
    host: str, port: int, requests: Sequence[bytes], concurrency: int, duration_s: float
) -> LoadResult:
    """Closed-loop HTTP/1.1 keep-alive callers, one connection each, raw pre-built bytes."""
    return asyncio.run(_http_load(host, port, requests, concurrency, duration_s))


async def _http_load(
    host: str, port: int, requests: Sequence[bytes], concurrency: int, duration_s: float
) -> LoadResult:
    leg = _ClosedLoop(requests, duration_s)

    async def caller() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (request := leg.next_request()) is not None:
                started = time.perf_counter()
                writer.write(request)
                try:
                    head = await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
                    leg.errors.append(type(error).__name__)
                    head = ResponseHead(0, None, False, True)
                else:
                    if head.status == 200:
                        leg.latencies.append(time.perf_counter() - started)
                    else:
                        leg.errors.append(f"HTTP {head.status}")
                if head.close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
        finally:
            writer.close()

    return await leg.run(concurrency, caller, "asyncio http")
