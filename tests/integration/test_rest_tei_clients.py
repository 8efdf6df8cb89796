"""TEI's clients, unchanged, against real models behind the real Envoy: huggingface_hub's
InferenceClient (feature_extraction, sentence_similarity, text_classification, get_endpoint_info,
health_check), llama-index's TextEmbeddingsInference, LangChain's HuggingFaceEndpointEmbeddings
and Haystack's HuggingFaceAPITextEmbedder / HuggingFaceAPIDocumentEmbedder
(api_type="text_embeddings_inference").

One `embedd serve` with Envoy in front serves the f16 default model (all-minilm-l6-v2; vectors
held to sentence-transformers' in ../shared/reference) and tiny-roberta-classifier imported f32
(probabilities held to transformers' softmax in its reference/). What each client sends, read
from its source (the versions pinned in pyproject's dev extra):
- InferenceClient(base_url=URL) POSTs to URL itself, as to a TEI endpoint's root:
  feature_extraction {"inputs", "normalize", "truncate", "truncation_direction", "prompt_name",
  "dimensions"} (only those given) and reads TEI's [[float]]; sentence_similarity
  {"inputs": {"source_sentence", "sentences"}, "parameters": {}} and reads [float];
  text_classification {"inputs", "parameters": {}} and returns element [0] of the answer, which
  for TEI's flat [{label, score}] (highest first) is the top prediction. So the root of the
  server is the embedder (TEI's POST / for an embedding model); similarity and classification
  name their route in the URL, as with TEI itself.
- llama-index POSTs {"inputs": [...], "truncate": true} to URL + "/embed".
- LangChain (1.2.1: later releases refuse a URL) and Haystack call InferenceClient's
  feature_extraction on the root URL; Haystack sends "truncate": true, "normalize": false.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from langchain_huggingface import HuggingFaceEndpointEmbeddings
from llama_index.embeddings.text_embeddings_inference import TextEmbeddingsInference

from embedd_server.convert.hf_to_gguf import import_model
from tests.conftest import DEFAULT_MODEL, MODELS_DIR, REFERENCE_DIR, SHARED
from tests.envoy_proc import EnvoyProcess
from tests.metrics import Matrix, read_reference, row_cosines
from tests.servers import server_behind_envoy

# Haystack reports usage to PostHog unless told not to, read when haystack is first imported.
os.environ["HAYSTACK_TELEMETRY_ENABLED"] = "False"
from haystack import Document
from haystack_integrations.components.embedders.huggingface_api import (
    HuggingFaceAPIDocumentEmbedder,
    HuggingFaceAPITextEmbedder,
)

pytestmark = pytest.mark.real_model

MIN_COSINE = 0.9999  # the f16 default model's bar (README)
CLASSIFIER = "tiny-roberta-classifier"
CLASSIFIER_DIR = SHARED / "models" / CLASSIFIER
PROBABILITY_ERROR = 1e-4  # f32 classifier against transformers' softmax
SIMILARITY_ERROR = 5e-4  # f16 vectors' cosines vs sentence-transformers' (measured 1.0e-4)
LONG_TEXT = "word " * 400  # 402 tokens; the model takes 256
DIMENSIONS = 64


@pytest.fixture(scope="module")
def envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    """The default model and the classifier in one models directory, one server, one Envoy."""
    assert CLASSIFIER_DIR.is_dir(), f"{CLASSIFIER_DIR} is missing: the tests read ../shared"
    models = tmp_path_factory.mktemp("tei-models")
    default_file = f"{DEFAULT_MODEL}.gguf"
    (models / default_file).symlink_to((MODELS_DIR / default_file).resolve())
    import_model(CLASSIFIER_DIR, models, out_type="f32", name=CLASSIFIER, report=lambda _: None)
    args = ["--default-model", DEFAULT_MODEL]
    with server_behind_envoy(models, args, tmp_path_factory.mktemp("envoy")) as (_, proxy):
        yield proxy


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], Matrix]:
    """The first 64 reference texts (no surrounding whitespace or newline, which some clients
    rewrite, none over the model's 256 tokens) and their vectors."""
    texts, vectors = read_reference(REFERENCE_DIR)
    return [t["text"] for t in texts[:64]], vectors[:64]


def assert_reference(vectors: Sequence[Sequence[float]] | Matrix, expected: Matrix) -> None:
    got = np.asarray(vectors, dtype=np.float32)
    assert got.shape == expected.shape
    cosines = row_cosines(got, expected)
    worst = int(cosines.argmin())
    assert cosines.min() >= MIN_COSINE, f"text {worst}: cosine {cosines[worst]:.6f}"


def unit_rows(vectors: Matrix) -> Matrix:
    rows: Matrix = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return rows


# --- huggingface_hub's InferenceClient -----------------------------------------------------------


def test_inference_client_feature_extraction(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    with InferenceClient(base_url=envoy.base_url) as client:
        batch = client.feature_extraction(texts)
        one = client.feature_extraction(texts[0])
        raw = client.feature_extraction(texts[:8], normalize=False)
        short = client.feature_extraction(texts[:8], dimensions=DIMENSIONS)
    with InferenceClient(base_url=envoy.base_url + "/invocations") as client:  # SageMaker's
        invoked = client.feature_extraction(texts[:8])
    assert batch.shape == (64, 384)
    assert_reference(batch, expected)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)  # TEI normalizes
    assert one.shape == (1, 384)  # a string in, TEI's [[...]] out
    assert_reference(one, expected[:1])
    np.testing.assert_allclose(invoked, batch[:8], atol=1e-5)
    # normalize=false: the pooled vectors themselves, same directions, not unit length.
    assert_reference(raw, expected[:8])
    assert np.abs(np.linalg.norm(raw, axis=1) - 1).max() > 0.1
    # dimensions: the first 64 of each vector, normalized again (Matryoshka, as TEI cuts).
    assert short.shape == (8, DIMENSIONS)
    cut = unit_rows(batch[:8, :DIMENSIONS])
    assert row_cosines(short, cut).min() >= 0.99999


def test_inference_client_truncation(envoy: EnvoyProcess) -> None:
    text = "The cat sits on the mat. " + LONG_TEXT
    with InferenceClient(base_url=envoy.base_url) as client:
        words = client.feature_extraction(LONG_TEXT, truncate=True)
        right = client.feature_extraction(text, truncate=True)
        left = client.feature_extraction(text, truncate=True, truncation_direction="left")
        with pytest.raises(HfHubHTTPError) as caught:
            client.feature_extraction(LONG_TEXT, truncate=False)
    assert words.shape == right.shape == left.shape == (1, 384)
    assert row_cosines(right, words).min() < 0.999  # the end was cut: the cat stays
    assert row_cosines(left, words).min() >= 0.99999  # the start was cut: only words are left
    assert caught.value.response.status_code == 422  # TEI's status for a Validation error
    error = caught.value.response.json()
    assert error["error_type"] == "Validation"
    assert "truncate" in error["error"]


def test_inference_client_endpoint_info_and_health(envoy: EnvoyProcess) -> None:
    client = InferenceClient(base_url=envoy.base_url, provider="hf-inference")
    info = client.get_endpoint_info()  # GET /info
    assert client.health_check()  # GET /health: 200
    assert info["model_id"] == DEFAULT_MODEL
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_input_length"] == 256
    assert info["model_dtype"] == "float16"


def test_inference_client_sentence_similarity(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    with InferenceClient(base_url=envoy.base_url + "/similarity") as client:
        scores = np.array(client.sentence_similarity(texts[0], other_sentences=texts[1:33]))
    # The root too (TEI needs TASK=sentence-similarity for that; embedd's POST / reads the body).
    with InferenceClient(base_url=envoy.base_url) as client:
        at_root = client.sentence_similarity(texts[0], other_sentences=texts[1:33])
    np.testing.assert_allclose(at_root, scores, atol=1e-6)
    assert scores.shape == (32,)
    unit = unit_rows(expected.astype(np.float64))
    cosines = unit[1:33] @ unit[0]
    error = float(np.abs(scores - cosines).max())
    print(f"MAX sentence_similarity error against sentence-transformers: {error:.2e}")
    assert error <= SIMILARITY_ERROR
    assert (np.argsort(-scores)[:5] == np.argsort(-cosines)[:5]).all()


def test_inference_client_text_classification(envoy: EnvoyProcess) -> None:
    items = json.loads((CLASSIFIER_DIR / "reference" / "texts.json").read_text(encoding="utf-8"))
    by_id = json.loads((CLASSIFIER_DIR / "reference" / "labels.json").read_text(encoding="utf-8"))
    probabilities = np.load(CLASSIFIER_DIR / "reference" / "probabilities.npy")
    tops: list[Any] = []
    # /predict without "model" picks the first classifier, as TEI's single model. One request
    # per text, as the client sends them (most of the test's 5 s is loading the classifier).
    with InferenceClient(base_url=envoy.base_url + "/predict") as client:
        for item in items:
            tops.append(client.text_classification(item["text"]))
    assert len(tops) == len(probabilities)
    for index, (top, expected) in enumerate(zip(tops, probabilities, strict=True)):
        # TEI answers a flat list, highest first; the client keeps its first element.
        assert top.label == by_id[str(int(expected.argmax()))], f"text {index}"
        assert abs(top.score - float(expected.max())) <= PROBABILITY_ERROR, f"text {index}"


# --- llama-index ---------------------------------------------------------------------------------


def test_llama_index_text_embeddings_inference(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    embedder = TextEmbeddingsInference(model_name=DEFAULT_MODEL, base_url=envoy.base_url)
    documents = embedder.get_text_embedding_batch(texts[:32])  # batches of 10 to /embed
    query = embedder.get_query_embedding(texts[40])
    later = asyncio.run(embedder.aget_text_embedding(texts[41]))
    assert_reference(documents, expected[:32])
    assert_reference([query, later], expected[40:42])


# --- LangChain -----------------------------------------------------------------------------------


def test_langchain_huggingface_endpoint_embeddings(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    embeddings = HuggingFaceEndpointEmbeddings(model=envoy.base_url)
    try:
        assert_reference(embeddings.embed_documents(texts[:32]), expected[:32])
        assert_reference([embeddings.embed_query(texts[40])], expected[40:41])
    finally:
        embeddings.client.close()  # its InferenceClient holds the responses it read


# --- Haystack ------------------------------------------------------------------------------------


def test_haystack_text_and_document_embedders(
    envoy: EnvoyProcess, reference: tuple[list[str], Matrix]
) -> None:
    texts, expected = reference
    api_params = {"url": envoy.base_url}
    text_embedder = HuggingFaceAPITextEmbedder(
        api_type="text_embeddings_inference", api_params=api_params
    )
    document_embedder = HuggingFaceAPIDocumentEmbedder(
        api_type="text_embeddings_inference", api_params=api_params, progress_bar=False
    )
    try:
        query = text_embedder.run(text=texts[40])["embedding"]
        documents = document_embedder.run(documents=[Document(content=t) for t in texts[:40]])
    finally:
        text_embedder.close()
        document_embedder.close()
    assert_reference([query], expected[40:41])
    embedded = [document.embedding or [] for document in documents["documents"]]
    assert_reference(embedded, expected[:40])  # two batches of Haystack's 32
