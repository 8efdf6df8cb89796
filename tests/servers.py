"""Servers for tests: in-process on the fake engine, or the real CLI as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import Any

from embedd_server.rpc.server import EmbeddServer
from embedd_server.run.probes import free_port, grpc_serving, wait_until
from embedd_server.settings import Settings
from tests.envoy_proc import EnvoyProcess
from tests.fakes import FakeLoader, FakeRuntime, write_fake_gguf


def wait_serving(
    target: str, timeout: float = 120.0, process: subprocess.Popen[Any] | None = None
) -> None:
    """Polls the gRPC health service until SERVING (or fails the test)."""

    def exited() -> str | None:
        if process is None or process.poll() is None:
            return None
        return f"server exited with {process.returncode} before serving"

    wait_until(functools.partial(grpc_serving, target), timeout, target, gone=exited)


class ServerThread:
    """An EmbeddServer over the fake engine on its own event loop in a thread; port 0.

    ``loader`` gives its models their behaviour (default: plain fake vectors) and keeps the
    runtimes it made: ``server.loader.runtimes``.
    """

    def __init__(self, settings: Settings, loader: FakeLoader | None = None) -> None:
        self.settings = settings
        self.loader = loader or FakeLoader()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = EmbeddServer(settings, self.loader)
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    @classmethod
    def with_fake_models(
        cls, models_dir: Path, loader: FakeLoader | None = None, **overrides: Any
    ) -> ServerThread:
        """Models 'fake' (8 dims, the default) and 'other' (4 dims); ``overrides`` are
        settings."""
        write_fake_gguf(models_dir / "fake.gguf")
        write_fake_gguf(models_dir / "other.gguf", dimensions=4)
        overrides.setdefault("metrics_port", 0)  # no fixed port: tests run servers side by side
        # The fake tokenizer maps words by length, so most test texts share tokens: without
        # the vector cache every call is computed, as these tests expect; cache tests opt in.
        overrides.setdefault("cache_mb", 0)
        settings = Settings(
            grpc_port=0, models_dir=models_dir, default_model="fake", workers=2, **overrides
        )
        return cls(settings, loader)

    def call(self, coroutine: Any, timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    @property
    def runtime(self) -> FakeRuntime:
        """The fake runtime of the default model (the first this server loaded)."""
        return self.loader.runtimes[0]

    def stop(self, grace: float = 5) -> None:
        if self.loop.is_running():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()  # frees its self-pipe sockets now, not at a random later GC

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess:
    """`python -m embedd_server.cli.main serve` as a subprocess on a free port."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.process = process
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.log_path = log_path

    @classmethod
    def start(
        cls, models_dir: Path, extra_args: Sequence[str] = (), timeout: float = 180
    ) -> ServerProcess:
        port = free_port()
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"embedd-test-{port}.log"
        command = [
            sys.executable,
            "-m",
            "embedd_server.cli.main",
            "serve",
            "--grpc-port",
            str(port),
            "--models-dir",
            str(models_dir),
            "--metrics-port",
            "0",  # no fixed port: tests run servers side by side (extra_args may override)
            *extra_args,
        ]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        server = cls(process, port, log_path)
        try:
            wait_serving(server.target, timeout, process)
        except BaseException:
            server.stop()
            raise
        return server

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@contextlib.contextmanager
def server_behind_envoy(
    models_dir: Path, args: Sequence[str], envoy_dir: Path
) -> Iterator[tuple[ServerProcess, EnvoyProcess]]:
    """`embedd serve` on ``models_dir`` (with ``args``) and Envoy's REST in front of it,
    sharing a proxy secret as `embedd run`'s do (the servers believe Envoy's client address)."""
    secret = secrets.token_urlsafe(16)
    with (
        # One argument: a secret that begins with "-" (token_urlsafe's alphabet has it) is no
        # option of its own.
        ServerProcess.start(models_dir, [*args, f"--proxy-secret={secret}"]) as server,
        EnvoyProcess.start([server.target], envoy_dir, proxy_secret=secret) as envoy,
    ):
        yield server, envoy
