"""The core's prompt rules (resolve_prompt, model_texts), as sentence-transformers applies them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from embedd_server.core.catalog import ModelInfo
from embedd_server.core.errors import InvalidInput, NotImplementedFeature
from embedd_server.core.service import EmbedParams, model_texts, resolve_prompt

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
    assert model_texts(EmbedParams(texts=["Hi"]), info, "mean") == ["query: Hi"]
    assert model_texts(EmbedParams(texts=["Hi"], prompt=""), info, "mean") == ["Hi"]


def test_lower_case_covers_the_prompt_too() -> None:
    info = dataclasses.replace(INFO, do_lower_case=True)
    assert model_texts(EmbedParams(texts=["Hi"], prompt="Q: "), info, "mean") == ["q: hi"]


def test_errors() -> None:
    with pytest.raises(InvalidInput, match="'query', 'document', 'passage'"):
        resolve_prompt(EmbedParams(prompt_name="nope"), INFO)
    with pytest.raises(InvalidInput, match="at most one"):
        resolve_prompt(EmbedParams(prompt_name="query", input_type="search_query"), INFO)
    with pytest.raises(InvalidInput, match="input_type must be one of"):
        resolve_prompt(EmbedParams(input_type="rerank"), INFO)
    with pytest.raises(InvalidInput, match="token ids"):
        model_texts(EmbedParams(token_ids=[[1, 2]], prompt_name="query"), INFO, "mean")
    info = dataclasses.replace(INFO, default_prompt_name="query")
    assert model_texts(EmbedParams(token_ids=[[1, 2]]), info, "mean") == []


def test_include_prompt_false_is_refused_only_where_the_pooling_sees_the_prompt() -> None:
    info = dataclasses.replace(INFO, include_prompt=False)
    with pytest.raises(NotImplementedFeature, match="include_prompt: false"):
        model_texts(EmbedParams(texts=["a"], prompt_name="query"), info, "mean")
    assert model_texts(EmbedParams(texts=["a"], prompt_name="query"), info, "cls") == ["query: a"]
    assert model_texts(EmbedParams(texts=["a"], prompt_name="document"), info, "mean") == ["a"]
