"""The RPCs of the tasks beyond embedding and reranking: native ``Classify`` and
``EmbedSparse``, and TEI's ``/predict`` (``TeiPredict``) and ``/embed_sparse``
(``TeiEmbedSparse``).

Each translates its request into the core's params and the outcome back into its API's shape:
TEI's answers are bare JSON arrays, so they are ``ListValue`` messages the transcoder prints as
such. Every rule about inputs, labels and scores lives in the core.
"""

from __future__ import annotations

from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.classifying import ClassifyInput, ClassifyOutcome, ClassifyParams
from embedd_server.core.service import EmbeddingService, EmbedParams, SparseOutcome
from embedd_server.core.tokenization import LEFT, RIGHT
from embedd_server.errors import InvalidInput
from embedd_server.rpc.context import Context, deadline_of
from embedd_server.rpc.status import tei_error_body, translate_errors
from embedd_server.rpc.truncation import native_truncation

PREDICT_SHAPES = (
    'inputs must be a string, a pair [string, string], or a batch of them [["a"], ["a", "b"], ...]'
)
_TEI_TRUNCATE_HINT = 'send "truncate": true'
_NATIVE_TRUNCATE_HINT = "set truncation to TRUNCATION_END or TRUNCATION_START"


class TaskRoutes:
    """Classification and sparse-vector RPCs of embedd.v1.Embedder (mixed into its servicer)."""

    def __init__(self, service: EmbeddingService) -> None:
        self._task_service = service

    @translate_errors()
    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        truncate, direction = native_truncation(request.truncation)
        params = ClassifyParams(
            model=request.model,
            inputs=[_native_input(item) for item in request.inputs],
            raw_scores=request.raw_scores,
            truncate=truncate,
            truncation_direction=direction,
            truncation_hint=_NATIVE_TRUNCATE_HINT,
        )
        outcome = await self._task_service.classify(params, deadline_of(context))
        return pb.ClassifyResponse(
            model=outcome.model,
            results=[
                pb.Classification(
                    labels=[pb.LabelScore(label=p.label, score=p.score) for p in predictions]
                )
                for predictions in outcome.predictions
            ],
            usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
            request_id=request.request_id,
        )

    @translate_errors(tei_error_body)
    async def TeiPredict(
        self, request: pb.TeiPredictRequest, context: Context
    ) -> struct_pb2.ListValue:
        inputs, batch = predict_inputs(request.inputs)
        params = ClassifyParams(
            model=request.model,
            inputs=inputs,
            raw_scores=request.raw_scores,
            truncate=request.truncate if request.HasField("truncate") else True,
            truncation_direction=tei_direction(request.truncation_direction),
            truncation_hint=_TEI_TRUNCATE_HINT,
        )
        outcome = await self._task_service.classify(params, deadline_of(context))
        return _tei_predictions(outcome, batch)

    @translate_errors()
    async def EmbedSparse(
        self, request: pb.EmbedSparseRequest, context: Context
    ) -> pb.EmbedSparseResponse:
        truncate, direction = native_truncation(request.truncation)
        params = EmbedParams(
            model=request.model,
            texts=list(request.texts),
            truncate=truncate,
            truncation_direction=direction,
            truncation_hint=_NATIVE_TRUNCATE_HINT,
            prompt_name=request.prompt_name or None,
            prompt=request.prompt if request.HasField("prompt") else None,
        )
        outcome = await self._task_service.embed_sparse(params, deadline_of(context))
        return pb.EmbedSparseResponse(
            model=outcome.model,
            vectors=[
                pb.SparseVector(indices=indices.tolist(), values=values.tolist())
                for indices, values in outcome.rows
            ],
            dimensions=outcome.dimensions,
            usage=pb.Usage(prompt_tokens=outcome.prompt_tokens, total_tokens=outcome.prompt_tokens),
            request_id=request.request_id,
        )

    @translate_errors(tei_error_body)
    async def TeiEmbedSparse(
        self, request: pb.TeiEmbedSparseRequest, context: Context
    ) -> struct_pb2.ListValue:
        params = EmbedParams(
            model=request.model,
            texts=tei_texts(request.inputs),
            truncate=request.truncate if request.HasField("truncate") else True,
            truncation_direction=tei_direction(request.truncation_direction),
            truncation_hint=_TEI_TRUNCATE_HINT,
            prompt_name=request.prompt_name or None,
        )
        outcome = await self._task_service.embed_sparse(params, deadline_of(context))
        return _tei_sparse(outcome)


def _native_input(item: pb.ClassifyInput) -> ClassifyInput:
    if item.HasField("text_pair"):
        return (item.text, item.text_pair)
    return (item.text,)


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
