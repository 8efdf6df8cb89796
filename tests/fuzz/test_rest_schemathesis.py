"""Fuzzing the REST surface end to end: a real Envoy in front of a fake-engine server.

Two sources of requests:

- schemathesis, from the OpenAPI description generated from the protos
  (docs/openapi/embedd.openapi.json, `python -m tools.openapi`): every operation, positive
  cases (two thirds of them steered towards real model names, valid or extreme values, so
  they get past "model not found") and negative ones (schema-violating bodies); after each
  load/unload, the listings must still answer;
- hypothesis-generated raw bodies POSTed as they are: wrong types, huge and empty strings,
  invalid UTF-8, lone surrogates, deep nesting, token ids out of range, absurd dimensions,
  unknown fields, non-JSON.

Required of every answer: no 5xx; a 2xx is the documented JSON (or GET /'s text); any other
status is the route's well-formed error body (OpenAI's {"error": {"message", "type", "param",
"code"}}, Ollama's {"error": "..."} under /api/ and at GET /, {"message", "detail"} on
/v1/rerank and /v2/rerank, Cohere's {"message": "..."} under /v2/ otherwise, TEI's {"error",
"error_type"} on TEI's routes and POST /), as application/json, with no grpc-* header. The
server and Envoy the tests fuzzed are healthy afterwards (the module's fixture checks them at
teardown). Everything is derandomized: the same requests on every run.
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import schemathesis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.fakes import FakeLoader, task_behaviour, write_fake_gguf
from tests.servers import ServerThread

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "docs" / "openapi" / "embedd.openapi.json"
SCHEMA = schemathesis.openapi.from_path(SPEC, config=schemathesis.Config())


def _fuzzing_order(label: str) -> tuple[int, str]:
    """Model management first (it changes what the listings show), the listings last."""
    verb, path = label.split(" ", 1)
    if verb == "POST" and path.startswith("/v1/models/"):
        return 0, label
    return (2 if verb in ("GET", "HEAD") else 1), label


# Every operation the description has (test_every_rest_route_is_described holds it to the
# protos' routes), so a new route is fuzzed without a line here.
OPERATIONS = sorted(
    (result.ok().label for result in SCHEMA.get_all_operations() if isinstance(result, Ok)),
    key=_fuzzing_order,
)
EMBEDDING_ROUTES = (
    "/v1/embeddings",
    "/embeddings",  # TEI's path for OpenAI's route
    "/api/embed",
    "/api/embeddings",
    "/v2/embed",
)
BODY_OPERATIONS = [label for label in OPERATIONS if label.startswith("POST")]
POST_ROUTES = [label.split()[1] for label in BODY_OPERATIONS]
# The 5xx check is assert_well_formed's (it knows the one deliberate 501).
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
RERANK_ROUTES = ("/v1/rerank", "/v2/rerank", "/rerank")
# TEI's routes (POST / too): bare JSON arrays when they succeed (/info an object, /ping
# nothing), {"error", "error_type"} when not.
TEI_ROUTES = (
    "/rerank",
    "/predict",
    "/embed_sparse",
    "/embed",
    "/embed_all",
    "/similarity",
    "/tokenize",
    "/decode",
    "/invocations",
)
CLASSES = ("negative", "neutral", "positive")  # the fake classifier's labels
TEI_ERROR_TYPES = {"Validation", "Empty", "Overloaded", "Unhealthy", "Backend"}
# The fake models: 'fake' (the default; 8 dimensions) and 'other' (4); 16 tokens, ids 0..15;
# 'reranker', a fake cross-encoder (its "logit" a hash of the pair's ids); 'sentiment', a fake
# 3-label classifier; 'splade', a fake sparse encoder (a weight per token id it holds).
SCHEMATHESIS_EXAMPLES = 200  # per operation and mode: 7 positive + 4 negative runs
RAW_EXAMPLES = 200  # per POST route

# A failing example with a 100 kB text makes Hypothesis warn about its repr; the failure is
# what matters (and pyproject turns warnings into errors).
# Every test here fuzzes one shared server with hundreds of requests: slow (make test-fast).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
    pytest.mark.slow,
]

FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    print_blob=False,
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, EnvoyProcess]]:
    """One server and Envoy for the whole module. After the tests that used them (whichever
    ran, in any order), the same pair must still be healthy: checked here, at teardown, so
    that a server the fuzzing broke fails the run (as an error of the last test using it)."""
    root = tmp_path_factory.mktemp("fuzz-rest")
    write_fake_gguf(root / "models" / "reranker.gguf", pooling=4)
    write_fake_gguf(root / "models" / "sentiment.gguf", pooling=4, task="classify", labels=CLASSES)
    write_fake_gguf(root / "models" / "splade.gguf", pooling=0, task="sparse")
    with (
        ServerThread.with_fake_models(
            root / "models", FakeLoader(task_behaviour), metrics_port=0
        ) as server,
        EnvoyProcess.start([server.target], root / "envoy") as envoy,
    ):
        yield server, envoy
        assert_healthy(server, envoy)


@pytest.fixture(scope="module")
def envoy(stack: tuple[ServerThread, EnvoyProcess]) -> EnvoyProcess:
    return stack[1]


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as shared:
        yield shared


def reset_model_state(envoy: EnvoyProcess) -> None:
    """The models as they started: 'fake' loaded for ever, 'other' not loaded."""
    http(envoy.base_url + "/v1/models/load", "POST", body={"model": "fake", "keep_alive": -1})
    http(envoy.base_url + "/v1/models/unload", "POST", body={"model": "other"})


@pytest.fixture
def reset_models(envoy: EnvoyProcess) -> Iterator[None]:
    """After a test that loads and unloads models: a failure there does not spill over."""
    yield
    reset_model_state(envoy)


# --- what every answer must be -----------------------------------------------------------------


def assert_well_formed(
    path: str, status: int, headers: dict[str, str], body: bytes, method: str = "POST"
) -> Any:
    """No 5xx; JSON; a non-2xx is the route's error body. Returns the parsed JSON."""
    where = f"{method} {path} -> {status}: {body[:500]!r}"
    assert status < 500 or is_deliberate_501(path, status, body), where
    tei = path in (*TEI_ROUTES, "/info", "/ping") or (path == "/" and method == "POST")
    if status == 200 and (path in ("/ping", "/api/pull") or (path == "/" and not tei)):
        return assert_http_body(path, headers, body, where)  # HttpBody answers
    assert headers.get("content-type") == "application/json", where
    leaked = [name for name in headers if name.startswith(("grpc-", "x-http-"))]
    assert not leaked, where
    document = json.loads(body)
    if 200 <= status < 300:
        assert isinstance(document, list if tei and path != "/info" else dict), where
        return document
    assert isinstance(document, dict), where
    if path in ("/v1/rerank", "/v2/rerank"):
        assert set(document) == {"message", "detail"}, where
        assert isinstance(document["message"], str) and document["message"], where
        assert document["detail"] == document["message"], where
        return document
    if tei:
        assert set(document) == {"error", "error_type"}, where
        assert isinstance(document["error"], str) and document["error"], where
        assert document["error_type"] in TEI_ERROR_TYPES, where
        return document
    if path.startswith("/v2/"):
        assert set(document) == {"message"}, where
        assert isinstance(document["message"], str) and document["message"], where
        return document
    assert set(document) == {"error"}, where
    error = document["error"]
    if path.startswith("/api/") or path == "/":
        assert isinstance(error, str), where
        assert error, where
    else:
        assert isinstance(error, dict), where
        assert set(error) == OPENAI_ERROR_KEYS, where
        assert isinstance(error["message"], str), where
        assert error["message"], where
        assert isinstance(error["type"], str), where
        assert error["param"] is None or isinstance(error["param"], str), where
        assert error["code"] is None or isinstance(error["code"], str), where
    return document


