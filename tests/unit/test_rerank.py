"""Reranking in the core: request rules, scores and ranking, pairs through the fair queue.

The engines are fakes here (a cross-encoder's "logit" is a hash of its pair's token ids);
tests/integration/test_rerank_real.py holds real cross-encoders to the reference.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from embedd_server.compute.settings import EngineSettings
from embedd_server.core.registry import ModelRegistry
from embedd_server.core.reranking import (
    RerankOutcome,
    RerankParams,
    check_rerank_params,
    ranked,
    scores_of,
)
from embedd_server.core.service import EmbeddingService, EmbedParams
from embedd_server.errors import (
    InputTooLong,
    InvalidInput,
    ModelNotEmbedding,
    ModelNotReranker,
)
from tests.fakes import FakeLoader, fake_vector, slow, write_fake_gguf

T = TypeVar("T")
CLS, SEP, HELLO, WORLD, THE, CAT = 2, 3, 4, 5, 6, 7


# --- scores and ranking ---------------------------------------------------------------------------


def test_scores_are_the_sigmoid_of_the_logit_or_the_logit_itself() -> None:
    logits = np.array([[0.0], [2.0], [-3.5]], dtype=np.float32)
    assert scores_of(logits, raw=False) == pytest.approx(
        [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(3.5))]
    )
    assert scores_of(logits, raw=True) == [0.0, 2.0, -3.5]


def test_ranking_is_best_first_stable_on_ties_and_cut_at_top_n() -> None:
    scores = [0.2, 0.9, 0.2, 0.5]
    documents = ["a", "b", "c", "d"]
    assert [r.index for r in ranked(scores, documents, None, False)] == [1, 3, 0, 2]
    best = ranked(scores, documents, 2, True)
    assert [(r.index, r.score, r.document) for r in best] == [(1, 0.9, "b"), (3, 0.5, "d")]
    assert ranked(scores, documents, 10, False)[-1].document is None  # top_n past the end


@pytest.mark.parametrize(
    ("params", "param", "words"),
    [
        (RerankParams(documents=["a"]), "query", "query is empty"),
        (RerankParams(query="q"), "documents", "no documents"),
        (RerankParams(query="q", documents=["a", ""]), "documents[1]", "Document 1 is an empty"),
        (RerankParams(query="q", documents=["a"] * 5), "documents", "at most 4"),
        (RerankParams(query="q", documents=["a"], top_n=0), "top_n", "at least 1"),
    ],
)
def test_malformed_requests_name_the_field(params: RerankParams, param: str, words: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_rerank_params(params, max_documents=4)
    assert caught.value.param == param and words in caught.value.message


# --- the service with fake models ---------------------------------------------------------------


class Service:
    """An EmbeddingService over a fake embedding model ("fake") and a fake reranker."""

    def __init__(self, models_dir: Path, loader: FakeLoader, **settings: Any) -> None:
        write_fake_gguf(models_dir / "fake.gguf")
        write_fake_gguf(
            models_dir / "reranker.gguf", pooling=4, max_seq_length=8, pair_token_types=True
        )
        write_fake_gguf(models_dir / "untyped-reranker.gguf", pooling=4, pair_token_types=False)
        # The fake tokenizer maps words by length, so test texts share tokens: the vector cache
        # off, every call is computed, as these tests expect (tests/unit/test_cache_and_lanes.py
        # runs it).
        settings.setdefault("cache_mb", 0)
        engine_settings = EngineSettings(
            models_dir=models_dir, default_model="fake", workers=1, **settings
        )
        self.loader = loader
        self.registry = ModelRegistry(engine_settings, loader)
        self.service = EmbeddingService(engine_settings, self.registry)
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 30))

    def rerank(self, params: RerankParams) -> RerankOutcome:
        return self.run(self.service.rerank(params))

    def close(self) -> None:
        self.run(self.registry.close())
        self.loop.close()


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Service]:
    service = Service(tmp_path, FakeLoader())
    yield service
    service.close()


def _logit(ids: list[int]) -> float:
    return float(fake_vector(ids, 1)[0])


def test_pairs_use_the_pair_template_with_token_types_and_rank_by_the_models_logit(
    svc: Service,
) -> None:
    params = RerankParams(model="reranker", query="hello", documents=["the cat", "world", "cat"])
    outcome = svc.rerank(params)
    runtime = svc.loader.runtimes[-1]
    pairs = [
        [CLS, HELLO, SEP, THE, CAT, SEP],
        [CLS, HELLO, SEP, WORLD, SEP],
        [CLS, HELLO, SEP, CAT, SEP],
    ]
    assert sorted(runtime.calls) == sorted(pairs)  # the queue hands them out shortest first
    assert runtime.token_type_starts == [3, 3, 3]  # type 1 from the document on
    logits = [_logit(ids) for ids in pairs]
    expected = sorted(range(3), key=lambda i: -logits[i])
    assert [r.index for r in outcome.results] == expected
    scores = [r.score for r in outcome.results]
    assert scores == pytest.approx([1 / (1 + math.exp(-logits[i])) for i in expected], rel=1e-6)
    assert outcome.prompt_tokens == 16
    assert all(r.document is None for r in outcome.results)


def test_a_tokenizer_without_token_types_gives_every_token_type_0(svc: Service) -> None:
    """transformers' generic tokenizer hands the model no token_type_ids: no type 1 then."""
    svc.rerank(RerankParams(model="untyped-reranker", query="hello", documents=["cat"]))
    runtime = svc.loader.runtimes[-1]
    assert runtime.calls == [[CLS, HELLO, SEP, CAT, SEP]]
    assert runtime.token_type_starts == [5]  # its length: no token of type 1


