"""Request fields that arrive as ``google.protobuf.Value`` so the server can check their JSON type.

Envoy's gRPC-JSON transcoder is lenient where the REST APIs are strict: it reads the string
"yes" into a bool field as true and a plain string into a repeated field as a list of one.
Fields where that leniency would hide a caller's mistake are declared as ``Value`` in the proto
and checked here, so the caller gets a 400 naming the field, in its API's error shape.
"""

from __future__ import annotations

from google.protobuf import struct_pb2

from embedd.v1 import embedder_pb2 as pb
from embedd_server.errors import InvalidInput

_JSON_TYPES = {
    "null_value": "null",
    "number_value": "a number",
    "string_value": "a string",
    "bool_value": "a boolean",
    "struct_value": "an object",
    "list_value": "an array",
}


def json_type(value: struct_pb2.Value) -> str:
    """The JSON type of a Value, as a message names it ("a string", "an array", ...)."""
    return _JSON_TYPES.get(value.WhichOneof("kind") or "null_value", "null")


def optional_bool(value: struct_pb2.Value | None, param: str) -> bool | None:
    """A JSON boolean field: its value, None when absent or null, else InvalidInput."""
    kind = None if value is None else value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    assert value is not None
    if kind != "bool_value":
        raise InvalidInput(
            f"{param} must be a JSON boolean (true or false); got {json_type(value)}.",
            param=param,
        )
    return value.bool_value


def string_list(value: struct_pb2.Value | None, param: str) -> list[str]:
    """A JSON array of strings: its items; [] when absent or null; else InvalidInput."""
    kind = None if value is None else value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return []
    assert value is not None
    if kind != "list_value":
        raise InvalidInput(
            f'{param} must be an array of strings (e.g. "{param}": ["hello"]); got '
            f"{json_type(value)}.",
            param=param,
        )
    items = value.list_value.values
    for index, item in enumerate(items):
        if item.WhichOneof("kind") != "string_value":
            raise InvalidInput(
                f"{param}[{index}] must be a string; got {json_type(item)}.", param=param
            )
    return [item.string_value for item in items]


def requested_dimensions(request: pb.CreateEmbeddingsRequest | pb.OllamaEmbedRequest) -> int | None:
    """The request's ``dimensions`` (None: not set); below 1 is refused."""
    if not request.HasField("dimensions"):
        return None
    if request.dimensions < 1:
        raise InvalidInput(
            f"dimensions must be at least 1; got {request.dimensions}.", param="dimensions"
        )
    return request.dimensions


def json_kind(kind: str | None) -> str:
    """A Value's kind in JSON words; an unset Value (no kind) reads as null."""
    return _JSON_TYPES.get(kind or "null_value", str(kind))
