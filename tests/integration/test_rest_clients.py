"""The clients people already run, unchanged, against the real model behind the real Envoy:
the official ``ollama`` and ``cohere`` clients, LangChain's OllamaEmbeddings and
OpenAIEmbeddings. Vectors are checked against sentence-transformers' (../shared/reference)."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterator, Sequence
from typing import Any

import cohere
import grpc
import httpx
import numpy as np
import numpy.typing as npt
import ollama
import openai
import pytest
from langchain_ollama import OllamaEmbeddings
from langchain_openai import OpenAIEmbeddings

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, REFERENCE_DIR, STSB_TEST
from tests.envoy_proc import EnvoyProcess, http
from tests.metrics import Matrix, read_reference, read_stsb, row_cosines, spearman
from tests.servers import ServerProcess

pytestmark = pytest.mark.real_model

MIN_COSINE = 0.9999  # the f16 default model's bar (README)
LONG_TEXT = "word " * 400  # 402 tokens; the model takes 256


@pytest.fixture(scope="module")
def envoy(
    real_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProcess]:
    with EnvoyProcess.start([real_server.target], tmp_path_factory.mktemp("clients")) as proc:
        yield proc


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], Matrix]:
    texts, vectors = read_reference(REFERENCE_DIR)
    return [t["text"] for t in texts], vectors


def assert_reference(vectors: Sequence[Sequence[float]], expected: Matrix) -> None:
    cosines = row_cosines(np.array(vectors, dtype=np.float32), expected)
    worst = int(cosines.argmin())
    assert cosines.min() >= MIN_COSINE, f"text {worst}: cosine {cosines[worst]:.6f}"


# --- Ollama ------------------------------------------------------------------------------------


def test_ollama_client_embed_and_legacy_embeddings(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    with ollama.Client(host=envoy.base_url) as client:
        check_embed_and_embeddings(client, envoy, texts, expected)


def check_embed_and_embeddings(
    client: ollama.Client, envoy: EnvoyProcess, texts: list[str], expected: Matrix
) -> None:
    result = client.embed(model=DEFAULT_MODEL, input=texts)
    assert result.model == DEFAULT_MODEL
    assert_reference(result.embeddings, expected)
    legacy = [client.embeddings(model=DEFAULT_MODEL, prompt=text).embedding for text in texts[:5]]
    assert_reference(legacy, expected[:5])
    # Over-long prompts are cut (Ollama's behaviour), and the header says so.
    assert len(client.embeddings(model=DEFAULT_MODEL, prompt=LONG_TEXT).embedding) == 384
    reply = http(
        envoy.base_url + "/api/embeddings", "POST", body={"model": "", "prompt": LONG_TEXT}
    )
    assert reply.headers["x-embedd-truncated-inputs"] == "1"
    # An empty prompt: an empty vector, as Ollama answers it.
    assert client.embeddings(model=DEFAULT_MODEL, prompt="").embedding == []
    with pytest.raises(ollama.ResponseError) as caught:
        client.embeddings(model="nope", prompt="x")
    assert caught.value.status_code == 404
    assert "does not exist" in caught.value.error


def test_ollama_client_list_show_ps(envoy: EnvoyProcess) -> None:
    with ollama.Client(host=envoy.base_url) as client:
        check_list_show_ps(client)


def check_list_show_ps(client: ollama.Client) -> None:
    # Listed as Ollama lists a model: with its tag.
    [listed] = [m for m in client.list().models if m.model == f"{DEFAULT_MODEL}:latest"]
    assert isinstance(listed.modified_at, datetime.datetime)
    assert listed.size is not None and listed.size > 10_000_000
    assert listed.digest is not None and len(listed.digest) == 64
    assert listed.details is not None
    assert (listed.details.format, listed.details.family) == ("gguf", "bert")
    assert listed.details.quantization_level == "F16"
    assert listed.details.parameter_size == "22.6M"

    shown = client.show(DEFAULT_MODEL)
    assert shown.capabilities == ["embedding"]
    assert shown.modelinfo is not None
    assert shown.modelinfo["bert.embedding_length"] == 384
    assert shown.modelinfo["bert.context_length"] == 256
    assert shown.details is not None and shown.details.family == "bert"
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nope")
    assert caught.value.status_code == 404

    client.embed(model=DEFAULT_MODEL, input="load it")
    [running] = [m for m in client.ps().models if m.model == DEFAULT_MODEL]
    assert running.context_length == 256
    assert running.expires_at is not None


def test_ollama_probes_root_version_and_health(envoy: EnvoyProcess) -> None:
    root = http(envoy.base_url + "/")
    assert (root.status, root.body) == (200, b"Ollama is running")
    assert root.headers["content-type"].startswith("text/plain")
    head = http(envoy.base_url + "/", "HEAD")
    assert (head.status, head.body) == (200, b"")
    assert http(envoy.base_url + "/api/version").json() == {"version": "0.24.0"}
    health = http(envoy.base_url + "/health")
    assert (health.status, health.json()) == (200, {"status": "serving"})


def test_langchain_ollama_embeddings(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    embeddings = OllamaEmbeddings(model=DEFAULT_MODEL, base_url=envoy.base_url)
    try:
        assert_reference(embeddings.embed_documents(texts[:32]), expected[:32])
        assert_reference([embeddings.embed_query(texts[40])], expected[40:41])
    finally:
        if embeddings._client is not None:  # it offers no close() of its own
            embeddings._client.close()  # type: ignore[no-untyped-call]


# --- Cohere -------------------------------------------------------------------------------------


@pytest.fixture
def cohere_client(envoy: EnvoyProcess) -> Iterator[cohere.ClientV2]:
    with httpx.Client(timeout=300) as transport:
        yield cohere.ClientV2(base_url=envoy.base_url, api_key="unused", httpx_client=transport)


def test_cohere_client_embeds_every_type_from_one_pass(
    cohere_client: cohere.ClientV2, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    types: Any = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
    result = cohere_client.embed(
        model=DEFAULT_MODEL,
        texts=texts[:64],
        input_type="search_document",
        embedding_types=types,
    )
    got = result.embeddings
    assert got.float_ is not None
    assert_reference(got.float_, expected[:64])
    floats = np.array(got.float_, dtype=np.float32)
    assert got.base64 is not None
    decoded = np.array([np.frombuffer(base64.b64decode(b), "<f4") for b in got.base64])
    np.testing.assert_array_equal(decoded, floats)
    assert got.ubinary is not None and got.binary is not None
    ubinary = np.packbits(floats > 0, axis=1)  # sentence-transformers' quantize_embeddings
    np.testing.assert_array_equal(np.array(got.ubinary), ubinary)
    np.testing.assert_array_equal(np.array(got.binary), ubinary.astype(np.int16) - 128)
    assert got.int8 is not None and got.uint8 is not None
    int8, uint8 = np.array(got.int8), np.array(got.uint8)
    assert int8.shape == uint8.shape == (64, 384)
    assert int8.min() >= -128 and int8.max() <= 127 and uint8.min() >= 0 and uint8.max() <= 255
    assert np.abs(uint8 - 128 - int8).max() <= 1  # same scale; astype cuts toward zero
    assert result.texts == texts[:64]
    assert result.meta is not None and result.meta.billed_units is not None
    assert result.meta.billed_units.input_tokens is not None
    assert result.meta.billed_units.input_tokens > 64


def test_cohere_truncate_and_errors(cohere_client: cohere.ClientV2, envoy: EnvoyProcess) -> None:
    client = cohere_client
    ends = client.embed(
        model=DEFAULT_MODEL, texts=[LONG_TEXT + "end"], input_type="search_query", truncate="END"
    )
    starts = client.embed(
        model=DEFAULT_MODEL, texts=[LONG_TEXT + "end"], input_type="search_query", truncate="START"
    )
    assert ends.embeddings.float_ != starts.embeddings.float_
    with pytest.raises(cohere.BadRequestError) as caught:
        client.embed(
            model=DEFAULT_MODEL, texts=[LONG_TEXT], input_type="search_query", truncate="NONE"
        )
    assert "truncate" in caught.value.body["message"]
    with pytest.raises(cohere.NotFoundError):
        client.embed(model="nope", texts=["x"], input_type="search_query")
    bad = http(
        envoy.base_url + "/v2/embed",
        "POST",
        body={"texts": ["x"], "embedding_types": ["int4"]},
    )
    assert bad.status == 400
    assert "embedding_types" in bad.json()["message"]
    images = http(envoy.base_url + "/v2/embed", "POST", body={"images": ["data:image/png;"]})
    assert images.status == 400 and "text only" in images.json()["message"]


# --- OpenAI: truncation you choose, compact vectors, LangChain ---------------------------------


def openai_client(envoy: EnvoyProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=envoy.base_url + "/v1", api_key="unused", max_retries=0)


def test_openai_truncate_extension_and_its_header(envoy: EnvoyProcess) -> None:
    with openai_client(envoy) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=DEFAULT_MODEL, input=[LONG_TEXT])
        assert caught.value.code == "context_length_exceeded"
        assert '"truncate": true' in caught.value.message
        raw = client.embeddings.with_raw_response.create(
            model=DEFAULT_MODEL, input=["short", LONG_TEXT], extra_body={"truncate": True}
        )
    assert raw.headers["x-embedd-truncated-inputs"] == "1"
    right = raw.parse().data[1].embedding
    ollama_cut = http(envoy.base_url + "/api/embed", "POST", body={"input": LONG_TEXT})
    assert ollama_cut.headers["x-embedd-truncated-inputs"] == "1"
    np.testing.assert_allclose(right, ollama_cut.json()["embeddings"][0], atol=1e-6)
    left = http(
        envoy.base_url + "/v1/embeddings",
        "POST",
        body={
            "input": "The cat sits on the mat. " + LONG_TEXT + " The cat sits on the mat.",
            "truncate": True,
            "truncation_direction": "left",
            "encoding_format": "float",
        },
    )
    assert left.status == 200, left.body
    assert not np.allclose(left.json()["data"][0]["embedding"], right, atol=1e-3)
    wrong = http(
        envoy.base_url + "/v1/embeddings",
        "POST",
        body={"input": "x", "truncate": True, "truncation_direction": "middle"},
    )
    assert wrong.status == 400 and wrong.json()["error"]["param"] == "truncation_direction"
    untouched = http(envoy.base_url + "/v1/embeddings", "POST", body={"input": "x"})
    assert untouched.headers["x-embedd-truncated-inputs"] == "0"


def test_openai_compact_encodings_follow_dimensions(envoy: EnvoyProcess) -> None:
    with openai_client(envoy) as client:
        floats = client.embeddings.create(
            model=DEFAULT_MODEL, input=["a cat", "a dog"], dimensions=64, encoding_format="float"
        )
        packed = client.embeddings.create(
            model=DEFAULT_MODEL,
            input=["a cat", "a dog"],
            dimensions=64,
            encoding_format="ubinary",  # type: ignore[arg-type]
        )
    vectors = np.array([d.embedding for d in floats.data], dtype=np.float32)
    expected = np.packbits(vectors > 0, axis=1)
    np.testing.assert_array_equal(np.array([d.embedding for d in packed.data]), expected)
    assert expected.shape == (2, 8)


def test_langchain_openai_embeddings(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    with httpx.Client() as transport:  # closed here: no socket left to the garbage collector
        embeddings = OpenAIEmbeddings(
            model=DEFAULT_MODEL,
            base_url=envoy.base_url + "/v1",
            api_key="unused",  # type: ignore[arg-type]
            check_embedding_ctx_length=False,
            http_client=transport,
        )
        assert_reference(embeddings.embed_documents(texts[:32]), expected[:32])
        assert_reference([embeddings.embed_query(texts[40])], expected[40:41])


# --- compact vectors keep STS-B's ranking -------------------------------------------------------


def pair_cosines(firsts: Matrix, seconds: Matrix) -> npt.NDArray[np.float64]:
    a = firsts / np.linalg.norm(firsts, axis=1, keepdims=True)
    b = seconds / np.linalg.norm(seconds, axis=1, keepdims=True)
    cosines: npt.NDArray[np.float64] = (a.astype(np.float64) * b).sum(axis=1)
    return cosines


@pytest.mark.slow  # the STS-B test set, three vector types
def test_int8_and_binary_rank_stsb_pairs_as_float_does(envoy: EnvoyProcess) -> None:
    """One pass over the STS-B test sentences through /v2/embed (float, int8, ubinary): int8
    cosine's Spearman within 0.03 of float's; binary (Hamming distance) reported."""
    stsb = read_stsb(STSB_TEST)
    unique = sorted(set(stsb.firsts) | set(stsb.seconds))
    kinds = ("float", "int8", "ubinary")
    rows: dict[str, dict[str, list[int | float]]] = {kind: {} for kind in kinds}
    for start in range(0, len(unique), 2048):
        batch = unique[start : start + 2048]
        body = {"model": DEFAULT_MODEL, "texts": batch, "embedding_types": list(kinds)}
        reply = http(envoy.base_url + "/v2/embed", "POST", body=body, timeout=300)
        assert reply.status == 200, reply.body[:300]
        for kind in kinds:
            rows[kind].update(zip(batch, reply.json()["embeddings"][kind], strict=True))

    def pairs(kind: str, dtype: type) -> tuple[Any, Any]:
        return (
            np.array([rows[kind][t] for t in stsb.firsts], dtype=dtype),
            np.array([rows[kind][t] for t in stsb.seconds], dtype=dtype),
        )

    floats = pair_cosines(*pairs("float", np.float32))
    int8 = pair_cosines(*pairs("int8", np.float32))
    first_bits, second_bits = pairs("ubinary", np.uint8)
    hamming = np.unpackbits(first_bits ^ second_bits, axis=1).sum(axis=1).astype(np.float64)
    scores = {
        "float": spearman(floats, stsb.scores),
        "int8": spearman(int8, stsb.scores),
        "binary": spearman(-hamming, stsb.scores),
    }
    print(
        "STS-B Spearman x100: "
        + ", ".join(f"{kind} {score * 100:.2f}" for kind, score in scores.items())
        + f"; int8 vs float ranking {spearman(int8, floats):.4f}, "
        f"binary vs float {spearman(-hamming, floats):.4f}"
    )
    assert scores["float"] * 100 == pytest.approx(82.03, abs=0.05)
    assert abs(scores["int8"] - scores["float"]) <= 0.03
    assert scores["binary"] > scores["float"] - 0.05  # reported; a loose floor against breakage


def test_token_ids_of_another_tokenizer_are_refused_naming_the_langchain_option(
    envoy: EnvoyProcess,
) -> None:
    """OpenAIEmbeddings' default (check_embedding_ctx_length=True) tokenizes with tiktoken and
    sends lists of ids for OpenAI's vocabulary. (tiktoken downloads its vocabulary, so the body
    it would send is written here: arrays of ids without the model's [CLS]/[SEP].)"""
    for ids in ([[976, 8415, 23874, 389, 279, 5634, 13]], [[976, 100256, 13]]):
        with openai_client(envoy) as client, pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=DEFAULT_MODEL, input=ids)
        assert caught.value.param == "input[0]"
        assert "check_embedding_ctx_length=False" in caught.value.message
        assert "tiktoken" in caught.value.message
    with openai_client(envoy) as client:  # the model's own ids, as Tokenize gives them
        own = client.embeddings.create(model=DEFAULT_MODEL, input=[[101, 4937, 102]])
    assert len(own.data[0].embedding) == 384


