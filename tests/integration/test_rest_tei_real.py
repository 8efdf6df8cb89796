"""TEI's routes on real models through a real Envoy, against the references.

- The default model (all-MiniLM-L6-v2, f16 GGUF, ONNX Runtime by default): /embed and POST /
  against sentence-transformers' vectors, /similarity against their cosines, /embed_all's
  token vectors against the pooled vector (their mean is the model's mean pooling),
  /tokenize and /decode against the model's own tokenizer, /info's fields.
- The tiny models of ../shared/models: a classifier as the default model serves TEI's
  /predict at POST / (probabilities against transformers'), a reranker named by ``model``
  its /rerank (scores against CrossEncoder's).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer

from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.model.catalog import read_model_info
from tests.conftest import DEFAULT_MODEL, MODELS_DIR, REFERENCE_DIR, SHARED
from tests.envoy_proc import EnvoyProcess, HttpReply, http
from tests.metrics import Matrix, read_reference, row_cosines
from tests.servers import ServerProcess, server_behind_envoy

pytestmark = pytest.mark.real_model

MIN_COSINE = 0.9999
MODELS = SHARED / "models"
CLASSIFIER, RERANKER = "tiny-roberta-classifier", "tiny-bert-reranker"
PROBABILITY_ERROR = SCORE_ERROR = 1e-4  # f32 files, as tests/integration/test_tasks_real.py
GROUP = 8  # the reranker reference's documents per query


@pytest.fixture(scope="module")
def envoy(
    real_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProcess]:
    with EnvoyProcess.start([real_server.target], tmp_path_factory.mktemp("tei-real")) as proc:
        yield proc


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], Matrix]:
    texts, vectors = read_reference(REFERENCE_DIR)
    return [t["text"] for t in texts][:64], vectors[:64]


def post(base_url: str, path: str, body: Any) -> HttpReply:
    return http(base_url + path, "POST", body=body, timeout=300)


def ok(reply: HttpReply) -> Any:
    assert reply.status == 200, reply.body
    return reply.json()


def test_embed_and_the_root_give_the_reference_vectors(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    vectors = np.array(ok(post(envoy.base_url, "/embed", {"inputs": texts})), np.float32)
    cosines = row_cosines(vectors, expected)
    assert cosines.min() >= MIN_COSINE, f"text {int(cosines.argmin())}: {cosines.min():.6f}"
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-5)
    for path in ("/", "/invocations"):  # an embedding model's hosted-endpoint routes
        root = np.array(ok(post(envoy.base_url, path, {"inputs": texts[:4]})), np.float32)
        np.testing.assert_allclose(root, vectors[:4], atol=1e-6)


def test_similarity_is_the_cosine_of_the_reference_vectors(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    body = {"inputs": {"source_sentence": texts[0], "sentences": texts[1:9]}}
    scores = ok(post(envoy.base_url, "/similarity", body))
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    assert scores == pytest.approx((unit[1:9] @ unit[0]).tolist(), abs=1e-4)


def test_embed_all_token_vectors_mean_to_the_pooled_vector(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    states = ok(post(envoy.base_url, "/embed_all", {"inputs": texts[:6]}))
    pooled = ok(post(envoy.base_url, "/embed", {"inputs": texts[:6], "normalize": False}))
    tokens = [len(row) for row in ok(post(envoy.base_url, "/tokenize", {"inputs": texts[:6]}))]
    assert [len(per_input) for per_input in states] == tokens
    means = np.array([np.mean(np.array(rows, np.float64), axis=0) for rows in states])
    np.testing.assert_allclose(means, np.array(pooled), atol=2e-5)
    assert row_cosines(means.astype(np.float32), expected[:6]).min() >= MIN_COSINE


def test_tokenize_and_decode_are_the_models_own_tokenizer(envoy: EnvoyProcess) -> None:
    text = "Héllo, naïve café — 12 tokens?"
    tokenizer = Tokenizer.from_str(
        read_model_info(MODELS_DIR / f"{DEFAULT_MODEL}.gguf").hf_tokenizer_json or ""
    )
    tokenizer.no_padding()
    tokenizer.no_truncation()
    encoding = tokenizer.encode(text)
    [tokens] = ok(post(envoy.base_url, "/tokenize", {"inputs": text}))
    assert [t["id"] for t in tokens] == encoding.ids
    assert [t["special"] for t in tokens] == [bool(m) for m in encoding.special_tokens_mask]
    raw = text.encode()
    for token in tokens:
        if token["special"]:
            assert token["start"] is None and token["text"] in ("[CLS]", "[SEP]")
        else:  # TEI's offsets count UTF-8 bytes
            assert raw[token["start"] : token["stop"]].decode() == token["text"]
    decoded = ok(post(envoy.base_url, "/decode", {"ids": [encoding.ids, encoding.ids[1:3]]}))
    assert decoded == [
        tokenizer.decode(encoding.ids),
        tokenizer.decode(encoding.ids[1:3]),
    ]


def test_info_describes_the_default_model(envoy: EnvoyProcess) -> None:
    info = ok(http(envoy.base_url + "/info"))
    assert info["model_id"] == DEFAULT_MODEL
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["model_dtype"] == "float16"
    assert info["max_input_length"] == 256
    ping = http(envoy.base_url + "/ping")
    assert (ping.status, ping.body) == (200, b"")


# --- a classifier as the default model, a reranker beside it -----------------------------------


@pytest.fixture(scope="module")
def tasks_envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    out = tmp_path_factory.mktemp("tei-task-models")
    for model in (CLASSIFIER, RERANKER):
        import_model(MODELS / model, out, out_type="f32", name=model)
    args = ["--default-model", CLASSIFIER, "--keep-alive", "-1"]
    with server_behind_envoy(out, args, tmp_path_factory.mktemp("envoy")) as (_, proxy):
        yield proxy


def _reference_file(model: str, name: str) -> Path:
    return MODELS / model / "reference" / name


def test_a_default_classifier_serves_predict_at_the_root(tasks_envoy: EnvoyProcess) -> None:
    items = json.loads(_reference_file(CLASSIFIER, "texts.json").read_text("utf-8"))
    texts = [item["text"] for item in items]
    by_id = json.loads(_reference_file(CLASSIFIER, "labels.json").read_text())
    labels = [by_id[str(i)] for i in range(len(by_id))]
    answer = ok(post(tasks_envoy.base_url, "/", {"inputs": [[t] for t in texts]}))
    got = np.array(
        [[{p["label"]: p["score"] for p in row}[label] for label in labels] for row in answer]
    )
    probabilities = np.load(_reference_file(CLASSIFIER, "probabilities.npy"))
    assert float(np.abs(got - probabilities).max()) <= PROBABILITY_ERROR
    info = ok(http(tasks_envoy.base_url + "/info"))
    assert info["model_type"] == {
        "classifier": {
            "id2label": by_id,
            "label2id": {label: i for i, label in enumerate(labels)},
        }
    }


def test_a_reranker_named_by_model_reranks_at_the_root(tasks_envoy: EnvoyProcess) -> None:
    pairs = json.loads(_reference_file(RERANKER, "pairs.json").read_text("utf-8"))[:GROUP]
    scores = np.load(_reference_file(RERANKER, "scores.npy")).astype(np.float64)[:GROUP]
    body = {"model": RERANKER, "query": pairs[0]["query"], "texts": [p["document"] for p in pairs]}
    answer = ok(post(tasks_envoy.base_url, "/invocations", body))
    got = {int(r["index"]): r["score"] for r in answer}
    assert [got[i] for i in range(GROUP)] == pytest.approx(scores.tolist(), abs=SCORE_ERROR)
    assert [int(r["index"]) for r in answer] == np.argsort(-scores, kind="stable").tolist()
    assert ok(http(tasks_envoy.base_url + f"/info?model={RERANKER}"))["model_type"] == {
        "reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}
    }