def assert_http_body(path: str, headers: dict[str, str], body: bytes, where: str) -> Any:
    """The 200 of a route whose answer is not one JSON document. "/": "Ollama is running"
    (nothing for HEAD). /api/pull of a model that is here: Ollama's NDJSON progress, or with
    "stream": false its last line as one JSON object (returned). /ping: TEI's empty 200."""
    kind = headers.get("content-type", "")
    if path == "/ping":
        assert body == b"", where
        return None
    if path == "/":
        assert kind.startswith("text/plain"), where
        assert body in (b"Ollama is running", b""), where
        return None
    if kind == "application/x-ndjson":
        lines = [json.loads(line) for line in body.splitlines()]
        assert lines == [{"status": "pulling manifest"}, {"status": "success"}], where
    else:
        assert kind.startswith("application/json"), where
        lines = [json.loads(body)]
        assert lines == [{"status": "success"}], where
    return lines[-1]


def is_deliberate_501(path: str, status: int, body: bytes) -> bool:
    """Loading a model with "embedding": false is documented as 501 not_implemented_error
    (docs/rest.md): embedd serves embeddings only."""
    if (path, status) != ("/v1/models/load", 501):
        return False
    error = json.loads(body)["error"]
    return isinstance(error, dict) and error.get("code") == "not_implemented_error"


def check_reply(path: str, reply: HttpReply, method: str = "POST") -> Any:
    headers = {name.lower(): value for name, value in reply.headers.items()}
    return assert_well_formed(path, reply.status, headers, reply.body, method)


def assert_embeddings_shape(path: str, document: dict[str, Any]) -> None:
    """A 200 from an embedding route: vectors of one length, finite, unit norm (integers for
    the compact types)."""
    if path == "/api/embed":
        rows = document["embeddings"]
        if rows == []:  # no input: the model loaded, nothing embedded (Ollama's answer)
            assert set(document) == {"model", "embeddings"}
            return
    elif path == "/api/embeddings":
        rows = [document["embedding"]]
        if rows == [[]]:  # an empty prompt: an empty vector, as Ollama answers it
            return
    elif path == "/v2/embed":
        kinds = document["embeddings"]
        assert kinds and all(len(rows) == len(document["texts"]) for rows in kinds.values())
        rows = kinds.get("float", [])
        if not rows:
            return
    else:
        rows = [item["embedding"] for item in document["data"]]
        assert [item["index"] for item in document["data"]] == list(range(len(rows)))
    assert rows
    if all(isinstance(row, list) for row in rows):
        assert len({len(row) for row in rows}) == 1
        for row in rows:
            assert all(isinstance(x, float | int) and math.isfinite(x) for x in row)
            if not all(isinstance(x, int) for x in row):
                assert math.isclose(math.hypot(*row), 1, rel_tol=1e-4)
    else:
        assert all(isinstance(row, str) for row in rows)  # base64


def assert_predictions_shape(document: list[Any]) -> None:
    """A 200 from /predict: one input's labels (or a batch of them), best first, each label
    once, probabilities in [0, 1] unless raw. The classifier's three labels, or the fake
    reranker's one (a cross-encoder may be asked to /predict, as TEI allows)."""
    rows = document if document and isinstance(document[0], list) else [document]
    for row in rows:
        assert sorted(item["label"] for item in row) in (sorted(CLASSES), ["LABEL_0"])
        scores = [item["score"] for item in row]
        assert all(isinstance(x, float | int) and math.isfinite(x) for x in scores)
        assert scores == sorted(scores, reverse=True)


def assert_sparse_shape(document: list[Any]) -> None:
    """A 200 from /embed_sparse: per input, token ids ascending within the vocabulary, finite
    non-zero weights."""
    assert document
    for row in document:
        indices = [item["index"] for item in row]
        assert indices == sorted(set(indices)) and all(0 <= i < 16 for i in indices)
        assert all(math.isfinite(item["value"]) and item["value"] != 0 for item in row)


def finite_numbers(row: Any) -> bool:
    return isinstance(row, list) and all(
        isinstance(x, float | int) and not isinstance(x, bool) and math.isfinite(x) for x in row
    )


