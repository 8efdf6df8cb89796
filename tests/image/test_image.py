"""The container image (Containerfile, `make image`): built with the engine that works here,
run as `make image-run` runs it, answering REST (Envoy inside the container) and gRPC with the
reference vectors, healthy by its HEALTHCHECK, stopping cleanly on SIGTERM within the grace
period, and serving models from a mounted directory beside its built-in default.

Run by `make test-image` (not `make test`: `pytest` collects only pyproject's testpaths, which
leave tests/image out). Needs podman (or docker) and, offline, mmdebstrap: `.ci/run` installs
them. Without a working engine these tests fail with the install command; they never skip. The
build reuses the engine's cached layers, so after the first build it takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd_server.run.probes import free_port, grpc_serving, http_ok
from tests.conftest import DEFAULT_MODEL, MODELS_DIR, REFERENCE_DIR
from tests.envoy_proc import http
from tests.image.engine import Engine, image_tool
from tests.image.vectors import assert_reference_vectors, embedder
from tests.metrics import read_reference

# A cold build (base image, dependencies) takes a few minutes; compiling llama-cpp-python in
# the image (no host wheel) about five more.
pytestmark = pytest.mark.timeout(1500)

HEALTH_SERVICE = "embedd.v1.Embedder"
GRACE_S = 10  # EMBEDD_SHUTDOWN_GRACE_S in the container
STOP_TIMEOUT_S = GRACE_S + 5  # what `podman stop -t` allows before SIGKILL
START_TIMEOUT_S = 120.0
MIN_COSINE = 0.9999


@dataclass(frozen=True)
class Container:
    """A running container of the image and its published ports on 127.0.0.1."""

    engine: Engine
    name: str
    grpc_port: int
    http_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def logs(self) -> str:
        """The container's output (embedd logs to stderr)."""
        result = self.engine.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self, field: str) -> str:
        return self.engine("inspect", "--format", f"{{{{.State.{field}}}}}", self.name)


def start(
    engine: Engine, name: str, extra: Mapping[str, str] | None = None, models: Path | None = None
) -> Container:
    """`make image-run` on free host ports, with a short shutdown grace."""
    grpc_port, http_port = free_port(), free_port()
    environment = dict(engine.environment)
    environment |= {
        "NAME": name,
        "EMBEDD_GRPC_PORT": str(grpc_port),
        "EMBEDD_HTTP_PORT": str(http_port),
        "EMBEDD_SHUTDOWN_GRACE_S": str(GRACE_S),
        **(extra or {}),
    }
    if models is not None:
        environment["MODELS"] = str(models)
    engine("rm", "-f", name, check=False)  # a leftover of an interrupted run
    printed = image_tool("run", environment, timeout=120).strip()
    assert printed == name  # make image-run prints the container's name
    return Container(engine, name, grpc_port, http_port)


def wait_serving(container: Container) -> float:
    """Seconds until gRPC health says SERVING and Envoy answers REST; fails with the log."""
    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_S:
        if container.state("Running") != "true":
            pytest.fail(f"the container exited:\n{container.logs()}")
        rest = f"http://127.0.0.1:{container.http_port}/v1/models"
        if grpc_serving(container.target, HEALTH_SERVICE) and http_ok(rest):
            return time.monotonic() - started
        time.sleep(0.5)
    pytest.fail(f"not serving within {START_TIMEOUT_S:.0f}s:\n{container.logs()}")


@pytest.fixture(scope="module")
def container(engine: Engine, image: str) -> Iterator[Container]:
    name = f"embedd-test-{os.getpid()}"
    running = start(engine, name)
    try:
        print(f"serving {wait_serving(running):.1f} s after start")
        yield running
    finally:
        engine("rm", "-f", name, check=False)


