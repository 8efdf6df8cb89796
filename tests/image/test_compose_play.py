"""compose.yaml brought up with podman-compose on the image `make image` builds: both server
replicas and Envoy become healthy by their healthchecks, Envoy's DNS name for the servers
answers with every replica, REST and native gRPC through Envoy's published port and gRPC from
each replica give the reference vectors, and `podman-compose down` leaves nothing behind.

compose.yaml is used as it is, under a project name of the test's own and with Envoy
published on a free host port (EMBEDD_COMPOSE_PORT). podman-compose is the dev extra's pin
(1.6.0), found beside this Python or on PATH. With podman 4.3 it does not wait for
`service_healthy` (it says so and starts Envoy at once: Envoy's own health checks hold calls
until a replica serves), and podman 4.3 without systemd runs no healthcheck by itself: the test
runs them (`podman healthcheck run`) until they pass, within the image's start period.

Run by `make test-image` (tests/image); needs podman, as root (the replicas' addresses).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from embedd_server.run.probes import free_port
from tests.conftest import REPO
from tests.image.engine import Engine
from tests.image.vectors import assert_serves_the_reference

pytestmark = pytest.mark.timeout(1500)  # a cold `make image` included (test_image.py)

COMPOSE = REPO / "compose.yaml"
REPLICAS = 2  # compose.yaml's server deploy.replicas
HEALTHY_TIMEOUT_S = 120.0  # the image's HEALTHCHECK --start-period
POLL_S = 0.5


def podman_compose() -> str:
    """podman-compose from this Python's environment (the dev extra), else from PATH."""
    beside = Path(sys.executable).parent / "podman-compose"
    found = str(beside) if beside.exists() else shutil.which("podman-compose")
    if found is None:
        pytest.fail("no podman-compose: `make setup` installs the dev extra's podman-compose")
    return found


@dataclass(frozen=True)
class Project:
    """compose.yaml up under a project name of its own, Envoy on ``port`` of 127.0.0.1."""

    engine: Engine
    name: str
    port: int

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``podman-compose -p NAME -f compose.yaml ARGS`` with the engine's containers.conf."""
        environment = {**self.engine.environment, "EMBEDD_COMPOSE_PORT": str(self.port)}
        done = subprocess.run(
            [podman_compose(), "-p", self.name, "-f", str(COMPOSE), *args],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if check and done.returncode != 0:
            pytest.fail(f"podman-compose {' '.join(args)} failed:\n{done.stderr[-3000:]}")
        return done

    def containers(self, service: str = "") -> list[str]:
        """The project's containers (of one service: podman-compose names them
        PROJECT_SERVICE_N)."""
        prefix = f"name=^{self.name}_{service}"
        return sorted(self.engine("ps", "-a", "--format", "{{.Names}}", "--filter", prefix).split())

    def address(self, container: str) -> str:
        networks = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
        return self.engine("inspect", "--format", networks, container)


def healthy(engine: Engine, container: str) -> bool:
    """One run of the container's healthcheck (podman 4.3 without systemd runs none itself)."""
    return engine.run("healthcheck", "run", container, check=False).returncode == 0


def wait_healthy(project: Project, containers: list[str]) -> float:
    """Seconds until every container's healthcheck passes; fails with the log of one that
    exits or is not healthy within HEALTHY_TIMEOUT_S."""
    started = time.monotonic()
    pending = list(containers)
    while pending:
        pending = [name for name in pending if not healthy(project.engine, name)]
        for name in pending:
            running = project.engine("inspect", "--format", "{{.State.Running}}", name)
            late = time.monotonic() - started > HEALTHY_TIMEOUT_S
            if running != "true" or late:
                log = project.engine.run("logs", name, check=False)
                pytest.fail(f"{name} not healthy:\n{(log.stdout + log.stderr)[-4000:]}")
        if pending:
            time.sleep(POLL_S)
    return time.monotonic() - started


@pytest.fixture(scope="module")
def project(engine: Engine, image: str) -> Iterator[Project]:
    """compose.yaml up, every container healthy."""
    if engine.name != "podman":
        pytest.fail(f"this test runs podman-compose; tools/image.sh chose {engine.name}")
    up = Project(engine, f"embedd-compose-{os.getpid()}", free_port())
    try:
        started = time.monotonic()
        up.compose("up", "-d")
        took = wait_healthy(up, up.containers())
        print(f"up in {time.monotonic() - started:.1f} s (healthy {took:.1f} s after up -d)")
        yield up
    finally:
        up.compose("down", check=False)


def test_every_replica_and_envoy_run_healthy_and_envoy_resolves_every_replica(
    project: Project,
) -> None:
    servers = project.containers("server_")
    [envoy] = project.containers("envoy_")
    assert len(servers) == REPLICAS
    script = "import socket; print(*sorted({a[4][0] for a in socket.getaddrinfo('server', 1)}))"
    resolved = project.engine("exec", envoy, "python", "-c", script).split()
    assert resolved == sorted(project.address(name) for name in servers)
    for name in [*servers, envoy]:
        assert healthy(project.engine, name), name


def test_rest_and_grpc_through_envoy_and_grpc_of_each_replica_give_the_reference(
    project: Project,
) -> None:
    envoy = f"127.0.0.1:{project.port}"
    replicas = [f"{project.address(name)}:50051" for name in project.containers("server_")]
    assert_serves_the_reference([f"http://{envoy}"], [envoy, *replicas])


def test_compose_down_leaves_no_container_pod_or_network(project: Project) -> None:
    started = time.monotonic()
    project.compose("down")
    print(f"down in {time.monotonic() - started:.1f} s")
    assert project.containers() == []
    pods = project.engine("pod", "ps", "--format", "{{.Name}}", "--filter", f"name={project.name}")
    assert pods == ""
    network = f"{project.name}_default"
    assert project.engine.run("network", "exists", network, check=False).returncode != 0
