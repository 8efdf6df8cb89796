"""Ollama's model-name rules (core.model_names) and how the registry applies them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from embedd_server.compute.settings import EngineSettings
from embedd_server.core.model_names import plain_name, tagged_name
from embedd_server.core.registry import ModelRegistry
from embedd_server.errors import ModelNotFound
from tests.fakes import FakeLoader, write_fake_gguf


@pytest.mark.parametrize(
    ("name", "plain"),
    [
        ("all-minilm", "all-minilm"),
        ("all-minilm:latest", "all-minilm"),
        ("all-minilm:LATEST", "all-minilm"),  # Ollama matches the parts without case
        ("library/all-minilm", "all-minilm"),
        ("Library/all-minilm:latest", "all-minilm"),
        ("registry.ollama.ai/library/all-minilm:latest", "all-minilm"),
        ("registry.ollama.ai/library/all-minilm", "all-minilm"),
        # Other tags, namespaces and hosts are names of their own.
        ("all-minilm:v2", "all-minilm:v2"),
        ("me/all-minilm", "me/all-minilm"),
        ("example.com/library/all-minilm", "example.com/library/all-minilm"),
        ("registry.ollama.ai/all-minilm", "registry.ollama.ai/all-minilm"),
        ("all-minilm:latest:latest", "all-minilm:latest:latest"),
        # A port's ":" is not a tag's.
        ("localhost:5000/library/all-minilm", "localhost:5000/library/all-minilm"),
        # Nothing left of the name: the name stays (and names no model).
        (":latest", ":latest"),
        ("library/:latest", "library/:latest"),
        ("", ""),
    ],
)
def test_plain_name(name: str, plain: str) -> None:
    assert plain_name(name) == plain


def test_tagged_name() -> None:
    assert tagged_name("all-minilm") == "all-minilm:latest"
    assert tagged_name("nomic-embed-text:v1.5") == "nomic-embed-text:v1.5"


def test_registry_resolves_ollama_names_and_a_literal_tagged_file_keeps_its_name(
    tmp_path: Path,
) -> None:
    write_fake_gguf(tmp_path / "fake.gguf")
    write_fake_gguf(tmp_path / "odd:latest.gguf")  # a file named with a tag: found as named
    settings = EngineSettings(
        models_dir=tmp_path, default_model="fake", aliases={"nomic-embed-text": "fake"}
    )
    registry = ModelRegistry(settings, FakeLoader())
    assert registry.resolve("fake:latest") == "fake"
    assert registry.resolve("library/fake") == "fake"
    assert registry.resolve("nomic-embed-text:latest") == "fake"
    assert registry.alias_named("nomic-embed-text:latest") == "nomic-embed-text"
    assert registry.alias_named("fake:latest") == ""

    async def info_name(name: str) -> str:
        return (await registry.info(name)).name

    assert asyncio.run(info_name("fake:latest")) == "fake"
    assert asyncio.run(info_name("odd:latest")) == "odd:latest"
    with pytest.raises(ModelNotFound):
        asyncio.run(info_name("odd"))  # only its own name names it
    with pytest.raises(ModelNotFound):
        asyncio.run(info_name("fake:v2"))