def assert_tei_shape(path: str, document: Any) -> None:
    """A 200 from TEI's /embed, /embed_all, /similarity, /tokenize or /decode: its array."""
    assert isinstance(document, list) and document
    if path == "/embed":
        assert all(finite_numbers(row) and row for row in document)
        assert len({len(row) for row in document}) == 1
    elif path == "/embed_all":
        for rows in document:
            assert rows and all(finite_numbers(row) and row for row in rows)
        assert len({len(row) for rows in document for row in rows}) == 1  # the hidden size
    elif path == "/similarity":
        assert finite_numbers(document) and all(-1.0001 <= x <= 1.0001 for x in document)
    elif path == "/tokenize":
        for tokens in document:
            for token in tokens:
                assert set(token) == {"id", "text", "special", "start", "stop"}
                assert (token["start"] is None) == token["special"]
    elif path == "/decode":
        assert all(isinstance(text, str) for text in document)


def assert_ranking_shape(path: str, document: Any) -> None:
    """A 200 from a rerank route: results best first, each index once, finite scores."""
    results = document if path == "/rerank" else document["results"]
    score = "score" if path == "/rerank" else "relevance_score"
    indexes = [item["index"] for item in results]
    assert len(set(indexes)) == len(indexes)
    scores = [item[score] for item in results]
    assert all(isinstance(x, float | int) and math.isfinite(x) for x in scores)
    assert scores == sorted(scores, reverse=True)


# --- schemathesis --------------------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
MODELS = st.sampled_from(["fake", "other", "", "nope", "FAKE", "fake ", "../fake", "other\x00"])
# Ollama's forms of a name (core.model_names) and their near misses.
TAGGED_MODELS = MODELS | st.sampled_from(
    ["fake:latest", "library/fake", "registry.ollama.ai/library/other:latest", "fake:v2", ":latest"]
)
WORDS = st.sampled_from(["hello", "world", "the", "cat", "sat", "on", "mat", "dog", "zebra"])
SENTENCES = st.lists(WORDS, min_size=1, max_size=20).map(" ".join)
TEXTS = st.one_of(
    SENTENCES,
    st.text(max_size=30),
    st.just(""),
    st.integers(min_value=1, max_value=20_000).map(lambda n: "word " * n),
)
TOKEN_IDS = st.one_of(
    st.integers(min_value=0, max_value=15),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([16, 2**31, 2**32, 2**53, 1e300, -0.0, 0.5]),
)
OPENAI_INPUTS = st.one_of(
    TEXTS,
    st.lists(TEXTS, min_size=0, max_size=8),
    st.lists(TOKEN_IDS, max_size=20),
    st.lists(st.lists(TOKEN_IDS, max_size=20), max_size=4),
    JSON_VALUES,
)
OLLAMA_INPUTS = st.one_of(TEXTS, st.lists(TEXTS, max_size=8), JSON_VALUES)
COMPACT_TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]
EMBEDDING_TYPES = st.one_of(
    st.lists(st.sampled_from([*COMPACT_TYPES, "", "int4", "FLOAT"]), max_size=7), JSON_VALUES
)
COHERE_TRUNCATES = st.sampled_from(["NONE", "START", "END", "", "end", "middle"])
DIMENSIONS = st.one_of(
    st.integers(min_value=-2, max_value=10),
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
KEEP_ALIVES = st.one_of(
    st.sampled_from(["5m", "0", "-1", "1h30m", "250ms", "", "x", "5", "1e400", "nan", "-inf"]),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    JSON_VALUES,
)
INPUT_TYPES = ["search_query", "search_document", "classification", "clustering"]
PROMPT_NAMES = st.one_of(st.sampled_from(["", "query", "nope"]), st.text(max_size=10))
PROMPTS = st.one_of(st.sampled_from(["", "query: "]), TEXTS)
INPUT_TYPE_VALUES = st.one_of(st.sampled_from(["", "nope", *INPUT_TYPES]), st.text(max_size=10))
OLLAMA_OPTIONS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "prompt_name": PROMPT_NAMES | JSON_SCALARS,
            "prompt": PROMPTS | JSON_SCALARS,
            "input_type": INPUT_TYPE_VALUES,
            "temperature": JSON_SCALARS,
            "num_ctx": DIMENSIONS | JSON_SCALARS,
        },
    ),
    st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3),
)
STEERED_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/v1/embeddings": {
        "model": MODELS,
        "input": OPENAI_INPUTS,
        "dimensions": DIMENSIONS,
        "encoding_format": st.sampled_from([*COMPACT_TYPES, "", "int4"]),
        "prompt_name": PROMPT_NAMES,
        "prompt": PROMPTS,
        "input_type": INPUT_TYPE_VALUES,
        "truncate": st.booleans(),
        "truncation_direction": st.sampled_from(["right", "left", "", "middle"]),
    },
    "/api/embeddings": {
        "model": MODELS,
        "prompt": TEXTS,
        "keep_alive": KEEP_ALIVES,
        "options": OLLAMA_OPTIONS,
    },
    "/v2/embed": {
        "model": MODELS,
        "texts": st.lists(TEXTS, max_size=8),
        "input_type": INPUT_TYPE_VALUES,
        "embedding_types": EMBEDDING_TYPES,
        "truncate": COHERE_TRUNCATES,
        "output_dimension": DIMENSIONS,
        "max_tokens": DIMENSIONS,
        "images": JSON_VALUES,
    },
    "/api/show": {"model": MODELS, "name": MODELS, "verbose": st.booleans()},
    "/api/pull": {"model": TAGGED_MODELS, "name": TAGGED_MODELS, "stream": st.booleans()},
    "/api/embed": {
        "model": TAGGED_MODELS,
        "input": OLLAMA_INPUTS,
        "dimensions": DIMENSIONS,
        "keep_alive": KEEP_ALIVES,
        "truncate": st.booleans(),
        "options": OLLAMA_OPTIONS,
    },
    "/v1/models/load": {
        "model": MODELS,
        "keep_alive": KEEP_ALIVES,
        "pooling": st.sampled_from(["", "mean", "cls", "last", "none", "max"]),
        "embedding": st.booleans(),
    },
    "/v1/models/unload": {"model": MODELS},
    **{
        route: {
            "model": st.sampled_from(["reranker", "fake", "", "nope"]),
            "query": TEXTS,
            "documents" if route != "/rerank" else "texts": st.lists(TEXTS, max_size=8)
            | JSON_VALUES,
            "top_n": DIMENSIONS,
            "return_documents" if route != "/rerank" else "return_text": st.booleans(),
            "raw_scores": st.booleans(),
        }
        for route in RERANK_ROUTES
    },
    "/predict": {
        "model": st.sampled_from(["sentiment", "reranker", "fake", "", "nope"]),
        "inputs": st.one_of(
            TEXTS,
            st.lists(TEXTS, max_size=3),
            st.lists(st.lists(TEXTS, max_size=3), max_size=4),
            JSON_VALUES,
        ),
        "truncate": st.booleans(),
        "truncation_direction": st.sampled_from(["right", "left", "Left", "", "middle"]),
        "raw_scores": st.booleans(),
    },
    "/embed_sparse": {
        "model": st.sampled_from(["splade", "fake", "", "nope"]),
        "inputs": OLLAMA_INPUTS,
        "truncate": st.booleans(),
        "truncation_direction": st.sampled_from(["right", "left", "", "middle"]),
        "prompt_name": PROMPT_NAMES,
    },
}


