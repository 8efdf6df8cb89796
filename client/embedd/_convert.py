"""What the sync and the asyncio clients share besides their methods (:mod:`embedd._calls`):
the result types, the checks of the arguments, the readers of the server's answers (one per
response message), the channel's settings and the bookkeeping of an EmbedStream."""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypedDict

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2

from embedd.errors import EmbeddClientError, InternalServerError, from_rpc_error
from embedd.v1 import embedder_pb2 as pb

DEFAULT_TARGET: Final = "127.0.0.1:50051"

FloatMatrix = npt.NDArray[np.float32]
#: The inputs of an embedding call: one text, or a sequence of texts.
Texts = str | Sequence[str]
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class EmbedResult:
    """The answer of one embedding call: the vectors and what they cost."""

    #: One float32 row per input, in input order: shape (inputs, dimensions).
    vectors: FloatMatrix
    #: The model that computed them (the server's default when none was named).
    model: str
    #: Tokens the inputs took, after truncation.
    prompt_tokens: int


@dataclass(frozen=True)
class TokenizeResult:
    """A text as the model's tokens (special tokens included, untruncated)."""

    model: str
    ids: list[int]
    tokens: list[str]
    count: int
    #: The model's input limit: embedding a text with more tokens truncates (or fails).
    max_input_tokens: int


@dataclass(frozen=True)
class RankedDocument:
    """One document's place in a rerank."""

    #: Its position in the documents given.
    index: int
    #: sigmoid of the cross-encoder's logit, in [0, 1] (the logit with ``raw_scores``).
    score: float
    #: Its text, when ``return_documents`` was asked; else None.
    document: str | None


@dataclass(frozen=True)
class RerankResult:
    """The answer of one rerank: the documents, best first, and what they cost."""

    results: list[RankedDocument]
    model: str
    #: Tokens of every query/document pair as the model read them.
    prompt_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    """A model of the server's catalogue (the fields of ``embedd.v1.Model``)."""

    id: str
    object: str
    created: int
    owned_by: str
    name: str
    dimensions: int
    max_input_tokens: int
    pooling: str
    quantization: str
    loaded: bool
    file_size_bytes: int
    embedding: bool
    normalizes: bool
    engine: str = ""  # "llama.cpp" or "onnxruntime"; "" while not loaded
    task: str = "embed"  # "embed", "rerank" (cross-encoder), "classify" or "sparse" (SPLADE)
    family: str = ""  # "bert", "xlm-roberta", "qwen3", "mpnet", ...
    labels: tuple[str, ...] = ()  # a classifier's or cross-encoder's output labels, in id order


@dataclass(frozen=True)
class LabelScore:
    """One label of a classification and its score."""

    label: str
    #: softmax over the labels (sigmoid per label for a multi-label or one-label model), or
    #: the logit with ``raw_scores``.
    score: float


@dataclass(frozen=True)
class ClassifyResult:
    """The answer of one classification: each input's labels, highest score first."""

    #: One list per input, in input order.
    predictions: list[list[LabelScore]]
    model: str
    prompt_tokens: int


@dataclass(frozen=True)
class SparseVector:
    """One text's sparse vector: the non-zero weights, by token id (ascending)."""

    indices: npt.NDArray[np.int64]
    values: FloatMatrix

    def dense(self, dimensions: int) -> FloatMatrix:
        """The vector with its zeros: ``dimensions`` (the vocabulary size) float32 values."""
        vector = np.zeros(dimensions, dtype=np.float32)
        vector[self.indices] = self.values
        return vector


@dataclass(frozen=True)
class SparseResult:
    """The answer of one sparse embedding call."""

    vectors: list[SparseVector]
    model: str
    #: The vectors' dimension: the model's vocabulary size.
    dimensions: int
    prompt_tokens: int


@dataclass(frozen=True)
class EmbedOptions:
    """The per-call options of an embedding request."""

    model: str = ""
    dimensions: int | None = None
    normalize: bool = True
    truncate: bool = True

    def request(
        self,
        texts: Sequence[str] = (),
        token_ids: Sequence[Sequence[int]] = (),
        request_id: str = "",
    ) -> pb.EmbedRequest:
        """An EmbedRequest carrying these options and the given inputs."""
        request = pb.EmbedRequest(
            model=self.model,
            texts=texts,
            token_ids=[pb.TokenIds(ids=ids) for ids in token_ids],
            normalize=self.normalize,
            truncation=pb.TRUNCATION_END if self.truncate else pb.TRUNCATION_NONE,
            request_id=request_id,
        )
        if self.dimensions is not None:
            request.dimensions = self.dimensions
        return request


