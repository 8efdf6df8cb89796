"""The client subcommands (embed, models, tokenize, embed-file) against the fake server."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from embedd import Client
from embedd_server.cli.main import main
from embedd_server.run.probes import free_port
from tests.fakes import write_fake_gguf
from tests.servers import ServerThread

HINT = "is the server running? start it with `embedd serve`"
TEXTS = ["hello world", "the cat sat on the mat", "a dog runs fast", "slow cat"]
LABELS = ("negative", "neutral", "positive")


@pytest.fixture
def client(fake_server: ServerThread) -> Iterator[Client]:
    with Client(fake_server.target) as client:
        yield client


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs ``embedd argv...`` in-process: exit code, stdout, stderr."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def target_of(server: ServerThread) -> Sequence[str]:
    return ("--target", server.target)


def assert_one_line_failure(code: int, err: str, command: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"embedd {command}: ")
    for fragment in fragments:
        assert fragment in last


# --- embed ----------------------------------------------------------------------------------


def test_embed_prints_json(
    fake_server: ServerThread, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "embed", *TEXTS[:2], *target_of(fake_server))
    assert code == 0
    document = json.loads(out)
    assert document["model"] == "fake"
    vectors = np.array(document["embeddings"], dtype=np.float32)
    np.testing.assert_array_equal(vectors, client.embed(TEXTS[:2]))  # shortest repr round-trips
    assert "0.10000000" not in out  # float32 values, not their float64 expansions


def test_embed_model_and_dimensions(
    fake_server: ServerThread, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["embed", "hello", "--model", "other", "--dimensions", "2", *target_of(fake_server)]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    document = json.loads(out)
    assert document["model"] == "other"
    np.testing.assert_array_equal(
        np.array(document["embeddings"], dtype=np.float32),
        client.embed("hello", model="other", dimensions=2),
    )


def test_embed_similarity_table(
    fake_server: ServerThread, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    long_text = "the cat sat on the mat " * 5
    argv = ["embed", "--similarity", *TEXTS[:3], long_text, *target_of(fake_server)]
    code, out, _ = run(capsys, *argv)
    assert code == 0
    lines = out.rstrip("\n").splitlines()
    assert len(lines) == 5
    assert lines[0].split() == ["[1]", "[2]", "[3]", "[4]"]
    assert lines[1].startswith("[1] hello world")
    assert "[4] the cat sat on the mat the..." in lines[4]  # label cut to 30 characters
    assert long_text.strip() not in out
    vectors = client.embed([*TEXTS[:3], long_text])
    expected = vectors @ vectors.T
    for row, line in enumerate(lines[1:]):
        values = [float(cell) for cell in line.split()[-4:]]
        np.testing.assert_allclose(values, expected[row], atol=5e-4)
        assert line.split()[-4:][row] == "1.000"


def test_embed_similarity_json(
    fake_server: ServerThread, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "embed", "--similarity", "--json", *TEXTS, *target_of(fake_server))
    assert code == 0
    document = json.loads(out)
    assert document["model"] == "fake"
    assert document["texts"] == TEXTS
    matrix = np.array(document["similarity"])
    vectors = client.embed(TEXTS).astype(np.float64)
    np.testing.assert_allclose(matrix, vectors @ vectors.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-6)


def test_embed_errors(fake_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "embed", "hello", "--model", "nope", *target_of(fake_server))
    assert_one_line_failure(code, err, "embed", "'nope' does not exist")
    code, _, err = run(capsys, "embed", "hello", "", *target_of(fake_server))
    assert_one_line_failure(code, err, "embed", "empty")


# --- models, tokenize -----------------------------------------------------------------------


def test_models_table(fake_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "models", *target_of(fake_server))
    assert code == 0
    header, *rows = out.rstrip("\n").splitlines()
    assert header.split() == [
        "NAME",
        "FAMILY",
        "TASK",
        "DIMS",
        "MAX",
        "TOKENS",
        "POOLING",
        "QUANTIZATION",
        "ENGINE",
        "LOADED",
        "LABELS",
    ]
    cells = {row.split()[0]: row.split() for row in rows}
    assert cells["fake"] == ["fake", "bert", "embed", "8", "16", "mean", "f16", "fake", "yes"]
    assert cells["other"][:4] == ["other", "bert", "embed", "4"]
    assert cells["other"][-1] in ("yes", "no")


@pytest.fixture
def task_server(tmp_path: Path) -> Iterator[ServerThread]:
    """The fake server with a 3-label classifier and a sparse encoder besides its models."""
    write_fake_gguf(tmp_path / "sentiment.gguf", pooling=4, task="classify", labels=LABELS)
    write_fake_gguf(tmp_path / "splade.gguf", pooling=0, task="sparse")
    with ServerThread.with_fake_models(tmp_path) as server:
        yield server


def test_classify_prints_each_texts_labels_best_first(
    task_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, "classify", "hello world", "a dog", "--json", *target_of(task_server)
    )
    assert code == 0
    document = json.loads(out)
    assert document["model"] == "sentiment"
    with Client(task_server.target) as client:
        expected = client.classify(["hello world", "a dog"])
    assert document["results"] == [
        [{"label": p.label, "score": round(p.score, 6)} for p in row]
        for row in expected.predictions
    ]
    assert sorted(p["label"] for p in document["results"][0]) == sorted(LABELS)
    code, out, _ = run(capsys, "classify", "hello", "--pair", "world", *target_of(task_server))
    assert code == 0 and out.startswith("model: sentiment") and "positive" in out
    code, _, err = run(capsys, "classify", "a", "b", "--pair", "c", *target_of(task_server))
    assert_one_line_failure(code, err, "classify", "exactly one TEXT")


def test_models_table_shows_a_classifiers_labels(
    task_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "models", *target_of(task_server))
    assert code == 0
    cells = {row.split()[0]: row.split() for row in out.splitlines()[1:]}
    assert cells["sentiment"][2] == "classify" and cells["sentiment"][-1] == ",".join(LABELS)
    assert cells["splade"][2:4] == ["sparse", "16"]


def test_embed_sparse_prints_the_non_zero_weights(
    task_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "embed-sparse", "hello world", *target_of(task_server))
    assert code == 0
    document = json.loads(out)
    assert (document["model"], document["dimensions"]) == ("splade", 16)
    [vector] = document["vectors"]
    with Client(task_server.target) as client:
        [expected] = client.embed_sparse("hello world").vectors
    assert vector["indices"] == expected.indices.tolist()
    assert vector["values"] == [round(v, 6) for v in expected.values.tolist()]
    code, out, _ = run(capsys, "embed-sparse", "--top", "2", "hello", *target_of(task_server))
    assert code == 0 and out.startswith("model: splade") and len(out.splitlines()) == 4


def test_classify_on_an_embedding_model_names_the_right_routes(
    task_server: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "classify", "hi", "--model", "fake", *target_of(task_server))
    assert_one_line_failure(code, err, "classify", "embedding model", "/v1/embeddings")


def test_tokenize(fake_server: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "tokenize", "hello world zebra", *target_of(fake_server))
    assert code == 0
    assert "model:  fake" in out
    assert "ids:    [2, 4, 5, 1, 3]" in out
    assert 'tokens: ["[CLS]", "hello", "world", "[UNK]", "[SEP]"]' in out
    assert "count:  5 (max input tokens: 16)" in out
    code, out, _ = run(capsys, "tokenize", "cat", "--model", "other", *target_of(fake_server))
    assert code == 0 and "model:  other" in out


def test_default_target_comes_from_the_settings(
    fake_server: ServerThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EMBEDD_CONFIG", raising=False)
    monkeypatch.setenv("EMBEDD_GRPC_HOST", "127.0.0.1")
    monkeypatch.setenv("EMBEDD_GRPC_PORT", str(fake_server.port))
    code, out, _ = run(capsys, "models")
    assert code == 0 and "fake" in out
    config = fake_server.settings.models_dir / "client.toml"
    config.write_text(f'grpc_host = "0.0.0.0"\ngrpc_port = {fake_server.port}\n')
    monkeypatch.delenv("EMBEDD_GRPC_HOST")
    monkeypatch.delenv("EMBEDD_GRPC_PORT")
    code, out, _ = run(capsys, "tokenize", "hello", "--config", str(config))
    assert code == 0 and "[CLS]" in out


# --- embed-file -----------------------------------------------------------------------------


def test_embed_file_txt_to_npy(
    fake_server: ServerThread, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [f"{word} {other}" for word in ("hello", "cat", "dog") for other in ("runs", "sat")]
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join([lines[0], "", *lines[1:4], "   ", *lines[4:]]) + "\n\n")
    output = tmp_path / "vectors.npy"
    argv = ["embed-file", str(source), str(output), "--batch-size", "4"]
    code, out, err = run(capsys, *argv, *target_of(fake_server))
    assert code == 0, err
    vectors = np.load(output)
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, client.embed(lines))
    assert f"wrote 6 embeddings of 8 dimensions to {output}" in err
    assert "6/6" in err  # the progress bar's total is the number of texts
    assert not (tmp_path / "vectors.npy.partial").exists()
    assert out == ""


def test_embed_file_jsonl_to_jsonl(
    fake_server: ServerThread, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "docs.jsonl"
    records = [{"id": index, "body": text} for index, text in enumerate(TEXTS * 3)]
    source.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    output = tmp_path / "out.jsonl"
    argv = ["embed-file", str(source), str(output), "--text-key", "body", "--batch-size", "5"]
    code, _, err = run(capsys, *argv, "--model", "other", *target_of(fake_server))
    assert code == 0, err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(12))
    vectors = np.array([row["embedding"] for row in rows], dtype=np.float32)
    np.testing.assert_array_equal(vectors, client.embed(TEXTS * 3, model="other"))


def test_embed_file_jsonl_to_npy(
    fake_server: ServerThread, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n\n" for text in TEXTS))
    output = tmp_path / "out.npy"
    code, _, err = run(capsys, "embed-file", str(source), str(output), *target_of(fake_server))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(output), client.embed(TEXTS))


def test_embed_file_missing_input(
    fake_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.txt"
    output = tmp_path / "out.npy"
    code, _, err = run(capsys, "embed-file", str(missing), str(output), *target_of(fake_server))
    assert_one_line_failure(code, err, "embed-file", str(missing), "no such file")
    assert not output.exists()


def test_embed_file_bad_jsonl_lines(
    fake_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "docs.jsonl"
    output = tmp_path / "out.jsonl"
    good = [json.dumps({"text": text}) for text in TEXTS]
    cases = {
        "not valid JSON": [*good, '{"text": "unterminated'],
        "no 'text' field": [*good, json.dumps({"body": "hello"})],
        "is not a string": [good[0], json.dumps({"text": 3})],
        "expected a JSON object": [json.dumps(["hello"])],
        "is empty": [json.dumps({"text": ""})],
    }
    for message, lines in cases.items():
        source.write_text("\n".join(lines) + "\n")
        code, _, err = run(
            capsys,
            "embed-file",
            str(source),
            str(output),
            "--batch-size",
            "2",
            *target_of(fake_server),
        )
        assert_one_line_failure(code, err, "embed-file", f"{source}:{len(lines)}:", message)
        assert not output.exists()
        assert not (tmp_path / "out.jsonl.partial").exists()


def test_embed_file_bad_arguments(
    fake_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "corpus.txt"
    source.write_text("hello\n")
    code, _, err = run(
        capsys, "embed-file", str(source), str(tmp_path / "out.csv"), *target_of(fake_server)
    )
    assert_one_line_failure(code, err, "embed-file", ".npy or .jsonl")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    code, _, err = run(
        capsys, "embed-file", str(blank), str(tmp_path / "o.npy"), *target_of(fake_server)
    )
    assert_one_line_failure(code, err, "embed-file", "no texts")
    code, _, err = run(
        capsys,
        "embed-file",
        str(source),
        str(tmp_path / "o.npy"),
        "--model",
        "nope",
        *target_of(fake_server),
    )
    assert_one_line_failure(code, err, "embed-file", "'nope' does not exist")
    assert not (tmp_path / "o.npy").exists()


# --- an unreachable server ------------------------------------------------------------------


def test_unreachable_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    source = tmp_path / "corpus.txt"
    source.write_text("hello\nworld\n")
    output = tmp_path / "out.npy"
    for argv in (
        ["embed", "hello"],
        ["models"],
        ["tokenize", "hello"],
        ["embed-file", str(source), str(output)],
    ):
        code, out, err = run(capsys, *argv, "--target", target)
        assert_one_line_failure(code, err, argv[0], f"cannot reach the server at {target}", HINT)
        assert out == ""
    assert not output.exists()


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for command, option in (
        ("embed", "--similarity"),
        ("models", "--target"),
        ("tokenize", "--model"),
        ("embed-file", "--text-key"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert option in capsys.readouterr().out
