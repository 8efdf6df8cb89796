"""EmbeddingService alone, on the fake engine: what every transport relies on.

No network and no gRPC: a ModelRegistry over a FakeLoader, driven on an event loop of the
test's own. Model 'fake' has 8 dimensions and a 16-token limit; 'other' has 4 dimensions.
The fake tokenizer is word-level: [CLS]=2, hello=4, cat=7, dog=12, [SEP]=3.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.core.chunking import MEAN, Chunking
from embedd_server.core.registry import ModelRegistry
from embedd_server.core.service import EmbeddingService, EmbedOutcome, EmbedParams
from embedd_server.errors import (
    DeadlineExceeded,
    InputTooLong,
    InvalidInput,
    ModelNotFound,
)
from tests.fakes import (
    FakeLoader,
    FloatMatrix,
    fake_tokenizer_json,
    fake_vector,
    write_fake_gguf,
)

T = TypeVar("T")
CLS, SEP, HELLO, CAT, DOG = 2, 3, 4, 7, 12


class Harness:
    """An EmbeddingService over fake models, and the loop its calls run on."""

    def __init__(self, models_dir: Path, loader: FakeLoader, **settings: Any) -> None:
        write_fake_gguf(models_dir / "fake.gguf")
        write_fake_gguf(models_dir / "other.gguf", dimensions=4)
        # The fake tokenizer maps words by length, so test texts share tokens: the vector cache
        # off, every call is computed, as these tests expect (tests/unit/test_cache_and_lanes.py
        # runs it).
        settings.setdefault("cache_mb", 0)
        self.settings = EngineSettings(
            models_dir=models_dir, default_model="fake", workers=1, **settings
        )
        self.loader = loader
        self.registry = ModelRegistry(self.settings, loader)
        self.service = EmbeddingService(self.settings, self.registry)
        self.loop = asyncio.new_event_loop()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coroutine, 10))

    def embed(self, params: EmbedParams, deadline: float | None = None) -> EmbedOutcome:
        return self.run(self.service.embed(params, deadline))

    def close(self) -> None:
        self.run(self.registry.close())
        self.loop.close()


@contextlib.contextmanager
def _harness(
    tmp_path: Path, loader: FakeLoader | None = None, **settings: Any
) -> Iterator[Harness]:
    harness = Harness(tmp_path, loader or FakeLoader(), **settings)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Harness]:
    with _harness(tmp_path, max_inputs_per_request=4) as harness:
        yield harness


def _unit(vector: FloatMatrix) -> FloatMatrix:
    unit: FloatMatrix = vector / np.linalg.norm(vector)
    return unit


# --- validating inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "param", "words"),
    [
        (EmbedParams(), "input", ["no input"]),
        (EmbedParams(texts=["a"], token_ids=[[CLS]]), "input", ["either texts or token ids"]),
        (EmbedParams(texts=["a"] * 5), "input", ["5 inputs", "at most 4", "EmbedStream"]),
        (EmbedParams(token_ids=[[CLS]] * 5), "input", ["5 inputs", "at most 4"]),
        (EmbedParams(texts=["hello", ""]), "input[1]", ["Input 1 is an empty string"]),
    ],
)
def test_bad_inputs_are_invalid_input_naming_the_parameter(
    svc: Harness, params: EmbedParams, param: str, words: list[str]
) -> None:
    with pytest.raises(InvalidInput) as caught:
        svc.embed(params)
    assert caught.value.param == param
    for word in words:
        assert word in caught.value.message


def test_inputs_are_checked_before_any_model_is_looked_up_or_loaded(svc: Harness) -> None:
    with pytest.raises(InvalidInput):
        svc.embed(EmbedParams(model="nope", texts=[""]))
    assert svc.loader.runtimes == [] and svc.registry.loads == 0
    with pytest.raises(ModelNotFound, match="Available models: fake, other"):
        svc.embed(EmbedParams(model="nope", texts=["hello"]))


def test_the_limit_on_inputs_is_inclusive(svc: Harness) -> None:
    assert svc.embed(EmbedParams(texts=["hello"] * 4)).vectors.shape == (4, 8)


# --- dimensions and normalization ----------------------------------------------------------------


def test_vectors_are_unit_length_by_default_in_input_order(svc: Harness) -> None:
    outcome = svc.embed(EmbedParams(texts=["hello cat", "dog"]))
    assert outcome.model == "fake" and outcome.vectors.dtype == np.float32
    expected = [
        _unit(fake_vector([CLS, HELLO, CAT, SEP], 8)),
        _unit(fake_vector([CLS, DOG, SEP], 8)),
    ]
    np.testing.assert_allclose(outcome.vectors, np.stack(expected), rtol=1e-6)


def test_normalize_false_returns_the_engines_vectors(svc: Harness) -> None:
    raw = svc.embed(EmbedParams(texts=["hello"], normalize=False)).vectors
    np.testing.assert_array_equal(raw[0], fake_vector([CLS, HELLO, SEP], 8))


@pytest.mark.parametrize("dimensions", [1, 3, 8])
def test_dimensions_keep_the_first_components_then_normalize(svc: Harness, dimensions: int) -> None:
    head = fake_vector([CLS, HELLO, SEP], 8)[:dimensions]
    cut = svc.embed(EmbedParams(texts=["hello"], dimensions=dimensions)).vectors
    assert cut.shape == (1, dimensions) and cut.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(cut[0], _unit(head), rtol=1e-6)
    raw = svc.embed(EmbedParams(texts=["hello"], dimensions=dimensions, normalize=False)).vectors
    np.testing.assert_array_equal(raw[0], head)


@pytest.mark.parametrize(
    ("model", "dimensions", "limit"), [("", 0, 8), ("", 9, 8), ("other", 5, 4)]
)
def test_dimensions_outside_the_models_width_are_invalid(
    svc: Harness, model: str, dimensions: int, limit: int
) -> None:
    with pytest.raises(InvalidInput) as caught:
        svc.embed(EmbedParams(model=model, texts=["hello"], dimensions=dimensions))
    assert caught.value.param == "dimensions"
    assert f"between 1 and {limit}" in caught.value.message
    assert f"got {dimensions}" in caught.value.message


def test_a_zero_vector_is_not_divided_by_zero(tmp_path: Path) -> None:
    def zeros(sequences: Sequence[Sequence[int]], dimensions: int) -> FloatMatrix:
        return np.zeros((len(sequences), dimensions), dtype=np.float32)

    with _harness(tmp_path, FakeLoader(zeros)) as harness:
        vectors = harness.embed(EmbedParams(texts=["hello"])).vectors
    assert np.isfinite(vectors).all() and not vectors.any()


# --- truncation and usage ------------------------------------------------------------------------


def test_too_long_texts_are_truncated_by_default_and_billed_as_computed(svc: Harness) -> None:
    outcome = svc.embed(EmbedParams(texts=["hello " * 20, "cat"], normalize=False))
    assert outcome.prompt_tokens == 16 + 3  # the model's limit, then [CLS] cat [SEP]
    truncated = [CLS, *[HELLO] * 14, SEP]  # the closing [SEP] is kept
    np.testing.assert_array_equal(outcome.vectors[0], fake_vector(truncated, 8))
    assert truncated in svc.loader.runtimes[0].calls  # what the engine was fed


def test_without_truncation_too_long_texts_are_input_too_long(svc: Harness) -> None:
    with pytest.raises(InputTooLong) as caught:
        svc.embed(EmbedParams(texts=["cat", "hello " * 20], truncate=False))
    assert caught.value.param == "input[1]"
    assert "22 tokens" in caught.value.message and "limit of 16" in caught.value.message
    assert svc.loader.runtimes[0].calls == []  # nothing was computed


def test_a_text_at_the_limit_is_not_too_long(svc: Harness) -> None:
    outcome = svc.embed(EmbedParams(texts=["hello " * 14], truncate=False))
    assert outcome.prompt_tokens == 16


def test_long_texts_tokenized_off_the_loop_give_the_same_answer(svc: Harness) -> None:
    long_text = "hello " * 3000  # past the size tokenized inline on the event loop
    off_loop = svc.embed(EmbedParams(texts=[long_text]))
    inline = svc.embed(EmbedParams(texts=["hello " * 20]))
    assert off_loop.prompt_tokens == inline.prompt_tokens == 16
    np.testing.assert_array_equal(off_loop.vectors, inline.vectors)


def test_token_ids_are_checked_truncated_and_counted(svc: Harness) -> None:
    outcome = svc.embed(EmbedParams(token_ids=[[CLS, HELLO, SEP], [CAT] * 20], normalize=False))
    assert outcome.prompt_tokens == 3 + 16
    np.testing.assert_array_equal(outcome.vectors[1], fake_vector([CAT] * 16, 8))
    with pytest.raises(InputTooLong):
        svc.embed(EmbedParams(token_ids=[[CAT] * 17], truncate=False))
    with pytest.raises(InvalidInput, match="token id 16"):
        svc.embed(EmbedParams(token_ids=[[CLS, 16, SEP]]))


def test_usage_counts_every_token_including_special_ones(svc: Harness) -> None:
    outcome = svc.embed(EmbedParams(texts=["hello cat", "dog", "zebra zebra zebra"]))
    assert outcome.prompt_tokens == 4 + 3 + 5


# --- models, loading and deadlines -------------------------------------------------------------


def test_load_seconds_are_reported_only_by_the_call_that_loaded(svc: Harness) -> None:
    first = svc.embed(EmbedParams(model="other", texts=["hello"]))
    again = svc.embed(EmbedParams(model="other", texts=["hello"]))
    assert first.model == again.model == "other" and first.vectors.shape == (1, 4)
    assert first.load_seconds > 0 and again.load_seconds == 0.0
    assert again.total_seconds > 0


def test_aliases_resolve_to_the_models_name(tmp_path: Path) -> None:
    with _harness(tmp_path, aliases={"small": "other"}) as harness:
        assert harness.embed(EmbedParams(model="small", texts=["hi"])).model == "other"


def test_a_deadline_that_passed_in_the_queue_is_deadline_exceeded(svc: Harness) -> None:
    svc.embed(EmbedParams(texts=["hello"]))  # loaded: the deadline is the queue's business
    with pytest.raises(DeadlineExceeded):
        svc.embed(EmbedParams(texts=["hello"]), deadline=time.monotonic() - 1)


def test_tokenize_is_untruncated_with_token_strings(svc: Harness) -> None:
    outcome = svc.run(svc.service.tokenize("", "hello zebra " * 10))
    assert outcome.model == "fake" and outcome.max_input_tokens == 16
    assert len(outcome.ids) == 22 and outcome.ids[:3] == [CLS, HELLO, 1]
    assert outcome.tokens[:3] == ["[CLS]", "hello", "[UNK]"] and outcome.tokens[-1] == "[SEP]"


def test_models_are_listed_with_their_loaded_state(svc: Harness) -> None:
    assert [(s.info.name, s.loaded) for s in svc.run(svc.service.list_models())] == [
        ("fake", False),
        ("other", False),
    ]
    svc.embed(EmbedParams(texts=["hello"]))
    assert svc.run(svc.service.get_model("fake")).loaded
    assert not svc.run(svc.service.get_model("other")).loaded
    with pytest.raises(ModelNotFound):
        svc.run(svc.service.get_model("nope"))


def test_loading_with_an_unknown_pooling_is_invalid(svc: Harness) -> None:
    with pytest.raises(InvalidInput) as caught:
        svc.run(svc.service.load_model("other", LoadOptions(pooling="max"), None))
    assert caught.value.param == "pooling" and "'max'" in caught.value.message
    assert svc.loader.runtimes == []
    status = svc.run(svc.service.load_model("other", LoadOptions(pooling="mean"), None))
    # 'other' pools with mean of its own: asking for it is no override.
    assert status.loaded and status.pooling == "mean"
    assert svc.loader.runtimes[-1].options.pooling is None


# --- include_prompt: false ------------------------------------------------------------------------


@pytest.mark.parametrize(("pooling", "pooled_from"), [(1, 3), (2, 0), (3, 0)])
def test_a_model_pooling_without_its_prompt_gets_each_inputs_pooling_start(
    tmp_path: Path, pooling: int, pooled_from: int
) -> None:
    """Mean pooling is handed the prompt's length ([CLS] + its words); CLS and last-token
    pooling see the whole input, as sentence-transformers' masks leave them."""
    write_fake_gguf(tmp_path / "instructed.gguf", pooling=pooling, include_prompt=False)
    with _harness(tmp_path) as harness:
        params = EmbedParams(model="instructed", texts=["hello", "cat"], prompt="the cat ")
        harness.embed(params)
        runtime = harness.loader.runtimes[-1]
        assert runtime.calls == [[CLS, 6, CAT, HELLO, SEP], [CLS, 6, CAT, CAT, SEP]]
        assert runtime.pooling_starts == [pooled_from, pooled_from]
        harness.embed(EmbedParams(model="instructed", texts=["hello"]))  # no prompt: from 0
        assert runtime.pooling_starts[-1] == 0


