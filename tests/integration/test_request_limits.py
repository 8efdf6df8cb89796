"""Input size: the payload cap (--max-request-bytes) and long texts cut before tokenizing.

Issue 21, item 3: a request was bounded only by the 64 MiB message limit, and a long text was
tokenized whole (twice when over the limit, the second time holding the GIL) although only the
model's window is kept: one 5 MB text stalled every other caller for seconds. Now Envoy answers
413 in each API's error shape to a REST body over the cap, the gRPC server RESOURCE_EXHAUSTED
to a message over it (naming the setting), and a long text is tokenized only as far as its
kept ids, which are exactly those of the whole text tokenized and truncated, on the real
tokenizers of ../shared/models (WordPiece, Unigram, byte-level BPE, SentencePiece BPE with byte
fallback).
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tokenizers import Tokenizer

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.core.tokenization import (
    CHARS_PER_TOKEN_GUESS,
    LEFT,
    RIGHT,
    UNSETTLED_PIECES,
    HuggingFaceTokenizer,
)
from embedd_server.settings import Settings
from tests.envoy_proc import EnvoyProcess, http
from tests.servers import ServerThread

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
LIMIT = 64 * 1024  # the cap the Envoy tests run with (bytes)


# --- exactness of the cut, on the real tokenizers ------------------------------------------------

TOKENIZERS = {
    "tiny-bert-cls": "WordPiece, lower-casing BertNormalizer",
    "tiny-bert-mean-raw": "WordPiece, cased",
    "tiny-xlmr": "Unigram, NFKC and a run-of-spaces Replace, Metaspace",
    "tiny-qwen3": "byte-level BPE, GPT-2 regex",
    "tiny-roberta": "byte-level BPE, <s> A </s>",
    "tiny-gemma3-embed": "SentencePiece BPE with byte fallback, Split on ▁",
}
# What is hardest for a cut: runs the cut lands in (spaces, combining marks, zero-width
# joiners that BertNormalizer deletes, a word longer than WordPiece's 100 characters), marks
# that compose with the character before them (NFC/NFKC), NFKC expansions into several words
# (U+FDFA), CJK, emoji and ZWJ sequences (byte-level and byte-fallback pieces), GPT-2's
# contractions ending a regex alternative early, the tokenizers' own special tokens as text.
PIECES = [
    "a", "the ", "n", "t", " ", "  ", "\n", "\r\n", "\t", "'", "'re", "'s", "!", ".", ",",
    "\u0301", "\u0308", "e\u0301", "中", "文字", "日本語", "😀", "👍🏽", "👨‍👩‍👧", "\u200d",
    "\u200b", "\ufeff", "\x00", "é", "ﬁ", "①", "\ufdfa", "\u3000", "[SEP]", "<s>", "</s>", "<bos>",
    "<|endoftext|>", "hello", "world", "12345", "ß", "İ", "▁", "##", "ǅ", "\U0001d11e",
]  # fmt: skip
RUNS = [" ", "\u0301", "a", "中", "😀", "\u200d", "-", "\n", "'", "\ufdfa", "x\u200d"]


def _mixed(rng: random.Random, chars: int) -> str:
    out: list[str] = []
    while sum(map(len, out)) < chars:
        out.append(rng.choice(PIECES))
    return "".join(out)


def _texts(rng: random.Random, first_cut: int) -> list[str]:
    """Texts whose length puts the first, second and later cuts inside their hard parts."""
    lengths = [first_cut - 2, first_cut + 1, first_cut + 5, 2 * first_cut + 3, 5 * first_cut]
    texts = [_mixed(rng, n) for n in lengths for _ in range(4)]
    for run in RUNS:  # a long run around the cut, with text on both sides
        for n in (first_cut, 3 * first_cut):
            texts.append(_mixed(rng, 40) + run * (n // len(run)) + _mixed(rng, 40))
            texts.append(_mixed(rng, first_cut - 20) + run * n)
            texts.append(run * n + _mixed(rng, first_cut - 20))
    return texts


def _reference(path: Path, texts: list[str], max_tokens: int, direction: str) -> list[list[int]]:
    """Each whole text tokenized and truncated by the tokenizers library itself."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_tokens, direction=direction)
    return [list(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


@pytest.mark.parametrize("model", sorted(TOKENIZERS))
@pytest.mark.parametrize("direction", [RIGHT, LEFT])
def test_cut_texts_keep_exactly_the_ids_of_the_whole_text(model: str, direction: str) -> None:
    path = MODELS / model / "tokenizer.json"
    tokenizer = HuggingFaceTokenizer(path.read_text(encoding="utf-8"))
    rng = random.Random(f"{model}-{direction}")
    cut_short = 0
    for max_tokens in (4, 17, 64):
        budget = max_tokens - Tokenizer.from_file(str(path)).num_special_tokens_to_add(False)
        first_cut = (budget + UNSETTLED_PIECES) * CHARS_PER_TOKEN_GUESS
        texts = _texts(rng, first_cut)
        counted = tokenizer.encode_bounded(texts, max_tokens, direction)
        whole = Tokenizer.from_file(str(path)).encode_batch(texts)
        expected = _reference(path, texts, max_tokens, direction)
        for text, got, want, full in zip(texts, counted, expected, whole, strict=True):
            assert got.ids == want, (max_tokens, text)
            # The count is exact when the whole text was tokenized, else a lower bound that
            # still says the text is over the limit.
            assert got.tokens == len(full.ids) if got.exact else max_tokens < got.tokens
            assert got.tokens <= len(full.ids)
            cut_short += not got.exact
    assert cut_short > 100  # most texts were tokenized only in part: the cut was exercised


# --- the payload cap ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, EnvoyProcess]]:
    root = tmp_path_factory.mktemp("limits")
    with (
        ServerThread.with_fake_models(root / "models", max_request_bytes=LIMIT) as server,
        EnvoyProcess.start([server.target], root / "envoy", max_request_bytes=LIMIT) as envoy,
    ):
        yield server, envoy


BIG = "hello world " * (LIMIT // 10)  # over the cap in any encoding
TOO_LARGE = f"larger than this server's limit of {LIMIT} bytes (its --max-request-bytes setting)"
# Each API's route and its body with one over-long text, and how its error body reads.
SHAPES: dict[str, tuple[dict[str, Any], Any]] = {
    "/v1/embeddings": (
        {"input": [BIG]},
        lambda body: (
            body["error"]["message"]
            if (body["error"]["code"], body["error"]["type"], body["error"]["param"])
            == ("request_too_large", "invalid_request_error", None)
            else None
        ),
    ),
    "/api/embed": ({"input": BIG}, lambda body: body["error"]),  # Ollama
    "/api/embeddings": ({"prompt": BIG}, lambda body: body["error"]),
    "/v2/embed": ({"texts": [BIG]}, lambda body: body["message"]),  # Cohere
    "/v1/rerank": (  # Cohere's "message" and Jina's "detail"
        {"query": "q", "documents": [BIG]},
        lambda body: body["message"] if body["message"] == body["detail"] else None,
    ),
    "/rerank": (  # TEI
        {"query": "q", "texts": [BIG]},
        lambda body: body["error"] if body["error_type"] == "Validation" else None,
    ),
    "/predict": ({"inputs": BIG}, lambda body: body["error"] if body["error_type"] else None),
    "/embed_sparse": ({"inputs": BIG}, lambda body: body["error"]),
    "/embed": ({"inputs": BIG}, lambda body: body["error"] if body["error_type"] else None),
    "/": ({"inputs": BIG}, lambda body: body["error"] if body["error_type"] else None),  # POST
}


@pytest.mark.parametrize("path", sorted(SHAPES))
def test_a_rest_body_over_the_cap_is_413_in_the_apis_shape(
    capped: tuple[ServerThread, EnvoyProcess], path: str
) -> None:
    server, envoy = capped
    body, message_of = SHAPES[path]
    calls_before = sum(len(runtime.calls) for runtime in server.loader.runtimes)
    reply = http(envoy.base_url + path, "POST", body=body)
    assert reply.status == 413, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert TOO_LARGE in message_of(reply.json()), reply.body
    assert not [name for name in reply.headers if name.lower().startswith(("grpc-", "x-http-"))]
    assert sum(len(runtime.calls) for runtime in server.loader.runtimes) == calls_before


def test_a_body_under_the_cap_passes(capped: tuple[ServerThread, EnvoyProcess]) -> None:
    _, envoy = capped
    text = "hello world " * ((LIMIT - 200) // 12)
    reply = http(envoy.base_url + "/v1/embeddings", "POST", body={"input": text, "truncate": True})
    assert reply.status == 200, reply.body
    assert len(reply.json()["data"]) == 1


def _embedder(channel: grpc.Channel) -> Any:
    return pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]


@pytest.mark.parametrize("through", ["server", "envoy"])
def test_a_grpc_message_over_the_cap_is_resource_exhausted_naming_the_setting(
    capped: tuple[ServerThread, EnvoyProcess], through: str
) -> None:
    server, envoy = capped
    target = server.target if through == "server" else envoy.grpc_target
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            _embedder(channel).Embed(pb.EmbedRequest(texts=[BIG]), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = caught.value.details() or ""
        assert f"more than this server's limit of {LIMIT} bytes" in details
        assert "--max-request-bytes" in details
        # The cap is per message: a stream whose messages are each under it may carry more.
        half = "hello world " * (LIMIT // 30)
        requests = [pb.EmbedRequest(texts=[half]) for _ in range(4)]
        replies = list(_embedder(channel).EmbedStream(iter(requests), timeout=30))
        assert sum(len(r.embeddings) for r in replies) == 4


def test_max_request_bytes_is_a_setting_with_a_default_and_a_floor() -> None:
    assert Settings().max_request_bytes == 2 * 1024 * 1024
    assert Settings(max_request_bytes=64 << 20).max_receive_bytes > 64 << 20
    with pytest.raises(ValueError, match="max_request_bytes must be at least 1024"):
        Settings(max_request_bytes=10)


# --- a long text does not stall other callers ---------------------------------------------------


def _small_caller_during(target: str, work: Any) -> list[float]:
    """A small caller's latencies, one call after another, while ``work()`` runs in a thread
    (and for at least ``calls`` calls)."""
    done = threading.Event()

    def run() -> None:
        work()
        done.set()

    worker = threading.Thread(target=run)
    latencies: list[float] = []
    with grpc.insecure_channel(target) as channel:
        stub = _embedder(channel)
        stub.Embed(pb.EmbedRequest(texts=["warm up"]), timeout=60)
        worker.start()
        while not done.is_set() or len(latencies) < 20:
            started = time.perf_counter()
            stub.Embed(pb.EmbedRequest(texts=["hello cat"]), timeout=60)
            latencies.append(time.perf_counter() - started)
    worker.join(120)
    return latencies


def test_a_5mb_text_does_not_stall_other_callers(tmp_path: Path) -> None:
    text = "hello cat dog " * (5_000_000 // 14)  # 5 MB: over the default cap, allowed here
    with ServerThread.with_fake_models(tmp_path / "models", max_request_bytes=8 << 20) as server:
        quiet = _small_caller_during(server.target, lambda: None)

        def big_requests() -> None:
            with grpc.insecure_channel(
                server.target, options=[("grpc.max_send_message_length", 8 << 20)]
            ) as channel:
                stub = _embedder(channel)
                for truncation in (pb.TRUNCATION_END, pb.TRUNCATION_START, pb.TRUNCATION_NONE):
                    try:
                        request = pb.EmbedRequest(texts=[text], truncation=truncation)
                        stub.Embed(request, timeout=120)
                    except grpc.RpcError as error:  # truncation off: too long, said so
                        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
                        assert "at least" in (error.details() or "")

        busy = _small_caller_during(server.target, big_requests)
    # A stalled event loop shows as one call waiting for the whole tokenization (seconds);
    # the bound leaves room for a loaded test machine.
    assert max(busy) < max(10 * statistics.median(quiet), 0.5), (max(busy), quiet)