def test_image_runs_as_non_root_exposes_both_ports_and_has_a_healthcheck(
    engine: Engine, image: str
) -> None:
    [inspected] = json.loads(engine("image", "inspect", image))
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert {"50051/tcp", "8080/tcp"} <= set(config["ExposedPorts"])
    # podman shows the Docker-format HEALTHCHECK beside Config, docker inside it.
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck") or {}
    assert "grpc_health" in " ".join(healthcheck.get("Test", []))


def test_rest_through_envoy_and_grpc_give_the_reference_vectors(container: Container) -> None:
    texts, expected = read_reference(REFERENCE_DIR)
    inputs = [entry["text"] for entry in texts]
    rest = f"http://127.0.0.1:{container.http_port}"
    # OpenAI's route refuses over-long inputs (as OpenAI does); Ollama's truncates, as the
    # reference did.
    fits = [i for i, entry in enumerate(texts) if entry["tokens_untruncated"] <= 256]
    reply = http(
        f"{rest}/v1/embeddings",
        "POST",
        body={"model": DEFAULT_MODEL, "input": [inputs[i] for i in fits]},
        timeout=300,
    )
    assert reply.status == 200, reply.body[:500]
    openai = np.array([item["embedding"] for item in reply.json()["data"]], dtype=np.float32)
    assert_reference_vectors(openai, expected[fits], MIN_COSINE)
    reply = http(
        f"{rest}/api/embed", "POST", body={"model": DEFAULT_MODEL, "input": inputs}, timeout=300
    )
    assert reply.status == 200, reply.body[:500]
    ollama = np.array(reply.json()["embeddings"], dtype=np.float32)
    assert_reference_vectors(ollama, expected, MIN_COSINE)
    with grpc.insecure_channel(container.target) as channel:
        answer = embedder(channel).Embed(pb.EmbedRequest(texts=inputs), timeout=300)
    native = np.array([list(e.values) for e in answer.embeddings], dtype=np.float32)
    assert_reference_vectors(native, expected, MIN_COSINE)


def test_the_images_healthcheck_passes(container: Container) -> None:
    if container.engine.name == "podman":
        container.engine("healthcheck", "run", container.name)  # exit 0: healthy
    else:  # docker runs it itself, every 10 s
        deadline = time.monotonic() + 30
        while container.state("Health.Status") != "healthy":
            assert time.monotonic() < deadline, container.state("Health.Status")
            time.sleep(1)


def test_sigterm_drains_and_exits_zero_within_the_grace_period(container: Container) -> None:
    started = time.monotonic()
    container.engine("stop", "-t", str(STOP_TIMEOUT_S), container.name, timeout=STOP_TIMEOUT_S + 30)
    took = time.monotonic() - started
    # 0: embedd run drained and stopped Envoy; 137 would be the SIGKILL after the timeout.
    assert container.state("ExitCode") == "0", container.logs()
    assert took < STOP_TIMEOUT_S, f"stop took {took:.1f}s"
    log = container.logs()
    assert "signal received: draining the server, then stopping Envoy" in log
    print(f"stopped in {took:.1f} s")


def test_a_mounted_models_directory_adds_to_the_built_in_default(
    engine: Engine, image: str, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(MODELS_DIR / f"{DEFAULT_MODEL}.gguf", models / "mounted-minilm.gguf")
    models.chmod(0o755)  # the container's user is not this one
    name = f"embedd-test-models-{os.getpid()}"
    mounted = start(engine, name, models=models)
    try:
        wait_serving(mounted)  # the default model: the built-in one
        rest = f"http://127.0.0.1:{mounted.http_port}"
        names = [model["id"] for model in http(f"{rest}/v1/models", timeout=10).json()["data"]]
        assert {DEFAULT_MODEL, "mounted-minilm"} <= set(names)
        body = {"model": "mounted-minilm", "input": "served from the mounted directory"}
        reply = http(f"{rest}/v1/embeddings", "POST", body=body, timeout=60)
        assert reply.status == 200, reply.body[:500]
        assert reply.json()["model"] == "mounted-minilm"
    finally:
        engine("rm", "-f", name, check=False)
