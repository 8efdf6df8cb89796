"""``embedd run``: gRPC server(s) and Envoy's REST listener in front of them.

One replica (the default): the gRPC server runs in-process and Envoy as a subprocess.
Start-up: check the ports, start the server (it reports SERVING once the default model is
loaded), render Envoy's config for it, start Envoy and wait for its admin ``/ready``.

``--replicas N`` (N >= 2): N ``embedd serve`` child processes on gRPC ports grpc_port,
grpc_port+1, ... (free ports when grpc_port is 0), each given exactly this Settings object
through its environment (inherited ``EMBEDD_*`` variables are replaced, so a child reads
nothing else), and ONE Envoy whose cluster lists all N with active gRPC health checks, outlier
detection and retries of the idempotent RPCs on another replica. A child that exits
unexpectedly is restarted with backoff; Envoy takes it back once its health check passes.

Shutdown (SIGINT/SIGTERM): the server(s) go NOT_SERVING and drain (children get SIGTERM; their
``EmbeddServer.stop`` does NOT_SERVING -> drain) while Envoy still carries the answers of calls
in flight and retries refused calls elsewhere; once every server has exited, Envoy stops
accepting connections, finishes the replies it holds, and is stopped. If Envoy dies, it is
restarted like a replica (with backoff; the servers keep running, so only the calls Envoy held
are lost); if it keeps dying right after each start, the servers are stopped and the exit code
is non-zero. Envoy's admin interface is a unix socket in the run's private (0700) directory.

TLS (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``): Envoy terminates it on its port, for
REST and native gRPC alike; the server(s) behind it are told the same settings without TLS and
on the loopback (:func:`backend_settings`), so the supervisor's health probes and Envoy's
health checks stay plaintext on 127.0.0.1 and no plaintext port is reachable from outside.

Envoy and the children run in their own process groups so that a terminal's Ctrl-C reaches
only this process, which then stops everything in order. They never outlive it: if it is killed
(SIGKILL, the OOM killer), the kernel kills them too (:mod:`embedd_server.run.children`), and
their engine processes exit when their socket to the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path

from embedd_server.rpc.server import SERVICE_NAME, EmbeddServer, StartupError
from embedd_server.run.children import bound_to_parent
from embedd_server.run.envoy import (
    EnvoyConfigError,
    connect_host,
    private_admin_socket,
    write_envoy_config,
)
from embedd_server.run.envoy_process import EnvoyFailed, EnvoySupervisor
from embedd_server.run.probes import grpc_serving, port_free
from embedd_server.settings import Settings, child_environment, env_name
from embedd_server.tls import TlsError, check_server_tls

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.5, 10.0)  # first delay, cap; doubles after each quick failure
STABLE_AFTER_S = 30.0  # a replica up this long starts again from the first delay
CHILD_STOP_MARGIN_S = 15.0  # beyond shutdown_grace_s, before a child is killed


class PortInUse(RuntimeError):
    """A port the settings name is taken; the message names the port, setting and env var."""


def replica_ports(settings: Settings) -> list[int]:
    """The gRPC ports of the replicas: grpc_port, grpc_port+1, ... (free ones when it is 0)."""
    if settings.grpc_port != 0:
        last = settings.grpc_port + settings.replicas - 1
        if last > 65535:
            raise StartupError(
                f"{settings.replicas} replicas need gRPC ports {settings.grpc_port}..{last}: "
                f"choose a lower --grpc-port / {env_name('grpc_port')}."
            )
        return list(range(settings.grpc_port, last + 1))
    host = settings.grpc_host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as held:  # all held at once: N different ports
        sockets = [held.enter_context(socket.socket(family)) for _ in range(settings.replicas)]
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def check_ports_free(settings: Settings) -> None:
    """Fails fast, before any model is loaded, if a port ``embedd run`` needs is taken."""
    wanted = [
        (settings.http_host, settings.http_port, "http_port", ""),
        (settings.grpc_host, settings.grpc_port, "grpc_port", ""),
    ]
    if settings.grpc_port != 0:
        wanted += [
            (settings.grpc_host, port, "grpc_port", f"+{i}, replica {i}")
            for i, port in enumerate(replica_ports(settings)[1:], start=1)
        ]
    for host, port, name, which in wanted:
        if port != 0 and not port_free(host, port):
            flag = "--" + name.replace("_", "-")
            raise PortInUse(
                f"port {port} ({name}{which}) is already in use on {host}: stop what listens "
                f"there or choose another port with {flag} or {env_name(name)}."
            )


def run_with_envoy(settings: Settings) -> int:
    """Runs server(s) and Envoy until a signal (exit 0) or a failure (non-zero). For the CLI."""
    try:
        check_server_tls(settings)  # Envoy reads the files; a bad one is one line, here
        settings = with_proxy_secret(settings)  # before backend: the servers need it too
        backend = backend_settings(settings)
        check_ports_free(backend)
        if settings.replicas > 1:
            ports = replica_ports(backend)
            return asyncio.run(_supervise_replicas(settings, backend, ports))
        return asyncio.run(_supervise(settings, backend))
    except (PortInUse, StartupError, EnvoyConfigError, EnvoyFailed, TlsError) as exc:
        print(f"embedd run: {exc}", file=sys.stderr)
        return 2 if not isinstance(exc, EnvoyFailed) else 1


def with_proxy_secret(settings: Settings) -> Settings:
    """``settings`` with a proxy secret (a new random one unless one is set): Envoy proves
    with it that the client address it sends is the one it determined, so a direct gRPC
    caller cannot pick another caller's rate-limit bucket by claiming an address."""
    if settings.proxy_secret:
        return settings
    return settings.replace(proxy_secret=secrets.token_urlsafe(32))


