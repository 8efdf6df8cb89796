"""Property-based tests of the native gRPC surface: a fake-engine server over a real channel.

Random EmbedRequests (texts empty, huge, non-BMP, control characters; token ids up to 2**32-1;
dimensions 0..2**32-1; truncation values the enum does not name; up to a few thousand inputs)
must be answered either OK with the right shape (one vector per input, in order, each of the
requested length, unit norm unless normalize is off) or with a clean status (INVALID_ARGUMENT,
NOT_FOUND or RESOURCE_EXHAUSTED and a message), never INTERNAL or UNKNOWN. The fake engine's
vector of an input does not depend on what it is batched with. Raw bytes that are not an
EmbedRequest get grpcio's own answer. The server the tests fuzzed is healthy afterwards (the
module's server fixture checks it at teardown). Derandomized throughout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from tests.servers import ServerThread

# The fake models: 'fake' (the default) has 8 dimensions, 'other' 4; both have a 16-token limit
# and the token ids 0..15.
DIMENSIONS = {"": 8, "fake": 8, "other": 4}
VOCAB = 16
MAX_TOKENS = 16
MAX_INPUTS = 2048  # Settings.max_inputs_per_request's default
CLEAN_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
EXAMPLES = 600

# A failing example with a 100 kB text makes Hypothesis warn about its repr; the failure is
# what matters (and pyproject turns warnings into errors).
# Every test here fuzzes one shared server with hundreds of requests: slow (make test-fast).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
    pytest.mark.slow,
]

FUZZ_SETTINGS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    print_blob=False,
)


@dataclass(frozen=True, repr=False)
class Native:
    server: ServerThread
    channel: grpc.Channel
    stub: Any

    def __repr__(self) -> str:  # short, in Hypothesis' failure reports
        return f"Native({self.server.target})"


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Native]:
    """One server for the whole module. After the tests that used it (whichever ran, in any
    order), the same server must still be healthy: checked here, at teardown, so that a
    server the fuzzing broke fails the run (as an error of the last test that used it)."""
    root = tmp_path_factory.mktemp("fuzz-grpc")
    with (
        ServerThread.with_fake_models(root / "models", metrics_port=0) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        fuzzed = Native(server, channel, stub)
        yield fuzzed
        assert_healthy(fuzzed)


async def _no_op() -> None:
    return None


def assert_healthy(native: Native) -> None:
    """SERVING (the server and the Embedder service), normal requests answered, and the
    server's event loop still runs."""
    health = health_pb2_grpc.HealthStub(native.channel)
    for service in ("", "embedd.v1.Embedder"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    answer = native.stub.Embed(pb.EmbedRequest(texts=["hello world", "a dog"]), timeout=30)
    assert [len(e.values) for e in answer.embeddings] == [8, 8]
    native.server.call(_no_op())


# --- strategies --------------------------------------------------------------------------------

WORDS = st.sampled_from(["hello", "world", "the", "cat", "sat", "on", "mat", "dog", "zebra"])
# Protobuf strings are UTF-8: lone surrogates cannot be sent (the raw-bytes test covers them).
ANY_CHARACTER = st.characters(codec="utf-8")
NON_EMPTY_TEXTS = st.one_of(
    st.lists(WORDS, min_size=1, max_size=30).map(" ".join),
    st.text(ANY_CHARACTER, min_size=1, max_size=40),
    st.text(st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF), min_size=1, max_size=10),
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), min_size=1, max_size=10),
    st.tuples(st.text(ANY_CHARACTER, min_size=1, max_size=6), st.integers(1, 50_000)).map(
        lambda args: args[0] * args[1]
    ),
)
TEXTS = NON_EMPTY_TEXTS | st.just("")
TOKEN_IDS = st.lists(
    st.one_of(
        st.integers(min_value=0, max_value=VOCAB - 1),
        st.integers(min_value=0, max_value=2**32 - 1),
        st.sampled_from([VOCAB, 2**31, 2**32 - 1]),
    ),
    max_size=40,
)
INPUT_COUNTS = st.one_of(
    st.integers(min_value=0, max_value=6), st.integers(min_value=MAX_INPUTS - 2, max_value=2100)
)
MODELS = st.one_of(
    st.sampled_from(["", "fake", "other"]),
    st.sampled_from(["nope", "FAKE", "../fake", "fake.gguf", "m" * 300, "a/b", ".hidden"]),
    st.text(ANY_CHARACTER, max_size=20),
)
TRUNCATIONS = st.one_of(  # proto3 enums are open: values the enum does not name travel too
    st.sampled_from(list(pb.Truncation.values())),
    st.integers(min_value=-(2**31), max_value=2**31 - 1).map(pb.Truncation.ValueType),
)


