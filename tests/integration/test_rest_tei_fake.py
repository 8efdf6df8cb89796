"""TEI's routes (/embed, /embed_all, /similarity, /tokenize, /decode, /info, /ping, POST / and
/invocations) end to end: a real Envoy in front of an in-process server on the fake engine.

What is checked here is the REST surface: TEI's request and answer shapes, TEI's error shape
and status codes for every failure (Envoy's own replies included), and the dispatch of POST /
by the model's task. tests/integration/test_rest_tei_real.py holds real models to their
references.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from embedd_server.settings import Settings
from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.fakes import (
    SPECIALS,
    FakeLoader,
    fake_token_states,
    fake_tokenizer_json,
    fake_vector,
    task_behaviour,
    write_fake_gguf,
)
from tests.servers import ServerThread

LABELS = ("negative", "neutral", "positive")
TEI_ERROR_KEYS = {"error", "error_type"}
CLS, SEP, HELLO, WORLD, THE, CAT = 2, 3, 4, 5, 6, 7
Stack = tuple[ServerThread, EnvoyProcess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("rest-tei")
    models = root / "models"
    write_fake_gguf(
        models / "sentiment.gguf", pooling=4, max_seq_length=5, task="classify", labels=LABELS
    )
    write_fake_gguf(models / "ranker.gguf", pooling=4, max_seq_length=8, pair_token_types=True)
    write_fake_gguf(models / "splade.gguf", pooling=0, max_seq_length=5, task="sparse")
    write_fake_gguf(models / "short.gguf", max_seq_length=4)
    write_fake_gguf(models / "marked.gguf", tokenizer_json=_marked_specials())
    with (
        ServerThread.with_fake_models(models, FakeLoader(task_behaviour)) as server,
        EnvoyProcess.start([server.target], root / "envoy") as envoy,
    ):
        yield server, envoy


def _marked_specials() -> str:
    """The fake tokenizer with [CLS], [SEP], ... registered as special tokens, as real
    tokenizers have them (decoding leaves them out)."""
    tokenizer = Tokenizer.from_str(fake_tokenizer_json())
    tokenizer.add_special_tokens(list(SPECIALS))
    return tokenizer.to_str()


def post(stack: Stack, path: str, body: Any = None, **kw: Any) -> HttpReply:
    return http(stack[1].base_url + path, "POST", body=body, **kw)


def get(stack: Stack, path: str) -> HttpReply:
    return http(stack[1].base_url + path)


def unit(ids: list[int], dimensions: int = 8) -> np.ndarray:
    vector = fake_vector(ids, dimensions).astype(np.float64)
    return vector / np.linalg.norm(vector)


def test_embed_answers_teis_shapes(stack: Stack) -> None:
    single = post(stack, "/embed", {"inputs": "hello world"})
    assert single.status == 200, single.body
    [vector] = single.json()
    assert vector == pytest.approx(unit([CLS, HELLO, WORLD, SEP]).tolist(), rel=1e-5)
    batch = post(stack, "/embed", {"inputs": ["hello world", "the cat"]}).json()
    assert batch[0] == vector
    assert batch[1] == pytest.approx(unit([CLS, THE, CAT, SEP]).tolist(), rel=1e-5)
    raw = post(stack, "/embed", {"inputs": "hello world", "normalize": False}).json()
    assert raw[0] == pytest.approx(fake_vector([CLS, HELLO, WORLD, SEP], 8).tolist(), rel=1e-5)
    cut = post(stack, "/embed", {"inputs": "hello world", "dimensions": 3}).json()
    head = fake_vector([CLS, HELLO, WORLD, SEP], 8)[:3].astype(np.float64)
    assert cut[0] == pytest.approx((head / np.linalg.norm(head)).tolist(), rel=1e-5)


def test_embed_takes_token_ids_alone_and_mixed_with_texts(stack: Stack) -> None:
    ids = post(stack, "/embed", {"inputs": [CLS, HELLO, WORLD, SEP]}).json()
    texts = post(stack, "/embed", {"inputs": "hello world"}).json()
    assert ids == texts
    mixed = post(stack, "/embed", {"inputs": ["the cat", [CLS, HELLO, WORLD, SEP], "hello"]})
    assert mixed.status == 200, mixed.body
    first, second, third = mixed.json()
    assert second == texts[0]
    assert first == pytest.approx(unit([CLS, THE, CAT, SEP]).tolist(), rel=1e-5)
    assert third == pytest.approx(unit([CLS, HELLO, SEP]).tolist(), rel=1e-5)


def test_embed_cuts_long_inputs_unless_told_not_to(stack: Stack) -> None:
    text = "the cat sat on the mat"  # 8 tokens; 'short' takes 4
    right = post(stack, "/embed", {"inputs": text, "model": "short"}).json()
    assert right[0] == pytest.approx(unit([CLS, THE, CAT, SEP]).tolist(), rel=1e-5)
    left = post(
        stack, "/embed", {"inputs": text, "model": "short", "truncation_direction": "Left"}
    ).json()
    assert left[0] == pytest.approx(unit([CLS, 6, 10, SEP]).tolist(), rel=1e-5)
    refused = post(stack, "/embed", {"inputs": text, "model": "short", "truncate": False})
    assert refused.status == 422, refused.body
    assert refused.json()["error_type"] == "Validation"


def test_embed_all_answers_every_tokens_hidden_state(stack: Stack) -> None:
    reply = post(stack, "/embed_all", {"inputs": ["hello world", "the"]})
    assert reply.status == 200, reply.body
    first, second = reply.json()
    assert np.asarray(first) == pytest.approx(fake_token_states([CLS, HELLO, WORLD, SEP], 8))
    assert np.asarray(second) == pytest.approx(fake_token_states([CLS, THE, SEP], 8))
    single = post(stack, "/embed_all", {"inputs": "hello world"}).json()
    assert single == [first]
    ids = post(stack, "/embed_all", {"inputs": [CLS, HELLO, WORLD, SEP]}).json()
    assert ids == [first]
    cut = post(stack, "/embed_all", {"inputs": "the cat sat on the mat", "model": "short"}).json()
    assert np.asarray(cut[0]) == pytest.approx(fake_token_states([CLS, THE, CAT, SEP], 8))


def test_tokenize_answers_teis_token_objects(stack: Stack) -> None:
    reply = post(stack, "/tokenize", {"inputs": "hello  world"})
    assert reply.status == 200, reply.body
    assert reply.json() == [
        [
            {"id": CLS, "text": "[CLS]", "special": True, "start": None, "stop": None},
            {"id": HELLO, "text": "hello", "special": False, "start": 0, "stop": 5},
            {"id": WORLD, "text": "world", "special": False, "start": 7, "stop": 12},
            {"id": SEP, "text": "[SEP]", "special": True, "start": None, "stop": None},
        ]
    ]
    bare = post(stack, "/tokenize", {"inputs": ["the cat"], "add_special_tokens": False}).json()
    assert bare == [
        [
            {"id": THE, "text": "the", "special": False, "start": 0, "stop": 3},
            {"id": CAT, "text": "cat", "special": False, "start": 4, "stop": 7},
        ]
    ]


def test_tokenize_counts_utf8_bytes_as_tei_does(stack: Stack) -> None:
    # "héllo" is an unknown word: its offsets are UTF-8 bytes, 6 for 5 characters.
    [[_, word, after, _]] = post(stack, "/tokenize", {"inputs": "héllo cat"}).json()
    assert (word["text"], word["start"], word["stop"]) == ("héllo", 0, 6)
    assert (after["text"], after["start"], after["stop"]) == ("cat", 7, 10)


def test_decode_gives_the_text_back(stack: Stack) -> None:
    reply = post(stack, "/decode", {"ids": [CLS, HELLO, WORLD, SEP], "model": "marked"})
    assert reply.status == 200, reply.body
    assert reply.json() == ["hello world"]
    both = {"ids": [[CLS, HELLO, SEP], [THE]], "skip_special_tokens": False, "model": "marked"}
    assert post(stack, "/decode", both).json() == ["[CLS] hello [SEP]", "the"]


def test_similarity_is_the_cosine_with_each_sentence(stack: Stack) -> None:
    body = {"inputs": {"source_sentence": "hello world", "sentences": ["the cat", "hello"]}}
    reply = post(stack, "/similarity", body)
    assert reply.status == 200, reply.body
    source = unit([CLS, HELLO, WORLD, SEP])
    expected = [float(source @ unit([CLS, THE, CAT, SEP])), float(source @ unit([CLS, HELLO, SEP]))]
    assert reply.json() == pytest.approx(expected, rel=1e-5)
    assert post(stack, "/", body).json() == reply.json()  # an embedding model's POST / too


def test_info_describes_each_model_in_teis_fields(stack: Stack) -> None:
    reply = get(stack, "/info")
    assert reply.status == 200, reply.body
    info = reply.json()
    assert info["model_id"] == info["served_model_name"] == "fake"
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["model_dtype"] == "float16"
    assert info["max_input_length"] == 16
    assert info["max_client_batch_size"] == stack[0].settings.max_inputs_per_request
    assert info["max_concurrent_requests"] == stack[0].settings.max_queued_texts
    assert info["auto_truncate"] is True
    assert info["model_sha"] is None and info["max_batch_requests"] is None
    for key in ("max_batch_tokens", "tokenization_workers"):
        assert isinstance(info[key], int) and info[key] > 0
    assert isinstance(info["version"], str) and info["version"]
    classifier = get(stack, "/info?model=sentiment").json()["model_type"]
    assert classifier == {
        "classifier": {
            "id2label": {"0": "negative", "1": "neutral", "2": "positive"},
            "label2id": {"negative": 0, "neutral": 1, "positive": 2},
        }
    }
    assert get(stack, "/info?model=ranker").json()["model_type"] == {
        "reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    }
    assert get(stack, "/info?model=splade").json()["model_type"] == {
        "embedding": {"pooling": "splade"}
    }
    missing = get(stack, "/info?model=nope")
    assert missing.status == 404 and set(missing.json()) == TEI_ERROR_KEYS


def test_ping_is_an_empty_200(stack: Stack) -> None:
    reply = get(stack, "/ping")
    assert (reply.status, reply.body) == (200, b"")


@pytest.mark.parametrize("path", ["/", "/invocations"])
def test_root_dispatches_by_the_models_task(stack: Stack, path: str) -> None:
    embedded = post(stack, path, {"inputs": "hello world"})
    assert embedded.status == 200, embedded.body
    assert embedded.json() == post(stack, "/embed", {"inputs": "hello world"}).json()
    predicted = post(stack, path, {"inputs": "hello", "model": "sentiment"}).json()
    assert predicted == post(stack, "/predict", {"inputs": "hello", "model": "sentiment"}).json()
    rerank = {"query": "hello", "texts": ["the cat", "world"], "model": "ranker"}
    assert post(stack, path, rerank).json() == post(stack, "/rerank", rerank).json()
    sparse = {"inputs": ["hello"], "model": "splade"}
    assert post(stack, path, sparse).json() == post(stack, "/embed_sparse", sparse).json()


def test_root_get_and_head_stay_ollamas(stack: Stack) -> None:
    reply = get(stack, "/")
    assert (reply.status, reply.body) == (200, b"Ollama is running")


@pytest.mark.parametrize(
    ("path", "body", "expected", "words"),
    [
        ("/embed", {"inputs": []}, (400, "Empty"), "cannot be empty"),
        ("/embed", {"inputs": ""}, (400, "Empty"), "empty string"),
        ("/embed", {"inputs": ["hello", ""]}, (400, "Empty"), "Input 1"),
        ("/embed", {}, (422, "Validation"), "inputs must be"),
        ("/embed", {"inputs": 7}, (422, "Validation"), "inputs must be"),
        ("/embed", {"inputs": [True]}, (422, "Validation"), "inputs[0]"),
        ("/embed", {"inputs": [1.5]}, (422, "Validation"), "token id"),
        ("/embed", {"inputs": [[-1]]}, (422, "Validation"), "inputs[0][0]"),
        ("/embed", {"inputs": "hi", "dimensions": 0}, (422, "Validation"), "dimensions"),
        ("/embed", {"inputs": "hi", "truncation_direction": "up"}, (422, "Validation"), "left"),
        ("/embed", {"inputs": "hi", "prompt_name": "nope"}, (422, "Validation"), "nope"),
        ("/embed", {"inputs": "hi", "model": "nope"}, (404, "Validation"), "nope"),
        ("/embed", {"inputs": "hi", "model": "sentiment"}, (424, "Backend"), "/predict"),
        ("/similarity", {"inputs": {"source_sentence": "a"}}, (400, "Empty"), "sentences"),
        ("/similarity", {"inputs": {"sentences": ["a"]}}, (400, "Empty"), "Input 0"),
        ("/predict", {"inputs": []}, (422, "Validation"), "inputs must be"),
        ("/predict", {"inputs": ""}, (400, "Empty"), "empty text"),
        ("/predict", {"inputs": "hello", "model": "fake"}, (424, "Backend"), "/embed"),
        ("/rerank", {"query": "", "texts": ["a"]}, (400, "Empty"), "query"),
        ("/rerank", {"query": "a", "texts": []}, (400, "Empty"), "documents"),
        ("/embed_sparse", {"inputs": "hi", "model": "sentiment"}, (424, "Backend"), "/predict"),
        ("/", {"inputs": {"source_sentence": 3}}, (422, "Validation"), "source_sentence"),
        ("/embed_all", {"inputs": []}, (400, "Empty"), "cannot be empty"),
        ("/embed_all", {"inputs": ["a", [2, 3]]}, (422, "Validation"), "not both"),
        ("/embed_all", {"inputs": "hi", "model": "splade"}, (424, "Backend"), "/embed_sparse"),
        ("/embed_all", {"inputs": "hi", "model": "ranker"}, (424, "Backend"), "/rerank"),
        ("/tokenize", {"inputs": []}, (400, "Empty"), "cannot be empty"),
        ("/tokenize", {"inputs": ""}, (400, "Empty"), "empty string"),
        ("/tokenize", {"inputs": [1]}, (422, "Validation"), "list of strings"),
        ("/tokenize", {"inputs": "hi", "prompt_name": "nope"}, (422, "Validation"), "nope"),
        ("/decode", {"ids": []}, (400, "Empty"), "empty"),
        ("/decode", {"ids": "hi"}, (422, "Validation"), "ids must be"),
        ("/decode", {"ids": [99999]}, (422, "Validation"), "vocabulary"),
        ("/decode", {"ids": [[2], "a"]}, (422, "Validation"), "ids[1]"),
        ("/", {"inputs": "hi", "model": "nope"}, (404, "Validation"), "nope"),
    ],
)
def test_errors_are_teis_shape_and_status(
    stack: Stack, path: str, body: Any, expected: tuple[int, str], words: str
) -> None:
    reply = post(stack, path, body)
    answer = reply.json()
    assert (reply.status, answer.get("error_type")) == expected, reply.body
    assert set(answer) == TEI_ERROR_KEYS, answer
    assert words in answer["error"]


@pytest.mark.parametrize(
    "path", ["/embed", "/embed_all", "/similarity", "/tokenize", "/decode", "/", "/invocations"]
)
def test_envoys_own_replies_are_teis_shape_too(stack: Stack, path: str) -> None:
    reply = post(stack, path, raw=b'{"inputs": ', headers={"content-type": "application/json"})
    assert reply.status == 400, reply.body
    assert set(reply.json()) == TEI_ERROR_KEYS


def test_a_classifier_as_default_model_serves_predict_at_the_root(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("rest-tei-default")
    models = root / "models"
    write_fake_gguf(models / "sentiment.gguf", pooling=4, task="classify", labels=LABELS)
    settings = Settings(
        grpc_port=0, models_dir=models, default_model="sentiment", workers=1, metrics_port=0
    )
    with (
        ServerThread(settings, FakeLoader(task_behaviour)) as server,
        EnvoyProcess.start([server.target], root / "envoy") as envoy,
    ):
        stack = (server, envoy)
        reply = post(stack, "/", {"inputs": "hello"})
        assert reply.status == 200, reply.body
        assert reply.json() == post(stack, "/predict", {"inputs": "hello"}).json()
        assert get(stack, "/info").json()["model_type"]["classifier"]["id2label"]["2"] == (
            "positive"
        )