TEI_TRUNCATION = {
    "truncate": st.booleans(),
    "truncation_direction": st.sampled_from(["right", "left", "Left", "", "middle"]),
}
TEI_MODELS = st.sampled_from(["fake", "other", "sentiment", "reranker", "splade", "", "nope"])
SIMILARITY_INPUTS = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"source_sentence": TEXTS | JSON_SCALARS, "sentences": OLLAMA_INPUTS}
    ),
    JSON_VALUES,
)
SIMILARITY_PARAMETERS = st.one_of(
    st.fixed_dictionaries(
        {}, optional={**TEI_TRUNCATION, "prompt_name": PROMPT_NAMES | JSON_SCALARS}
    ),
    JSON_VALUES,
)
DECODE_IDS = st.one_of(
    st.lists(TOKEN_IDS, max_size=20), st.lists(st.lists(TOKEN_IDS, max_size=20), max_size=4)
)
TEI_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/embed": {
        "model": TEI_MODELS,
        "inputs": OPENAI_INPUTS,
        "normalize": st.booleans(),
        "dimensions": DIMENSIONS,
        "prompt_name": PROMPT_NAMES,
        **TEI_TRUNCATION,
    },
    "/embed_all": {"model": TEI_MODELS, "inputs": OPENAI_INPUTS, **TEI_TRUNCATION},
    "/similarity": {
        "model": TEI_MODELS,
        "inputs": SIMILARITY_INPUTS,
        "parameters": SIMILARITY_PARAMETERS,
    },
    "/tokenize": {
        "model": TEI_MODELS,
        "inputs": OLLAMA_INPUTS,
        "add_special_tokens": st.booleans(),
        "prompt_name": PROMPT_NAMES,
    },
    "/decode": {"model": TEI_MODELS, "ids": DECODE_IDS, "skip_special_tokens": st.booleans()},
}
ROOT_FIELDS = {  # POST / and /invocations: every TEI request shape's fields
    **TEI_FIELDS["/embed"],
    "inputs": st.one_of(OPENAI_INPUTS, SIMILARITY_INPUTS),
    "parameters": SIMILARITY_PARAMETERS,
    "query": TEXTS,
    "texts": st.lists(TEXTS, max_size=8) | JSON_VALUES,
    "raw_scores": st.booleans(),
    "return_text": st.booleans(),
}
STEERED_FIELDS.update(
    {
        **TEI_FIELDS,
        "/": ROOT_FIELDS,
        "/invocations": ROOT_FIELDS,
        "/embeddings": STEERED_FIELDS["/v1/embeddings"],
    }
)


SHORT_SENTENCES = st.lists(WORDS, min_size=1, max_size=8).map(" ".join)
OMIT = object()  # a valid value that is: no such field
VALID_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "/v1/embeddings": {
        "model": st.sampled_from(["fake", "other", ""]),
        "input": st.one_of(
            SHORT_SENTENCES,
            st.lists(SHORT_SENTENCES, min_size=1, max_size=8),
            # The model's own ids: between its [CLS] (2) and [SEP] (3), as Tokenize gives them.
            st.lists(st.integers(min_value=0, max_value=15), max_size=14).map(
                lambda ids: [2, *ids, 3]
            ),
        ),
        "dimensions": st.none() | st.integers(min_value=1, max_value=4),
        "encoding_format": st.sampled_from([*COMPACT_TYPES, ""]),
        # The fake models have no prompts: input_type maps to none, and token ids stay valid.
        "prompt_name": st.just(""),
        "prompt": st.just(OMIT),
        "input_type": st.sampled_from(["", *INPUT_TYPES]),
        "truncate": st.booleans(),
        "truncation_direction": st.sampled_from(["right", "left", ""]),
    },
    "/api/embeddings": {
        "model": st.sampled_from(["fake", "other", ""]),
        "prompt": TEXTS,
        "keep_alive": st.sampled_from(["5m", "1h", 0, -1, 30, None]),
        "options": st.sampled_from([{}, {"input_type": "search_query"}, {"temperature": 0.5}]),
    },
    "/v2/embed": {
        "model": st.sampled_from(["fake", "other", ""]),
        "texts": st.lists(SHORT_SENTENCES, min_size=1, max_size=8),
        "input_type": st.sampled_from(INPUT_TYPES),
        "embedding_types": st.lists(st.sampled_from(COMPACT_TYPES), max_size=6),
        "truncate": st.sampled_from(["NONE", "START", "END"]),
        "output_dimension": st.none() | st.integers(min_value=1, max_value=4),
        "max_tokens": st.none() | st.integers(min_value=1, max_value=100),
        "images": st.just(OMIT),
        "inputs": st.just(OMIT),
    },
    "/api/show": {"model": st.sampled_from(["fake", "other", ""]), "name": st.just(OMIT)},
    "/api/pull": {
        "model": st.sampled_from(["fake", "other:latest", "library/fake"]),
        "name": st.just(OMIT),
        "stream": st.booleans(),
    },
    "/api/embed": {
        "model": st.sampled_from(["fake", "other", ""]),
        "input": st.one_of(TEXTS.filter(bool), st.lists(TEXTS.filter(bool), min_size=1)),
        "dimensions": st.none() | st.integers(min_value=1, max_value=4),
        "keep_alive": st.sampled_from(["5m", "1h", 0, -1, 30, None]),
        "truncate": st.just(True),
        "options": st.sampled_from(
            [
                {},
                {"input_type": "search_query"},
                {"prompt": "query: "},
                {"temperature": 0.5},
                {"num_ctx": 3},
            ]
        ),
    },
    "/v1/models/load": {
        "model": st.sampled_from(["fake", "other", ""]),
        "keep_alive": st.sampled_from(["5m", "1h", 0, -1, 30, None]),
        "pooling": st.sampled_from(["", "mean"]),
        "embedding": st.just(True),
        "n_gpu_layers": st.integers(min_value=-1, max_value=100),
    },
    "/v1/models/unload": {"model": st.sampled_from(["fake", "other", ""])},
    **{
        route: {
            "model": st.sampled_from(["reranker", ""]),
            "query": SHORT_SENTENCES,
            "documents" if route != "/rerank" else "texts": st.lists(
                SHORT_SENTENCES | st.builds(lambda t: {"text": t}, SHORT_SENTENCES)
                if route != "/rerank"
                else SHORT_SENTENCES,
                min_size=1,
                max_size=8,
            ),
            "top_n": st.just(OMIT) if route == "/rerank" else st.none() | st.integers(1, 10),
            "return_documents" if route != "/rerank" else "return_text": st.booleans(),
            "raw_scores": st.booleans(),
        }
        for route in RERANK_ROUTES
    },
    "/predict": {
        "model": st.sampled_from(["sentiment", ""]),
        "inputs": st.one_of(
            SHORT_SENTENCES,
            st.lists(SHORT_SENTENCES, min_size=1, max_size=2),
            st.lists(st.lists(SHORT_SENTENCES, min_size=1, max_size=2), min_size=1, max_size=4),
        ),
        "truncate": st.just(True),
        "truncation_direction": st.sampled_from(["right", "left"]),
        "raw_scores": st.booleans(),
    },
    "/embed_sparse": {
        "model": st.sampled_from(["splade", ""]),
        "inputs": SHORT_SENTENCES | st.lists(SHORT_SENTENCES, min_size=1, max_size=8),
        "truncate": st.just(True),
        "truncation_direction": st.sampled_from(["right", "left"]),
        "prompt_name": st.just(""),
    },
}