def test_last_token_pooling_of_an_input_that_is_all_prompt_is_the_zero_vector(
    tmp_path: Path,
) -> None:
    """With no closing special token, an input cut inside its prompt has every token masked:
    sentence-transformers' last-token gather then gives zeros. With [SEP] it stays pooled."""
    for name, closing in (("bos-only", False), ("bert", True)):
        write_fake_gguf(
            tmp_path / f"{name}.gguf",
            pooling=3,
            include_prompt=False,
            max_seq_length=4,
            tokenizer_json=fake_tokenizer_json(closing=closing),
        )
    with _harness(tmp_path) as harness:
        params = EmbedParams(model="bos-only", texts=["hello"], prompt="the cat sat ")
        assert not harness.embed(params).vectors.any()  # [CLS] the cat sat: all prompt
        assert harness.embed(dataclasses.replace(params, prompt="the ")).vectors.all()
        bert = harness.embed(dataclasses.replace(params, model="bert")).vectors
        assert bert.all()  # [CLS] the cat [SEP]: the prompt is 3 tokens, [SEP] is pooled


# --- work done once -------------------------------------------------------------------------------


def _counting(monkeypatch: pytest.MonkeyPatch, owner: object, method: str) -> list[Any]:
    """Replaces ``owner.method`` by a wrapper noting each call's first argument."""
    calls: list[Any] = []
    inner = getattr(owner, method)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return inner(*args, **kwargs)

    monkeypatch.setattr(owner, method, counted)
    return calls


