"""`embedd run --replicas N`: N server processes behind one Envoy, on the REAL default model.

Fault tests under closed-loop REST load (8 threads of POST /v1/embeddings, short texts):
SIGKILL one replica -> no request fails, the replica is restarted and takes traffic again;
SIGTERM `embedd run` -> every request the servers accepted is answered 200, the rest get a clean
503 (or find the port closed once the servers are gone), and the process exits 0. Each prints
what it measured. Also, without the model: what the children are told, the ports checked, and
the rendered cluster/route configuration (health checks, outlier detection, retries, admin on
a private unix socket).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from embedd_server.run.envoy import render_envoy_config
from embedd_server.run.envoy_process import admin_request
from embedd_server.run.probes import free_port
from embedd_server.run.replicas import (
    PortInUse,
    check_ports_free,
    replica_ports,
    replica_settings,
)
from embedd_server.settings import (
    Settings,
    child_environment,
    load_settings,
    settings_from_argv,
)
from tests.conftest import DEFAULT_MODEL, MODELS_DIR
from tests.envoy_proc import http
from tests.servers import wait_serving

LOAD_THREADS = 8
REQUEST_TIMEOUT_S = 60.0


# --- without the model: settings, ports, configuration --------------------------------------


def test_children_get_exactly_the_settings_object() -> None:
    settings = settings_from_argv(
        ["--replicas", "3", "--grpc-port", "17000", "--metrics-port", "17100", "--log-json"]
    ).replace(api_keys="k1,k2", model_aliases="small=all-minilm-l6-v2", shutdown_grace_s=7.5)
    inherited = {"PATH": "/usr/bin", "EMBEDD_WORKERS": "9", "EMBEDD_CONFIG": "/nope.toml"}
    for index, port in enumerate(replica_ports(settings)):
        child = replica_settings(settings, index, port)
        environment = child_environment(child, base=inherited)
        assert environment["PATH"] == "/usr/bin"  # the rest of the environment passes
        assert "EMBEDD_CONFIG" not in environment  # no config file behind the object's back
        assert load_settings(environ=environment) == child  # flags-free child sees the object
        assert (child.grpc_port, child.metrics_port, child.replicas) == (
            17000 + index,
            17100 + index,
            1,
        )
        assert child.workers == settings.workers  # not the inherited EMBEDD_WORKERS=9
    assert replica_settings(settings.replace(metrics_port=0), 1, 17001).metrics_port == 0


def test_grpc_port_0_gives_distinct_free_ports() -> None:
    ports = replica_ports(Settings(grpc_port=0, replicas=4))
    assert len(set(ports)) == 4
    assert 0 not in ports


def test_a_replica_port_in_use_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    with _taken_port_above_a_free_one() as port:
        settings = Settings(grpc_port=port - 1, replicas=2, http_port=free_port())
        with pytest.raises(PortInUse, match=rf"port {port} \(grpc_port\+1, replica 1\)"):
            check_ports_free(settings)


@contextlib.contextmanager
def _taken_port_above_a_free_one() -> Iterator[int]:
    """Listens on a port whose lower neighbour is free (tries a few until one fits)."""
    for _ in range(50):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port: int = taken.getsockname()[1]
            if _bindable(port - 1):
                yield port
                return
    raise AssertionError("found no free port below a taken one in 50 tries")


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _first_route(routes: list[dict[str, Any]], path: str, native: bool) -> dict[str, Any]:
    """The route Envoy picks for a (transcoded) gRPC path, as the route table says."""
    for route in routes:
        match = route["match"]
        if "dynamic_metadata" in match and not native:
            continue
        if "safe_regex" in match and not re.fullmatch(match["safe_regex"]["regex"], path):
            continue
        if "prefix" in match and not path.startswith(match["prefix"]):
            continue
        return route
    raise AssertionError(f"no route for {path}")


def test_rendered_config_health_checks_outliers_retries_and_socket_admin() -> None:
    settings = Settings(http_port=18080, grpc_port=15051, replicas=2)
    upstreams = [f"127.0.0.1:{port}" for port in replica_ports(settings)]
    admin_socket = Path("/run/embedd/admin.sock")
    config = yaml.safe_load(
        render_envoy_config(settings, upstreams=upstreams, admin_socket=admin_socket)
    )
    assert config["admin"]["address"] == {"pipe": {"path": str(admin_socket), "mode": 0o600}}
    [cluster] = config["static_resources"]["clusters"]
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints] == [
        15051,
        15052,
    ]
    [check] = cluster["health_checks"]
    assert check["grpc_health_check"] == {"service_name": "embedd.v1.Embedder"}
    assert check["interval"] == "1s"
    assert check["unhealthy_threshold"] <= 2
    outliers = cluster["outlier_detection"]
    assert outliers["consecutive_5xx"] and outliers["consecutive_gateway_failure"]
    assert outliers["max_ejection_percent"] == 50  # one of two replicas, never both
    assert cluster["circuit_breakers"]["thresholds"][0]["max_retries"] > 0
    single = yaml.safe_load(render_envoy_config(settings, upstreams=upstreams[:1]))
    assert (
        single["static_resources"]["clusters"][0]["outlier_detection"]["max_ejection_percent"] == 0
    )  # nothing to fail over to
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    idempotent = [
        "Embedder/Embed",
        "Embedder/Tokenize",
        "Embedder/ListModels",
        "Embedder/GetModel",
        "OpenAI/CreateEmbeddings",
        "Ollama/OllamaEmbed",
    ]
    for native in (True, False):
        for rpc in idempotent:
            policy = _first_route(routes, f"/embedd.v1.{rpc}", native)["route"]
            retry = policy["retry_policy"]
            assert set(retry["retry_on"].split(",")) == {
                "unavailable",
                "cancelled",
                "reset",
                "connect-failure",
                "refused-stream",
            }
            assert retry["num_retries"] >= 1
            [predicate] = retry["retry_host_predicate"]
            assert predicate["name"] == "envoy.retry_host_predicates.previous_hosts"
            assert policy["timeout"] == ("0s" if native else "300s")
        for rpc in ("EmbedStream", "LoadModel", "UnloadModel"):
            route = _first_route(routes, f"/embedd.v1.Embedder/{rpc}", native)["route"]
            assert "retry_policy" not in route
        health = _first_route(routes, "/grpc.health.v1.Health/Check", native)["route"]
        assert "retry_policy" not in health


# --- `embedd run --replicas 2` on the real model ---------------------------------------------


def consecutive_free_ports(count: int) -> int:
    """A port p such that p .. p+count-1 are free now."""
    for _ in range(100):
        first = free_port()
        if first + count - 1 <= 65535 and all(_bindable(first + i) for i in range(count)):
            return first
    raise RuntimeError("no run of free ports found")


class ReplicatedRun:
    """`embedd run --replicas N` as a subprocess on free ports; its log in a file."""

    def __init__(self, tmp_path: Path, replicas: int = 2) -> None:
        self.http_port = free_port()
        # Envoy's admin socket: a short private (0700) directory (pytest's paths are long).
        self.admin_socket = Path(tempfile.mkdtemp(prefix="embedd-admin-")) / "admin.sock"
        first = consecutive_free_ports(replicas)
        self.grpc_ports = list(range(first, first + replicas))
        self.log_path = tmp_path / "run.log"
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        command = [
            sys.executable,
            "-m",
            "embedd_server.cli.main",
            "run",
            "--replicas",
            str(replicas),
            "--models-dir",
            str(MODELS_DIR),
            "--http-port",
            str(self.http_port),
            "--envoy-admin-socket",
            str(self.admin_socket),
            "--grpc-port",
            str(first),
            "--metrics-port",
            "0",
            "--workers",
            "1",  # 2 cores shared with other test runs: one worker per replica
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout: float = 120) -> None:
        line = f"REST on http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + timeout
        while line not in self.log():
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)
        self.wait_all_healthy()

    def children(self) -> dict[int, str]:
        """pid -> command line of this process's live children (Envoy and the replicas)."""
        found = {}
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
                command = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if re.search(rf"^PPid:\s+{self.process.pid}$", text, re.MULTILINE) and not re.search(
                r"^State:\s+Z", text, re.MULTILINE
            ):
                found[int(status.parent.name)] = command.decode(errors="replace")
        return found

    def replica_pid(self, port: int) -> int | None:
        for pid, command in self.children().items():
            if " serve " in command and f"--grpc-port {port}" in command:
                return pid
        return None

    def upstreams(self) -> dict[int, dict[str, str]]:
        """Envoy's admin /clusters for the replicas: port -> {stat or flag: value}."""
        _, text = admin_request(self.admin_socket, "/clusters", timeout=5)
        table: dict[int, dict[str, str]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            host, _, port = parts[1].rpartition(":") if len(parts) == 4 else ("", "", "")
            if parts[0] == "embedd_grpc" and host and port.isdigit():
                table.setdefault(int(port), {})[parts[2]] = parts[3]
        return table

    def retry_stats(self) -> dict[str, int]:
        """Envoy's retry and ejection counters of the replicas' cluster."""
        stats = "/stats?filter=^cluster\\.embedd_grpc\\."
        _, text = admin_request(self.admin_socket, stats, timeout=5)
        wanted = ("upstream_rq_retry", "outlier_detection.ejections_enforced_total")
        found = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            short = name.removeprefix("cluster.embedd_grpc.")
            if short.startswith(wanted) and value.isdigit() and int(value):
                found[short] = int(value)
        return found

    def rq_total(self, port: int) -> int:
        return int(self.upstreams()[port]["rq_total"])

    def wait_healthy(self, port: int, timeout: float = 60) -> None:
        """Until Envoy routes to ``port`` again (health check passed, not ejected)."""
        deadline = time.monotonic() + timeout
        while self.upstreams()[port].get("health_flags") != "healthy":
            assert time.monotonic() < deadline, (self.upstreams(), self.log())
            time.sleep(0.1)

    def wait_all_healthy(self) -> None:
        for port in self.grpc_ports:
            self.wait_healthy(port)

    def kill_everything(self) -> None:
        """SIGKILL to this process and to its children of the moment (a failed test's leftovers:
        only pids that are ours now, never ones seen earlier that may have been reused)."""
        pids = list(self.children()) if self.process.poll() is None else []
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.admin_socket.parent, ignore_errors=True)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[ReplicatedRun]:
    run = ReplicatedRun(tmp_path)
    try:
        run.wait_serving()
        yield run
    finally:
        run.kill_everything()