# The model's own ids: between its [CLS] (2) and [SEP] (3).
OWN_IDS = st.lists(st.integers(min_value=0, max_value=15), max_size=12).map(lambda i: [2, *i, 3])
VALID_TEI_INPUTS = st.one_of(
    SHORT_SENTENCES,
    st.lists(SHORT_SENTENCES | OWN_IDS, min_size=1, max_size=8),
    OWN_IDS,
)
VALID_TRUNCATION = {
    "truncate": st.just(True),
    "truncation_direction": st.sampled_from(["right", "left", "Left"]),
}
VALID_SIMILARITY = st.fixed_dictionaries(
    {
        "source_sentence": SHORT_SENTENCES,
        "sentences": st.lists(SHORT_SENTENCES, min_size=1, max_size=8),
    }
)
VALID_ROOT = {
    "model": st.sampled_from(["fake", ""]),
    "inputs": VALID_TEI_INPUTS | VALID_SIMILARITY,
    "parameters": st.just(OMIT),
    "normalize": st.booleans(),
    "dimensions": st.none() | st.integers(min_value=1, max_value=4),
    "prompt_name": st.just(""),
    **VALID_TRUNCATION,
}
VALID_FIELDS.update(
    {
        "/embed": {
            "model": st.sampled_from(["fake", "other", ""]),
            "inputs": VALID_TEI_INPUTS,
            "normalize": st.booleans(),
            "dimensions": st.none() | st.integers(min_value=1, max_value=4),
            "prompt_name": st.just(""),
            **VALID_TRUNCATION,
        },
        "/embed_all": {
            "model": st.sampled_from(["fake", ""]),
            "inputs": SHORT_SENTENCES | st.lists(SHORT_SENTENCES, min_size=1, max_size=4),
            "prompt_name": st.just(""),
            **VALID_TRUNCATION,
        },
        "/similarity": {
            "model": st.sampled_from(["fake", "other", ""]),
            "inputs": VALID_SIMILARITY,
            "parameters": st.sampled_from([OMIT, {}, {"truncate": True}]),
        },
        "/tokenize": {
            "model": st.sampled_from(["fake", "other", ""]),
            "inputs": SHORT_SENTENCES | st.lists(SHORT_SENTENCES, min_size=1, max_size=8),
            "add_special_tokens": st.booleans(),
            "prompt_name": st.just(""),
        },
        "/decode": {
            "model": st.sampled_from(["fake", "other", ""]),
            "ids": OWN_IDS | st.lists(OWN_IDS, min_size=1, max_size=4),
            "skip_special_tokens": st.booleans(),
        },
        "/": VALID_ROOT,
        "/invocations": VALID_ROOT,
        "/embeddings": VALID_FIELDS["/v1/embeddings"],
    }
)
TEI_SHAPED = ("/embed", "/embed_all", "/similarity", "/tokenize", "/decode")


def steer(case: schemathesis.Case[Any], draw: Callable[[st.SearchStrategy[Any]], Any]) -> None:
    """Positive cases: a third as schemathesis made them; a third with the route's fields set to
    valid values (the unknown fields schemathesis added stay), so they reach the engine; a
    third with some fields set to meaningful or extreme values."""
    how = draw(st.sampled_from(["as made", "valid", "extreme"]))
    if how == "as made":
        return
    if case.path_parameters and "model" in case.path_parameters:
        models = st.sampled_from(["fake", "other"]) if how == "valid" else MODELS.filter(bool)
        case.path_parameters["model"] = draw(models)
    if not isinstance(case.body, dict):
        return
    if how == "valid":
        for name, strategy in VALID_FIELDS.get(case.path, {}).items():
            value = draw(strategy)
            if value is OMIT:
                case.body.pop(name, None)
            else:
                case.body[name] = value
        return
    for name, strategy in STEERED_FIELDS.get(case.path, {}).items():
        if draw(st.booleans()):
            case.body[name] = draw(strategy)


