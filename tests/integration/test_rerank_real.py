"""Reranking end to end: real cross-encoders, a real server, real Envoy, the official clients.

Both shared rerankers (BERT: pooler + classifier; XLM-RoBERTa: classifier head) are imported
f32 and f16 into one models directory and served by ``engine=auto`` (ONNX Runtime for both)
and by ``engine=llama.cpp``. Every reference pair's score is held to ``reference/scores.npy``
(auto: f32 1e-4, f16 1e-3; llama.cpp, whose tanh GELU misses that bar, 2e-3: see
test_rerank_engines.py) and each query's ranking of its eight documents to the reference's,
over gRPC, ``/v1/rerank``, ``/v2/rerank`` (the official ``cohere`` client) and TEI's
``/rerank``. A copy of the BERT reranker naming BertTokenizer gives its documents token type
1, which llama.cpp cannot: it refuses that one with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import cohere
import grpc
import httpx
import numpy as np
import numpy.typing as npt
import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.convert.hf_to_gguf import import_model
from tests.conftest import SHARED
from tests.envoy_proc import EnvoyProcess, http
from tests.integration.test_rerank_engines import typed_bert_copy
from tests.servers import ServerProcess, server_behind_envoy

pytestmark = pytest.mark.real_model

MODELS = SHARED / "models"
RERANKERS = ("tiny-bert-reranker", "tiny-xlmr-reranker")
OUT_TYPES = ("f32", "f16")
# engine setting -> out_type -> the bar on scores.
TOLERANCE = {"auto": {"f32": 1e-4, "f16": 1e-3}, "llama.cpp": {"f32": 2e-3, "f16": 2e-3}}
TYPED = "tiny-bert-reranker-typed"  # its documents have token type 1
GROUP = 8  # each query's candidate documents, in reference order

Scores = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Reference:
    queries: list[str]  # one per group of GROUP pairs
    documents: list[list[str]]
    scores: Scores  # [queries, GROUP]
    logits: Scores


@cache
def _reference(model: str) -> Reference:
    directory = MODELS / model / "reference"
    pairs = json.loads((directory / "pairs.json").read_text(encoding="utf-8"))
    queries = [pairs[i]["query"] for i in range(0, len(pairs), GROUP)]
    documents = [[p["document"] for p in pairs[i : i + GROUP]] for i in range(0, len(pairs), GROUP)]
    assert all(p["query"] == queries[i // GROUP] for i, p in enumerate(pairs))
    scores = np.load(directory / "scores.npy").astype(np.float64).reshape(-1, GROUP)
    logits = np.load(directory / "logits.npy").astype(np.float64).reshape(-1, GROUP)
    return Reference(queries, documents, scores, logits)


def _ranking(scores: Scores) -> list[int]:
    return [int(i) for i in np.argsort(-scores, kind="stable")]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests read ../shared beside the repo"
    out = tmp_path_factory.mktemp("rerank-models")
    for model in RERANKERS:
        for out_type in OUT_TYPES:
            import_model(MODELS / model, out, out_type=out_type, name=f"{model}-{out_type}")
    typed = typed_bert_copy(tmp_path_factory.mktemp("typed") / TYPED)
    import_model(typed, out, out_type="f32", name=f"{TYPED}-f32")
    return out


@dataclass
class Served:
    engine: str
    server: ServerProcess
    envoy: EnvoyProcess

    @property
    def url(self) -> str:
        return self.envoy.base_url


@pytest.fixture(scope="module", params=list(TOLERANCE))
def served(
    request: pytest.FixtureRequest, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    engine = str(request.param)
    args = ["--engine", engine, "--default-model", "tiny-xlmr-reranker-f32", "--keep-alive", "-1"]
    with server_behind_envoy(models_dir, args, tmp_path_factory.mktemp("envoy")) as stack:
        yield Served(engine, *stack)


def _served_models(served: Served) -> list[tuple[str, str, float]]:
    """(model, out_type, the bar on scores) of every case the server is held to."""
    bars = TOLERANCE[served.engine]
    return [(m, t, bars[t]) for m in RERANKERS for t in OUT_TYPES]


def _grpc_rerank(served: Served, request: pb.RerankRequest) -> pb.RerankResponse:
    with grpc.insecure_channel(served.server.target) as channel:
        stub: Any = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        response: pb.RerankResponse = stub.Rerank(request, timeout=120)
    return response


def _check_group(
    got: dict[int, float], expected: Scores, tolerance: float, ranking: list[int], where: str
) -> None:
    values = np.array([got[i] for i in range(GROUP)])
    error = float(np.max(np.abs(values - expected)))
    assert error <= tolerance, f"{where}: max score error {error:.2e}"
    assert ranking == _ranking(expected), where


def test_grpc_scores_and_rankings_equal_the_reference(served: Served) -> None:
    for model, out_type, bar in _served_models(served):
        reference = _reference(model)
        for q, query in enumerate(reference.queries):
            response = _grpc_rerank(
                served,
                pb.RerankRequest(
                    model=f"{model}-{out_type}", query=query, documents=reference.documents[q]
                ),
            )
            got = {r.index: r.relevance_score for r in response.results}
            ranking = [r.index for r in response.results]
            where = f"{served.engine} {model}-{out_type} query {q}"
            _check_group(got, reference.scores[q], bar, ranking, where)
            assert response.usage.prompt_tokens > 0


def test_rest_v1_rerank_in_jinas_shape(served: Served) -> None:
    for model, out_type, bar in _served_models(served):
        reference = _reference(model)
        for q in (0, 7, 15):
            documents: list[Any] = list(reference.documents[q])
            documents[1] = {"text": documents[1]}  # Jina's and Cohere's object form
            reply = http(
                served.url + "/v1/rerank",
                "POST",
                body={
                    "model": f"{model}-{out_type}",
                    "query": reference.queries[q],
                    "documents": documents,
                    "return_documents": True,
                },
            )
            assert reply.status == 200, reply.body
            answer = reply.json()
            assert answer["model"] == f"{model}-{out_type}"
            assert answer["usage"]["total_tokens"] > 0
            results = answer["results"]
            got = {r["index"]: r["relevance_score"] for r in results}
            for r in results:
                assert r["document"] == {"text": reference.documents[q][r["index"]]}
            where = f"{served.engine} /v1/rerank {model}-{out_type} query {q}"
            ranking = [r["index"] for r in results]
            _check_group(got, reference.scores[q], bar, ranking, where)


def test_the_official_cohere_client_reranks_unchanged(served: Served) -> None:
    with httpx.Client(timeout=120) as http_client:
        client = cohere.ClientV2(api_key="unused", base_url=served.url, httpx_client=http_client)
        _rerank_with_cohere(client, served)


def _rerank_with_cohere(client: cohere.ClientV2, served: Served) -> None:
    for model, out_type, bar in _served_models(served):
        reference = _reference(model)
        for q in (2, 9):
            response = client.rerank(
                model=f"{model}-{out_type}",
                query=reference.queries[q],
                documents=reference.documents[q],
                top_n=3,
            )
            ranking = _ranking(reference.scores[q])
            assert [r.index for r in response.results] == ranking[:3]
            for r in response.results:
                expected = reference.scores[q][r.index]
                assert abs(r.relevance_score - expected) <= bar


def test_tei_rerank_with_raw_scores_and_texts(served: Served) -> None:
    model, out_type, bar = _served_models(served)[0]
    reference = _reference(model)
    reply = http(
        served.url + "/rerank",
        "POST",
        body={
            "model": f"{model}-{out_type}",
            "query": reference.queries[4],
            "texts": reference.documents[4],
            "raw_scores": True,
            "return_text": True,
        },
    )
    assert reply.status == 200, reply.body
    results = reply.json()
    assert isinstance(results, list) and len(results) == GROUP
    assert set(results[0]) == {"index", "score", "text"}
    got = {int(r["index"]): r["score"] for r in results}
    where = f"{served.engine} /rerank {model}-{out_type}"
    ranking = [int(r["index"]) for r in results]
    _check_group(got, reference.logits[4], 10 * bar, ranking, where)
    plain = http(
        served.url + "/rerank",
        "POST",
        body={"model": f"{model}-{out_type}", "query": "q", "texts": ["a", "b"]},
    )
    assert plain.status == 200 and set(plain.json()[0]) == {"index", "score"}


def test_an_empty_document_list_is_a_400_in_each_routes_shape(served: Served) -> None:
    model = "tiny-xlmr-reranker-f32"
    body = {"model": model, "query": "q", "documents": []}
    for route in ("/v1/rerank", "/v2/rerank"):
        reply = http(served.url + route, "POST", body=body)
        assert reply.status == 400, reply.body
        error = reply.json()
        assert "no documents" in error["message"] and error["detail"] == error["message"]
    tei = http(served.url + "/rerank", "POST", body={"model": model, "query": "q", "texts": []})
    assert tei.status == 400  # TEI's "Empty" kind
    assert tei.json()["error_type"] == "Empty" and "no documents" in tei.json()["error"]
    with pytest.raises(grpc.RpcError) as raised:
        _grpc_rerank(served, pb.RerankRequest(model=model, query="q"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    malformed = http(served.url + "/v1/rerank", "POST", raw=b'{"query": "q", "documents": [')
    assert malformed.status == 400 and "detail" in malformed.json()


def test_two_thousand_documents_are_served_or_refused_never_5xx(served: Served) -> None:
    model = "tiny-xlmr-reranker-f32"
    documents = [f"document number {i} about cats and dogs" for i in range(2000)]
    reply = http(
        served.url + "/v1/rerank",
        "POST",
        body={"model": model, "query": "cats", "documents": documents, "top_n": 5},
        timeout=300,
    )
    assert reply.status in (200, 429), reply.body
    if reply.status == 200:
        results = reply.json()["results"]
        assert len(results) == 5
        scores = [r["relevance_score"] for r in results]
        assert scores == sorted(scores, reverse=True)


def test_documents_over_the_models_length_are_cut_longest_first(served: Served) -> None:
    model = "tiny-xlmr-reranker-f32"
    long_document = " ".join(["the quick brown fox jumps over the lazy dog"] * 100)
    response = _grpc_rerank(
        served,
        pb.RerankRequest(model=model, query="a fox", documents=[long_document, "a fox"]),
    )
    assert len(response.results) == 2
    models = {m["id"]: m for m in http(served.url + "/v1/models").json()["data"]}
    limit = models[model]["max_input_tokens"]
    assert response.usage.prompt_tokens <= 2 * limit
    with pytest.raises(grpc.RpcError) as raised:
        _grpc_rerank(
            served,
            pb.RerankRequest(
                model=model,
                query="a fox",
                documents=[long_document],
                truncation=pb.TRUNCATION_NONE,
            ),
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_models_are_marked_rerank_and_the_wrong_route_is_a_400(served: Served) -> None:
    models = {m["id"]: m for m in http(served.url + "/v1/models").json()["data"]}
    for model in RERANKERS:
        assert models[f"{model}-f16"]["task"] == "rerank"
    assert models[f"{TYPED}-f32"]["task"] == "rerank"
    model = "tiny-xlmr-reranker-f32"
    reply = http(served.url + "/v1/embeddings", "POST", body={"model": model, "input": "hi"})
    assert reply.status == 400
    assert "/v1/rerank" in reply.json()["error"]["message"]


def test_a_reranker_whose_documents_have_token_type_1(served: Served) -> None:
    """ONNX Runtime (auto) serves it; llama.cpp, which gives every token type 0, refuses it
    with the reason and what to do."""
    reply = http(
        served.url + "/v1/rerank",
        "POST",
        body={"model": f"{TYPED}-f32", "query": "a cat", "documents": ["a cat sat", "dogs"]},
    )
    if served.engine == "auto":
        assert reply.status == 200, reply.body
        assert len(reply.json()["results"]) == 2
        return
    assert reply.status == 500, reply.body  # the server's engine setting, not the request
    message = reply.json()["message"]
    assert "token type 1" in message and "engine=auto" in message