@dataclass(frozen=True)
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no HTTP answer
    body: bytes = b""
    error: BaseException | None = None

    @property
    def connection_refused(self) -> bool:
        reason = getattr(self.error, "reason", None)
        return isinstance(self.error, ConnectionRefusedError) or isinstance(
            reason, ConnectionRefusedError
        )

    @property
    def clean_503(self) -> bool:
        """Envoy's (or the server's) 503 for a call no server accepted, in OpenAI's shape."""
        if self.status != 503:
            return False
        try:
            error = json.loads(self.body)["error"]
        except (ValueError, KeyError, TypeError):
            return False
        return bool(error.get("code") == "service_unavailable")


class ClosedLoopLoad:
    """``threads`` clients, each sending the next request as soon as the last is answered."""

    def __init__(self, url: str, threads: int = LOAD_THREADS) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)
        ]

    def __enter__(self) -> ClosedLoopLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 10)
        with self._lock:
            return list(self.outcomes)

    def _client(self, index: int) -> None:
        sent = 0
        while not self._stop.is_set():
            body = {"model": DEFAULT_MODEL, "input": f"client {index} says hello number {sent}"}
            started = time.monotonic()
            try:
                reply = http(self.url, "POST", body=body, timeout=REQUEST_TIMEOUT_S)
                outcome = Outcome(started, time.monotonic(), reply.status, reply.body)
            except Exception as exc:  # a connection-level failure: recorded, judged later
                outcome = Outcome(started, time.monotonic(), None, error=exc)
            sent += 1
            with self._lock:
                self.outcomes.append(outcome)
            if outcome.status is None:
                time.sleep(0.05)  # the port is closed: do not spin