def listings_still_answer(envoy: EnvoyProcess, session: requests.Session) -> None:
    """After a model was loaded or unloaded: the listings answer 200 with their documented JSON."""
    for path in ("/api/ps", "/v1/models"):
        case = SCHEMA[path]["GET"].Case()
        response = case.call(base_url=envoy.base_url, session=session, timeout=30)
        assert response.status_code == 200, f"GET {path} -> {response.status_code}: {response.text}"
        case.validate_response(response, checks=CHECKS)


def assert_healthy(server: ServerThread, envoy: EnvoyProcess) -> None:
    """SERVING, directly and through Envoy; Envoy's upstream healthy; embeddings answered over
    gRPC and REST; the listings still answer."""
    for target in (server.target, envoy.grpc_target):
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "embedd.v1.Embedder"):
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub: Any = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
            answer = stub.Embed(pb.EmbedRequest(texts=["hello world"]), timeout=30)
            assert len(answer.embeddings[0].values) == 8
    assert "healthy" in envoy.upstream_health()
    for route, body in (
        ("/v1/embeddings", {"model": "fake", "input": ["hello world", "the cat"]}),
        ("/api/embed", {"model": "other", "input": "hello world"}),
    ):
        reply = http(envoy.base_url + route, "POST", body=body)
        assert reply.status == 200, reply.body
        assert_embeddings_shape(route, check_reply(route, reply))
    with requests.Session() as session:
        listings_still_answer(envoy, session)


# Negative cases only where there is something to violate: a body. (A GET without parameters
# has none; GET /v1/models/{model}'s string is satisfied by any text.)
SCHEMATHESIS_RUNS = [
    *[pytest.param(label, GenerationMode.POSITIVE, id=f"{label}-positive") for label in OPERATIONS],
    *[
        pytest.param(label, GenerationMode.NEGATIVE, id=f"{label}-negative")
        for label in BODY_OPERATIONS
    ],
]


@pytest.mark.parametrize(("label", "mode"), SCHEMATHESIS_RUNS)
def test_schemathesis(
    envoy: EnvoyProcess,
    session: requests.Session,
    reset_models: None,
    label: str,
    mode: GenerationMode,
) -> None:
    """Every operation of the OpenAPI description, positive and negative cases."""
    method, path = label.split()
    operation = SCHEMA[path][method]
    mutates = path in ("/v1/models/load", "/v1/models/unload")
    sent: list[int] = []

    @settings(FUZZ_SETTINGS, max_examples=SCHEMATHESIS_EXAMPLES)
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: schemathesis.Case[Any], data: st.DataObject) -> None:
        if mutates:  # every example starts from the same models: reproducible failures
            reset_model_state(envoy)
        if mode is GenerationMode.POSITIVE:
            steer(case, data.draw)
        response = case.call(base_url=envoy.base_url, session=session, timeout=60)
        sent.append(response.status_code)
        headers = {name.lower(): values[-1] for name, values in response.headers.items()}
        document = assert_well_formed(path, response.status_code, headers, response.content, method)
        case.validate_response(response, checks=CHECKS)
        if response.status_code == 200 and path in EMBEDDING_ROUTES:
            assert_embeddings_shape(path, document)
        if response.status_code == 200 and path in RERANK_ROUTES:
            assert_ranking_shape(path, document)
        if response.status_code == 200 and path == "/predict":
            assert_predictions_shape(document)
        if response.status_code == 200 and path == "/embed_sparse":
            assert_sparse_shape(document)
        if response.status_code == 200 and path in TEI_SHAPED:
            assert_tei_shape(path, document)
        if mutates:
            listings_still_answer(envoy, session)

    run()
    assert len(sent) >= min(SCHEMATHESIS_EXAMPLES, 2)
    if mode is GenerationMode.POSITIVE:
        assert 200 in sent  # the steering reaches the engine


def test_every_rest_route_is_described() -> None:
    """The description covers exactly the RPCs with a google.api.http annotation, in every
    service (one per API)."""
    from google.api import annotations_pb2  # type: ignore[import-untyped, unused-ignore]

    routes = set()
    methods = [m for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods]
    for method in methods:
        options = method.GetOptions()
        if options.HasExtension(annotations_pb2.http):
            first = options.Extensions[annotations_pb2.http]
            for rule in (first, *first.additional_bindings):
                verb = rule.WhichOneof("pattern")
                if verb == "custom":
                    routes.add(f"{rule.custom.kind} {rule.custom.path}")
                else:
                    routes.add(f"{verb.upper()} {getattr(rule, verb)}")
    described = {
        result.ok().label for result in SCHEMA.get_all_operations() if isinstance(result, Ok)
    }
    assert described == routes == set(OPERATIONS)


# --- hypothesis: raw bodies ----------------------------------------------------------------------

