"""Classification and sparse vectors in the core, and each task's refusal of the others.

The engines are fakes (a classifier's "logits" and a sparse encoder's weights are hashes of
the token ids); tests/integration/test_families_served.py holds the real models to their
references over gRPC and REST.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from embedd_server.compute.settings import EngineSettings
from embedd_server.core.classifying import (
    ClassifyParams,
    check_classify_params,
    class_scores,
    labelled,
)
from embedd_server.core.registry import ModelRegistry
from embedd_server.core.reranking import RerankParams
from embedd_server.core.service import EmbeddingService, EmbedParams
from embedd_server.errors import (
    InputTooLong,
    InvalidInput,
    ModelNotClassifier,
    ModelNotEmbedding,
    ModelNotReranker,
    ModelNotSparse,
    ModelWrongTask,
)
from embedd_server.model.catalog import CLASSIFY, EMBED, MULTI_LABEL, RERANK, SPARSE
from embedd_server.model.sparse import sparse_rows
from tests.fakes import FAKE_VOCAB as VOCAB
from tests.fakes import FakeLoader, fake_vector, task_behaviour, write_fake_gguf

T = TypeVar("T")
CLS, SEP, HELLO, WORLD, THE, CAT = 2, 3, 4, 5, 6, 7
LABELS = ("negative", "neutral", "positive")


# --- scores -----------------------------------------------------------------------------------


def test_softmax_sums_to_one_and_keeps_the_logits_order() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    scores = class_scores(logits, "single_label_classification", raw=False)
    assert scores.sum(axis=1) == pytest.approx([1.0, 1.0])
    e = np.exp([1.0, 2.0, 3.0])
    assert scores[0] == pytest.approx(e / e.sum())
    assert scores[1] == pytest.approx([1.0, 0.0, 0.0])  # no overflow: the max is subtracted


def test_multi_label_and_one_label_models_get_a_sigmoid_per_label() -> None:
    logits = np.array([[0.0, 2.0]], dtype=np.float32)
    assert class_scores(logits, MULTI_LABEL, raw=False)[0] == pytest.approx(
        [0.5, 1 / (1 + math.exp(-2))]
    )
    one = np.array([[-1.0]], dtype=np.float32)
    assert class_scores(one, "", raw=False)[0] == pytest.approx([1 / (1 + math.e)])
    assert class_scores(logits, MULTI_LABEL, raw=True)[0].tolist() == [0.0, 2.0]


def test_labels_come_best_first() -> None:
    rows = labelled(np.array([[0.1, 0.7, 0.2]]), LABELS)
    assert [(p.label, p.score) for p in rows[0]] == [
        ("neutral", 0.7),
        ("positive", 0.2),
        ("negative", 0.1),
    ]


@pytest.mark.parametrize(
    ("inputs", "param", "words"),
    [
        ((), "inputs", "no input"),
        ((("a",), ("",)), "inputs[1]", "empty text"),
        ((("a", "b", "c"),), "inputs[0]", "3 texts"),
        ((("a",),) * 5, "inputs", "at most 4"),
    ],
)
def test_malformed_classifications_name_the_input(
    inputs: Sequence[Any], param: str, words: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_classify_params(ClassifyParams(inputs=inputs), max_inputs=4)
    assert caught.value.param == param and words in caught.value.message


def test_sparse_rows_are_the_non_zeros_by_ascending_index() -> None:
    dense = np.array([[0.0, 1.5, 0.0, 0.25], [0.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    (indices, values), (none, nothing) = sparse_rows(dense)
    assert indices.tolist() == [1, 3] and values.tolist() == [1.5, 0.25]
    assert values.dtype == np.float32
    assert none.size == 0 and nothing.size == 0


# --- the service with fake models ---------------------------------------------------------------


class Service:
    """An EmbeddingService over a fake model of every task."""

    def __init__(self, models_dir: Path) -> None:
        write_fake_gguf(models_dir / "embedder.gguf")
        write_fake_gguf(models_dir / "reranker.gguf", pooling=4, pair_token_types=False)
        write_fake_gguf(
            models_dir / "sentiment.gguf",
            pooling=4,
            max_seq_length=5,
            task=CLASSIFY,
            labels=LABELS,
            pair_token_types=True,
        )
        write_fake_gguf(
            models_dir / "topics.gguf",
            pooling=4,
            task=CLASSIFY,
            labels=("cats", "dogs"),
            problem_type=MULTI_LABEL,
        )
        write_fake_gguf(models_dir / "splade.gguf", pooling=0, task=SPARSE)
        # The fake tokenizer maps words by length, so test texts share tokens: the vector cache
        # off, every call is computed, as these tests expect (tests/unit/test_cache_and_lanes.py
        # runs it).
        settings = EngineSettings(
            models_dir=models_dir,
            default_model="embedder",
            workers=1,
            max_inputs_per_request=8,
            cache_mb=0,
        )
        self.loader = FakeLoader(task_behaviour)
        self.registry = ModelRegistry(settings, self.loader)
        self.service = EmbeddingService(settings, self.registry)
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 30))

    def close(self) -> None:
        self.run(self.registry.close())
        self.loop.close()


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    service = Service(tmp_path)
    yield service
    service.close()


def test_the_catalogue_says_each_models_task_labels_and_dimensions(svc: Service) -> None:
    infos = {info.name: info for info in svc.run(svc.registry.catalogue())}
    assert {name: info.task for name, info in infos.items()} == {
        "embedder": EMBED,
        "reranker": RERANK,
        "sentiment": CLASSIFY,
        "splade": SPARSE,
        "topics": CLASSIFY,
    }
    assert infos["sentiment"].label_names == LABELS
    assert infos["sentiment"].dimensions == 3
    assert infos["topics"].problem_type == MULTI_LABEL
    assert infos["reranker"].label_names == ("LABEL_0",)
    assert infos["splade"].dimensions == VOCAB


def test_texts_and_pairs_are_classified_in_order_with_the_pair_template(svc: Service) -> None:
    params = ClassifyParams(
        model="sentiment", inputs=[("hello",), ("hello", "the cat"), ("world",)]
    )
    outcome = svc.run(svc.service.classify(params))
    runtime = svc.loader.runtimes[-1]
    sequences = [[CLS, HELLO, SEP], [CLS, HELLO, SEP, THE, SEP], [CLS, WORLD, SEP]]
    # the pair was cut longest-first to the model's 5 tokens, as transformers cuts pairs
    assert sorted(runtime.calls) == sorted(sequences)
    starts = dict(zip(map(tuple, runtime.calls), runtime.token_type_starts, strict=True))
    assert [starts[tuple(s)] for s in sequences] == [3, 3, 3]  # the pair's second from 3
    for ids, predictions in zip(sequences, outcome.predictions, strict=True):
        logits = fake_vector(ids, 3).astype(np.float64)
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        order = np.argsort(-expected, kind="stable")
        assert [p.label for p in predictions] == [LABELS[i] for i in order]
        assert [p.score for p in predictions] == pytest.approx(expected[order], rel=1e-6)
    assert outcome.model == "sentiment" and outcome.prompt_tokens == 11


def test_a_multi_label_classifier_scores_each_label_with_a_sigmoid(svc: Service) -> None:
    outcome = svc.run(svc.service.classify(ClassifyParams(model="topics", inputs=[("cat",)])))
    logits = fake_vector([CLS, CAT, SEP], 2).astype(np.float64)
    scores = {p.label: p.score for p in outcome.predictions[0]}
    assert [scores["cats"], scores["dogs"]] == pytest.approx(1 / (1 + np.exp(-logits)))


def test_a_classification_without_a_model_goes_to_the_first_classifier(svc: Service) -> None:
    outcome = svc.run(svc.service.classify(ClassifyParams(inputs=[("cat",)])))
    assert outcome.model == "sentiment"


def test_a_one_label_reranker_classifies_too_as_teis_predict_allows(svc: Service) -> None:
    outcome = svc.run(svc.service.classify(ClassifyParams(model="reranker", inputs=[("a", "b")])))
    assert [p.label for p in outcome.predictions[0]] == ["LABEL_0"]
    assert 0.0 < outcome.predictions[0][0].score < 1.0


def test_over_long_texts_are_cut_or_refused(svc: Service) -> None:
    long_text = "the cat sat on the mat"
    params = ClassifyParams(model="sentiment", inputs=[("hello",), (long_text,)])
    outcome = svc.run(svc.service.classify(params))
    assert outcome.truncated_inputs == 1
    assert [CLS, THE, CAT, 8, SEP] in svc.loader.runtimes[-1].calls  # 5 tokens, [SEP] kept
    with pytest.raises(InputTooLong) as caught:
        svc.run(
            svc.service.classify(
                ClassifyParams(model="sentiment", inputs=[("a",), (long_text,)], truncate=False)
            )
        )
    assert "Input 1 has 8 tokens" in caught.value.message


def test_sparse_vectors_are_the_engines_non_zero_weights(svc: Service) -> None:
    outcome = svc.run(svc.service.embed_sparse(EmbedParams(texts=["hello the cat", "world"])))
    assert outcome.model == "splade" and outcome.dimensions == VOCAB
    (first, weights), (second, _) = outcome.rows
    assert first.tolist() == [CLS, SEP, HELLO, THE, CAT]
    assert weights.tolist() == pytest.approx([1 + t / 10 for t in first.tolist()])
    assert second.tolist() == [CLS, SEP, WORLD]
    assert outcome.prompt_tokens == 8


@pytest.mark.parametrize(
    ("call", "model", "error", "routes"),
    [
        ("classify", "embedder", ModelNotClassifier, "/v1/embeddings"),
        ("classify", "splade", ModelNotClassifier, "/embed_sparse"),
        ("sparse", "sentiment", ModelNotSparse, "/predict"),
        ("sparse", "embedder", ModelNotSparse, "/api/embed"),
        ("embed", "sentiment", ModelNotEmbedding, "negative, neutral, positive"),
        ("embed", "splade", ModelNotEmbedding, "EmbedSparse"),
        ("rerank", "sentiment", ModelNotReranker, "/predict"),
        ("rerank", "splade", ModelNotReranker, "/embed_sparse"),
    ],
)
def test_a_model_on_the_wrong_task_is_a_400_naming_its_own_routes(
    svc: Service, call: str, model: str, error: type[Exception], routes: str
) -> None:
    requests: dict[str, Callable[[], Coroutine[Any, Any, object]]] = {
        "classify": lambda: svc.service.classify(ClassifyParams(model=model, inputs=[("a",)])),
        "sparse": lambda: svc.service.embed_sparse(EmbedParams(model=model, texts=["a"])),
        "embed": lambda: svc.service.embed(EmbedParams(model=model, texts=["a"])),
        "rerank": lambda: svc.service.rerank(RerankParams(model=model, query="q", documents=["d"])),
    }
    with pytest.raises(ModelWrongTask) as caught:
        svc.run(requests[call]())
    assert type(caught.value) is error
    assert routes in caught.value.message and caught.value.param == "model"
    assert not svc.loader.runtimes  # refused from the catalogue, nothing was loaded
