"""Envoy at the edge (issue 21): slow clients cannot hold its connections, its admin interface
answers no request, `embedd run` restarts it when it dies, and a caller cannot pick its
rate-limit bucket by claiming an address (X-Forwarded-For, metadata).

Real Envoy on the project's rendered config; fake-engine servers where the model does not
matter, `embedd run` on the real default model where the supervisor is the subject.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest

from embedd import Client, EmbeddClientError
from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.run.envoy import EnvoyConfigError, private_admin_socket
from embedd_server.run.probes import free_port
from embedd_server.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS_DIR
from tests.envoy_proc import EnvoyProcess, http
from tests.servers import ServerThread

# --- slowloris ---------------------------------------------------------------------------------

SLOW_CONNECTIONS = 2000
HEADER_TIMEOUT_S = 2.0  # short for the test; the default is 10 s
MAX_CONNECTIONS = 1000  # below SLOW_CONNECTIONS: without the timeout they would fill Envoy
SLOW_HEAD = b"POST /v1/embeddings HTTP/1.1\r\nHost: embedd\r\nX-Slow: "


class Tricklers:
    """Connections that send a request's first header bytes, then one byte at a time."""

    def __init__(self, port: int, count: int) -> None:
        self.selector = selectors.DefaultSelector()
        self.opened_at: dict[socket.socket, float] = {}
        self.closed_after: list[float] = []  # seconds each lived, as Envoy closed them
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", port))
            self.opened_at[sock] = time.monotonic()
            self.selector.register(sock, selectors.EVENT_READ)
        self.trickle(SLOW_HEAD)

    @property
    def open(self) -> int:
        return len(self.opened_at)

    def trickle(self, data: bytes = b"x") -> None:
        for sock in list(self.opened_at):
            try:
                sock.send(data)
            except BlockingIOError:
                pass  # still connecting, or a full buffer: next time
            except OSError:
                self._closed(sock)

    def watch(self, seconds: float) -> None:
        """Notes the connections Envoy closes within ``seconds``."""
        for key, _ in self.selector.select(seconds):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if sock.recv(65536):
                    continue  # a reply (Envoy's 408) before the close
            except BlockingIOError:
                continue
            except OSError:
                pass
            self._closed(sock)

    def _closed(self, sock: socket.socket) -> None:
        self.closed_after.append(time.monotonic() - self.opened_at.pop(sock))
        self.selector.unregister(sock)
        sock.close()

    def close(self) -> None:
        for sock in list(self.opened_at):
            self.selector.unregister(sock)
            sock.close()
        self.selector.close()


def test_slow_header_connections_are_closed_and_do_not_keep_a_client_out(
    tmp_path: Path,
) -> None:
    with (
        ServerThread.with_fake_models(tmp_path / "models") as server,
        EnvoyProcess.start(
            [server.target],
            tmp_path / "envoy",
            envoy_header_timeout_s=HEADER_TIMEOUT_S,
            envoy_max_connections=MAX_CONNECTIONS,
        ) as envoy,
    ):
        body = {"model": "fake", "input": "hello"}
        assert http(envoy.base_url + "/v1/embeddings", "POST", body=body).status == 200
        flood = Tricklers(envoy.settings.http_port, SLOW_CONNECTIONS)
        started = time.monotonic()
        admitted: list[float] = []
        client = threading.Thread(
            target=_until_admitted, args=(envoy.base_url, body, admitted, started)
        )
        client.start()
        try:
            deadline = started + HEADER_TIMEOUT_S + 5
            while flood.open and time.monotonic() < deadline:
                flood.watch(0.25)
                flood.trickle()  # one more header byte each: a live, slow client
            left = flood.open
        finally:
            flood.close()
            client.join(35)
        timed_out = [t for t in flood.closed_after if t >= 0.8 * HEADER_TIMEOUT_S]
        print(
            f"\n{SLOW_CONNECTIONS} slow connections, cap {MAX_CONNECTIONS}, header timeout "
            f"{HEADER_TIMEOUT_S:g}s: {len(timed_out)} closed by the timeout (the rest over the "
            f"cap at once), all within {max(flood.closed_after):.1f}s; a normal client got its "
            f"200 after {admitted[0] if admitted else float('nan'):.1f}s"
        )
        assert left == 0, f"{left} slow connections still open after {HEADER_TIMEOUT_S + 5:g}s"
        assert len(timed_out) >= MAX_CONNECTIONS // 2  # held until the timeout, then closed
        assert admitted and admitted[0] < HEADER_TIMEOUT_S + 4


