"""The Python client library (embedd.Client, embedd.AsyncClient) against the fake-engine server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import embedd
from embedd import AsyncClient, Client
from embedd._convert import EmbedOptions, StreamState, call_metadata
from embedd.v1 import embedder_pb2 as pb
from embedd_server.run.probes import free_port
from tests.fakes import WORDS, FakeLoader, fake_vector, slow
from tests.servers import ServerThread


def text_of(number: int) -> str:
    """A distinct text of vocabulary words for each number below 12**3."""
    digits = [(number // len(WORDS) ** place) % len(WORDS) for place in range(3)]
    return " ".join(WORDS[digit] for digit in digits)


def texts(count: int) -> Iterator[str]:
    """A generator, so the stream never sees a list."""
    return (text_of(number) for number in range(count))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    unit: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit


@pytest.fixture
def client(fake_server: ServerThread) -> Iterator[Client]:
    with Client(fake_server.target, timeout=30) as client:
        yield client


# --- embed ----------------------------------------------------------------------------------


def test_embed_shape_dtype_and_normalization(client: Client) -> None:
    vectors = client.embed(["hello world", "the cat sat", "a dog runs fast"])
    assert vectors.shape == (3, 8)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(vectors[0], vectors[1])


def test_single_text_is_one_row_and_batches_agree(client: Client) -> None:
    one = client.embed("the cat sat")
    assert one.shape == (1, 8)
    many = client.embed(["hello world", "the cat sat"])
    np.testing.assert_array_equal(one[0], many[1])


def test_vectors_are_the_engines(client: Client) -> None:
    ids = client.tokenize("hello world").ids
    raw = client.embed("hello world", normalize=False)
    np.testing.assert_allclose(raw[0], fake_vector(ids, 8), rtol=1e-6)
    assert np.linalg.norm(raw[0]) > 2  # the fake's raw vectors are far from unit length
    np.testing.assert_allclose(client.embed("hello world"), unit_rows(raw), rtol=1e-6)


def test_dimensions_keep_the_first_components_renormalized(client: Client) -> None:
    raw = client.embed(["hello world", "the cat"], normalize=False)
    cut = client.embed(["hello world", "the cat"], dimensions=3)
    assert cut.shape == (2, 3)
    np.testing.assert_allclose(cut, unit_rows(raw[:, :3]), rtol=1e-6)
    np.testing.assert_allclose(
        client.embed("hello world", dimensions=3, normalize=False), raw[:1, :3], rtol=1e-6
    )


def test_embed_with_usage_names_the_model_and_tokens(client: Client) -> None:
    result = client.embed_with_usage(["hello world", "the cat sat"], model="other")
    assert result.model == "other"
    assert result.vectors.shape == (2, 4)
    assert result.prompt_tokens == 4 + 5  # [CLS] words [SEP]
    assert client.embed_with_usage("hello").model == "fake"


def test_embed_tokens_equals_embed_of_the_text(client: Client) -> None:
    ids = [client.tokenize(text).ids for text in ("hello world", "a dog runs")]
    np.testing.assert_array_equal(
        client.embed_tokens(ids), client.embed(["hello world", "a dog runs"])
    )
    numpy_ids = [np.array(ids[0], dtype=np.int64)]
    np.testing.assert_array_equal(client.embed_tokens(numpy_ids, dimensions=2).shape, (1, 2))


def test_truncation(client: Client) -> None:
    long_text = " ".join(WORDS * 3)  # 36 words: more than the fake model's 16 tokens
    assert client.embed(long_text).shape == (1, 8)
    with pytest.raises(embedd.InvalidArgument):
        client.embed(long_text, truncate=False)


def test_non_str_inputs_are_refused_before_sending(client: Client) -> None:
    with pytest.raises(TypeError, match="input 1 is a bytes"):
        client.embed(["hello", b"world"])  # type: ignore[list-item]


# --- embed_stream ---------------------------------------------------------------------------


def test_embed_stream_equals_embed(client: Client) -> None:
    batches = list(client.embed_stream(texts(1000), batch_size=7))
    assert [len(batch) for batch in batches] == [7] * 142 + [6]
    np.testing.assert_array_equal(np.concatenate(batches), client.embed(list(texts(1000))))


def test_embed_stream_options(client: Client) -> None:
    batches = list(client.embed_stream(texts(10), batch_size=4, model="other", dimensions=2))
    assert [batch.shape for batch in batches] == [(4, 2), (4, 2), (2, 2)]
    expected = client.embed(list(texts(10)), model="other", dimensions=2)
    np.testing.assert_array_equal(np.concatenate(batches), expected)


def test_embed_stream_reads_lazily_and_stops_when_abandoned(client: Client) -> None:
    pulled = itertools.count()
    readers: set[threading.Thread] = set()  # the threads that pulled texts from it

    def endless() -> Iterator[str]:
        while True:
            readers.add(threading.current_thread())
            yield text_of(next(pulled) % 1000)

    stream = client.embed_stream(endless(), batch_size=5)
    first = list(itertools.islice(stream, 3))
    stream.close()  # cancels the call: an endless generator must not be drained
    # grpcio reads the requests on a thread of its own, which ends with the call.
    (reader,) = readers
    assert reader is not threading.current_thread()
    reader.join(timeout=5)
    assert not reader.is_alive(), "the generator is still being read after close()"
    assert next(pulled) < 10_000  # read lazily: far from drained
    assert [len(batch) for batch in first] == [5, 5, 5]
    np.testing.assert_array_equal(np.concatenate(first), client.embed(list(texts(15))))
    assert client.health()


def test_embed_stream_of_nothing_yields_nothing(client: Client) -> None:
    assert list(client.embed_stream(iter(()))) == []


def test_embed_stream_raises_the_iterables_error_after_the_texts_before_it(
    client: Client,
) -> None:
    def failing() -> Iterator[str]:
        yield from texts(10)
        raise ValueError("the source broke")

    sizes = []
    with pytest.raises(ValueError, match="the source broke"):
        for batch in client.embed_stream(failing(), batch_size=4):
            sizes.append(len(batch))
    assert sizes == [4, 4, 2]


def test_embed_stream_errors(client: Client) -> None:
    with pytest.raises(embedd.NotFound, match="nope"):
        list(client.embed_stream(texts(3), model="nope"))
    with pytest.raises(embedd.InvalidArgument, match="empty"):
        list(client.embed_stream(["hello", ""], batch_size=1))
    with pytest.raises(ValueError, match="batch_size"):
        client.embed_stream(texts(3), batch_size=0)
    with pytest.raises(TypeError):
        client.embed_stream("hello world")


def test_stream_state_checks_request_ids() -> None:
    state = StreamState(2, EmbedOptions())
    assert state.request(["a", "b"]).request_id == "0"
    assert state.request(["c"]).request_id == "1"
    answer = pb.EmbedResponse(
        embeddings=[pb.Embedding(index=0, values=[1.0]), pb.Embedding(index=1, values=[2.0])],
        request_id="0",
    )
    np.testing.assert_array_equal(state.answer(answer), [[1.0], [2.0]])
    with pytest.raises(embedd.InternalServerError, match="batch '5'"):
        state.answer(pb.EmbedResponse(request_id="5"))
    with pytest.raises(embedd.InternalServerError, match="1 of 2"):
        state.finish()


# --- tokenize, models, health ---------------------------------------------------------------


def test_tokenize(client: Client) -> None:
    result = client.tokenize("hello world zebra")
    assert result == embedd.TokenizeResult(
        model="fake",
        ids=[2, 4, 5, 1, 3],
        tokens=["[CLS]", "hello", "world", "[UNK]", "[SEP]"],
        count=5,
        max_input_tokens=16,
    )
    assert client.tokenize("cat", model="other").model == "other"
    with pytest.raises(embedd.InvalidArgument):
        client.tokenize("")


def test_models(client: Client) -> None:
    models = {model.name: model for model in client.models()}
    assert set(models) == {"fake", "other"}
    fake = models["fake"]
    assert isinstance(fake, embedd.ModelInfo)
    assert (fake.id, fake.object, fake.dimensions, fake.max_input_tokens) == (
        "fake",
        "model",
        8,
        16,
    )
    assert fake.loaded and fake.embedding and fake.normalizes
    assert fake.pooling == "mean" and fake.quantization
    assert models["other"].dimensions == 4
    assert client.get_model("other") == models["other"]
    with pytest.raises(embedd.NotFound):
        client.get_model("nope")


def test_health(client: Client) -> None:
    assert client.health() is True
    with Client(f"127.0.0.1:{free_port()}", timeout=5) as nobody:
        assert nobody.health() is False


# --- errors ---------------------------------------------------------------------------------


def test_errors_map_to_classes(client: Client) -> None:
    with pytest.raises(embedd.NotFound) as not_found:
        client.embed("hello", model="nope")
    assert not_found.value.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in not_found.value.details
    with pytest.raises(embedd.InvalidArgument) as empty:
        client.embed([""])
    assert empty.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty" in str(empty.value)
    with pytest.raises(embedd.InvalidArgument, match="dimensions"):
        client.embed("hello", dimensions=0)
    with pytest.raises(embedd.InvalidArgument, match="dimensions"):
        client.embed("hello", dimensions=9)
    with pytest.raises(embedd.InvalidArgument):
        client.embed([])


def test_unreachable_server_is_unavailable() -> None:
    with Client(f"127.0.0.1:{free_port()}") as nobody, pytest.raises(embedd.Unavailable) as err:
        nobody.embed("hello")
    assert isinstance(err.value, embedd.EmbeddClientError)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_deadline_exceeded(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(tmp_path, FakeLoader(slow(1.0))) as slow_server,
        Client(slow_server.target, timeout=0.2) as hasty,
        pytest.raises(embedd.DeadlineExceeded),
    ):
        hasty.embed("hello")


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"details of {self._code.name}"


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, embedd.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, embedd.NotFound),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, embedd.ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, embedd.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, embedd.DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, embedd.Unauthenticated),
        (grpc.StatusCode.INTERNAL, embedd.InternalServerError),
        (grpc.StatusCode.DATA_LOSS, embedd.InternalServerError),
        (grpc.StatusCode.CANCELLED, embedd.Cancelled),
        (grpc.StatusCode.FAILED_PRECONDITION, embedd.EmbeddClientError),
    ],
)
def test_from_rpc_error(code: grpc.StatusCode, cls: type[embedd.EmbeddClientError]) -> None:
    error = embedd.from_rpc_error(_FakeRpcError(code))
    assert type(error) is cls
    assert error.code == code
    assert error.details == str(error) == f"details of {code.name}"


def test_metadata_and_api_key(fake_server: ServerThread) -> None:
    assert call_metadata([("X-Trace", "1")], "secret") == (
        ("x-trace", "1"),
        ("authorization", "Bearer secret"),
    )
    assert call_metadata((), None) == ()
    with Client(fake_server.target, api_key="secret", metadata=[("x-trace", "1")]) as keyed:
        assert keyed.embed("hello").shape == (1, 8)


# --- AsyncClient ----------------------------------------------------------------------------


def test_async_client(fake_server: ServerThread, client: Client) -> None:
    async def scenario() -> None:
        async with AsyncClient(fake_server.target, timeout=30) as aclient:
            vectors = await aclient.embed(["hello world", "the cat sat"])
            assert vectors.shape == (2, 8) and vectors.dtype == np.float32
            np.testing.assert_array_equal(vectors, client.embed(["hello world", "the cat sat"]))
            assert (await aclient.embed("hello", dimensions=3)).shape == (1, 3)
            usage = await aclient.embed_with_usage("hello world", model="other")
            assert (usage.model, usage.prompt_tokens, usage.vectors.shape) == ("other", 4, (1, 4))
            ids = (await aclient.tokenize("hello world")).ids
            assert ids == [2, 4, 5, 3]
            np.testing.assert_array_equal(
                await aclient.embed_tokens([ids]), client.embed("hello world")
            )
            assert {model.name for model in await aclient.models()} == {"fake", "other"}
            assert (await aclient.get_model("other")).dimensions == 4
            assert await aclient.health() is True

            with pytest.raises(embedd.NotFound):
                await aclient.embed("hello", model="nope")
            with pytest.raises(embedd.InvalidArgument):
                await aclient.embed([""])
            with pytest.raises(embedd.InvalidArgument):
                await aclient.embed("hello", dimensions=0)

    asyncio.run(scenario())


def test_async_embed_stream_equals_embed(fake_server: ServerThread, client: Client) -> None:
    expected = client.embed(list(texts(1000)))

    async def source() -> AsyncIterator[str]:
        for text in texts(1000):
            yield text

    async def scenario() -> None:
        async with AsyncClient(fake_server.target) as aclient:
            from_sync = [batch async for batch in aclient.embed_stream(texts(1000), batch_size=7)]
            assert [len(batch) for batch in from_sync] == [7] * 142 + [6]
            np.testing.assert_array_equal(np.concatenate(from_sync), expected)

            from_async = [batch async for batch in aclient.embed_stream(source(), batch_size=7)]
            np.testing.assert_array_equal(np.concatenate(from_async), expected)

            endless = (text_of(number % 1000) for number in itertools.count())
            async with contextlib.aclosing(aclient.embed_stream(endless, batch_size=5)) as stream:
                first = [batch async for batch in _take(stream, 2)]
            np.testing.assert_array_equal(np.concatenate(first), expected[:10])

            with pytest.raises(embedd.NotFound):
                async for _ in aclient.embed_stream(texts(3), model="nope"):
                    pass
            assert await aclient.health()

    asyncio.run(scenario())


async def _take(stream: AsyncIterator[np.ndarray], count: int) -> AsyncIterator[np.ndarray]:
    for _ in range(count):
        yield await anext(stream)


def test_async_unreachable_server() -> None:
    async def scenario() -> None:
        async with AsyncClient(f"127.0.0.1:{free_port()}") as nobody:
            assert await nobody.health() is False
            with pytest.raises(embedd.Unavailable):
                await nobody.embed("hello")

    asyncio.run(scenario())