def report(title: str, outcomes: list[Outcome], lost: int, **figures: object) -> None:
    """One line: requests sent, answered (ok = 200, failed = any other status), not answered
    (connection refused or reset), lost (accepted by a server and not answered 200), and more."""
    statuses = Counter(str(o.status) if o.status else type(o.error).__name__ for o in outcomes)
    answered = sum(o.status is not None for o in outcomes)
    ok = sum(o.status == 200 for o in outcomes)
    seconds = max(o.ended for o in outcomes) - min(o.started for o in outcomes)
    extra = " ".join(f"{key}={value}" for key, value in figures.items())
    print(
        f"\n[{title}] sent={len(outcomes)} answered={answered} ok={ok} failed={answered - ok} "
        f"not_answered={len(outcomes) - answered} lost={lost} in {seconds:.1f}s "
        f"({len(outcomes) / seconds:.0f} req/s) outcomes={dict(statuses)} {extra}"
    )


def wait_replaced(run: ReplicatedRun, port: int, old_pid: int, timeout: float = 60) -> int:
    """Until a new process serves ``port`` (SERVING on its own port); its pid."""
    deadline = time.monotonic() + timeout
    while True:
        pid = run.replica_pid(port)
        if pid is not None and pid != old_pid:
            break
        assert time.monotonic() < deadline, run.log()
        time.sleep(0.05)
    wait_serving(f"127.0.0.1:{port}", timeout=deadline - time.monotonic())
    return pid