def _until_admitted(base_url: str, body: object, admitted: list[float], started: float) -> None:
    """A normal client retrying (refused, reset) until it gets a 200: seconds after the flood
    began (``started``) that it did."""
    while time.monotonic() < started + 30:
        with contextlib.suppress(OSError):
            if http(base_url + "/v1/embeddings", "POST", body=body, timeout=2).status == 200:
                admitted.append(time.monotonic() - started)
                return
        time.sleep(0.05)  # pacing of a retrying client, not synchronisation


# --- the per-address rate limit: what Envoy saw, not what the caller claims ---------------------

SECRET = "test-proxy-secret"
RATE: dict[str, Any] = {"rate_limit_per_s": 0.05, "rate_limit_burst": 2}  # 2, then 1 per 20 s


@contextlib.contextmanager
def limited(tmp_path: Path, **envoy_settings: Any) -> Iterator[tuple[ServerThread, EnvoyProcess]]:
    """A rate-limited fake server (no keys: buckets per client address) behind Envoy, the two
    sharing a proxy secret as `embedd run`'s do."""
    with (
        ServerThread.with_fake_models(tmp_path / "models", proxy_secret=SECRET, **RATE) as server,
        EnvoyProcess.start(
            [server.target], tmp_path / "envoy", proxy_secret=SECRET, **envoy_settings
        ) as envoy,
    ):
        yield server, envoy


def test_spoofed_forwarded_for_through_envoy_stays_in_its_bucket(tmp_path: Path) -> None:
    with limited(tmp_path) as (_, envoy):
        statuses = []
        for i in range(20):
            spoofed = {
                "x-forwarded-for": f"203.0.113.{i + 1}",
                "x-embedd-client-address": f"198.51.100.{i + 1}",  # Envoy writes over it
                "x-embedd-proxy-secret": "guess",
            }
            reply = http(
                envoy.base_url + "/v1/embeddings",
                "POST",
                body={"model": "fake", "input": "hi"},
                headers=spoofed,
            )
            statuses.append(reply.status)
        assert statuses == [200] * 2 + [429] * 18, statuses


def test_trusted_hops_take_the_proxy_s_forwarded_address(tmp_path: Path) -> None:
    # Behind one trusted proxy (xff_trusted_hops=1) its X-Forwarded-For entry is the client.
    with limited(tmp_path, xff_trusted_hops=1) as (_, envoy):

        def status(client: str) -> int:
            headers = {"x-forwarded-for": client}
            body = {"model": "fake", "input": "hi"}
            return http(
                envoy.base_url + "/v1/embeddings", "POST", body=body, headers=headers
            ).status

        assert [status("192.0.2.10") for _ in range(3)] == [200, 200, 429]
        assert [status("192.0.2.11") for _ in range(3)] == [200, 200, 429]  # its own bucket


