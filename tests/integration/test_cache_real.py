"""The vector cache and the lanes on a real `embedd serve` (cache on, its default size), over
gRPC and through real Envoy.

Its models directory holds the default model and a copy named ``copy`` (not the default, so it
can be unloaded and its file rewritten).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, MODELS_DIR
from tests.envoy_proc import EnvoyProcess, http
from tests.servers import ServerProcess

pytestmark = pytest.mark.real_model

LONG = " ".join(f"word{i}" for i in range(400))  # past the model's 256 tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("cache-models")
    source = MODELS_DIR / f"{DEFAULT_MODEL}.gguf"
    shutil.copyfile(source, directory / f"{DEFAULT_MODEL}.gguf")
    shutil.copyfile(source, directory / "copy.gguf")
    return directory


@pytest.fixture(scope="module")
def server(models: Path) -> Iterator[ServerProcess]:
    with ServerProcess.start(models) as process:
        yield process


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]


def embed(stub: Any, **request: Any) -> tuple[list[bytes], str]:
    """Each vector's bytes, and the call's x-embedd-cache trailer ("" if none)."""
    reply, call = stub.Embed.with_call(pb.EmbedRequest(**request), timeout=120)
    rows = [np.array(e.values, dtype=np.float32).tobytes() for e in reply.embeddings]
    trailers = dict(call.trailing_metadata())
    return rows, trailers.get("x-embedd-cache", "")


def test_a_repeated_request_hits_and_returns_the_same_bytes(stub: Any) -> None:
    texts = ["The cache keeps this one.", "And this one."]
    first, outcome = embed(stub, texts=texts)
    assert outcome == "hits=0 misses=2"
    again, outcome = embed(stub, texts=texts)
    assert outcome == "hits=2 misses=0"
    assert again == first
    mixed, outcome = embed(stub, texts=[texts[1], "A new one.", texts[0]])
    assert outcome == "hits=2 misses=1"
    assert [mixed[0], mixed[2]] == [first[1], first[0]]


def test_dimensions_reuse_the_row_but_a_prompt_or_truncation_does_not(stub: Any) -> None:
    text = ["Options that change the vector never hit."]
    full, _ = embed(stub, texts=text)
    short, outcome = embed(stub, texts=text, dimensions=8)
    assert outcome == "hits=1 misses=0"  # the same raw row, cut and normalized after
    assert short != full
    _, outcome = embed(stub, texts=text, prompt="query: ")
    assert outcome == "hits=0 misses=1"
    _, outcome = embed(stub, texts=text, prompt="query: ")
    assert outcome == "hits=1 misses=0"
    _, outcome = embed(stub, texts=[LONG], truncation=pb.TRUNCATION_END)
    assert outcome == "hits=0 misses=1"
    _, outcome = embed(stub, texts=[LONG], truncation=pb.TRUNCATION_START)
    assert outcome == "hits=0 misses=1"


def test_a_rewritten_model_file_never_hits(stub: Any, models: Path) -> None:
    text = ["Rows of the old file stay with it."]
    before, outcome = embed(stub, model="copy", texts=text)
    assert outcome in ("hits=0 misses=1", "hits=1 misses=0")
    _, outcome = embed(stub, model="copy", texts=text)
    assert outcome == "hits=1 misses=0"
    stub.UnloadModel(pb.UnloadModelRequest(model="copy"), timeout=60)
    rewritten = models / "copy.gguf.new"
    shutil.copyfile(models / "copy.gguf", rewritten)
    stat = os.stat(models / "copy.gguf")
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    os.replace(rewritten, models / "copy.gguf")
    after, outcome = embed(stub, model="copy", texts=text)
    assert outcome == "hits=0 misses=1"
    assert after == before  # the same weights: recomputed, equal


def test_a_bad_lane_is_invalid_argument(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Embed(pb.EmbedRequest(texts=["x"]), metadata=(("x-embedd-lane", "urgent"),))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "lane" in (raised.value.details() or "")
    for lane in ("interactive", "bulk"):
        reply = stub.Embed(pb.EmbedRequest(texts=["x"]), metadata=(("x-embedd-lane", lane),))
        assert len(reply.embeddings) == 1
    assert len(stub.Embed(pb.EmbedRequest(texts=["x"], lane=pb.LANE_BULK)).embeddings) == 1


@pytest.fixture(scope="module")
def envoy(
    server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProcess]:
    with EnvoyProcess.start([server.target], tmp_path_factory.mktemp("cache-envoy")) as proc:
        yield proc


def test_rest_shows_the_cache_header_and_takes_the_lane_header(envoy: EnvoyProcess) -> None:
    body = {"model": DEFAULT_MODEL, "input": ["Through Envoy, twice."]}
    url = envoy.base_url + "/v1/embeddings"
    first = http(url, "POST", body=body)
    assert first.status == 200, first.body
    assert first.headers["x-embedd-cache"] == "hits=0 misses=1"
    second = http(url, "POST", body=body, headers={"x-embedd-lane": "bulk"})
    assert second.status == 200, second.body
    assert second.headers["x-embedd-cache"] == "hits=1 misses=0"
    assert second.json()["data"] == first.json()["data"]
    ollama = http(
        envoy.base_url + "/api/embed",
        "POST",
        body={"model": DEFAULT_MODEL, "input": "Through Envoy, twice."},
        headers={"x-embedd-lane": "interactive"},
    )
    assert ollama.headers["x-embedd-cache"] == "hits=1 misses=0"
    bad = http(url, "POST", body=body, headers={"x-embedd-lane": "urgent"})
    assert bad.status == 400, bad.body
    assert bad.json()["error"]["param"] == "x-embedd-lane"
    assert bad.json()["error"]["code"] == "invalid_request_error"  # as docs/rest.md shows
