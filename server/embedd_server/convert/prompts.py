"""The curated prompt table: prompts popular models document but ship no config for.

Many embedding models are trained with a prefix on each text (e5's ``"query: "``, nomic's
``"search_query: "``, bge-en's query instruction) but their directory has no
``config_sentence_transformers.json`` prompts, so a server that reads only the config embeds
without them and retrieval quality drops. ``embedd import`` applies this table, keyed by the
model's original name (the Hugging Face repository name, from the directory, a Hub cache path,
config.json's ``_name_or_path`` or the model card's title), only where the directory's own
config has no prompts; ``--prompt NAME=TEXT`` overrides any entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from embedd_server.convert.files import optional_object

_BGE_EN_QUERY = "Represent this sentence for searching relevant passages: "
_E5 = {"query": "query: ", "passage": "passage: "}


@dataclass(frozen=True)
class CuratedPrompts:
    """One row of the table: which names it covers, the prompts, and where they are documented."""

    pattern: str  # a regular expression, matched against the lower-cased repository name
    prompts: dict[str, str]
    source: str


CURATED: tuple[CuratedPrompts, ...] = (
    # The instruction-tuned e5 models take "Instruct: ...\nQuery: " instead: not matched.
    CuratedPrompts(r"(multilingual-)?e5-(small|base|large)(-v2)?", _E5, "intfloat's model cards"),
    CuratedPrompts(
        r"nomic-embed-text-v1(\.5)?",
        {
            "query": "search_query: ",
            "document": "search_document: ",
            "classification": "classification: ",
            "clustering": "clustering: ",
        },
        "nomic-ai's model card",
    ),
    CuratedPrompts(
        r"bge-(small|base|large)-en(-v1\.5)?", {"query": _BGE_EN_QUERY}, "BAAI's model card"
    ),
    CuratedPrompts(
        r"bge-(small|base|large)-zh(-v1\.5)?",
        {"query": "为这个句子生成表示以用于检索相关文章："},  # noqa: RUF001 - BAAI's own colon
        "BAAI's model card",
    ),
    CuratedPrompts(r"mxbai-embed-large-v1", {"query": _BGE_EN_QUERY}, "mixedbread-ai's model card"),
    CuratedPrompts(
        r"snowflake-arctic-embed-(xs|s|m|m-long|l)", {"query": _BGE_EN_QUERY}, "Snowflake's card"
    ),
    CuratedPrompts(
        r"qwen3-embedding-(0\.6b|4b|8b)",
        {
            "query": "Instruct: Given a web search query, retrieve relevant passages that "
            "answer the query\nQuery:",
            "document": "",
        },
        "Qwen's model card",
    ),
)


def original_names(src: Path, model_dir: Path) -> list[str]:
    """The names ``src`` may have on the Hub, most specific first, lower-cased, without the
    organisation: config.json's ``_name_or_path``, a Hub cache snapshot's repository, the
    directory's own name, the model card's ``# title``."""
    names: list[str] = []
    name_or_path = optional_object(model_dir / "config.json").get("_name_or_path")
    if isinstance(name_or_path, str) and name_or_path.strip():
        names.append(name_or_path.rstrip("/").rsplit("/", 1)[-1])
    resolved = src.resolve()
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        names.append(resolved.parent.parent.name.split("--")[-1])
    names.append(resolved.name)
    readme = src / "README.md"
    if readme.is_file():
        for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
            if match := re.fullmatch(r"#\s+(?:[\w.-]+/)?([A-Za-z0-9][\w.-]*)\s*", line):
                names.append(match.group(1))
                break
    return [name.lower() for name in names]


def curated_prompts(names: list[str]) -> tuple[str, CuratedPrompts] | None:
    """The first table row one of ``names`` matches, with the name that matched."""
    for name in names:
        for row in CURATED:
            if re.fullmatch(row.pattern, name):
                return name, row
    return None


def parse_prompt(text: str) -> tuple[str, str]:
    """``NAME=TEXT`` (as ``embedd import --prompt`` takes it) -> (name, text); TEXT may be empty."""
    name, sep, prompt = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=TEXT, got {text!r}")
    return name.strip(), prompt