INT_EXTREMES = [0, -1, 1, 2**31 - 1, 2**31, -(2**31) - 1, 2**32, 2**63, 2**64, 10**30, 10**400]
FLOAT_EXTREMES = [1e308, -1e308, 1.5, -0.0, 5e-324, 2.0]
EXTREME_NUMBERS = st.one_of(
    st.sampled_from([*INT_EXTREMES, *FLOAT_EXTREMES]),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
)
ODD_TEXTS = ["", " ", "\x00", "\ud800", "\udfff", "\ud800\udc00", "\U0010ffff", "\ufeff"]
LOOKALIKES = ["2", "-1", "5m", "inf", "nan", "1e400", "0x10", "true", "null", "fake", "other"]
EXTREME_STRINGS = st.one_of(
    st.sampled_from([*ODD_TEXTS, *LOOKALIKES]),
    st.integers(min_value=10_000, max_value=300_000).map(lambda n: "x" * n),
    # Lone surrogates included: json.dumps escapes them as "\\ud800".
    st.text(st.characters(codec=None, exclude_categories=()), max_size=20),
)
FIELD_VALUES = st.one_of(
    EXTREME_NUMBERS,
    EXTREME_STRINGS,
    JSON_VALUES,
    st.lists(EXTREME_NUMBERS, max_size=10),
    st.lists(st.lists(EXTREME_NUMBERS, max_size=5), max_size=3),
    st.lists(EXTREME_STRINGS, max_size=5),
    st.integers(min_value=2000, max_value=2100).map(lambda n: ["hello"] * n),
)
ROUTE_FIELDS = {
    "/v1/embeddings": [
        "model",
        "input",
        "encoding_format",
        "dimensions",
        "user",
        "prompt_name",
        "prompt",
        "input_type",
    ],
    "/api/embed": ["model", "input", "truncate", "keep_alive", "options", "dimensions"],
    "/api/embeddings": ["model", "prompt", "keep_alive", "options"],
    "/v2/embed": [
        "model",
        "texts",
        "input_type",
        "embedding_types",
        "truncate",
        "output_dimension",
        "max_tokens",
        "images",
        "inputs",
    ],
    "/api/show": ["model", "name", "verbose"],
    "/api/pull": ["model", "name", "stream", "insecure"],
    "/v1/models/load": ["model", "embedding", "n_gpu_layers", "keep_alive", "pooling"],
    "/v1/models/unload": ["model"],
    "/v1/rerank": ["model", "query", "documents", "top_n", "return_documents", "raw_scores"],
    "/v2/rerank": ["model", "query", "documents", "top_n", "max_tokens_per_doc"],
    "/rerank": ["model", "query", "texts", "raw_scores", "return_text", "truncate"],
    "/predict": ["model", "inputs", "raw_scores", "truncate", "truncation_direction"],
    "/embed_sparse": ["model", "inputs", "truncate", "truncation_direction", "prompt_name"],
    **{route: list(fields) for route, fields in TEI_FIELDS.items()},
    "/embeddings": ["model", "input", "encoding_format", "dimensions", "user"],
    "/": list(ROOT_FIELDS),
    "/invocations": list(ROOT_FIELDS),
}


@st.composite
def field_bodies(draw: st.DrawFn, route: str) -> dict[str, Any]:
    """A JSON object with the route's fields (and unknown ones) set to extreme values."""
    body: dict[str, Any] = {}
    for name in ROUTE_FIELDS[route]:
        choice = draw(st.integers(min_value=0, max_value=3))
        if choice == 1:
            body[name] = draw(FIELD_VALUES)
        elif choice == 2 and name == "model":
            body[name] = draw(MODELS)
        elif choice == 2 and name == "input":
            body[name] = draw(OPENAI_INPUTS)
    body.update(draw(st.dictionaries(st.text(max_size=10), FIELD_VALUES, max_size=3)))
    return body


def encode(document: Any, ascii_only: bool) -> bytes:
    """JSON bytes; non-ASCII text raw, where a lone surrogate becomes invalid UTF-8."""
    return json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@st.composite
def corrupted(draw: st.DrawFn, route: str) -> bytes:
    """A valid JSON body with invalid UTF-8 or a NUL inserted, or cut off."""
    body = encode(draw(field_bodies(route)), ascii_only=True)
    at = draw(st.integers(min_value=0, max_value=len(body)))
    junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00", b"\xf4\x90", b""]))
    return body[:at] + junk + body[at:] if junk else body[:at]


@st.composite
def nested_bodies(draw: st.DrawFn, route: str) -> bytes:
    """A field nested in arrays, within the transcoder's JSON depth limit (100) and over it.
    (The depths between 50 and 100 have their own test below.)"""
    depth = draw(st.sampled_from([2, 10, 30, 100, 101, 1000, 50_000]))
    field = draw(st.sampled_from([*ROUTE_FIELDS[route], "unknown"]))
    return f'{{"{field}":{"[" * depth}{"]" * depth}}}'.encode()


NOT_JSON = [b"input=hello", b"hello", b"{", b"}", b"[]", b"null", b"\xef\xbb\xbf{}", b"{}" * 3]


def raw_bodies(route: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.tuples(field_bodies(route), st.booleans()).map(lambda args: encode(*args)),
        st.tuples(JSON_VALUES, st.booleans()).map(lambda args: encode(*args)),
        st.binary(max_size=300),
        corrupted(route),
        nested_bodies(route),
        st.sampled_from(NOT_JSON),
    )


@pytest.mark.parametrize("route", POST_ROUTES)
def test_raw_bodies(envoy: EnvoyProcess, reset_models: None, route: str) -> None:
    """Hypothesis-made bodies POSTed as they are: never a 5xx, always a well-formed answer."""
    statuses: dict[int, int] = {}

    @settings(FUZZ_SETTINGS, max_examples=RAW_EXAMPLES)
    @given(body=raw_bodies(route))
    def run(body: bytes) -> None:
        reply = http(envoy.base_url + route, "POST", raw=body, timeout=60)
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
        document = check_reply(route, reply)
        if reply.status == 200 and route in EMBEDDING_ROUTES:
            assert_embeddings_shape(route, document)
        if reply.status == 200 and route in RERANK_ROUTES:
            assert_ranking_shape(route, document)
        if reply.status == 200 and route in TEI_SHAPED:
            assert_tei_shape(route, document)

    run()
    assert sum(statuses.values()) >= RAW_EXAMPLES


# --- targeted extremes -------------------------------------------------------------------------


def test_absurd_dimensions(envoy: EnvoyProcess) -> None:
    """`dimensions` is an int32 in protobuf's JSON mapping: quoted integers and integral floats
    are read as numbers, null as unset; anything else (or out of range) is a clean 400."""
    expected: list[tuple[Any, int]] = [
        (0, 400),
        (-1, 400),
        (9, 400),
        (2**31 - 1, 400),
        (2**31, 400),
        (-(2**31) - 1, 400),
        (2**64, 400),
        (1e308, 400),
        (1.5, 400),
        ("0x10", 400),
        ("", 400),
        (True, 400),
        ([2], 400),
        ({}, 400),
        ("2", 200),
        (2.0, 200),
        (None, 200),
        (8, 200),
    ]
    for route in ("/v1/embeddings", "/api/embed"):
        for dimensions, status in expected:
            reply = http(
                envoy.base_url + route,
                "POST",
                body={"model": "fake", "input": "hello", "dimensions": dimensions},
            )
            assert reply.status == status, (route, dimensions, reply.body)
            document = check_reply(route, reply)
            if status == 200:
                assert_embeddings_shape(route, document)