@st.composite
def valid_embed_requests(draw: st.DrawFn) -> pb.EmbedRequest:
    """Requests that should succeed, bar an over-long text with TRUNCATION_NONE or a model
    that does not exist."""
    model = draw(st.sampled_from(["", "fake", "other"]) | MODELS)  # now and then, no such model
    request = pb.EmbedRequest(model=model, truncation=draw(TRUNCATIONS))
    if draw(st.booleans()):
        request.texts.extend(draw(st.lists(NON_EMPTY_TEXTS, min_size=1, max_size=8)))
    else:
        ids = st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=40)
        request.token_ids.extend(
            pb.TokenIds(ids=sequence) for sequence in draw(st.lists(ids, min_size=1, max_size=8))
        )
    if draw(st.booleans()):
        request.dimensions = draw(st.integers(min_value=1, max_value=DIMENSIONS.get(model, 8)))
    if draw(st.booleans()):
        request.normalize = draw(st.booleans())
    return request


@st.composite
def odd_embed_requests(draw: st.DrawFn) -> pb.EmbedRequest:
    """Anything goes: unknown models, empty and mixed inputs, absurd dimensions, many inputs."""
    request = pb.EmbedRequest(
        model=draw(MODELS),
        truncation=draw(TRUNCATIONS),
        request_id=draw(st.text(ANY_CHARACTER, max_size=20)),
    )
    kind = draw(st.sampled_from(["texts", "token_ids", "both", "neither", "many"]))
    if kind in ("texts", "both"):
        request.texts.extend(draw(st.lists(TEXTS, max_size=6)))
    if kind in ("token_ids", "both"):
        sequences = draw(st.lists(TOKEN_IDS, max_size=6))
        request.token_ids.extend(pb.TokenIds(ids=ids) for ids in sequences)
    if kind == "many":  # around the per-request limit
        text = draw(st.lists(WORDS, min_size=1, max_size=3).map(" ".join))
        request.texts.extend([text] * draw(INPUT_COUNTS))
    if draw(st.booleans()):
        request.dimensions = draw(
            st.one_of(
                st.integers(min_value=0, max_value=10),
                st.integers(min_value=0, max_value=2**32 - 1),
            )
        )
    if draw(st.booleans()):
        request.normalize = draw(st.booleans())
    return request


embed_requests = valid_embed_requests() | odd_embed_requests()


def expected_ok(request: pb.EmbedRequest) -> bool | None:
    """Whether the request must succeed (True), must fail (False), or either (None)."""
    count = len(request.texts) + len(request.token_ids)
    dimensions = DIMENSIONS.get(request.model, 0)
    strict = request.truncation == pb.TRUNCATION_NONE
    invalid = (
        request.truncation not in pb.Truncation.values()  # an unknown value: INVALID_ARGUMENT
        or request.model not in DIMENSIONS
        or (request.texts and request.token_ids)
        or not 1 <= count <= MAX_INPUTS
        or not all(request.texts)
        or (request.HasField("dimensions") and not 1 <= request.dimensions <= dimensions)
        or any(
            not sequence.ids
            or max(sequence.ids) >= VOCAB
            or (strict and len(sequence.ids) > MAX_TOKENS)
            for sequence in request.token_ids
        )
    )
    if invalid:
        return False
    if strict and request.texts:
        return None  # depends on the tokenizer's count
    return True


# --- properties --------------------------------------------------------------------------------


@settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
@given(request=embed_requests)
def test_embed_answers_ok_with_the_right_shape_or_a_clean_error(
    native: Native, request: pb.EmbedRequest
) -> None:
    expected = expected_ok(request)
    try:
        reply = native.stub.Embed(request, timeout=60)
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
        event(code.name)
        assert code in CLEAN_ERRORS, (code, details)
        assert details
        assert len(details) < 2000, details[:200]
        assert expected is not True, (code, details)
        return
    event("OK")
    assert expected is not False, reply
    count = len(request.texts) + len(request.token_ids)
    dimensions = request.dimensions if request.HasField("dimensions") else DIMENSIONS[request.model]
    assert reply.model == (request.model or "fake")
    assert reply.request_id == request.request_id
    assert [e.index for e in reply.embeddings] == list(range(count))
    vectors = np.array([list(e.values) for e in reply.embeddings], dtype=np.float32)
    assert vectors.shape == (count, dimensions)
    assert np.isfinite(vectors).all()
    if request.normalize or not request.HasField("normalize"):
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, rtol=1e-5)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens >= count