async def _start_envoy(
    settings: Settings, workdir: Path, upstreams: Sequence[str]
) -> EnvoySupervisor:
    """Renders Envoy's config into the run's private ``workdir`` and starts Envoy."""
    admin_socket = private_admin_socket(settings, workdir)
    config = workdir / "envoy.yaml"
    write_envoy_config(settings, config, upstreams=upstreams, admin_socket=admin_socket)
    envoy = EnvoySupervisor(config, admin_socket)
    await envoy.start()
    return envoy


def backend_settings(settings: Settings) -> Settings:
    """What the gRPC server(s) behind Envoy are told. With TLS, Envoy terminates it (REST and
    native gRPC on its port) and the servers listen in plaintext on the loopback only: a
    plaintext gRPC port on another interface would let callers around TLS (and mTLS)."""
    if not settings.tls:
        return settings
    backend = settings.without_tls()
    if backend.grpc_host != settings.grpc_host:
        log.warning(
            "TLS is on: the gRPC server(s) behind Envoy listen in plaintext on %s only, not on "
            "grpc_host %s; clients reach gRPC over TLS on Envoy's port %d",
            backend.grpc_host,
            settings.grpc_host,
            settings.http_port,
        )
    return backend


def _stop_event() -> asyncio.Event:
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    return stop_requested


async def _supervise(settings: Settings, backend: Settings) -> int:
    """One replica: the server in this process (told ``backend``; Envoy ``settings``)."""
    stop_requested = _stop_event()
    server = EmbeddServer(backend)
    await server.start()
    upstream = f"{backend.grpc_host}:{server.port}"
    envoy: EnvoySupervisor | None = None
    with tempfile.TemporaryDirectory(prefix="embedd-envoy-") as workdir:  # mode 0700
        try:
            envoy = await _start_envoy(settings, Path(workdir), [upstream])
            _log_serving(settings, [upstream])
            await _first_done(envoy.keep_running(), stop_requested.wait())  # raises EnvoyFailed
            log.info("signal received: draining the server, then stopping Envoy")
        finally:
            await server.stop()  # NOT_SERVING and drain; Envoy still carries answers in flight
            if envoy is not None:
                await envoy.drain_and_stop()
    return 0


async def _supervise_replicas(settings: Settings, backend: Settings, ports: Sequence[int]) -> int:
    """N replicas: ``embedd serve`` children (told ``backend``), restarted when they die,
    behind one Envoy (told ``settings``)."""
    stop_requested = _stop_event()
    pool = ReplicaPool(backend, ports)
    envoy: EnvoySupervisor | None = None
    upstreams = [f"{backend.grpc_host}:{port}" for port in ports]
    with tempfile.TemporaryDirectory(prefix="embedd-envoy-") as workdir:  # mode 0700
        try:
            if not await _first_done(pool.start(), stop_requested.wait()):
                log.info("signal received while starting: stopping the replicas")
                return 0
            envoy = await _start_envoy(settings, Path(workdir), upstreams)
            _log_serving(settings, upstreams)
            pool.supervise()
            await _first_done(envoy.keep_running(), stop_requested.wait())  # raises EnvoyFailed
            log.info("signal received: draining the %d replicas, then stopping Envoy", len(ports))
        finally:
            await pool.stop()  # each: NOT_SERVING and drain; Envoy still carries the answers
            if envoy is not None:
                await envoy.drain_and_stop()
    return 0


def _log_serving(settings: Settings, upstreams: Sequence[str]) -> None:
    if settings.tls:
        log.info(
            "REST on https://%s:%d and gRPC over %s on the same port (OpenAI /v1/embeddings, "
            "Ollama /api/embed, Cohere /v2/embed, rerank /v1/rerank); plaintext gRPC behind "
            "it on %s",
            settings.http_host,
            settings.http_port,
            "mutual TLS" if settings.tls_client_ca else "TLS",
            ", ".join(upstreams),
        )
        return
    log.info(
        "REST on http://%s:%d (OpenAI /v1/embeddings, Ollama /api/embed, Cohere /v2/embed, "
        "rerank /v1/rerank), gRPC on %s",
        settings.http_host,
        settings.http_port,
        ", ".join(upstreams),
    )