@pytest.mark.real_model
def test_sigkill_a_replica_under_load_loses_nothing_and_it_comes_back(
    replicated: ReplicatedRun,
) -> None:
    first, second = replicated.grpc_ports
    with ClosedLoopLoad(replicated.base_url + "/v1/embeddings") as load:
        time.sleep(2)
        victim = replicated.replica_pid(first)
        assert victim is not None, replicated.children()
        before_kill = {port: replicated.rq_total(port) for port in (first, second)}
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_replaced(replicated, first, victim)
        serving_after = time.monotonic() - killed_at
        replicated.wait_healthy(first)
        routed_after = time.monotonic() - killed_at
        # It takes traffic again: its fresh counter grows while the load goes on ...
        back = replicated.rq_total(first)
        time.sleep(2)
        again = replicated.rq_total(first) - back
        # ... and it carries the load alone once the OTHER replica is killed too.
        other = replicated.replica_pid(second)
        assert other is not None
        os.kill(other, signal.SIGKILL)
        second_kill_at = time.monotonic()
        alone_from = replicated.rq_total(first)
        time.sleep(2)
        alone = replicated.rq_total(first) - alone_from
        outcomes = load.stop()
    replicated.wait_all_healthy()  # both restarted
    failures = [o for o in outcomes if o.status != 200]
    report(
        "replica SIGKILL under load",
        outcomes,
        lost=len(failures),
        routed_before_kill=before_kill,
        back_serving_s=f"{serving_after:.1f}",
        back_in_envoy_s=f"{routed_after:.1f}",
        routed_to_restarted_in_2s=again,
        alone_in_2s=alone,
        restarts=replicated.log().count("exited unexpectedly"),
        envoy=replicated.retry_stats(),
    )
    for failure in failures[:5]:
        print(
            f"  failed at +{failure.started - killed_at:.2f}s..+{failure.ended - killed_at:.2f}s "
            f"after the first kill (second kill at +{second_kill_at - killed_at:.2f}s): "
            f"{failure.status} {failure.body[:300]!r} {failure.error!r}"
        )
    assert not failures, (
        "requests failed when a replica was killed; a 503 '... reset reason: connection "
        "termination' at the kill means the server had sent response headers (gRPC initial "
        "metadata) before its reply: Envoy cannot retry a call whose response has begun",
        failures[:5],
    )
    assert len(outcomes) > 50
    assert again > 0
    assert alone > 0
    log = replicated.log()
    assert f"replica 0 (gRPC port {first}) exited unexpectedly (killed by SIGKILL)" in log
    assert f"replica 0 (gRPC port {first}) is SERVING again" in log


@pytest.mark.real_model
def test_sigterm_under_load_drains_every_accepted_request_and_exits_0(
    replicated: ReplicatedRun,
) -> None:
    servers = [replicated.replica_pid(port) or 0 for port in replicated.grpc_ports]
    assert 0 not in servers
    gone_at: list[float] = []

    def watch_servers() -> None:
        while any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in servers):
            time.sleep(0.005)
        gone_at.append(time.monotonic())

    with ClosedLoopLoad(replicated.base_url + "/v1/embeddings") as load:
        time.sleep(2)
        watcher = threading.Thread(target=watch_servers, daemon=True)
        watcher.start()
        sigterm_at = time.monotonic()
        replicated.process.send_signal(signal.SIGTERM)
        code = replicated.process.wait(60)
        exited_at = time.monotonic()
        time.sleep(0.5)  # clients find the port closed
        outcomes = load.stop()
    watcher.join(10)
    [servers_gone] = gone_at
    in_flight = [o for o in outcomes if o.started < sigterm_at < o.ended]
    after_gone = [o for o in outcomes if o.started >= servers_gone]
    lost = [
        o
        for o in outcomes
        if (o.status not in (200, None) and not o.clean_503)
        or (o.status is None and not o.connection_refused and o.started < servers_gone)
    ]
    report(
        "SIGTERM under load",
        outcomes,
        lost=len(lost),
        in_flight_at_sigterm=Counter(o.status for o in in_flight),
        drained_s=f"{servers_gone - sigterm_at:.2f}",
        exited_s=f"{exited_at - sigterm_at:.2f}",
        clean_503=sum(o.clean_503 for o in outcomes),
        after_servers_gone=Counter(str(o.status or type(o.error).__name__) for o in after_gone),
    )
    assert code == 0, replicated.log()
    assert not lost, lost[:5]
    assert any(o.status == 200 for o in in_flight)  # accepted before SIGTERM, answered after
    assert all(o.status == 200 for o in outcomes if o.ended < sigterm_at)
    assert not replicated.children()  # Envoy and every replica stopped and reaped
    log = replicated.log()
    assert log.index("draining") < log.index("all 2 replicas stopped")
    assert log.index("all 2 replicas stopped") < log.index("caught ENVOY_SIGTERM")


def _zombie(pid: int) -> bool:
    try:
        return bool(re.search(r"^State:\s+Z", Path(f"/proc/{pid}/status").read_text(), re.M))
    except OSError:
        return True