def test_native_grpc_compact_output_types(real_server: ServerProcess, envoy: EnvoyProcess) -> None:
    texts = ["The cat sits on the mat.", "Stock markets fell today."]
    cohere_body = {"texts": texts, "embedding_types": ["float", "int8", "binary"]}
    expected = http(envoy.base_url + "/v2/embed", "POST", body=cohere_body).json()["embeddings"]
    with grpc.insecure_channel(real_server.target) as channel:
        stub: Any = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        int8 = stub.Embed(pb.EmbedRequest(texts=texts, output_type=pb.OUTPUT_TYPE_INT8))
        binary = stub.Embed(pb.EmbedRequest(texts=texts, output_type=pb.OUTPUT_TYPE_BINARY))
        short = stub.Embed(
            pb.EmbedRequest(texts=texts, output_type=pb.OUTPUT_TYPE_UBINARY, dimensions=16)
        )
    for kind, reply in (("int8", int8), ("binary", binary)):
        rows = [np.frombuffer(e.data, dtype=np.int8).tolist() for e in reply.embeddings]
        assert rows == expected[kind]
        assert not any(e.values for e in reply.embeddings)  # bytes only: no floats
    floats = np.array(expected["float"], dtype=np.float32)
    cut = floats[:, :16] / np.linalg.norm(floats[:, :16], axis=1, keepdims=True)
    assert [e.data for e in short.embeddings] == [row.tobytes() for row in np.packbits(cut > 0, 1)]