def test_a_request_resolves_its_model_once(svc: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Aliases, tags and the default are worked out once per call of a loaded model, for
    every kind of embedding call."""
    svc.embed(EmbedParams(model="other", texts=["hello"]))  # loaded
    svc.embed(EmbedParams(texts=["hello"]))
    resolved = _counting(monkeypatch, svc.registry, "resolve")
    for call in (
        svc.service.embed(EmbedParams(model="other", texts=["hello"])),
        svc.service.token_states(EmbedParams(model="other", texts=["hello"])),
        svc.service.embed(EmbedParams(texts=["hello"])),
    ):
        resolved.clear()
        svc.run(call)
        assert len(resolved) == 1


def test_special_tokens_are_worked_out_once_per_loaded_model(
    svc: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token-id request checks its frame against the model's special tokens, and a
    max_tokens request its room for text against their count: both probe the tokenizer
    once per loaded model, not once per request."""
    svc.embed(EmbedParams(texts=["hello"]))  # loaded
    model = svc.registry.loaded("fake")
    assert model is not None
    probes = _counting(monkeypatch, model.tokenizer, "encode_batch")
    for _ in range(3):
        ids = svc.embed(EmbedParams(token_ids=[[CLS, HELLO, SEP]], foreign_ids_hint="hint"))
        assert ids.prompt_tokens == 3
        assert svc.embed(EmbedParams(texts=["hello cat"], max_tokens=8)).prompt_tokens == 4
    with pytest.raises(InvalidInput, match="do not begin with"):
        svc.embed(EmbedParams(token_ids=[[HELLO, SEP]], foreign_ids_hint="hint"))
    with pytest.raises(InvalidInput, match="special tokens take 2"):
        svc.embed(EmbedParams(texts=["hello"], max_tokens=2))
    assert sorted(map(len, probes)) == [1, 4]  # [""] for the count, four probe texts


def test_a_prompts_length_is_worked_out_once_per_loaded_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model pooling without its prompt tokenizes each prompt once, not on every request;
    every request still gets the prompt's pooling starts."""
    write_fake_gguf(tmp_path / "instructed.gguf", pooling=1, include_prompt=False)
    with _harness(tmp_path) as harness:
        params = EmbedParams(model="instructed", texts=["hello", "cat"], prompt="the cat ")
        harness.embed(params)  # loaded
        model = harness.registry.loaded("instructed")
        assert model is not None
        prompts = _counting(monkeypatch, model.tokenizer, "prompt_length")
        runtime = harness.loader.runtimes[-1]
        for _ in range(3):
            runtime.pooling_starts.clear()
            harness.embed(params)
            assert runtime.pooling_starts == [3, 3]
        harness.embed(dataclasses.replace(params, prompt="the "))
        assert runtime.pooling_starts[-2:] == [2, 2]
        assert prompts == ["the "]  # "the cat " was counted by the first request


# --- chunking ------------------------------------------------------------------------------------

_LONG = "the cat sat on the mat a dog runs fast"  # 10 tokens of the fake tokenizer


def test_chunks_are_inputs_answered_in_order_or_pooled_by_tokens(svc: Harness) -> None:
    per_chunk = svc.embed(
        EmbedParams(texts=[_LONG, "hello"], chunking=Chunking(size=4), normalize=False)
    )
    assert [(c.text_index, c.start, c.stop, c.tokens) for c in per_chunk.chunks or ()] == [
        (0, 0, 14, 4),
        (0, 15, 28, 4),
        (0, 29, 38, 2),
        (1, 0, 5, 1),
    ]
    alone = svc.embed(
        EmbedParams(texts=["the cat sat on", "the mat a dog", "runs fast"], normalize=False)
    )
    np.testing.assert_array_equal(per_chunk.vectors[:3], alone.vectors)
    assert per_chunk.prompt_tokens == 4 * 2 + 11  # every chunk with its [CLS] and [SEP]
    mean = svc.embed(
        EmbedParams(texts=[_LONG], chunking=Chunking(size=4, pooling=MEAN), normalize=False)
    )
    assert mean.chunks is None
    expected = (alone.vectors.astype(np.float64) * [[4], [4], [2]]).sum(axis=0) / 10
    np.testing.assert_allclose(mean.vectors[0], expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("chunking", "param"),
    [
        (Chunking(size=2), "chunking.size"),  # 5 chunks, more than the 4 inputs allowed
        (Chunking(size=0), "chunking.size"),
        (Chunking(size=3, overlap=3), "chunking.overlap"),
        (Chunking(size=3, pooling="max"), "chunking.pooling"),
    ],
)
def test_bad_chunking_is_invalid_input_naming_the_field(
    svc: Harness, chunking: Chunking, param: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        svc.embed(EmbedParams(texts=[_LONG], chunking=chunking))
    assert caught.value.param == param