async def _first_done(work: Awaitable[object], other: Awaitable[object]) -> bool:
    """Runs two awaitables until the first finishes; True if it was ``work``. The other is
    cancelled; an exception of ``work`` propagates."""
    first = asyncio.ensure_future(work)
    second = asyncio.ensure_future(other)
    done, pending = await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if first in done:
        first.result()
        return True
    return False


# --- replicas ------------------------------------------------------------------------------


def replica_settings(settings: Settings, index: int, port: int) -> Settings:
    """What replica ``index`` is told: its own gRPC port (and metrics port, when metrics are on),
    one replica; everything else as given."""
    metrics_port = settings.metrics_port + index if settings.metrics_port else 0
    return settings.replace(grpc_port=port, metrics_port=metrics_port, replicas=1)


@dataclasses.dataclass
class Replica:
    index: int
    port: int
    settings: Settings
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    restarts: int = 0

    @property
    def name(self) -> str:
        return f"replica {self.index} (gRPC port {self.port})"


class ReplicaPool:
    """The child servers: start (all SERVING), supervise (restart with backoff), stop (drain)."""

    def __init__(self, settings: Settings, ports: Sequence[int]) -> None:
        self.settings = settings
        self.replicas = [
            Replica(i, port, replica_settings(settings, i, port)) for i, port in enumerate(ports)
        ]
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Starts every child and waits until each reports SERVING. A child that exits first
        is a StartupError (its own message is on stderr above)."""
        for replica in self.replicas:
            await self._spawn(replica)
        await asyncio.gather(*(self._wait_serving(replica) for replica in self.replicas))

    def supervise(self) -> None:
        """From now on a child that exits is restarted (until stop())."""
        self._watchers = [
            asyncio.create_task(self._keep_running(replica)) for replica in self.replicas
        ]

    async def stop(self) -> None:
        """SIGTERM to every child (NOT_SERVING, drain), then wait; SIGKILL after the grace."""
        self._stopping = True
        for watcher in self._watchers:
            watcher.cancel()
        for watcher in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        running = [r for r in self.replicas if r.process and r.process.returncode is None]
        for replica in running:
            assert replica.process is not None
            with contextlib.suppress(ProcessLookupError):
                replica.process.send_signal(signal.SIGTERM)
        limit = self.settings.shutdown_grace_s + CHILD_STOP_MARGIN_S
        await asyncio.gather(*(self._reap(replica, limit) for replica in running))
        if running and len(running) == len(self.replicas):
            log.info("all %d replicas stopped", len(running))
        elif running:
            log.info("the %d replicas still running stopped", len(running))

    async def _reap(self, replica: Replica, limit: float) -> None:
        assert replica.process is not None
        try:
            code = await asyncio.wait_for(replica.process.wait(), limit)
        except TimeoutError:
            log.warning("%s did not stop within %.0fs: killing it", replica.name, limit)
            replica.process.kill()
            code = await replica.process.wait()
        if code not in (0, -signal.SIGTERM):  # -SIGTERM: it was still starting or exiting
            log.warning("%s exited with code %s on shutdown", replica.name, code)

    async def _spawn(self, replica: Replica) -> None:
        command = [
            sys.executable,
            "-m",
            "embedd_server.cli.main",
            "serve",
            "--grpc-port",  # also in the environment; here for `ps`
            str(replica.port),
        ]
        replica.process = await asyncio.create_subprocess_exec(
            *bound_to_parent(command),
            env=child_environment(replica.settings),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sys.stderr,
            stderr=sys.stderr,
            process_group=0,  # Ctrl-C reaches the supervisor only; it stops children in order
        )
        replica.started_at = time.monotonic()
        log.info("%s: pid %d", replica.name, replica.process.pid)

    async def _wait_serving(self, replica: Replica) -> None:
        assert replica.process is not None
        target = f"{connect_host(self.settings.grpc_host)}:{replica.port}"
        while not await asyncio.to_thread(grpc_serving, target, SERVICE_NAME):
            if replica.process.returncode is not None:
                raise StartupError(
                    f"{replica.name} exited with code {replica.process.returncode} before "
                    "serving (its message is above)"
                )
            await asyncio.sleep(0.2)

    async def _keep_running(self, replica: Replica) -> None:
        delay = RESTART_BACKOFF_S[0]
        while True:
            assert replica.process is not None
            code = await replica.process.wait()
            if self._stopping:
                return
            if time.monotonic() - replica.started_at > STABLE_AFTER_S:
                delay = RESTART_BACKOFF_S[0]
            how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
            log.warning(
                "%s exited unexpectedly (%s); restarting it in %.1fs", replica.name, how, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_BACKOFF_S[1])
            replica.restarts += 1
            try:
                await self._spawn(replica)
                await self._wait_serving(replica)
            except StartupError:  # it exited before serving: logged and retried above
                continue
            except OSError as exc:  # could not even start the process
                log.error("%s could not be restarted (%s); trying again", replica.name, exc)
                replica.started_at = time.monotonic()
                continue
            log.info(
                "%s is SERVING again (restart %d); Envoy takes it back at its next health check",
                replica.name,
                replica.restarts,
            )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
