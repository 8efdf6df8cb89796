"""The core's prompt rules (resolve_prompt, model_texts, prompt_pooling_starts), as
sentence-transformers applies them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from embedd_server.core.service import (
    EmbedParams,
    model_texts,
    prompt_pooling_starts,
    resolve_prompt,
)
from embedd_server.core.tokenization import HuggingFaceTokenizer
from embedd_server.errors import InvalidInput
from embedd_server.model.catalog import ModelInfo
from tests.fakes import fake_tokenizer_json

INFO = ModelInfo(
    name="e5",
    path=Path("e5.gguf"),
    architecture="bert",
    dimensions=8,
    context_length=64,
    max_input_tokens=64,
    pooling="mean",
    quantization="f16",
    normalizes=True,
    vocab_size=100,
    hf_tokenizer_json=None,
    file_size_bytes=1,
    created=0,
    prompts={"query": "query: ", "document": "", "passage": "passage: "},
)


def _texts(params: EmbedParams, info: ModelInfo = INFO) -> list[str]:
    return model_texts(params, info, resolve_prompt(params, info))


def test_names_literals_and_input_types() -> None:
    assert resolve_prompt(EmbedParams(texts=["a"]), INFO) == ""
    assert resolve_prompt(EmbedParams(prompt_name="query"), INFO) == "query: "
    assert resolve_prompt(EmbedParams(prompt="x: "), INFO) == "x: "
    assert resolve_prompt(EmbedParams(input_type="search_query"), INFO) == "query: "
    # "document" is empty here: the passage prompt plays the document role.
    assert resolve_prompt(EmbedParams(input_type="search_document"), INFO) == "passage: "
    assert resolve_prompt(EmbedParams(input_type="clustering"), INFO) == ""


def test_default_prompt_and_an_empty_literal_overriding_it() -> None:
    info = dataclasses.replace(INFO, default_prompt_name="query")
    assert _texts(EmbedParams(texts=["Hi"]), info) == ["query: Hi"]
    assert _texts(EmbedParams(texts=["Hi"], prompt=""), info) == ["Hi"]


def test_lower_case_covers_the_prompt_too() -> None:
    info = dataclasses.replace(INFO, do_lower_case=True)
    assert _texts(EmbedParams(texts=["Hi"], prompt="Q: "), info) == ["q: hi"]


def test_errors() -> None:
    with pytest.raises(InvalidInput, match="'query', 'document', 'passage'"):
        resolve_prompt(EmbedParams(prompt_name="nope"), INFO)
    with pytest.raises(InvalidInput, match="at most one"):
        resolve_prompt(EmbedParams(prompt_name="query", input_type="search_query"), INFO)
    with pytest.raises(InvalidInput, match="input_type must be one of"):
        resolve_prompt(EmbedParams(input_type="rerank"), INFO)
    with pytest.raises(InvalidInput, match="token ids"):
        _texts(EmbedParams(token_ids=[[1, 2]], prompt_name="query"), INFO)
    info = dataclasses.replace(INFO, default_prompt_name="query")
    assert _texts(EmbedParams(token_ids=[[1, 2]]), info) == []


def test_include_prompt_false_pools_from_after_the_prompts_tokens() -> None:
    """sentence-transformers masks the prompt tokenized alone, less its closing [SEP]: so
    [CLS] and the prompt's words are left out of the mean."""
    info = dataclasses.replace(INFO, include_prompt=False)
    tokenizer = HuggingFaceTokenizer(fake_tokenizer_json())
    sequences = [[2, 6, 7, 4, 3], [2, 6, 7, 3], [2, 6, 3]]  # "the cat" + "hello" / "" / cut
    starts = prompt_pooling_starts(info, tokenizer, "the cat", sequences)
    assert starts == [3, 3, 3]  # [CLS] the cat | hello [SEP]; a shorter input: all of it
    assert prompt_pooling_starts(info, tokenizer, "", sequences) is None  # no prompt
    assert prompt_pooling_starts(INFO, tokenizer, "the cat", sequences) is None  # included


def test_the_prompts_length_is_counted_lower_cased_and_cut_to_the_limit() -> None:
    tokenizer = HuggingFaceTokenizer(fake_tokenizer_json())
    info = dataclasses.replace(INFO, include_prompt=False, do_lower_case=True)
    assert prompt_pooling_starts(info, tokenizer, "THE CAT", [[2] * 10]) == [3]
    cased = dataclasses.replace(info, do_lower_case=False)
    assert prompt_pooling_starts(cased, tokenizer, "THE CAT", [[2] * 10]) == [3]  # [UNK]s
    short = dataclasses.replace(info, max_input_tokens=3)  # [CLS] the [SEP]
    assert prompt_pooling_starts(short, tokenizer, "the cat sat", [[2] * 10]) == [2]