# The compact output types: the request's enum value and the dtype of one row's bytes.
# binary/ubinary hold 8 dimensions a byte (sign bits, numpy.packbits order); int8/uint8 one
# dimension a byte (ranges calibrated by the server). As sentence-transformers'
# quantize_embeddings.
COMPACT_TYPES: Final[dict[str, tuple[int, type[np.generic]]]] = {
    "int8": (pb.OUTPUT_TYPE_INT8, np.int8),
    "uint8": (pb.OUTPUT_TYPE_UINT8, np.uint8),
    "binary": (pb.OUTPUT_TYPE_BINARY, np.int8),
    "ubinary": (pb.OUTPUT_TYPE_UBINARY, np.uint8),
}

ByteMatrix = npt.NDArray[np.int8] | npt.NDArray[np.uint8]


def compact_type(output_type: str) -> tuple[int, type[np.generic]]:
    """The enum value and row dtype of a compact output type, or ValueError naming them."""
    found = COMPACT_TYPES.get(output_type)
    if found is None:
        raise ValueError(
            f"output_type must be one of {', '.join(COMPACT_TYPES)}; got {output_type!r}"
        )
    return found


def compact_of(
    response: pb.EmbedResponse, dtype: type[np.generic], expected: int | None = None
) -> ByteMatrix:
    """The response's compact vectors (``Embedding.data``) as an (n, bytes) matrix, rows
    placed by their index."""
    matrix: ByteMatrix = placed_rows(
        response, expected, dtype, lambda row: np.frombuffer(row.data, dtype=dtype)
    )
    return matrix


def classify_result(response: pb.ClassifyResponse) -> ClassifyResult:
    """A ClassifyResponse as a :class:`ClassifyResult`."""
    return ClassifyResult(
        predictions=[
            [LabelScore(item.label, item.score) for item in result.labels]
            for result in response.results
        ],
        model=response.model,
        prompt_tokens=response.usage.prompt_tokens,
    )


def sparse_result(response: pb.EmbedSparseResponse) -> SparseResult:
    """An EmbedSparseResponse as a :class:`SparseResult`."""
    return SparseResult(
        vectors=[
            SparseVector(
                np.asarray(vector.indices, dtype=np.int64),
                np.asarray(vector.values, dtype=np.float32),
            )
            for vector in response.vectors
        ],
        model=response.model,
        dimensions=response.dimensions,
        prompt_tokens=response.usage.prompt_tokens,
    )


def rerank_result(response: pb.RerankResponse) -> RerankResult:
    """A RerankResponse as a :class:`RerankResult`."""
    return RerankResult(
        results=[
            RankedDocument(r.index, r.relevance_score, r.document or None) for r in response.results
        ],
        model=response.model,
        prompt_tokens=response.usage.prompt_tokens,
    )


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    """gRPC channel options: the message size limit, both ways."""
    if max_message_mb < 1:
        raise ValueError(f"max_message_mb must be at least 1; got {max_message_mb}")
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
    ]


# --- the channel: plaintext or TLS ----------------------------------------------------------

#: A PEM file: its path, or its content as bytes.
PemSource = str | os.PathLike[str] | bytes

_SCHEMES = {"https://": True, "http://": False}


@dataclass(frozen=True)
class Connection:
    """How a client reaches its server: the gRPC target, the TLS credentials (None for a
    plaintext channel) and the channel options."""

    target: str
    credentials: grpc.ChannelCredentials | None = dataclasses.field(repr=False)
    options: list[tuple[str, Any]]


class ChannelOptions(TypedDict, total=False):
    """The keyword arguments of a client that shape its channel (see :func:`connection`)."""

    max_message_mb: int
    tls: bool | None
    tls_ca: PemSource | None
    tls_cert: PemSource | None
    tls_key: PemSource | None
    tls_server_name: str | None


