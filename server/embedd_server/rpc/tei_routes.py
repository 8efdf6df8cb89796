"""The ``embedd.v1.Tei`` API: Hugging Face TEI's routes ``/embed``, ``/embed_all``,
``/similarity``, ``/rerank``, ``/predict``, ``/embed_sparse``, ``/tokenize``, ``/decode``,
``/info``, ``/ping``, and ``POST /`` and ``/invocations`` (TEI's hosted-endpoint routes,
dispatched by the model's task).

Each translates TEI's request into the core's params and the outcome back into TEI's answer
(bare JSON arrays are ``ListValue`` messages the transcoder prints as such); errors are TEI's
``{"error", "error_type"}`` with TEI's status codes (rpc/status.py's ``tei_status``). Every
rule about inputs, prompts and vectors lives in the core.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from google.api import httpbody_pb2  # type: ignore[import-untyped]
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from embedd.v1 import embedder_pb2 as pb
from embedd_server.compute.engine import FloatMatrix
from embedd_server.core.classifying import ClassifyInput, ClassifyOutcome, ClassifyParams
from embedd_server.core.reranking import RerankParams
from embedd_server.core.service import EmbedParams, SparseOutcome
from embedd_server.core.tokenization import LEFT, RIGHT
from embedd_server.errors import EmptyInput, InvalidInput, Unavailable
from embedd_server.model.catalog import CLASSIFY, RERANK, SPARSE, ModelInfo
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.backend import Backend, Handlers
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.json_fields import json_type

# The requests an invocation (POST /, /invocations) is dispatched as.
Routed = TypeVar(
    "Routed",
    pb.TeiEmbedRequest,
    pb.TeiPredictRequest,
    pb.TeiRerankRequest,
    pb.TeiEmbedSparseRequest,
)

INPUT_SHAPES = (
    "inputs must be a string, a list of token ids, or a list of strings and token-id lists"
)
IDS_SHAPES = "ids must be a list of token ids or a list of such lists"
_TRUNCATE_HINT = 'send "truncate": true'
_MAX_TOKEN_ID = 2**32 - 1
# A number in a ListValue answer: its Value's tag, 8 bytes of double, and its own framing.
_BYTES_PER_NUMBER = 11
# TEI's names of the poolings embedd's models use.
_TEI_POOLINGS = {"last": "last_token"}
# TEI's names of the GGUF float types; quantized types keep their GGUF names (q8_0, ...).
_TEI_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

Input = str | list[int]  # a text, or token ids


@dataclass(frozen=True)
class TeiEmbedOptions:
    """The options of TEI's embedding-shaped requests, as the core takes them."""

    model: str
    truncate: bool
    truncation_direction: str
    prompt_name: str | None
    normalize: bool = True
    dimensions: int | None = None


def _version() -> str:
    try:
        return importlib.metadata.version("embedd")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0+unknown"


