"""Free ports and readiness probes: what `embedd run`, the tests and `make bench` all need."""

from __future__ import annotations

import errno
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (bound as the servers bind it)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def grpc_serving(
    target: str,
    service: str = "",
    timeout: float = 1.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> bool:
    """Whether the gRPC health service at ``target`` reports ``service`` SERVING (one check).
    ``credentials``: TLS (a server started with --tls-cert); default plaintext, as
    ``embedd run``'s replicas always are (Envoy terminates TLS in front of them)."""
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 (one try)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def wait_until(
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    gone: Callable[[], str | None] = lambda: None,
    interval: float = 0.1,
) -> None:
    """Polls ``ready`` until it holds; TimeoutError naming ``what`` after ``timeout`` seconds.
    ``gone`` returns why waiting is pointless (e.g. the process exited), raised at once."""
    deadline = time.monotonic() + timeout
    while True:
        reason = gone()
        if reason is not None:
            raise RuntimeError(f"{what}: {reason}")
        if ready():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not ready within {timeout:g}s")
        time.sleep(interval)
