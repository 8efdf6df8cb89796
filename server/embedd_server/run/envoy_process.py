"""Envoy as a child process: started bound to its parent, ready on /ready, drained, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from embedd_server.run.children import bound_to_parent
from embedd_server.run.envoy import envoy_binary

log = logging.getLogger(__name__)

ENVOY_READY_TIMEOUT_S = 30.0
ENVOY_STOP_TIMEOUT_S = 10.0
ENVOY_DRAIN_TIMEOUT_S = 2.0  # after the servers are gone: replies Envoy still holds


class EnvoyFailed(RuntimeError):
    """Envoy could not start, or exited while it should have been serving."""


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


async def start_envoy(config: Path) -> asyncio.subprocess.Process:
    command = envoy_command(config)
    return await asyncio.create_subprocess_exec(
        *bound_to_parent(command), stdout=sys.stderr, stderr=sys.stderr, process_group=0
    )


async def wait_ready(envoy: asyncio.subprocess.Process, admin_port: int) -> None:
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


async def drain_and_stop_envoy(envoy: asyncio.subprocess.Process, admin_port: int) -> None:
    """The servers are gone: Envoy stops accepting connections, gets a moment to send the
    replies it holds (its own 503s by now), then is stopped."""
    if envoy.returncode is None:
        await asyncio.to_thread(_drain_listeners, admin_port)
    await _stop_envoy(envoy)


def _drain_listeners(admin_port: int) -> None:
    admin = f"http://127.0.0.1:{admin_port}"
    try:
        drain = urllib.request.Request(admin + "/drain_listeners", method="POST")
        with urllib.request.urlopen(drain, timeout=2):
            pass
        deadline = time.monotonic() + ENVOY_DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            stats = admin + "/stats?filter=^http\\.rest\\.downstream_rq_active$"
            with urllib.request.urlopen(stats, timeout=2) as reply:
                text = reply.read().decode()
            if text.strip().endswith(": 0"):
                return
            time.sleep(0.05)
    except (urllib.error.URLError, OSError) as exc:
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