@settings(FUZZ_SETTINGS, max_examples=EXAMPLES // 3)
@given(
    batch=st.lists(st.lists(WORDS, min_size=1, max_size=12).map(" ".join), min_size=1, max_size=12),
    data=st.data(),
)
def test_vectors_do_not_depend_on_the_batch(
    native: Native, batch: list[str], data: st.DataObject
) -> None:
    """The same text gets the same vector alone, in any batch, at any position."""
    position = data.draw(st.integers(min_value=0, max_value=len(batch) - 1))
    model = data.draw(st.sampled_from(["fake", "other"]))
    text = batch[position]
    alone = native.stub.Embed(pb.EmbedRequest(model=model, texts=[text]), timeout=30)
    together = native.stub.Embed(pb.EmbedRequest(model=model, texts=batch), timeout=30)
    reversed_ = native.stub.Embed(pb.EmbedRequest(model=model, texts=batch[::-1]), timeout=30)
    expected = np.array(alone.embeddings[0].values)
    np.testing.assert_allclose(together.embeddings[position].values, expected, rtol=1e-6)
    mirrored = len(batch) - 1 - position
    np.testing.assert_allclose(reversed_.embeddings[mirrored].values, expected, rtol=1e-6)
    ids = native.stub.Tokenize(pb.TokenizeRequest(model=model, text=text), timeout=30).ids
    by_ids = native.stub.Embed(
        pb.EmbedRequest(model=model, token_ids=[pb.TokenIds(ids=ids)] * 2), timeout=30
    )
    for embedding in by_ids.embeddings:
        np.testing.assert_allclose(embedding.values, expected, rtol=1e-6)


@settings(FUZZ_SETTINGS, max_examples=EXAMPLES // 3)
@given(model=MODELS, text=TEXTS)
def test_tokenize_answers_or_fails_cleanly(native: Native, model: str, text: str) -> None:
    try:
        reply = native.stub.Tokenize(pb.TokenizeRequest(model=model, text=text), timeout=60)
    except grpc.RpcError as error:
        assert error.code() in CLEAN_ERRORS, (error.code(), error.details())
        assert error.details()
        return
    assert reply.count == len(reply.ids) == len(reply.tokens) >= 2  # [CLS] ... [SEP]
    assert all(0 <= token_id < VOCAB for token_id in reply.ids)
    assert reply.max_input_tokens == MAX_TOKENS


# --- raw bytes ---------------------------------------------------------------------------------

RAW_BYTES = st.one_of(
    st.binary(max_size=200),
    # texts (field 2) or model (field 1) holding invalid UTF-8: a CESU-8 lone surrogate, ...
    st.sampled_from([b"\x12\x03\xed\xa0\x80", b"\x12\x01\xff", b"\x0a\x02\xc3\x28"]),
    # A valid request cut short, or with junk appended.
    st.tuples(embed_requests, st.integers(min_value=1, max_value=50), st.binary(max_size=8)).map(
        lambda args: args[0].SerializeToString()[: -args[1]] + args[2]
    ),
)


@settings(FUZZ_SETTINGS, max_examples=EXAMPLES)
@given(raw=RAW_BYTES)
def test_raw_bytes_get_grpcios_own_answer(native: Native, raw: bytes) -> None:
    """Bytes sent as they are. When they do not parse as an EmbedRequest the servicer is never
    called: grpc.aio's server answers UNKNOWN "Unexpected <class 'DecodeError'>: ..." itself
    (grpcio 1.85's behaviour for a request deserializer that raises). When they parse (protobuf
    is lenient: b"" is an empty request), the answer is a normal one."""
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = native.channel.unary_unary(
        "/embedd.v1.Embedder/Embed", request_serializer=None, response_deserializer=None
    )
    try:
        reply = call(raw, timeout=30)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        event(code.name)
        if code is grpc.StatusCode.UNKNOWN:
            assert "DecodeError" in details, details
            with pytest.raises(Exception, match="Error parsing message"):
                pb.EmbedRequest.FromString(raw)
        else:
            assert code in CLEAN_ERRORS, (code, details)
            assert details
        return
    event("OK")
    pb.EmbedResponse.FromString(reply)
