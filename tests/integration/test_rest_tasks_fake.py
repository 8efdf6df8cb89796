"""TEI's /predict and /embed_sparse end to end: a real Envoy in front of an in-process server
on the fake engine, with a fake 3-label classifier and a fake sparse encoder.

What is checked here is the REST surface (TEI's request and answer shapes, its error shape
for every failure, Envoy's own replies included); tests/integration/test_tasks_real.py holds
real models to their references.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from embedd import Client
from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.fakes import FakeLoader, fake_vector, task_behaviour, write_fake_gguf
from tests.servers import ServerThread

LABELS = ("negative", "neutral", "positive")
TEI_ERROR_KEYS = {"error", "error_type"}
CLS, SEP, HELLO, WORLD = 2, 3, 4, 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, EnvoyProcess]]:
    root = tmp_path_factory.mktemp("rest-tasks")
    models = root / "models"
    write_fake_gguf(
        models / "sentiment.gguf", pooling=4, max_seq_length=5, task="classify", labels=LABELS
    )
    write_fake_gguf(models / "splade.gguf", pooling=0, max_seq_length=5, task="sparse")
    with (
        ServerThread.with_fake_models(models, FakeLoader(task_behaviour)) as server,
        EnvoyProcess.start([server.target], root / "envoy") as envoy,
    ):
        yield server, envoy


def post(
    stack: tuple[ServerThread, EnvoyProcess], path: str, body: Any = None, **kw: Any
) -> HttpReply:
    return http(stack[1].base_url + path, "POST", body=body, **kw)


def _softmax(ids: list[int]) -> dict[str, float]:
    logits = fake_vector(ids, 3).astype(np.float64)
    exp = np.exp(logits - logits.max())
    return dict(zip(LABELS, (exp / exp.sum()).tolist(), strict=True))


def test_predict_answers_teis_shapes(stack: tuple[ServerThread, EnvoyProcess]) -> None:
    single = post(stack, "/predict", {"inputs": "hello"})
    assert single.status == 200, single.body
    answer = single.json()
    assert [set(item) for item in answer] == [{"score", "label"}] * 3
    assert [item["score"] for item in answer] == sorted((i["score"] for i in answer), reverse=True)
    expected = _softmax([CLS, HELLO, SEP])
    assert {i["label"]: i["score"] for i in answer} == pytest.approx(expected, rel=1e-6)
    pair = post(stack, "/predict", {"inputs": ["hello", "world"]}).json()
    assert {i["label"]: i["score"] for i in pair} == pytest.approx(
        _softmax([CLS, HELLO, SEP, WORLD, SEP]), rel=1e-6
    )
    batch = post(stack, "/predict", {"inputs": [["hello"], ["hello", "world"]]}).json()
    assert batch == [answer, pair]
    raw = post(stack, "/predict", {"inputs": "hello", "raw_scores": True}).json()
    logits = fake_vector([CLS, HELLO, SEP], 3)
    assert {i["label"]: i["score"] for i in raw} == pytest.approx(
        dict(zip(LABELS, logits.tolist(), strict=True)), rel=1e-6
    )


def test_embed_sparse_answers_teis_shape(stack: tuple[ServerThread, EnvoyProcess]) -> None:
    reply = post(stack, "/embed_sparse", {"inputs": ["hello", "hello world"]})
    assert reply.status == 200, reply.body
    first, second = reply.json()
    assert [item["index"] for item in first] == [CLS, SEP, HELLO]
    assert [item["value"] for item in first] == pytest.approx([1.2, 1.3, 1.4])
    assert [item["index"] for item in second] == [CLS, SEP, HELLO, WORLD]
    assert post(stack, "/embed_sparse", {"inputs": "hello"}).json() == [first]
    with Client(stack[0].target) as client:
        vectors = client.embed_sparse(["hello"]).vectors
    assert vectors[0].indices.tolist() == [CLS, SEP, HELLO]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/predict", {"inputs": []}, 422, "inputs must be"),
        ("/predict", {"inputs": ["a", "b", "c"]}, 422, "got a list of 3"),
        ("/predict", {"inputs": [["a", "b", "c"]]}, 422, "one string or a pair"),
        ("/predict", {"inputs": [["hello"], "world"]}, 422, "inputs[1] is not a list"),
        ("/predict", {"inputs": 7}, 422, "inputs must be"),
        ("/predict", {"inputs": ""}, 400, "empty text"),
        ("/predict", {"inputs": "hello", "truncation_direction": "up"}, 422, "'right' or 'left'"),
        ("/predict", {"inputs": "the cat sat on the mat", "truncate": False}, 422, "truncate"),
        ("/predict", {"inputs": "hello", "model": "nope"}, 404, "nope"),
        ("/predict", {"inputs": "hello", "model": "fake"}, 424, "/v1/embeddings"),
        ("/embed_sparse", {"inputs": [1]}, 422, "not a string"),
        ("/embed_sparse", {"inputs": "hi", "model": "sentiment"}, 424, "/predict"),
        ("/embed_sparse", {"inputs": "hello", "prompt_name": "nope"}, 422, "nope"),
    ],
)
def test_bad_requests_are_teis_errors(
    stack: tuple[ServerThread, EnvoyProcess], path: str, body: Any, status: int, words: str
) -> None:
    reply = post(stack, path, body)
    assert reply.status == status, reply.body
    answer = reply.json()
    assert set(answer) == TEI_ERROR_KEYS, answer
    assert words in answer["error"]
    # TEI's kinds and codes: Empty 400, Validation 422, Backend 424 (a model of another task).
    kinds = {400: "Empty", 422: "Validation", 424: "Backend", 404: "Validation"}
    assert answer["error_type"] == kinds[status]


@pytest.mark.parametrize("path", ["/predict", "/embed_sparse"])
def test_envoys_own_replies_are_teis_shape_too(
    stack: tuple[ServerThread, EnvoyProcess], path: str
) -> None:
    reply = post(stack, path, raw=b'{"inputs": ', headers={"content-type": "application/json"})
    assert reply.status == 400, reply.body
    assert set(reply.json()) == TEI_ERROR_KEYS