def connection(
    target: str,
    *,
    max_message_mb: int = 64,
    tls: bool | None = None,
    tls_ca: PemSource | None = None,
    tls_cert: PemSource | None = None,
    tls_key: PemSource | None = None,
    tls_server_name: str | None = None,
) -> Connection:
    """The channel of a client. TLS when the target starts with ``https://``, when ``tls`` is
    True, or when any ``tls_*`` argument is given; plaintext for ``http://`` or a bare
    ``host:port`` without them.

    ``tls_ca``: the CA certificate(s) that signed the server's certificate (default: grpc's
    bundle of public CAs, or the file GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names). ``tls_cert`` /
    ``tls_key``: this client's certificate chain and private key, for a server that asks for
    one (mutual TLS); they go together. ``tls_server_name``: the name to check the server's
    certificate against when it is not the target's host.
    """
    bare, scheme_tls = _split_scheme(target)
    tls_given = any(value is not None for value in (tls_ca, tls_cert, tls_key, tls_server_name))
    if scheme_tls is False and (tls or tls_given):
        raise ValueError(f"target {target!r} says http:// (plaintext) but TLS options are given")
    if tls is False and (scheme_tls or tls_given):
        raise ValueError("tls=False contradicts an https:// target or tls_* options")
    options: list[tuple[str, Any]] = list(channel_options(max_message_mb))
    if not (tls or scheme_tls or tls_given):
        return Connection(bare, None, options)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together: give both (or neither)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_pem(tls_ca),
        private_key=_pem(tls_key),
        certificate_chain=_pem(tls_cert),
    )
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return Connection(bare, credentials, options)


def _split_scheme(target: str) -> tuple[str, bool | None]:
    """``https://host:port`` -> ("host:port", True); no scheme -> (target, None)."""
    for scheme, secure in _SCHEMES.items():
        if target.lower().startswith(scheme):
            return target[len(scheme) :].rstrip("/"), secure
    return target, None


def _pem(source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).expanduser().read_bytes()


def call_metadata(metadata: Iterable[tuple[str, str]], api_key: str | None) -> Metadata:
    """The metadata sent with every call; an API key becomes ``authorization: Bearer``."""
    pairs = tuple((str(key).lower(), str(value)) for key, value in metadata)
    if api_key:
        pairs += (("authorization", f"Bearer {api_key}"),)
    return pairs


def as_texts(texts: str | Iterable[str]) -> list[str]:
    """One text or many as a list of str (a single str is one input, not its characters)."""
    if isinstance(texts, str):
        return [texts]
    items = list(texts)
    for index, text in enumerate(items):
        check_text(text, index)
    return items


def check_text(text: object, index: int) -> str:
    """The text itself, or TypeError naming the position of the non-str input."""
    if not isinstance(text, str):
        raise TypeError(f"input {index} is a {type(text).__name__}, not a str")
    return text


def as_token_ids(sequences: Iterable[Iterable[int]]) -> list[list[int]]:
    """Pre-tokenized inputs as lists of int (numpy arrays of ids welcome)."""
    return [[int(token) for token in sequence] for sequence in sequences]


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")


def vectors_of(response: pb.EmbedResponse, expected: int | None = None) -> FloatMatrix:
    """The response's vectors as an (n, d) float32 matrix, rows placed by their index."""
    # numpy copies a repeated field in one C loop
    vectors: FloatMatrix = placed_rows(response, expected, np.float32, _VALUES)
    return vectors


_VALUES: Final = operator.attrgetter("values")


def placed_rows(
    response: pb.EmbedResponse,
    expected: int | None,
    dtype: type[np.generic],
    read: Callable[[pb.Embedding], Any],
) -> npt.NDArray[Any]:
    """The response's rows, each ``read`` from its Embedding, as one matrix placed by their
    index; InternalServerError when they are not one row per input of one width."""
    rows = response.embeddings
    count = len(rows)
    if expected is not None and count != expected:
        raise InternalServerError(f"the server returned {count} vectors for {expected} inputs")
    if count == 0:
        return np.empty((0, 0), dtype=dtype)
    width = len(read(rows[0]))
    matrix = np.empty((count, width), dtype=dtype)
    placed = np.zeros(count, dtype=bool)
    for row in rows:
        values = read(row)
        if row.index >= count or placed[row.index] or len(values) != width:
            raise InternalServerError("the server returned malformed vectors")
        matrix[row.index] = values
        placed[row.index] = True
    return matrix


def embed_result(response: pb.EmbedResponse, expected: int | None = None) -> EmbedResult:
    """An EmbedResponse as an :class:`EmbedResult`."""
    return EmbedResult(
        vectors=vectors_of(response, expected),
        model=response.model,
        prompt_tokens=response.usage.prompt_tokens,
    )


def tokenize_result(response: pb.TokenizeResponse) -> TokenizeResult:
    """A TokenizeResponse as a :class:`TokenizeResult`."""
    return TokenizeResult(
        model=response.model,
        ids=list(response.ids),
        tokens=list(response.tokens),
        count=response.count,
        max_input_tokens=response.max_input_tokens,
    )


_MODEL_FIELDS: Final = tuple(field.name for field in dataclasses.fields(ModelInfo))


def model_info(message: pb.Model) -> ModelInfo:
    """A Model message as a :class:`ModelInfo`."""
    fields = {name: getattr(message, name) for name in _MODEL_FIELDS}
    fields["file_size_bytes"] = int(fields["file_size_bytes"])  # a double on the wire
    fields["labels"] = tuple(fields["labels"])
    return ModelInfo(**fields)


