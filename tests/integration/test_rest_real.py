"""The REST surface in front of the REAL default model (all-MiniLM-L6-v2, f16 GGUF).

Needs `make setup` (the model file). Envoy is started here in front of the session's
`embedd serve` subprocess; `embedd run` (server + Envoy together) is tested as a subprocess.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.run.probes import free_port
from tests.conftest import DEFAULT_MODEL, MODELS_DIR, STSB_TEST
from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.metrics import Matrix, read_stsb, stsb_score
from tests.servers import ServerProcess

pytestmark = pytest.mark.real_model

EMBEDDING_RE = re.compile(rb'"embedding":\[([^\]]*)\]')
TEXTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "Envoy transcodes JSON into protobuf.",
]


@pytest.fixture(scope="module")
def envoy(
    real_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProcess]:
    with EnvoyProcess.start([real_server.target], tmp_path_factory.mktemp("rest-real")) as proc:
        yield proc


@pytest.fixture
def client(envoy: EnvoyProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=envoy.base_url + "/v1", api_key="sk-test", max_retries=0, timeout=300
    ) as official:
        yield official


def embedder(channel: grpc.Channel) -> Any:
    """An Embedder stub (the generated module is untyped)."""
    return pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]


def native(target: str, texts: Sequence[str], **request: Any) -> Matrix:
    with grpc.insecure_channel(target) as channel:
        reply = embedder(channel).Embed(pb.EmbedRequest(texts=list(texts), **request), timeout=120)
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)


def post(envoy: EnvoyProcess, path: str, body: Any) -> HttpReply:
    return http(envoy.base_url + path, "POST", body=body, timeout=300)


def test_float_base64_and_native_grpc_agree(
    client: openai.OpenAI, envoy: EnvoyProcess, real_server: ServerProcess
) -> None:
    default = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS)  # base64 on the wire
    floats = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS, encoding_format="float")
    as_b64 = np.array([d.embedding for d in default.data], dtype=np.float32)
    as_float = np.array([d.embedding for d in floats.data], dtype=np.float32)
    expected = native(real_server.target, TEXTS)
    through_envoy = native(envoy.grpc_target, TEXTS)
    assert expected.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(as_b64, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(as_float, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(through_envoy, expected, atol=1e-6, rtol=0)
    assert default.usage.prompt_tokens == floats.usage.prompt_tokens > len(TEXTS)


def test_dimensions_are_renormalized(client: openai.OpenAI, real_server: ServerProcess) -> None:
    cut = client.embeddings.create(model=DEFAULT_MODEL, input=TEXTS[:2], dimensions=128)
    full = native(real_server.target, TEXTS[:2])
    for item, row in zip(cut.data, full, strict=True):
        vector = np.array(item.embedding)
        assert vector.shape == (128,)
        assert np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)
        np.testing.assert_allclose(vector, row[:128] / np.linalg.norm(row[:128]), atol=1e-6)


def test_float_response_is_close_to_the_shortest_repr_size(envoy: EnvoyProcess) -> None:
    reply = post(envoy, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": TEXTS[0]})
    [array] = EMBEDDING_RE.findall(reply.body)
    values = np.array(reply.json()["data"][0]["embedding"], dtype=np.float32)
    shortest = ",".join(str(v) for v in values).encode()  # numpy: shortest float32 repr
    widened = ",".join(repr(float(v)) for v in values).encode()  # float32 widened to double
    assert abs(len(array) - len(shortest)) <= 0.02 * len(shortest), (len(array), len(shortest))
    assert len(array) < 0.7 * len(widened)
    assert len(reply.body) < len(shortest) + 200  # the envelope is small


def test_2048_inputs_in_one_request(client: openai.OpenAI) -> None:
    texts = [f"sentence number {i} about embeddings" for i in range(2048)]
    response = client.embeddings.create(model=DEFAULT_MODEL, input=texts, encoding_format="float")
    assert len(response.data) == 2048
    assert [d.index for d in response.data] == list(range(2048))
    assert len(response.data[2047].embedding) == 384


def test_over_long_input_openai_errors_ollama_truncates(
    client: openai.OpenAI, envoy: EnvoyProcess
) -> None:
    long_text = "word " * 400
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=DEFAULT_MODEL, input=["short", long_text])
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.type == "invalid_request_error"
    assert "Input 1" in caught.value.message
    assert "256" in caught.value.message
    reply = post(envoy, "/api/embed", {"model": DEFAULT_MODEL, "input": long_text})
    assert reply.status == 200
    assert reply.json()["prompt_eval_count"] == 256
    assert len(reply.json()["embeddings"][0]) == 384
    refused = post(envoy, "/api/embed", {"input": long_text, "truncate": False})
    assert refused.status == 400
    assert set(refused.json()) == {"error"}


def test_models_through_the_official_client(client: openai.OpenAI) -> None:
    [model] = [m for m in client.models.list().data if m.id == DEFAULT_MODEL]
    assert model.object == "model"
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL


@pytest.mark.slow  # the STS-B test set through Envoy (its gRPC twin: ~55 s here)
def test_stsb_over_rest(client: openai.OpenAI) -> None:
    stsb = read_stsb(STSB_TEST)
    assert len(stsb.scores) == 1379
    unique = sorted(set(stsb.firsts) | set(stsb.seconds))
    vectors: dict[str, Matrix] = {}
    for start in range(0, len(unique), 2048):
        batch = unique[start : start + 2048]
        response = client.embeddings.create(model=DEFAULT_MODEL, input=batch)  # base64
        for text, item in zip(batch, response.data, strict=True):
            vectors[text] = np.array(item.embedding, dtype=np.float32)
    firsts = np.array([vectors[t] for t in stsb.firsts])
    seconds = np.array([vectors[t] for t in stsb.seconds])
    assert stsb_score(firsts, seconds, stsb.scores) == pytest.approx(82.03, abs=0.05)


def test_base64_is_little_endian_float32(envoy: EnvoyProcess, real_server: ServerProcess) -> None:
    body = {"model": DEFAULT_MODEL, "input": TEXTS[0], "encoding_format": "base64"}
    encoded = post(envoy, "/v1/embeddings", body).json()["data"][0]["embedding"]
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_array_equal(decoded, native(real_server.target, TEXTS[:1])[0])


# --- `embedd run`: server and Envoy together ------------------------------------------------


class RunProcess:
    """`embedd run` as a subprocess on free ports, its log in a file."""

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
            # Engines in worker processes (ONNX Runtime's are threads by default), so that
            # their stop on SIGTERM is checked too.
            "--worker-processes",
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
            time.sleep(0.1)

    def children(self, name: str | None = None) -> list[int]:
        """PIDs whose parent is this process (Envoy, the worker processes), or only those
        whose command is ``name``."""
        found = []
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                text = status.read_text()
            except OSError:
                continue
            if re.search(rf"^PPid:\s+{self.process.pid}$", text, re.MULTILINE) and (
                name is None or re.search(rf"^Name:\s+{name}$", text, re.MULTILINE)
            ):
                found.append(int(status.parent.name))
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def run_process(tmp_path: Path) -> Iterator[RunProcess]:
    process = RunProcess(tmp_path)
    try:
        yield process
    finally:
        children = process.children()
        process.stop()
        for pid in children:  # an Envoy left behind by a failed test
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


def test_embedd_run_serves_rest_and_grpc_and_stops_on_sigterm(run_process: RunProcess) -> None:
    run_process.wait_for_log(
        f"REST on http://127.0.0.1:{run_process.http_port} (OpenAI /v1/embeddings, "
        f"Ollama /api/embed, Cohere /v2/embed, rerank /v1/rerank), gRPC on "
        f"127.0.0.1:{run_process.grpc_port}"
    )
    base = f"http://127.0.0.1:{run_process.http_port}"
    reply = http(base + "/v1/embeddings", "POST", body={"input": "hello"})
    assert reply.status == 200
    assert reply.json()["model"] == DEFAULT_MODEL
    assert http(base + "/api/embed", "POST", body={"input": "hello"}).status == 200
    grpc_vectors = native(f"127.0.0.1:{run_process.http_port}", ["hello"])
    assert grpc_vectors.shape == (1, 384)
    [envoy_pid] = run_process.children("envoy")
    workers = set(run_process.children()) - {envoy_pid}
    assert len(workers) == 2  # two worker processes (--worker-processes; 2 workers by default)
    run_process.process.send_signal(signal.SIGTERM)
    assert run_process.process.wait(60) == 0
    for pid in (envoy_pid, *workers):  # Envoy and the workers stopped and reaped
        assert not Path(f"/proc/{pid}").exists()
    log = run_process.log()
    assert log.index("draining") < log.index("caught ENVOY_SIGTERM")
