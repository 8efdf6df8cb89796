"""Envoy as a child process: started bound to its parent, ready on /ready, restarted when it
dies, drained, stopped.

Envoy's admin interface is a unix socket in a private directory (never a TCP port: any local
process could POST /quitquitquit to one), so the supervisor speaks HTTP over that socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import signal
import socket
import sys
import time
from pathlib import Path

from embedd_server.run.children import bound_to_parent
from embedd_server.run.envoy import envoy_binary

log = logging.getLogger(__name__)

ENVOY_READY_TIMEOUT_S = 30.0
ENVOY_STOP_TIMEOUT_S = 10.0
ENVOY_DRAIN_TIMEOUT_S = 2.0  # after the servers are gone: replies Envoy still holds
# Restarts after Envoy dies: the first comes at once-ish, then each quick failure doubles the
# delay. Envoy up STABLE_AFTER_S counts as a success; GIVE_UP_AFTER quick failures in a row
# (it dies as soon as it starts: a port taken, a broken binary) end `embedd run` instead.
ENVOY_RESTART_BACKOFF_S = (0.2, 5.0)
ENVOY_STABLE_AFTER_S = 30.0
ENVOY_GIVE_UP_AFTER = 5


class EnvoyFailed(RuntimeError):
    """Envoy could not start, or kept dying while it should have been serving."""


def envoy_command(config: Path) -> list[str]:
    """How embedd starts Envoy on a rendered config (the tests start it the same way)."""
    return [
        str(envoy_binary()),
        "-c",
        str(config),
        "--log-level",
        "warning",
        "--disable-hot-restart",  # several Envoys (tests, replicas) may share a machine
    ]


# --- the admin interface over its unix socket ------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def admin_request(
    admin_socket: Path, path: str, method: str = "GET", timeout: float = 2.0
) -> tuple[int, str]:
    """One request to Envoy's admin interface: (status, body). OSError when unreachable."""
    connection = _UnixHTTPConnection(admin_socket, timeout)
    try:
        connection.request(method, path)
        reply = connection.getresponse()
        return reply.status, reply.read().decode(errors="replace")
    except http.client.HTTPException as exc:
        raise OSError(f"Envoy's admin interface answered badly: {exc}") from exc
    finally:
        connection.close()


def admin_ready(admin_socket: Path) -> bool:
    """Whether Envoy's admin /ready answers 200 (LIVE) now."""
    try:
        return admin_request(admin_socket, "/ready", timeout=1.0)[0] == 200
    except OSError:
        return False


# --- one Envoy process -------------------------------------------------------------------------


async def start_envoy(config: Path, admin_socket: Path) -> asyncio.subprocess.Process:
    """Starts Envoy on ``config``; a socket file left by a killed Envoy is removed first."""
    with contextlib.suppress(FileNotFoundError):
        admin_socket.unlink()
    command = envoy_command(config)
    return await asyncio.create_subprocess_exec(
        *bound_to_parent(command), stdout=sys.stderr, stderr=sys.stderr, process_group=0
    )


async def wait_ready(envoy: asyncio.subprocess.Process, admin_socket: Path) -> None:
    deadline = time.monotonic() + ENVOY_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if envoy.returncode is not None:
            raise EnvoyFailed(
                f"Envoy exited with code {envoy.returncode} before it was ready (its log is above)"
            )
        if await asyncio.to_thread(admin_ready, admin_socket):
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(envoy.wait(), 0.1)
    raise EnvoyFailed(f"Envoy was not ready within {ENVOY_READY_TIMEOUT_S:.0f}s")


async def drain_and_stop_envoy(envoy: asyncio.subprocess.Process, admin_socket: Path) -> None:
    """The servers are gone: Envoy stops accepting connections, gets a moment to send the
    replies it holds (its own 503s by now), then is stopped."""
    if envoy.returncode is None:
        await asyncio.to_thread(_drain_listeners, admin_socket)
    await _stop_envoy(envoy)


def _drain_listeners(admin_socket: Path) -> None:
    try:
        admin_request(admin_socket, "/drain_listeners", method="POST")
        deadline = time.monotonic() + ENVOY_DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            stats = "/stats?filter=^http\\.rest\\.downstream_rq_active$"
            _, text = admin_request(admin_socket, stats)
            if text.strip().endswith(": 0"):
                return
            time.sleep(0.05)
    except OSError as exc:
        log.warning("could not drain Envoy's listener (%s); stopping it", exc)


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


# --- supervised: restarted like a replica ------------------------------------------------------


class EnvoySupervisor:
    """Envoy on one rendered config, restarted with backoff when it dies (SIGKILL, OOM killer,
    a crash) until :meth:`drain_and_stop`; the servers behind it keep running meanwhile, so
    only the calls Envoy held are lost. Repeated quick failures end it with EnvoyFailed."""

    def __init__(self, config: Path, admin_socket: Path) -> None:
        self.config = config
        self.admin_socket = admin_socket
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._start_error = ""

    async def start(self) -> None:
        """Starts Envoy and waits until it is ready (EnvoyFailed if it is not)."""
        self.process = await start_envoy(self.config, self.admin_socket)
        self._started_at = time.monotonic()
        log.info("Envoy: pid %d", self.process.pid)
        await wait_ready(self.process, self.admin_socket)

    async def keep_running(self) -> None:
        """Restarts Envoy whenever it exits; returns never (cancel it), raises EnvoyFailed
        after ENVOY_GIVE_UP_AFTER quick failures in a row."""
        delay = ENVOY_RESTART_BACKOFF_S[0]
        quick_failures = 0
        while True:
            how = await self._exited()
            if time.monotonic() - self._started_at > ENVOY_STABLE_AFTER_S:
                delay, quick_failures = ENVOY_RESTART_BACKOFF_S[0], 0
            quick_failures += 1
            if quick_failures > ENVOY_GIVE_UP_AFTER:
                raise EnvoyFailed(
                    f"Envoy failed {quick_failures} times in a row within "
                    f"{ENVOY_STABLE_AFTER_S:.0f}s of starting (last: {how}); giving up, "
                    "stopping the servers (Envoy's log is above)"
                )
            log.warning("Envoy exited unexpectedly (%s); restarting it in %.1fs", how, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, ENVOY_RESTART_BACKOFF_S[1])
            self.restarts += 1
            await self._restart()

    async def _exited(self) -> str:
        """Waits until the current Envoy has exited; how it ended, in words."""
        if self.process is None:
            return self._start_error
        return _how(await self.process.wait())

    async def _restart(self) -> None:
        try:
            await self.start()
        except EnvoyFailed as exc:  # it died (or hung) while starting: a quick failure
            log.warning("Envoy restart %d failed: %s", self.restarts, exc)
            if self.process is not None and self.process.returncode is None:
                self.process.kill()
        except OSError as exc:  # could not even start the process
            self.process = None
            self._start_error = f"could not start it: {exc}"
            self._started_at = time.monotonic()
        else:
            log.info("Envoy is serving again (restart %d)", self.restarts)

    async def drain_and_stop(self) -> None:
        """Drains Envoy's listener and stops it (nothing when it is not running)."""
        if self.process is not None:
            await drain_and_stop_envoy(self.process, self.admin_socket)


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