def model_list(response: pb.ListModelsResponse) -> list[ModelInfo]:
    """A ListModelsResponse as a list of :class:`ModelInfo`."""
    return [model_info(model) for model in response.data]


def is_serving(response: health_pb2.HealthCheckResponse) -> bool:
    """Whether a health check's answer is SERVING."""
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """Turns a grpc.RpcError raised inside the block into an :class:`EmbeddClientError`."""
    try:
        yield
    except grpc.RpcError as err:
        raise from_rpc_error(err) from err


class StreamState:
    """Bookkeeping of one EmbedStream: the texts read into batches, the batches sent and the
    answers due, in order.

    The request side (a thread of grpc's, or a task) reads texts with :meth:`add` and sends
    each full batch, recording its size; the response side checks each answer against the
    oldest batch still due. A failure of the caller's iterable is kept and raised after the
    batches sent before it are answered.
    """

    def __init__(self, batch_size: int, options: EmbedOptions) -> None:
        self.batch_size = batch_size
        self.options = options
        self.read = 0
        self.sent = 0
        self.answered = 0
        self.error: BaseException | None = None
        self._batch: list[str] = []
        self._due: deque[int] = deque()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Around the reading of the caller's iterable: its exception is kept in ``error``
        (grpc would only log it), so that the texts read before it are still sent and the
        request stream ends normally."""
        try:
            yield
        except Exception as exc:
            self.error = exc

    def add(self, text: object) -> list[pb.EmbedRequest]:
        """Takes the next text: the request of its batch when that is full, else none."""
        self._batch.append(check_text(text, self.read))
        self.read += 1
        return self.rest() if len(self._batch) == self.batch_size else []

    def rest(self) -> list[pb.EmbedRequest]:
        """The request of the batch read so far, if it holds any text."""
        if not self._batch:
            return []
        batch, self._batch = self._batch, []
        return [self.request(batch)]

    def request(self, batch: list[str]) -> pb.EmbedRequest:
        """The request of the next batch, recorded as due."""
        request = self.options.request(texts=batch, request_id=str(self.sent))
        self._due.append(len(batch))
        self.sent += 1
        return request

    def answer(self, response: pb.EmbedResponse) -> FloatMatrix:
        """The vectors of the next due batch, after checking the answer is that batch's."""
        expected_id = str(self.answered)
        if response.request_id != expected_id:
            raise InternalServerError(
                f"EmbedStream answered batch {response.request_id!r} when batch "
                f"{expected_id!r} was due"
            )
        if not self._due:
            raise InternalServerError("EmbedStream answered a batch that was never sent")
        vectors = vectors_of(response, self._due.popleft())
        self.answered += 1
        return vectors

    def finish(self) -> None:
        """At the end of the stream: raise the iterable's failure, or a missing answer."""
        if self.error is not None:
            raise self.error
        if self.answered != self.sent:
            raise InternalServerError(
                f"EmbedStream ended after {self.answered} of {self.sent} batches"
            )

    def failed(self, err: grpc.RpcError) -> BaseException:
        """What to raise when the call failed: the iterable's own error comes first."""
        return self.error if self.error is not None else from_rpc_error(err)

    @contextlib.contextmanager
    def answering(self, call: grpc.Call | grpc.aio.Call) -> Iterator[None]:
        """Around the reading of the answers: a failed call raises :meth:`failed`'s error,
        the end of the answers :meth:`finish`'s; leaving early cancels the call (a no-op
        once it is done)."""
        try:
            yield
            self.finish()
        except grpc.RpcError as err:
            raise self.failed(err) from err
        finally:
            call.cancel()


def stream_requests(texts: Iterable[str], state: StreamState) -> Iterator[pb.EmbedRequest]:
    """Pulls texts lazily, batch by batch, and yields one request per batch."""
    with state.reading():
        for text in texts:
            yield from state.add(text)
    yield from state.rest()


async def async_stream_requests(
    texts: AsyncIterable[str], state: StreamState
) -> AsyncIterator[pb.EmbedRequest]:
    """:func:`stream_requests` for an async iterable of texts."""
    with state.reading():
        async for text in texts:
            for request in state.add(text):
                yield request
    for request in state.rest():
        yield request


__all__ = [
    "DEFAULT_TARGET",
    "EmbedOptions",
    "EmbedResult",
    "EmbeddClientError",
    "FloatMatrix",
    "ModelInfo",
    "StreamState",
    "TokenizeResult",
]
