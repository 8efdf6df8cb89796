"""Long documents in chunks on the REAL default model, over gRPC, /v1/embeddings (the official
``openai`` client) and /api/embed: every chunk's vector is the vector of the chunk's text
embedded on its own, and a pooled vector is the token-weighted mean of those, normalized."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import openai
import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL
from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.metrics import Matrix, row_cosines
from tests.servers import ServerProcess

pytestmark = pytest.mark.real_model

BAR = 0.99999  # cosine of every vector with its one-by-one counterpart
SENTENCES = [
    "Embeddings map text to vectors that keep its meaning.",
    "The quick brown fox jumps over the lazy dog near the riverbank.",
    "Envoy transcodes JSON into protobuf, and the server answers in kind.",
    "A long report is cut into windows of tokens, each embedded as its own input.",
    "Rain fell on the old town all night, and by morning the streets were rivers.",
]
# About 600 tokens: several chunks of 100 at this model's window of 256.
DOCUMENT = " ".join(SENTENCES[i % len(SENTENCES)] + f" Paragraph {i}." for i in range(40))
TEXTS = [DOCUMENT, "A short text is one chunk, the whole of it."]
SIZE, OVERLAP = 100, 20
SPECIALS = 2  # [CLS] and [SEP]


@pytest.fixture(scope="module")
def stub(real_server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(real_server.target) as channel:
        yield pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]


@pytest.fixture(scope="module")
def envoy(
    real_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProcess]:
    with EnvoyProcess.start([real_server.target], tmp_path_factory.mktemp("chunks")) as proc:
        yield proc


def chunked(stub: Any, pooling: str = "", **request: Any) -> Any:
    chunking = pb.Chunking(size=SIZE, overlap=OVERLAP, pooling=pooling)
    return stub.Embed(pb.EmbedRequest(texts=TEXTS, chunking=chunking, **request), timeout=120)


def one_by_one(stub: Any, texts: Sequence[str], normalize: bool = True) -> Matrix:
    """Each text embedded alone, in a request of its own, without chunking."""
    rows = [
        stub.Embed(pb.EmbedRequest(texts=[text], normalize=normalize), timeout=120)
        .embeddings[0]
        .values
        for text in texts
    ]
    return np.array(rows, dtype=np.float32)


def values(reply: Any) -> Matrix:
    return np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)


def spans(reply: Any) -> list[tuple[int, int, int, int]]:
    return [(e.chunk.input, e.chunk.start, e.chunk.end, e.chunk.tokens) for e in reply.embeddings]


def pieces(chunks: Sequence[tuple[int, int, int, int]]) -> list[str]:
    return [TEXTS[text][start:end] for text, start, end, _ in chunks]


def pooled(stub: Any, chunks: Sequence[tuple[int, int, int, int]]) -> Matrix:
    """Per text, the token-weighted mean of its chunks' raw vectors (each embedded alone),
    normalized: what pooling "mean" must answer."""
    raw = one_by_one(stub, pieces(chunks), normalize=False).astype(np.float64)
    rows = []
    for index in range(len(TEXTS)):
        mine = [i for i, chunk in enumerate(chunks) if chunk[0] == index]
        weights = np.array([chunks[i][3] for i in mine], dtype=np.float64)
        mean = (raw[mine] * weights[:, None]).sum(axis=0) / weights.sum()
        rows.append(mean / np.linalg.norm(mean))
    return np.array(rows, dtype=np.float32)


def test_each_chunk_is_its_text_embedded_alone(stub: Any) -> None:
    reply = chunked(stub)
    chunks = spans(reply)
    assert [e.index for e in reply.embeddings] == list(range(len(chunks)))
    document = [c for c in chunks if c[0] == 0]
    assert len(document) >= 5
    assert document[0][1] == 0 and document[-1][2] == len(DOCUMENT)
    assert all(c[3] == SIZE for c in document[:-1]) and 0 < document[-1][3] <= SIZE
    assert all(a[1] < b[1] < a[2] for a, b in itertools.pairwise(document))
    assert chunks[-1] == (1, 0, len(TEXTS[1]), chunks[-1][3])  # fits: one chunk, the whole text
    for text, (_, _, _, tokens) in zip(pieces(chunks), chunks, strict=True):
        assert stub.Tokenize(pb.TokenizeRequest(text=text)).count == tokens + SPECIALS
    assert reply.usage.prompt_tokens == sum(c[3] + SPECIALS for c in chunks)
    assert row_cosines(values(reply), one_by_one(stub, pieces(chunks))).min() >= BAR


def test_overlap_is_shared_by_neighbours(stub: Any) -> None:
    chunks = [c for c in spans(chunked(stub)) if c[0] == 0]
    for first, second in itertools.pairwise(chunks):
        shared = DOCUMENT[second[1] : first[2]]
        assert stub.Tokenize(pb.TokenizeRequest(text=shared)).count == OVERLAP + SPECIALS


def test_mean_is_the_token_weighted_mean_of_the_chunks(stub: Any) -> None:
    chunks = spans(chunked(stub))
    reply = chunked(stub, "mean")
    assert len(reply.embeddings) == len(TEXTS)
    assert not any(e.HasField("chunk") for e in reply.embeddings)
    assert row_cosines(values(reply), pooled(stub, chunks)).min() >= BAR
    # The short text's mean is its one chunk: the text's own vector.
    assert row_cosines(values(reply)[1:], one_by_one(stub, TEXTS[1:])).min() >= BAR


def test_the_prompt_is_on_every_chunk_and_out_of_the_window(stub: Any) -> None:
    prompt = "search document: "  # 3 tokens: the window is 256 - 2 - 3
    reply = chunked(stub, prompt=prompt)
    rows = [
        stub.Embed(pb.EmbedRequest(texts=[text], prompt=prompt), timeout=120).embeddings[0].values
        for text in pieces(spans(reply))
    ]
    assert row_cosines(values(reply), np.array(rows, dtype=np.float32)).min() >= BAR
    too_big = pb.Chunking(size=252)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(texts=TEXTS, chunking=too_big, prompt=prompt), timeout=60)
    assert "at most 251" in (caught.value.details() or "")


def test_without_chunking_nothing_changes(stub: Any) -> None:
    reply = stub.Embed(pb.EmbedRequest(texts=TEXTS[1:]), timeout=120)
    assert not reply.embeddings[0].HasField("chunk")
    assert row_cosines(values(reply), one_by_one(stub, TEXTS[1:])).min() >= BAR


@pytest.mark.parametrize(
    ("chunking", "param"),
    [
        ({"size": 0}, "chunking.size"),
        ({"size": 1000}, "chunking.size"),
        ({"size": 10, "overlap": 10}, "chunking.overlap"),
        ({"size": 10, "overlap": -1}, "chunking.overlap"),
        ({"size": 10, "pooling": "max"}, "chunking.pooling"),
    ],
)
def test_bad_values_are_refused_by_name(
    stub: Any, envoy: EnvoyProcess, chunking: dict[str, Any], param: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(texts=TEXTS, chunking=pb.Chunking(**chunking)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert param in (caught.value.details() or "")
    openai_reply = post(envoy, "/v1/embeddings", {"input": TEXTS, "chunking": chunking})
    assert openai_reply.status == 400
    assert openai_reply.json()["error"]["param"] == param
    ollama_reply = post(envoy, "/api/embed", {"input": TEXTS, "chunking": chunking})
    assert ollama_reply.status == 400
    assert param in ollama_reply.json()["error"]


def test_token_ids_are_not_chunked(stub: Any) -> None:
    ids = pb.TokenIds(ids=[101, 7592, 102])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(token_ids=[ids], chunking=pb.Chunking(size=10)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunking" in (caught.value.details() or "")


def post(envoy: EnvoyProcess, path: str, body: Any) -> HttpReply:
    return http(envoy.base_url + path, "POST", body=body, timeout=300)


def test_openai_client_chunks_and_mean(stub: Any, envoy: EnvoyProcess) -> None:
    chunks = spans(chunked(stub))
    with openai.OpenAI(base_url=envoy.base_url + "/v1", api_key="sk-test", max_retries=0) as api:
        per_chunk = api.embeddings.create(
            model=DEFAULT_MODEL,
            input=TEXTS,
            extra_body={"chunking": {"size": SIZE, "overlap": OVERLAP, "pooling": "chunks"}},
        )
        mean = api.embeddings.create(
            model=DEFAULT_MODEL,
            input=TEXTS,
            extra_body={"chunking": {"size": SIZE, "overlap": OVERLAP, "pooling": "mean"}},
        )
    # The extension field, kept by the client's models as an extra attribute.
    extras = [d.model_extra or {} for d in per_chunk.data]
    served = [(c["input"], c["start"], c["end"], c["tokens"]) for c in (e["chunk"] for e in extras)]
    assert served == chunks
    vectors = np.array([d.embedding for d in per_chunk.data], dtype=np.float32)
    assert row_cosines(vectors, one_by_one(stub, pieces(chunks))).min() >= BAR
    assert per_chunk.usage.prompt_tokens == sum(c[3] + SPECIALS for c in chunks)
    assert [d.index for d in mean.data] == [0, 1]
    assert (
        row_cosines(np.array([d.embedding for d in mean.data]), pooled(stub, chunks)).min() >= BAR
    )


def test_ollama_chunks_and_mean(stub: Any, envoy: EnvoyProcess) -> None:
    chunks = spans(chunked(stub))
    chunking: dict[str, Any] = {"size": SIZE, "overlap": OVERLAP}
    body = {"model": DEFAULT_MODEL, "input": TEXTS, "chunking": chunking}
    per_chunk = post(envoy, "/api/embed", body).json()
    served = [(c["input"], c["start"], c["end"], c["tokens"]) for c in per_chunk["chunks"]]
    assert served == chunks
    vectors = np.array(per_chunk["embeddings"], dtype=np.float32)
    assert row_cosines(vectors, one_by_one(stub, pieces(chunks))).min() >= BAR
    mean = post(envoy, "/api/embed", {**body, "chunking": {**chunking, "pooling": "mean"}})
    assert "chunks" not in mean.json()
    vectors = np.array(mean.json()["embeddings"], dtype=np.float32)
    assert row_cosines(vectors, pooled(stub, chunks)).min() >= BAR


def test_rest_answers_without_chunking_are_unchanged(envoy: EnvoyProcess) -> None:
    openai_reply = post(envoy, "/v1/embeddings", {"model": DEFAULT_MODEL, "input": TEXTS[1:]})
    assert set(openai_reply.json()["data"][0]) == {"object", "index", "embedding"}
    ollama_reply = post(envoy, "/api/embed", {"model": DEFAULT_MODEL, "input": TEXTS[1:]})
    assert set(ollama_reply.json()) == {
        "model",
        "embeddings",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
    }
    base64_reply = post(
        envoy,
        "/v1/embeddings",
        {"input": TEXTS[1:], "encoding_format": "base64", "chunking": {"size": 50}},
    )
    item = base64_reply.json()["data"][0]
    assert {k: item["chunk"][k] for k in ("input", "start", "end")} == {
        "input": 0,
        "start": 0,
        "end": len(TEXTS[1]),
    }
    assert len(base64.b64decode(item["embedding"])) == 384 * 4
