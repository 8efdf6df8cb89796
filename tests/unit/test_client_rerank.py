"""Reranking from the Python client (sync and asyncio) and `embedd rerank`, over a real gRPC
channel to an in-process server whose fake cross-encoder scores a pair by a hash of its ids."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

import embedd
from embedd import AsyncClient, Client
from embedd_server.cli.main import main
from tests.fakes import write_fake_gguf
from tests.servers import ServerThread

DOCUMENTS = ["the cat sat", "hello world", "a dog runs fast", "the mat"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    """Models 'fake', 'other' (embedding) and 'reranker' (a fake cross-encoder)."""
    write_fake_gguf(tmp_path / "reranker.gguf", pooling=4, pair_token_types=True)
    with ServerThread.with_fake_models(tmp_path) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client(server.target, timeout=30) as client:
        yield client


def test_rerank_ranks_every_document_best_first(client: Client) -> None:
    result = client.rerank("the cat", DOCUMENTS)
    assert result.model == "reranker"  # the first cross-encoder: none was named
    assert sorted(r.index for r in result.results) == [0, 1, 2, 3]
    scores = [r.score for r in result.results]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 < s < 1.0 for s in scores)  # sigmoid of a logit
    assert all(r.document is None for r in result.results)
    assert result.prompt_tokens > 0


def test_top_n_documents_and_raw_scores(client: Client) -> None:
    full = client.rerank("the cat", DOCUMENTS, model="reranker")
    best = client.rerank("the cat", DOCUMENTS, top_n=2, return_documents=True)
    assert [r.index for r in best.results] == [r.index for r in full.results[:2]]
    assert [r.document for r in best.results] == [DOCUMENTS[r.index] for r in best.results]
    raw = client.rerank("the cat", DOCUMENTS, raw_scores=True)
    assert [r.index for r in raw.results] == [r.index for r in full.results]
    sigmoid = [1 / (1 + math.exp(-r.score)) for r in raw.results]  # the logits themselves
    assert sigmoid == pytest.approx([r.score for r in full.results], rel=1e-9)
    assert len(client.rerank("the cat", "the mat").results) == 1  # a str is one document


def test_rerank_errors(client: Client) -> None:
    with pytest.raises(embedd.InvalidArgument, match="not a reranker"):
        client.rerank("q", ["d"], model="fake")
    with pytest.raises(embedd.InvalidArgument, match="no documents"):
        client.rerank("q", [])
    with pytest.raises(embedd.NotFound):
        client.rerank("q", ["d"], model="nope")
    with pytest.raises(TypeError, match="query is a int"):
        client.rerank(3, ["d"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="input 1 is a int"):
        client.rerank("q", ["d", 5])  # type: ignore[list-item]


def test_async_client_reranks_as_the_sync_one(server: ServerThread, client: Client) -> None:
    async def scenario() -> None:
        async with AsyncClient(server.target, timeout=30) as aclient:
            result = await aclient.rerank("the cat", DOCUMENTS, top_n=3, return_documents=True)
            expected = client.rerank("the cat", DOCUMENTS, top_n=3, return_documents=True)
            assert result == expected
            with pytest.raises(embedd.InvalidArgument):
                await aclient.rerank("q", ["d"], model="other")

    asyncio.run(scenario())


def test_cli_prints_a_ranked_table(
    server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["rerank", "--target", server.target, "--top-n", "3", "the cat", *DOCUMENTS])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.rstrip("\n").splitlines()
    assert lines[0] == "model: reranker"
    assert lines[1].split() == ["RANK", "SCORE", "DOC", "TEXT"]
    rows = lines[2:]
    assert [row.split()[0] for row in rows] == ["1", "2", "3"]
    scores = [float(row.split()[1]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    for row in rows:  # [position] among the DOCs, 1-based, and that document's text
        position = int(row.split()[2].strip("[]"))
        assert row.endswith(DOCUMENTS[position - 1])


def test_cli_json_and_errors(server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["rerank", "--target", server.target, "--json", "the cat", *DOCUMENTS])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["model"] == "reranker"
    assert sorted(r["index"] for r in document["results"]) == [0, 1, 2, 3]
    assert {r["document"] for r in document["results"]} == set(DOCUMENTS)
    code = main(["rerank", "--target", server.target, "--model", "fake", "q", "d"])
    captured = capsys.readouterr()
    assert code != 0 and "not a reranker" in captured.err