def test_long_pairs_are_cut_longest_first_or_refused_without_truncation(svc: Service) -> None:
    params = RerankParams(model="reranker", query="hello", documents=["the cat the cat the cat"])
    svc.rerank(params)
    # 8 tokens at most: the longer side (the document) loses tokens first.
    assert svc.loader.runtimes[-1].calls[-1] == [CLS, HELLO, SEP, THE, CAT, THE, CAT, SEP]
    with pytest.raises(InputTooLong) as caught:
        svc.rerank(dataclasses.replace(params, truncate=False))
    assert caught.value.param == "documents[0]"


def test_the_first_reranker_serves_a_request_without_a_model(svc: Service) -> None:
    outcome = svc.rerank(RerankParams(query="hello", documents=["cat"], return_documents=True))
    assert outcome.model == "reranker"  # the first by name
    assert outcome.results[0].document == "cat"


def test_the_wrong_task_is_a_400_naming_the_right_route(svc: Service) -> None:
    with pytest.raises(ModelNotReranker) as caught:
        svc.rerank(RerankParams(model="fake", query="q", documents=["d"]))
    assert "/v1/embeddings" in caught.value.message and "reranker" in caught.value.message
    with pytest.raises(ModelNotEmbedding) as refused:
        svc.run(svc.service.embed(EmbedParams(model="reranker", texts=["hello"])))
    assert "/v1/rerank" in refused.value.message
    assert not svc.loader.runtimes  # refused from the catalogue, nothing was loaded


def test_a_big_rerank_does_not_hold_back_a_small_one(tmp_path: Path) -> None:
    """Pairs are work items of the fair queue: a one-document rerank arriving behind a
    300-document one waits for about one pair, not for all of them."""
    service = Service(tmp_path, FakeLoader(slow(0.005)))
    try:

        async def computing() -> None:
            """Until the reranker's engine has the big rerank's first pairs."""
            while not any(r.info.name == "reranker" and r.calls for r in service.loader.runtimes):
                await asyncio.sleep(0.005)

        async def both() -> tuple[float, float]:
            started = time.monotonic()
            big = asyncio.create_task(
                service.service.rerank(
                    RerankParams(model="reranker", query="hello", documents=["cat"] * 300)
                )
            )
            await asyncio.wait_for(computing(), 5)  # the small one arrives behind the big one
            await service.service.rerank(
                RerankParams(model="reranker", query="hello", documents=["world"])
            )
            small_done = time.monotonic() - started
            await big
            return small_done, time.monotonic() - started

        small, big = service.run(both())
        assert small < big / 2, (small, big)
    finally:
        service.close()
