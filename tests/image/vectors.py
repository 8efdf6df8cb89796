"""Calls of a served image and their check against the reference vectors of
all-MiniLM-L6-v2 (../shared/reference): what the image tests share."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, REFERENCE_DIR
from tests.envoy_proc import http
from tests.metrics import Matrix, read_reference, row_cosines

HANDFUL = 8  # reference texts per call: the first ones, all within /v1/embeddings' window
MIN_COSINE = 0.99999  # f32 vectors against sentence-transformers' (f16 weights)


def embedder(channel: grpc.Channel) -> Any:
    """An Embedder stub (the generated module is untyped)."""
    return pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]


def assert_reference_vectors(actual: Matrix, expected: Matrix, min_cosine: float) -> None:
    """Each row of ``actual`` within ``min_cosine`` of the same row of ``expected``."""
    cosines = row_cosines(actual, expected)
    worst = int(cosines.argmin())
    assert cosines.min() >= min_cosine, f"text {worst}: cosine {cosines[worst]:.6f}"


def a_handful() -> tuple[list[str], Matrix]:
    """The first HANDFUL reference texts and their reference vectors."""
    texts, vectors = read_reference(REFERENCE_DIR)
    return [entry["text"] for entry in texts[:HANDFUL]], vectors[:HANDFUL]


def grpc_vectors(target: str, texts: list[str]) -> Matrix:
    """The vectors of a native Embed call to ``target`` (a server, or Envoy's port)."""
    with grpc.insecure_channel(target) as channel:
        answer = embedder(channel).Embed(pb.EmbedRequest(texts=texts), timeout=120)
    return np.array([list(e.values) for e in answer.embeddings], dtype=np.float32)


def rest_vectors(base: str, route: str, texts: list[str]) -> Matrix:
    """The vectors of /v1/embeddings (OpenAI) or /api/embed (Ollama) at ``base``."""
    body = {"model": DEFAULT_MODEL, "input": texts}
    reply = http(f"{base}{route}", "POST", body=body, timeout=120)
    assert reply.status == 200, reply.body[:500]
    answer = reply.json()
    if "data" in answer:
        return np.array([item["embedding"] for item in answer["data"]], dtype=np.float32)
    return np.array(answer["embeddings"], dtype=np.float32)


def assert_serves_the_reference(rest: list[str], grpc_targets: list[str]) -> None:
    """Both REST routes at each base URL and Embed at each gRPC target give the reference
    vectors of a handful of texts."""
    texts, expected = a_handful()
    for base in rest:
        for route in ("/v1/embeddings", "/api/embed"):
            assert_reference_vectors(rest_vectors(base, route, texts), expected, MIN_COSINE)
    for target in grpc_targets:
        assert_reference_vectors(grpc_vectors(target, texts), expected, MIN_COSINE)
