"""EnvoySupervisor: an Envoy that dies is restarted with backoff; one that dies right after
every start is given up on with one clear error (the real Envoy: tests/integration/
test_envoy_edge.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path

import pytest

from embedd_server.run import envoy_process
from embedd_server.run.envoy_process import EnvoyFailed, EnvoySupervisor


def _stand_in(exit_code: int, started: list[float]) -> object:
    """A start_envoy that runs a process exiting with ``exit_code`` at once."""

    async def start(config: Path, admin_socket: Path) -> asyncio.subprocess.Process:
        started.append(asyncio.get_running_loop().time())
        return await asyncio.create_subprocess_exec("/bin/sh", "-c", f"exit {exit_code}")

    return start


async def _ready(envoy: asyncio.subprocess.Process, admin_socket: Path) -> None:
    return None


def test_an_envoy_that_keeps_dying_is_given_up_with_backoff(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    started: list[float] = []
    monkeypatch.setattr(envoy_process, "start_envoy", _stand_in(3, started))
    monkeypatch.setattr(envoy_process, "wait_ready", _ready)
    monkeypatch.setattr(envoy_process, "ENVOY_RESTART_BACKOFF_S", (0.01, 0.04))
    supervisor = EnvoySupervisor(Path("envoy.yaml"), Path("admin.sock"))

    async def scenario() -> None:
        await supervisor.start()
        await asyncio.wait_for(supervisor.keep_running(), 30)

    with pytest.raises(EnvoyFailed, match=r"Envoy failed 6 times in a row .*giving up"):
        asyncio.run(scenario())
    assert supervisor.restarts == envoy_process.ENVOY_GIVE_UP_AFTER
    assert len(started) == 1 + envoy_process.ENVOY_GIVE_UP_AFTER
    gaps = [later - earlier for earlier, later in itertools.pairwise(started)]
    assert gaps[-1] > gaps[0]  # the delay grew between restarts
    assert "Envoy exited unexpectedly (exit code 3); restarting it" in caplog.text


def test_an_envoy_up_long_enough_starts_again_from_the_first_delay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[float] = []
    monkeypatch.setattr(envoy_process, "start_envoy", _stand_in(0, started))
    monkeypatch.setattr(envoy_process, "wait_ready", _ready)
    monkeypatch.setattr(envoy_process, "ENVOY_RESTART_BACKOFF_S", (0.01, 0.04))
    monkeypatch.setattr(envoy_process, "ENVOY_STABLE_AFTER_S", 0.0)  # every run counts as stable
    supervisor = EnvoySupervisor(Path("envoy.yaml"), Path("admin.sock"))

    async def scenario() -> None:
        await supervisor.start()
        keeping = asyncio.ensure_future(supervisor.keep_running())
        while supervisor.restarts < 2 * envoy_process.ENVOY_GIVE_UP_AFTER:
            assert not keeping.done(), keeping.exception()
            await asyncio.sleep(0.01)
        keeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeping
        assert supervisor.process is not None
        await supervisor.process.wait()  # the last stand-in, reaped before the loop closes

    asyncio.run(scenario())  # never gave up: each exit came after a stable run
