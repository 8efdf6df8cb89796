"""The curated prompt table, `embedd import --prompt`, and the tokenizer rebuilt from a GGUF's
vocabulary (tiny models built on the spot; no model files needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import pytest

from embedd_server.cli.main import main
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.convert.prompts import curated_prompts, original_names, parse_prompt
from embedd_server.core.tokenization import HuggingFaceTokenizer
from embedd_server.model.catalog import read_model_info
from embedd_server.model.gguf_tokenizer import (
    EXACT,
    LLAMA_CPP,
    build_tokenizer_json,
    gguf_tokenizer,
    tokenizer_kind,
)
from tests.unit.test_hf_to_gguf import make_tiny_bert

E5_QUERY = {"query": "query: ", "passage": "passage: "}


def _prompts(path: Path) -> dict[str, str]:
    field = gguf.GGUFReader(path).fields["sentence_transformers.prompts"]
    prompts: dict[str, str] = json.loads(field.contents())
    return prompts


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("e5-base-v2", "query: "),
        ("multilingual-e5-small", "query: "),
        ("nomic-embed-text-v1.5", "search_query: "),
        ("bge-small-en-v1.5", "Represent this sentence for searching relevant passages: "),
        ("mxbai-embed-large-v1", "Represent this sentence for searching relevant passages: "),
        (
            "qwen3-embedding-0.6b",
            "Instruct: Given a web search query, retrieve relevant passages that answer the "
            "query\nQuery:",
        ),
    ],
)
def test_the_table_knows_popular_models(name: str, expected: str) -> None:
    found = curated_prompts([name])
    assert found is not None
    assert found[1].prompts[next(iter(found[1].prompts))] == expected


@pytest.mark.parametrize(
    "name", ["all-minilm-l6-v2", "multilingual-e5-large-instruct", "e5-mistral-7b-instruct"]
)
def test_models_without_documented_prefixes_get_none(name: str) -> None:
    assert curated_prompts([name]) is None


def test_original_names_come_from_config_cache_and_readme(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--intfloat--e5-small-v2" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"_name_or_path": "intfloat/e5-base-v2"}))
    (snapshot / "README.md").write_text("---\n---\n# nomic-ai/nomic-embed-text-v1\n")
    names = original_names(snapshot, snapshot)
    assert names == ["e5-base-v2", "e5-small-v2", "abc123", "nomic-embed-text-v1"]


def test_curated_prompts_apply_only_where_the_config_has_none(tmp_path: Path) -> None:
    src = make_tiny_bert(tmp_path / "e5-small-v2")
    notes: list[str] = []
    out = import_model(src, tmp_path / "out", report=notes.append)
    assert _prompts(out) == E5_QUERY
    assert any("e5-small-v2" in n and "'query: '" in n and "--prompt" in n for n in notes)
    (src / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"q": "Q "}}))
    out = import_model(src, tmp_path / "out", overwrite=True, report=notes.append)
    assert _prompts(out) == {"q": "Q "}


def test_given_prompts_override_the_curated_ones(tmp_path: Path) -> None:
    src = make_tiny_bert(tmp_path / "e5-small-v2")
    notes: list[str] = []
    out = import_model(
        src, tmp_path / "out", prompts={"query": "Q: ", "other": ""}, report=notes.append
    )
    assert _prompts(out) == {"query": "Q: ", "passage": "passage: ", "other": ""}
    assert any("command line" in n for n in notes)


def test_parse_prompt() -> None:
    assert parse_prompt("query=query: a=b") == ("query", "query: a=b")
    assert parse_prompt("document=") == ("document", "")
    for bad in ("query", "=text"):
        with pytest.raises(ValueError, match="NAME=TEXT"):
            parse_prompt(bad)


def test_cli_import_takes_prompts_and_writes_notes_above_the_bar(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = make_tiny_bert(tmp_path / "e5-small-v2")
    out = tmp_path / "out"
    argv = ["import", str(src), "--models-dir", str(out), "--prompt", "query=Q: "]
    assert main([*argv, "--prompt", "extra=E "]) == 0
    assert _prompts(out / "e5-small-v2.gguf") == {
        "query": "Q: ",
        "passage": "passage: ",
        "extra": "E ",
    }
    err = capsys.readouterr().err
    assert any(line.startswith("e5-small-v2: no prompts") for line in err.splitlines())
    assert main([*argv, "--overwrite", "--prompt", "nameless"]) == 2
    assert "NAME=TEXT" in capsys.readouterr().err


# --- the tokenizer rebuilt from a GGUF's vocabulary ------------------------------------------


def _bert_fields(**extra: Any) -> dict[str, Any]:
    # llama.cpp's phantom-space form of [PAD] [UNK] [CLS] [SEP] hello world ##s Hello
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "▁hello", "▁world", "s", "▁Hello"]
    return {
        "model": "bert",
        "tokens": tokens,
        "token_type": [3, 3, 3, 3, 1, 1, 1, 1],
        "bos_token_id": 2,
        "eos_token_id": 3,
        "unknown_token_id": 1,
        "add_bos_token": True,
        "add_eos_token": True,
        **extra,
    }


def _ids(fields: dict[str, Any], text: str) -> list[int]:
    built = build_tokenizer_json(fields)
    assert isinstance(built, str), built
    return HuggingFaceTokenizer(built).encode_batch([text])[0]


def test_wordpiece_from_the_phantom_space_form() -> None:
    assert _ids(_bert_fields(**{"normalizer.lowercase": True}), "Héllo worlds x") == [
        2, 4, 5, 6, 1, 3
    ]  # fmt: skip
    cased = _bert_fields(**{"normalizer.lowercase": False})
    assert _ids(cased, "Hello hello") == [2, 7, 4, 3]
    # no flag (older converters): upper-case pieces mean a cased vocabulary
    assert _ids(_bert_fields(), "Hello") == [2, 7, 3]


def test_unsupported_tokenizers_fall_back_to_llama_cpp(tmp_path: Path) -> None:
    assert not isinstance(build_tokenizer_json({"model": "llama", "tokens": ["a"]}), str)
    bpe = {"model": "gpt2", "pre": "llama3", "tokens": ["a"], "merges": ["a a"]}
    assert not isinstance(build_tokenizer_json(bpe), str)
    missing = gguf_tokenizer(tmp_path / "missing.gguf")
    assert (missing.kind, missing.json) == (LLAMA_CPP, None)


def test_tokenizer_kind(tmp_path: Path) -> None:
    info = read_model_info(import_model(make_tiny_bert(tmp_path / "tiny"), tmp_path / "out"))
    assert tokenizer_kind(info) == EXACT