async def tei_embed(
    backend: Backend, request: pb.TeiEmbedRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiEmbed (POST /embed)."""
    options = TeiEmbedOptions(
        model=request.model,
        truncate=_truncate(request),
        truncation_direction=tei_direction(request.truncation_direction),
        prompt_name=request.prompt_name or None,
        normalize=request.normalize if request.HasField("normalize") else True,
        dimensions=request.dimensions if request.HasField("dimensions") else None,
    )
    vectors = await _embed(backend, tei_inputs(request.inputs), options, deadline_of(context))
    return vector_messages.nested_list_value(vectors)


async def tei_similarity(
    backend: Backend, request: pb.TeiSimilarityRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiSimilarity (POST /similarity)."""
    if not request.inputs.sentences:
        raise EmptyInput("`inputs.sentences` cannot be empty", param="inputs.sentences")
    parameters = request.parameters
    options = TeiEmbedOptions(
        model=request.model,
        truncate=_truncate(parameters),
        truncation_direction=tei_direction(parameters.truncation_direction),
        prompt_name=parameters.prompt_name or None,
        normalize=False,
    )
    texts: list[Input] = [request.inputs.source_sentence, *request.inputs.sentences]
    vectors = await _embed(backend, texts, options, deadline_of(context))
    answer = struct_pb2.ListValue()
    answer.extend(vector_messages.shortest_float32(cosines(vectors)).tolist())
    return answer


async def tei_embed_all(
    backend: Backend, request: pb.TeiEmbedAllRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiEmbedAll (POST /embed_all)."""
    inputs = tei_inputs(request.inputs)
    if any(not isinstance(item, str) for item in inputs) and not all(
        not isinstance(item, str) for item in inputs
    ):
        raise InvalidInput(
            "embed_all takes texts or token ids, not both in one request.", param="inputs"
        )
    texts = [item for item in inputs if isinstance(item, str)]
    params = EmbedParams(
        model=request.model,
        texts=texts,
        token_ids=[item for item in inputs if not isinstance(item, str)],
        truncate=_truncate(request),
        truncation_direction=tei_direction(request.truncation_direction),
        truncation_hint=_TRUNCATE_HINT,
        prompt_name=(request.prompt_name or None) if texts else None,
        prompt=None if texts else "",
    )
    outcome = await backend.service.token_states(
        params, deadline_of(context), backend.max_answer_bytes // _BYTES_PER_NUMBER
    )
    answer = struct_pb2.ListValue()
    for states in outcome.states:
        answer.values.add().list_value.CopyFrom(vector_messages.nested_list_value(states))
    return answer


async def tei_tokenize(
    backend: Backend, request: pb.TeiTokenizeRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiTokenize (POST /tokenize)."""
    outcome = await backend.service.token_spans(
        request.model,
        tokenize_inputs(request.inputs),
        request.add_special_tokens if request.HasField("add_special_tokens") else True,
        request.prompt_name or None,
    )
    answer = struct_pb2.ListValue()
    for text, spans in zip(outcome.texts, outcome.spans, strict=True):
        row = answer.add_list()
        offsets = byte_offsets(text)
        for span in spans:
            token = row.add_struct()
            if span.special:
                token.update({"id": span.id, "text": span.token, "special": True})
                token.update({"start": None, "stop": None})
            else:
                token.update({"id": span.id, "text": text[span.start : span.stop]})
                token.update({"special": False, "start": int(offsets[span.start])})
                token.update({"stop": int(offsets[span.stop])})
    return answer


async def tei_decode(
    backend: Backend, request: pb.TeiDecodeRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiDecode (POST /decode)."""
    _, texts = await backend.service.decode(
        request.model,
        decode_ids(request.ids),
        request.skip_special_tokens if request.HasField("skip_special_tokens") else True,
    )
    answer = struct_pb2.ListValue()
    answer.extend(texts)
    return answer


async def tei_info(
    backend: Backend, request: pb.TeiInfoRequest, context: Context
) -> pb.TeiInfoResponse:
    """Tei.TeiInfo (GET /info)."""
    status = await backend.service.get_model(request.model)
    settings = backend.service.settings
    info = status.info
    onnx = status.engine.startswith("onnxruntime")
    null = struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
    return pb.TeiInfoResponse(
        model_id=info.name,
        model_sha=null,
        model_dtype=_TEI_DTYPES.get(info.quantization, info.quantization),
        served_model_name=info.name,
        model_type=tei_model_type(info, status.pooling or info.pooling),
        max_concurrent_requests=settings.max_queued_texts,
        max_input_length=info.max_input_tokens,
        max_batch_tokens=settings.onnx_batch_tokens if onnx else settings.batch_tokens,
        max_batch_requests=null,
        max_client_batch_size=settings.max_inputs_per_request,
        auto_truncate=True,
        # asyncio.to_thread's default executor, where long texts are tokenized.
        tokenization_workers=min(32, (os.cpu_count() or 1) + 4),
        version=_version(),
        sha=null,
        docker_label=null,
    )


async def tei_ping(
    backend: Backend, request: pb.TeiPingRequest, context: Context
) -> httpbody_pb2.HttpBody:
    """Tei.TeiPing (GET /ping)."""
    if not backend.serving():
        raise Unavailable("unhealthy: the server is starting, draining or without workers.")
    return httpbody_pb2.HttpBody(content_type="text/plain", data=b"")


async def tei_invoke(
    backend: Backend, request: pb.TeiInvokeRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiInvoke (POST /, POST /invocations)."""
    info = (await backend.service.get_model(request.model)).info
    if info.task == CLASSIFY:
        return await tei_predict(backend, _routed(request, pb.TeiPredictRequest, info), context)
    if info.task == RERANK:
        return await tei_rerank(backend, _routed(request, pb.TeiRerankRequest, info), context)
    if info.task == SPARSE:
        sparse = _routed(request, pb.TeiEmbedSparseRequest, info)
        return await tei_embed_sparse(backend, sparse, context)
    if request.inputs.WhichOneof("kind") == "struct_value":
        return await tei_similarity(backend, _similarity_request(request, info), context)
    return await tei_embed(backend, _routed(request, pb.TeiEmbedRequest, info), context)


async def _embed(
    backend: Backend, inputs: list[Input], options: TeiEmbedOptions, deadline: float | None
) -> FloatMatrix:
    """The vectors of texts and token-id lists, in order (each kind embedded apart: the
    core takes one kind per call)."""
    texts = [i for i, item in enumerate(inputs) if isinstance(item, str)]
    ids = [i for i, item in enumerate(inputs) if not isinstance(item, str)]
    parts: list[tuple[list[int], FloatMatrix]] = []
    for positions in (group for group in (texts, ids) if group):
        chosen = [inputs[i] for i in positions]
        are_texts = positions is texts
        params = EmbedParams(
            model=options.model,
            texts=[item for item in chosen if isinstance(item, str)],
            token_ids=[item for item in chosen if not isinstance(item, str)],
            dimensions=options.dimensions,
            normalize=options.normalize,
            truncate=options.truncate,
            truncation_direction=options.truncation_direction,
            truncation_hint=_TRUNCATE_HINT,
            # Token ids are the model's tokens as they are: no prompt goes before them.
            prompt_name=options.prompt_name if are_texts else None,
            prompt=None if are_texts else "",
        )
        outcome = await backend.service.embed(params, deadline)
        parts.append((positions, outcome.vectors))
    if len(parts) == 1:
        return parts[0][1]
    width = parts[0][1].shape[1]
    merged = np.empty((len(inputs), width), dtype=np.float32)
    for positions, vectors in parts:
        merged[positions] = vectors
    return merged


def _truncate(
    request: pb.TeiEmbedRequest | pb.TeiEmbedAllRequest | pb.TeiSimilarityParameters,
) -> bool:
    """TEI's ``truncate``: unset is true here (TEI's --auto-truncate, on in embedd)."""
    return request.truncate if request.HasField("truncate") else True


def tei_inputs(value: struct_pb2.Value) -> list[Input]:
    """TEI's ``inputs`` of /embed and /embed_all as its deserializer reads them: a string, a
    list of token ids (one input), or a list of strings and token-id lists (a batch)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return [value.string_value]
    if kind != "list_value":
        raise InvalidInput(f"{INPUT_SHAPES}; got {json_type(value)}.", param="inputs")
    items = list(value.list_value.values)
    if not items:
        raise EmptyInput("`inputs` cannot be empty", param="inputs")
    if all(item.WhichOneof("kind") == "number_value" for item in items):
        return [token_ids(items, "inputs")]
    batch: list[Input] = []
    for index, item in enumerate(items):
        where = f"inputs[{index}]"
        kind = item.WhichOneof("kind")
        if kind == "string_value":
            batch.append(item.string_value)
        elif kind == "list_value":
            batch.append(token_ids(list(item.list_value.values), where))
        else:
            raise InvalidInput(f"{where} is {json_type(item)}; {INPUT_SHAPES}.", param=where)
    return batch


def tokenize_inputs(value: struct_pb2.Value) -> list[str]:
    """TEI's ``inputs`` of /tokenize: a string or a list of strings."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return [value.string_value]
    items = list(value.list_value.values) if kind == "list_value" else []
    if kind != "list_value" or any(i.WhichOneof("kind") != "string_value" for i in items):
        raise InvalidInput(
            f"inputs must be a string or a list of strings; got {json_type(value)}.",
            param="inputs",
        )
    if not items:
        raise EmptyInput("`inputs` cannot be empty", param="inputs")
    return [item.string_value for item in items]


def decode_ids(value: struct_pb2.Value) -> list[list[int]]:
    """TEI's ``ids`` of /decode: a list of token ids, or a list of such lists."""
    if value.WhichOneof("kind") != "list_value":
        raise InvalidInput(f"{IDS_SHAPES}; got {json_type(value)}.", param="ids")
    items = list(value.list_value.values)
    if all(item.WhichOneof("kind") == "number_value" for item in items):
        return [token_ids(items, "ids")]  # [] too: one empty list, as TEI reads it
    batch = []
    for index, item in enumerate(items):
        if item.WhichOneof("kind") != "list_value":
            raise InvalidInput(
                f"ids[{index}] is {json_type(item)}; {IDS_SHAPES}.", param=f"ids[{index}]"
            )
        batch.append(token_ids(list(item.list_value.values), f"ids[{index}]"))
    return batch


def byte_offsets(text: str) -> npt.NDArray[np.int64]:
    """Per character offset of ``text`` (0 to its length), the UTF-8 byte offset: TEI's
    token offsets count bytes (Rust's strings), Python's tokenizers count characters."""
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    sizes = 1 + (points >= 0x80) + (points >= 0x800) + (points >= 0x10000)
    offsets = np.zeros(len(points) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def token_ids(items: list[struct_pb2.Value], where: str) -> list[int]:
    """A JSON list of token ids (integers from 0 to 2^32 - 1)."""
    ids: list[int] = []
    for index, item in enumerate(items):
        number = item.number_value if item.WhichOneof("kind") == "number_value" else -1.0
        if not (number.is_integer() and 0 <= number <= _MAX_TOKEN_ID):
            raise InvalidInput(
                f"{where}[{index}] is not a token id (an integer from 0 to {_MAX_TOKEN_ID}).",
                param=f"{where}[{index}]",
            )
        ids.append(int(number))
    return ids


def cosines(vectors: FloatMatrix) -> FloatMatrix:
    """The cosine of the first row with each other row (0 where a row is all zeros)."""
    rows = vectors.astype(np.float64)
    norms = np.linalg.norm(rows, axis=1)
    dots = rows[1:] @ rows[0]
    scale = norms[1:] * norms[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        found = np.where(scale > 0, dots / np.where(scale > 0, scale, 1.0), 0.0)
    result: FloatMatrix = found.astype(np.float32)
    return result


def tei_model_type(info: ModelInfo, pooling: str) -> struct_pb2.Struct:
    """TEI's model_type: {"embedding": {"pooling"}}, {"classifier": {"id2label",
    "label2id"}} or {"reranker": {...}}."""
    model_type = struct_pb2.Struct()
    if info.task in (CLASSIFY, RERANK):
        labels = info.label_names or tuple(f"LABEL_{i}" for i in range(max(1, info.labels)))
        model_type.update(
            {
                "classifier" if info.task == CLASSIFY else "reranker": {
                    "id2label": {str(i): label for i, label in enumerate(labels)},
                    "label2id": {label: i for i, label in enumerate(labels)},
                }
            }
        )
    else:
        name = "splade" if info.task == SPARSE else _TEI_POOLINGS.get(pooling, pooling)
        model_type.update({"embedding": {"pooling": name}})
    return model_type


def _routed(request: pb.TeiInvokeRequest, kind: type[Routed], info: ModelInfo) -> Routed:
    """The request of the route ``POST /`` dispatches to, for ``info``'s model: each field of
    ``kind`` copied from the invocation's field of the same name (an optional scalar only when
    it was set, so the route's own default applies otherwise)."""
    routed = kind(model=info.name)
    source: Message = request  # fields by name, as the descriptor gives them
    for field in kind.DESCRIPTOR.fields:
        if field.name == "model":
            continue
        value = getattr(request, field.name)
        if field.message_type is not None:
            getattr(routed, field.name).CopyFrom(value)
        elif field.is_repeated:
            getattr(routed, field.name).extend(value)
        elif not field.has_presence or source.HasField(field.name):
            setattr(routed, field.name, value)
    return routed


def _similarity_request(request: pb.TeiInvokeRequest, info: ModelInfo) -> pb.TeiSimilarityRequest:
    fields = request.inputs.struct_value.fields
    source = fields.get("source_sentence")
    if source is None or source.WhichOneof("kind") != "string_value":
        raise InvalidInput(
            'inputs.source_sentence must be a string: a similarity request is {"inputs": '
            '{"source_sentence": "...", "sentences": ["...", ...]}}.',
            param="inputs.source_sentence",
        )
    sentences = fields.get("sentences")
    items = sentences.list_value.values if sentences is not None else []
    if (
        sentences is None
        or sentences.WhichOneof("kind") != "list_value"
        or any(item.WhichOneof("kind") != "string_value" for item in items)
    ):
        raise InvalidInput("inputs.sentences must be a list of strings.", param="inputs.sentences")
    return pb.TeiSimilarityRequest(
        inputs=pb.TeiSimilarityInputs(
            source_sentence=source.string_value,
            sentences=[item.string_value for item in items],
        ),
        parameters=request.parameters,
        model=info.name,
    )


async def tei_predict(
    backend: Backend, request: pb.TeiPredictRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiPredict (POST /predict)."""
    inputs, batch = predict_inputs(request.inputs)
    params = ClassifyParams(
        model=request.model,
        inputs=inputs,
        raw_scores=request.raw_scores,
        truncate=request.truncate if request.HasField("truncate") else True,
        truncation_direction=tei_direction(request.truncation_direction),
        truncation_hint=_TRUNCATE_HINT,
    )
    outcome = await backend.service.classify(params, deadline_of(context))
    return _tei_predictions(outcome, batch)


async def tei_embed_sparse(
    backend: Backend, request: pb.TeiEmbedSparseRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiEmbedSparse (POST /embed_sparse)."""
    params = EmbedParams(
        model=request.model,
        texts=tei_texts(request.inputs),
        truncate=request.truncate if request.HasField("truncate") else True,
        truncation_direction=tei_direction(request.truncation_direction),
        truncation_hint=_TRUNCATE_HINT,
        prompt_name=request.prompt_name or None,
    )
    outcome = await backend.service.embed_sparse(params, deadline_of(context))
    return _tei_sparse(outcome)


async def tei_rerank(
    backend: Backend, request: pb.TeiRerankRequest, context: Context
) -> struct_pb2.ListValue:
    """Tei.TeiRerank (POST /rerank)."""
    params = RerankParams(
        model=request.model,
        query=request.query,
        documents=list(request.texts),
        return_documents=request.return_text,
        raw_scores=request.raw_scores,
        truncate=request.truncate if request.HasField("truncate") else True,
    )
    outcome = await backend.service.rerank(params, deadline_of(context))
    results = struct_pb2.ListValue()
    for r in outcome.results:
        item = results.add_struct()
        item.update({"index": r.index, "score": r.score})
        if r.document is not None:
            item["text"] = r.document
    return results


PREDICT_SHAPES = (
    'inputs must be a string, a pair [string, string], or a batch of them [["a"], ["a", "b"], ...]'
)


def tei_direction(value: str) -> str:
    """TEI's truncation_direction ("right" by default, or "left"; any case) as the core's."""
    direction = value.lower() or RIGHT
    if direction not in (LEFT, RIGHT):
        raise InvalidInput(
            f"truncation_direction must be 'right' or 'left'; got '{value[:40]}'.",
            param="truncation_direction",
        )
    return direction


def tei_texts(value: struct_pb2.Value) -> list[str]:
    """TEI's ``inputs`` of the embedding routes: a string or a list of strings."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return [value.string_value]
    if kind == "list_value":
        texts: list[str] = []
        for index, item in enumerate(value.list_value.values):
            if item.WhichOneof("kind") != "string_value":
                raise InvalidInput(
                    f"inputs[{index}] is not a string; inputs must be a string or a list of "
                    "strings.",
                    param=f"inputs[{index}]",
                )
            texts.append(item.string_value)
        return texts
    raise InvalidInput("inputs must be a string or a list of strings.", param="inputs")


def predict_inputs(value: struct_pb2.Value) -> tuple[list[ClassifyInput], bool]:
    """TEI's /predict ``inputs`` as the core's inputs, and whether it was a batch: a string
    (one text), a list of one or two strings (one text or a pair), or a list of such lists
    (a batch), read as TEI's deserializer reads them."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return [(value.string_value,)], False
    if kind != "list_value" or not value.list_value.values:
        raise InvalidInput(f"{PREDICT_SHAPES}.", param="inputs")
    items = list(value.list_value.values)
    if items[0].WhichOneof("kind") == "string_value":
        return [_sequence(items, "inputs")], False
    batch: list[ClassifyInput] = []
    for index, item in enumerate(items):
        if item.WhichOneof("kind") != "list_value":
            raise InvalidInput(
                f"inputs[{index}] is not a list; {PREDICT_SHAPES}.", param=f"inputs[{index}]"
            )
        batch.append(_sequence(list(item.list_value.values), f"inputs[{index}]"))
    return batch, True


def _sequence(items: list[struct_pb2.Value], where: str) -> ClassifyInput:
    """One or two strings: a text or a pair."""
    if not 1 <= len(items) <= 2 or any(i.WhichOneof("kind") != "string_value" for i in items):
        if where == "inputs":  # the whole of inputs: say what it may be
            raise InvalidInput(f"{PREDICT_SHAPES}; got a list of {len(items)}.", param=where)
        raise InvalidInput(
            f"{where} must be one string or a pair of strings; {PREDICT_SHAPES}.", param=where
        )
    if len(items) == 1:
        return (items[0].string_value,)
    return (items[0].string_value, items[1].string_value)


def _tei_predictions(outcome: ClassifyOutcome, batch: bool) -> struct_pb2.ListValue:
    """TEI's predict answer: [{"score", "label"}, ...] for one input, a list of them for a
    batch."""
    answer = struct_pb2.ListValue()
    for predictions in outcome.predictions:
        target = answer.add_list() if batch else answer
        for prediction in predictions:
            target.add_struct().update({"score": prediction.score, "label": prediction.label})
    return answer


def _tei_sparse(outcome: SparseOutcome) -> struct_pb2.ListValue:
    """TEI's embed_sparse answer: one [{"index", "value"}, ...] per input."""
    answer = struct_pb2.ListValue()
    for indices, values in outcome.rows:
        row = answer.add_list()
        for index, weight in zip(indices.tolist(), values.tolist(), strict=True):
            row.add_struct().update({"index": index, "value": weight})
    return answer


SERVICE = pb.DESCRIPTOR.services_by_name["Tei"]
HANDLERS: Handlers = {
    "TeiEmbed": tei_embed,
    "TeiEmbedAll": tei_embed_all,
    "TeiSimilarity": tei_similarity,
    "TeiRerank": tei_rerank,
    "TeiPredict": tei_predict,
    "TeiEmbedSparse": tei_embed_sparse,
    "TeiTokenize": tei_tokenize,
    "TeiDecode": tei_decode,
    "TeiInfo": tei_info,
    "TeiPing": tei_ping,
    "TeiInvoke": tei_invoke,
}