def test_direct_grpc_with_spoofed_metadata_stays_in_its_bucket(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(tmp_path / "models", proxy_secret=SECRET, **RATE) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        codes = []
        for i in range(20):
            spoofed = (
                ("x-forwarded-for", f"203.0.113.{i + 1}"),
                ("x-embedd-client-address", f"198.51.100.{i + 1}"),
                ("x-embedd-proxy-secret", "guess"),
            )
            try:
                stub.Embed(pb.EmbedRequest(texts=["hi"]), metadata=spoofed, timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as error:
                codes.append(error.code())
        assert codes == [grpc.StatusCode.OK] * 2 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 18


# --- the admin socket's directory ----------------------------------------------------------------


def test_admin_socket_directory_must_be_private(tmp_path: Path) -> None:
    made = private_admin_socket(Settings(), tmp_path)
    assert made.parent.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(EnvoyConfigError, match="open to other users"):
        private_admin_socket(Settings(envoy_admin_socket=str(shared / "admin.sock")), tmp_path)


# --- `embedd run`: admin unreachable, Envoy restarted under load --------------------------------


class Run:
    """`embedd run` (one replica, real default model) as a subprocess on free ports."""

    def __init__(self, tmp_path: Path) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log_path = tmp_path / "run.log"
        command = [
            sys.executable,
            "-m",
            "embedd_server.cli.main",
            "run",
            "--models-dir",
            str(MODELS_DIR),
            "--http-port",
            str(self.http_port),
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-port",
            "0",
            "--workers",
            "1",
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    def envoy_pid(self) -> int:
        for status in Path("/proc").glob("[0-9]*/status"):
            with contextlib.suppress(OSError):
                text = status.read_text()
                if re.search(rf"^PPid:\s+{self.process.pid}$", text, re.MULTILINE) and re.search(
                    r"^Name:\s+envoy$", text, re.MULTILINE
                ):
                    return int(status.parent.name)
        raise AssertionError(f"no Envoy child of {self.process.pid}:\n{self.log()}")

    def stop(self) -> None:
        pid = None
        with contextlib.suppress(AssertionError):
            pid = self.envoy_pid()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if pid is not None and Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)  # a failed test's leftover


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One `embedd run` for the tests below (the model loads once): the admin test leaves it
    as it was; the SIGKILL test, last, leaves it with a restarted Envoy."""
    process = Run(tmp_path_factory.mktemp("run"))
    try:
        process.wait_for_log(f"REST on http://127.0.0.1:{process.http_port}")
        yield process
    finally:
        process.stop()


def tcp_listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its socket inodes in /proc/net/tcp*)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if match := re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd)):
                inodes.add(match.group(1))
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_envoy_admin_answers_no_tcp_client(run: Run) -> None:
    envoy = run.envoy_pid()
    assert tcp_listening_ports(envoy) == {run.http_port}  # REST and gRPC only: no admin port
    base = f"http://127.0.0.1:{run.http_port}"
    assert http(base + "/quitquitquit", "POST").status == 404
    assert http(base + "/v1/embeddings", "POST", body={"input": "still here"}).status == 200
    assert run.envoy_pid() == envoy


@dataclass(frozen=True)
class Call:
    started: float
    ended: float
    ok: bool


def _load(call: Callable[[], object], calls: list[Call], stop: threading.Event) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            call()
            ok = True
        except (openai.APIError, EmbeddClientError, OSError):
            ok = False
        calls.append(Call(started, time.monotonic(), ok))
        if not ok:
            time.sleep(0.05)  # a client's retry pacing, not synchronisation


def test_sigkill_of_envoy_under_load_rest_and_grpc_back_within_5s(run: Run) -> None:
    target = f"127.0.0.1:{run.http_port}"
    rest = openai.OpenAI(base_url=f"http://{target}/v1", api_key="-", max_retries=0, timeout=10)
    native = Client(target, timeout=10)
    stop = threading.Event()
    rest_calls: list[Call] = []
    grpc_calls: list[Call] = []
    threads = [
        threading.Thread(
            target=_load,
            args=(
                lambda: rest.embeddings.create(input="hello", model=DEFAULT_MODEL),
                rest_calls,
                stop,
            ),
        )
        for _ in range(2)
    ] + [threading.Thread(target=_load, args=(lambda: native.embed("hello"), grpc_calls, stop))]
    for thread in threads:
        thread.start()
    try:
        _wait(lambda: sum(c.ok for c in rest_calls) >= 5 and sum(c.ok for c in grpc_calls) >= 5)
        old = run.envoy_pid()
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        _wait(lambda: _back(rest_calls, killed) is not None and _back(grpc_calls, killed))
        back = max(_back(rest_calls, killed) or 0, _back(grpc_calls, killed) or 0)
        _wait(lambda: len([c for c in rest_calls if c.started > back]) >= 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        rest.close()
        native.close()
    rest_back, grpc_back = _back(rest_calls, killed), _back(grpc_calls, killed)
    assert rest_back is not None and grpc_back is not None
    lost = [c for c in rest_calls + grpc_calls if not c.ok]
    print(
        f"\nEnvoy SIGKILLed under load: REST back after {rest_back - killed:.2f}s, gRPC after "
        f"{grpc_back - killed:.2f}s; {len(lost)} calls failed, all between the kill and "
        f"Envoy's return; {sum(c.ok for c in rest_calls + grpc_calls)} succeeded"
    )
    assert rest_back - killed < 5 and grpc_back - killed < 5
    # Nothing lost but the calls in flight when Envoy died and those sent while it was gone:
    # every call that started once both were back succeeded.
    assert all(c.ok for c in rest_calls + grpc_calls if c.started > max(rest_back, grpc_back))
    assert all(c.ended >= killed for c in lost)
    assert run.process.poll() is None  # embedd run (and its server) kept running
    assert run.envoy_pid() != old
    log = run.log()
    assert "Envoy exited unexpectedly (killed by SIGKILL)" in log
    assert "Envoy is serving again (restart 1)" in log


def _back(calls: list[Call], killed: float) -> float | None:
    """When the first call sent after the kill had succeeded (its end), or None."""
    return next((c.ended for c in list(calls) if c.started > killed and c.ok), None)


def _wait(condition: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