def test_token_ids_out_of_range(envoy: EnvoyProcess) -> None:
    """Negative, fractional, huge or out-of-vocabulary ids, or ids without the model's special
    tokens: a short 400 naming the input."""
    cases: list[list[Any]] = [[16], [-1], [0.5], [2**32], [2**64], [1e300], [1e308], [[3, 2**53]]]
    for ids in [*cases, [[0]], [[2, -0.0, 3]]]:
        reply = http(envoy.base_url + "/v1/embeddings", "POST", body={"input": ids})
        if ids == [[2, -0.0, 3]]:  # -0 is token id 0
            assert reply.status == 200, reply.body
            continue
        error = check_reply("/v1/embeddings", reply)["error"]
        assert reply.status == 400, (ids, reply.body)
        assert error["param"] in ("input", "input[0]"), error
        assert len(error["message"]) < 400, error


def nested(depth: int, kind: str) -> str:
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    return "[" * depth + "]" * depth


def test_deep_nesting(envoy: EnvoyProcess) -> None:
    """google.protobuf.Value/Struct fields nested up to the transcoder's limit (100 JSON levels)
    and beyond: a clean answer at every depth, never a 5xx."""
    fields = [
        ("/v1/embeddings", "input", "array"),
        ("/v1/embeddings", "unknown", "array"),
        ("/api/embed", "input", "array"),
        ("/api/embed", "keep_alive", "array"),
        ("/api/embed", "options", "object"),
        ("/v1/models/load", "keep_alive", "array"),
    ]
    failures = []
    for route, field, kind in fields:
        for depth in (1, 2, 10, 30, 40, 49, 50, 51, 75, 99, 100, 101, 1000):
            body = f'{{"model":"fake","input":"hello","{field}":{nested(depth, kind)}}}'.encode()
            if field == "input":
                body = f'{{"model":"fake","input":{nested(depth, kind)}}}'.encode()
            reply = http(envoy.base_url + route, "POST", raw=body)
            try:
                check_reply(route, reply)
            except AssertionError:
                failures.append(f"{route} {field} nested {depth} deep -> {reply.status}")
    assert not failures, "\n".join(failures)


def test_invalid_utf8_in_path_and_query(envoy: EnvoyProcess) -> None:
    """Percent-encoded bytes that are not UTF-8 (in a path parameter, or a query parameter the
    transcoder binds to a field): a 4xx, never a 5xx."""
    urls = [
        ("GET", "/v1/models/%ff"),
        ("GET", "/v1/models/%c3%28"),
        ("GET", "/v1/models/%ed%a0%80"),  # a UTF-8-encoded lone surrogate
        ("GET", "/v1/models/fake?model=%ff"),
        ("POST", "/v1/embeddings?model=%ff"),
        ("POST", "/api/embed?model=%ff"),
        ("GET", "/info?model=%ff"),
        ("POST", "/embed?model=%ff"),
    ]
    failures = []
    for method, url in urls:
        body = {"input": "hello"} if method == "POST" else None
        reply = http(envoy.base_url + url, method, body=body)
        try:
            check_reply(urllib.parse.urlsplit(url).path, reply, method)
        except AssertionError:
            failures.append(f"{method} {url} -> {reply.status}: {reply.body[:200]!r}")
    assert not failures, "\n".join(failures)


def test_far_future_keep_alive_then_listing(envoy: EnvoyProcess, reset_models: None) -> None:
    """A keep_alive of centuries (or more than a datetime can hold) is accepted, and /api/ps
    still answers: such a model expires far in the future."""
    failures = []
    for keep_alive in (10**9, 10**11, 3 * 10**11, 10**15, 1e300, "1e300", "100000000000h"):
        for route, body in (
            ("/v1/models/load", {"model": "other", "keep_alive": keep_alive}),
            ("/api/embed", {"model": "fake", "input": "hello", "keep_alive": keep_alive}),
        ):
            check_reply(route, http(envoy.base_url + route, "POST", body=body))
            reply = http(envoy.base_url + "/api/ps")
            if reply.status != 200:
                failures.append(
                    f"{route} keep_alive={keep_alive!r}, then GET /api/ps -> {reply.status}"
                )
            else:
                check_reply("/api/ps", reply)
    assert not failures, "\n".join(failures)


def test_long_values_in_error_messages(envoy: EnvoyProcess, reset_models: None) -> None:
    """A value the caller sent comes back in an error message cut short, however long it is
    (the message travels in gRPC trailers, which Envoy caps at 60 KiB), and a model name
    longer than a file name may be is simply not found."""
    long_text = "x" * 100_000
    requests_ = [
        ("/v1/embeddings", {"input": "hello", "encoding_format": long_text}, 400),
        ("/api/embed", {"input": "hello", "keep_alive": long_text}, 400),
        ("/v1/models/load", {"model": "fake", "pooling": long_text}, 400),
        ("/v1/models/load", {"model": "fake", "keep_alive": long_text}, 400),
        ("/v1/embeddings", {"input": "hello", "model": "m" * 256}, 404),
        ("/api/embed", {"input": "hello", "model": long_text}, 404),
        ("/v1/models/unload", {"model": long_text}, 404),
        ("/v1/models/" + "m" * 1000, None, 404),
    ]
    failures = []
    for route, body, status in requests_:
        method = "GET" if body is None else "POST"
        reply = http(envoy.base_url + route, method, body=body)
        path = "/v1/models/{model}" if body is None else route
        try:
            error = check_reply(path, reply)["error"]
            message = error if isinstance(error, str) else error["message"]
            assert reply.status == status
            assert len(message) < 1000
        except (AssertionError, KeyError, TypeError):
            fields = (
                "" if body is None else ", ".join(f"{k}: {len(str(v))}" for k, v in body.items())
            )
            failures.append(
                f"{method} {route[:30]} ({fields}) -> {reply.status}: {reply.body[:120]!r}"
            )
    assert not failures, "\n".join(failures)
