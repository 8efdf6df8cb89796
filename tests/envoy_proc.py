"""A real Envoy (the project's rendered config) in front of test gRPC servers, on free ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from embedd_server.run.envoy import write_envoy_config
from embedd_server.run.envoy_process import admin_ready, admin_request, envoy_command
from embedd_server.run.probes import free_port
from embedd_server.settings import Settings


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    url: str,
    method: str = "GET",
    *,
    body: Any = None,
    raw: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> HttpReply:
    """One plain HTTP/1.1 request; ``body`` is sent as JSON, ``raw`` as it is. Never raises
    for an HTTP error status."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={"content-type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return HttpReply(reply.status, reply.headers, reply.read())
    except urllib.error.HTTPError as error:
        with error:
            return HttpReply(error.code, error.headers, error.read())


class EnvoyProcess:
    """``envoy -c <rendered config>`` as a subprocess; its log goes to a file. Its admin
    interface is a unix socket in a private directory of its own (``admin_socket``)."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        settings: Settings,
        log_path: Path,
        admin_socket: Path,
    ) -> None:
        self.process = process
        self.settings = settings
        self.log_path = log_path
        self.admin_socket = admin_socket
        self.base_url = f"http://127.0.0.1:{settings.http_port}"
        self.grpc_target = f"127.0.0.1:{settings.http_port}"

    @classmethod
    def start(
        cls, upstreams: Sequence[str], workdir: Path, timeout: float = 30, **overrides: Any
    ) -> EnvoyProcess:
        """Starts Envoy in front of ``upstreams`` (host:port) and waits until it is ready.
        ``overrides`` are settings (e.g. the servers' ``proxy_secret``)."""
        workdir.mkdir(parents=True, exist_ok=True)
        settings = Settings(http_port=free_port(), **overrides)
        # A short private (0700) directory: unix socket paths are short, pytest's are long.
        admin_socket = Path(tempfile.mkdtemp(prefix="embedd-admin-")) / "admin.sock"
        config = write_envoy_config(
            settings, workdir / "envoy.yaml", upstreams=upstreams, admin_socket=admin_socket
        )
        log_path = workdir / "envoy.log"
        command = [*envoy_command(config), "--concurrency", "2"]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        envoy = cls(process, settings, log_path, admin_socket)
        try:
            envoy.wait_ready(timeout)
        except BaseException:
            envoy.stop()
            raise
        return envoy

    def admin(self, path: str) -> str:
        """The body of a GET of Envoy's admin ``path`` (over its unix socket)."""
        status, body = admin_request(self.admin_socket, path, timeout=5)
        assert status == 200, (path, status, body)
        return body

    def wait_ready(self, timeout: float = 30) -> None:
        """Polls the admin /ready until Envoy is LIVE (or fails with Envoy's log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.process.returncode}:\n{self.log()}")
            if admin_ready(self.admin_socket):
                return
            time.sleep(0.1)
        raise TimeoutError(f"envoy not ready within {timeout}s:\n{self.log()}")

    def upstream_health(self) -> str:
        """The admin /clusters health flags of the upstream endpoints (e.g. 'healthy')."""
        text = self.admin("/clusters")
        return "\n".join(line for line in text.splitlines() if "health_flags" in line)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.admin_socket.parent, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> EnvoyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
