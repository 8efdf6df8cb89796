"""``embedd run``: the gRPC server in-process and Envoy's REST listener as a subprocess.

Start-up: check the ports, start the server (it reports SERVING once the default model is
loaded), render Envoy's config for it, start Envoy and wait for its admin ``/ready``.
Shutdown (SIGINT/SIGTERM): the server goes NOT_SERVING and drains while Envoy still carries the
answers of calls in flight, then Envoy is stopped. If Envoy dies, the server is stopped too and
the exit code is non-zero.

Envoy runs in its own process group so that a terminal's Ctrl-C reaches only this process, which
then stops both in order. The upstream list given to the config renderer is where several
server replicas will go.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from embedd_server.app import EmbeddServer, StartupError
from embedd_server.envoy_config import EnvoyConfigError, envoy_binary, write_envoy_config
from embedd_server.settings import Settings, env_name

log = logging.getLogger(__name__)

ENVOY_READY_TIMEOUT_S = 30.0
ENVOY_STOP_TIMEOUT_S = 10.0


class PortInUse(RuntimeError):
    """A port the settings name is taken; the message names the port, setting and env var."""


class EnvoyFailed(RuntimeError):
    """Envoy could not start, or exited while it should have been serving."""


def check_ports_free(settings: Settings) -> None:
    """Fails fast, before any model is loaded, if a port ``embedd run`` needs is taken."""
    wanted = [
        ("127.0.0.1", settings.http_port, "http_port"),
        ("127.0.0.1", settings.envoy_admin_port, "envoy_admin_port"),
        (settings.grpc_host, settings.grpc_port, "grpc_port"),
    ]
    for host, port, name in wanted:
        if port != 0 and not _port_free(host, port):
            flag = "--" + name.replace("_", "-")
            raise PortInUse(
                f"port {port} ({name}) is already in use on {host}: stop what listens there "
                f"or choose another port with {flag} or {env_name(name)}."
            )


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def run_with_envoy(settings: Settings) -> int:
    """Runs server and Envoy until a signal (exit 0) or a failure (non-zero). For the CLI."""
    try:
        check_ports_free(settings)
        return asyncio.run(_supervise(settings))
    except (PortInUse, StartupError, EnvoyConfigError, EnvoyFailed) as exc:
        print(f"embedd run: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, EnvoyFailed) else 1


async def _supervise(settings: Settings) -> int:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    server = EmbeddServer(settings)
    await server.start()
    upstream = f"{settings.grpc_host}:{server.port}"
    envoy: asyncio.subprocess.Process | None = None
    with tempfile.TemporaryDirectory(prefix="embedd-envoy-") as workdir:
        try:
            config = Path(workdir) / "envoy.yaml"
            write_envoy_config(settings, config, upstreams=[upstream])
            envoy = await _start_envoy(config)
            await _wait_ready(envoy, settings.envoy_admin_port)
            log.info(
                "REST on http://127.0.0.1:%d (OpenAI /v1/embeddings, Ollama /api/embed), "
                "gRPC on %s",
                settings.http_port,
                upstream,
            )
            if await _envoy_exits_first(envoy, stop_requested):
                raise EnvoyFailed(f"Envoy exited unexpectedly with code {envoy.returncode}")
            log.info("signal received: draining the server, then stopping Envoy")
        finally:
            await server.stop()  # NOT_SERVING and drain; Envoy still carries answers in flight
            if envoy is not None:
                await _stop_envoy(envoy)
    return 0


async def _envoy_exits_first(
    envoy: asyncio.subprocess.Process, stop_requested: asyncio.Event
) -> bool:
    """Waits for a stop signal or Envoy's exit; True if Envoy exited first."""
    exited = asyncio.ensure_future(envoy.wait())
    signalled = asyncio.ensure_future(stop_requested.wait())
    done, pending = await asyncio.wait({exited, signalled}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return exited in done


async def _start_envoy(config: Path) -> asyncio.subprocess.Process:
    command = [
        str(envoy_binary()),
        "-c",
        str(config),
        "--log-level",
        "warning",
        "--disable-hot-restart",  # several Envoys (tests, replicas) may share a machine
    ]
    return await asyncio.create_subprocess_exec(
        *command, stdout=sys.stderr, stderr=sys.stderr, process_group=0
    )


async def _wait_ready(envoy: asyncio.subprocess.Process, admin_port: int) -> None:
    url = f"http://127.0.0.1:{admin_port}/ready"
    deadline = time.monotonic() + ENVOY_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if envoy.returncode is not None:
            raise EnvoyFailed(
                f"Envoy exited with code {envoy.returncode} before it was ready (its log is above)"
            )
        if await asyncio.to_thread(_answers_ready, url):
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(envoy.wait(), 0.1)
    raise EnvoyFailed(f"Envoy was not ready within {ENVOY_READY_TIMEOUT_S:.0f}s ({url})")


def _answers_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


async def _stop_envoy(envoy: asyncio.subprocess.Process) -> None:
    if envoy.returncode is not None:
        return
    envoy.terminate()
    try:
        await asyncio.wait_for(envoy.wait(), ENVOY_STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("Envoy did not stop within %.0fs: killing it", ENVOY_STOP_TIMEOUT_S)
        envoy.kill()
        await envoy.wait()
