"""The REST surface's OpenAPI description, generated from the protos.

    python -m tools.openapi            # (re)writes docs/openapi/embedd.openapi.json
    python -m tools.openapi --check    # exits 1 when the committed file is out of date

grpc-gateway's ``protoc-gen-openapiv2`` (pinned below; installed into ``.tools/bin`` with
``go install`` when missing) turns the ``google.api.http`` annotations of
``protos/embedd/v1/embedder.proto`` into Swagger 2.0, run through grpcio-tools' protoc. The
Swagger is then adjusted to what Envoy's gRPC-JSON transcoder really does (see
``docs/rest.md``), using the same protoc run's descriptor set for the fields' types:

- field names stay snake_case (``json_names_for_fields=false``, the transcoder's
  ``preserve_proto_field_names``);
- request fields may be ``null`` (protobuf's JSON mapping reads it as "not set"), int32 fields
  are bounded to int32 (larger values are a parse error); ``google.protobuf.Value`` fields
  (``input``, ``keep_alive``) are any JSON: the server validates their shape;
- response objects list the fields always printed (``always_print_primitive_fields``: every
  scalar and repeated field; message fields and proto3 ``optional`` fields only when set) and
  nothing else; uint32 fields are bounded; ``google.protobuf.ListValue`` is an array of any
  JSON values;
- every operation's non-2xx answer is documented as the error body its service declares
  (``embedd.v1.rest``, read through ``embedd_server.rpc.edge``): OpenAI's
  ``{"error": {"message", "type", "param", "code"}}`` (the native and OpenAI services), Ollama's
  ``{"error": "..."}`` (``/api/`` and ``GET /``), Cohere's ``{"message": "..."}`` (``/v2/``),
  ``{"message", "detail"}`` on the Cohere/Jina rerank routes, TEI's ``{"error", "error_type"}``
  on TEI's routes (``POST /`` included);
- a ``google.api.HttpBody`` answer is what it carries: the plain text of ``GET /``, Ollama's
  NDJSON progress (or, with ``"stream": false``, one JSON object) of ``POST /api/pull``, TEI's
  empty ``GET /ping``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

from embedd_server.rpc import edge

PLUGIN_MODULE = "github.com/grpc-ecosystem/grpc-gateway/v2/protoc-gen-openapiv2"
# v2.32.0 needs a genproto version the Go module proxy does not serve.
PLUGIN_VERSION = "v2.31.0"

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "protos"
PROTO = "embedd/v1/embedder.proto"
PACKAGE = "embedd.v1"
OUTPUT = REPO / "docs" / "openapi" / "embedd.openapi.json"
TOOLS_BIN = REPO / ".tools" / "bin"

PLUGIN_OPTIONS = (
    # A Go import path per file, which the plugin insists on (unused).
    f"M{PROTO}=embedd/v1",
    "Membedd/v1/rest.proto=embedd/v1",
    "json_names_for_fields=false",
    "allow_merge=true",
    "merge_file_name=embedd",
    "openapi_naming_strategy=simple",
    "simple_operation_ids=true",
    "disable_service_tags=true",
    "disable_default_errors=true",  # replaced by the routes' real error bodies below
)

INT32 = {"minimum": -(2**31), "maximum": 2**31 - 1}
UINT32 = {"minimum": 0, "maximum": 2**32 - 1}
F = descriptor_pb2.FieldDescriptorProto
VALUE_DESCRIPTION = "Any JSON value (google.protobuf.Value); the server validates its shape."
OPENAI_ERROR = "OpenAIError"
OLLAMA_ERROR = "OllamaError"
RERANK_ERROR = "RerankError"
TEI_ERROR = "TeiError"
COHERE_ERROR = "CohereError"
HTTP_BODY = "HttpBody"
# HttpBody answers that are not plain text: path -> (media types, the 200's schema).
PULL_PROGRESS = {
    "type": "object",
    "required": ["status"],
    "additionalProperties": False,
    "properties": {"status": {"type": "string", "enum": ["pulling manifest", "success"]}},
}
HTTP_BODY_ANSWERS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "/api/pull": (["application/x-ndjson", "application/json"], PULL_PROGRESS),
}
ERROR_DEFINITIONS: dict[str, Any] = {
    OPENAI_ERROR: {
        "type": "object",
        "description": "OpenAI's error body: every non-2xx answer of the /v1 routes.",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "additionalProperties": False,
                "properties": {
                    "message": {"type": "string", "minLength": 1},
                    "type": {
                        "type": "string",
                        "minLength": 1,
                        "description": '"invalid_request_error", "server_error", ...',
                    },
                    "param": {
                        "type": "string",
                        "x-nullable": True,
                        "description": "The request field at fault, or null.",
                    },
                    "code": {
                        "type": "string",
                        "x-nullable": True,
                        "description": '"model_not_found", "context_length_exceeded", ...',
                    },
                },
            }
        },
    },
    OLLAMA_ERROR: {
        "type": "object",
        "description": "Ollama's error body: every non-2xx answer of the /api routes.",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {"error": {"type": "string", "minLength": 1}},
    },
    RERANK_ERROR: {
        "type": "object",
        "description": (
            "The rerank routes' error body (/v1/rerank, /v2/rerank): Cohere's message and "
            "Jina's detail, the same text."
        ),
        "required": ["message", "detail"],
        "additionalProperties": False,
        "properties": {
            "message": {"type": "string", "minLength": 1},
            "detail": {"type": "string", "minLength": 1},
        },
    },
    TEI_ERROR: {
        "type": "object",
        "description": (
            "TEI's error body: every non-2xx answer of TEI's routes (/embed, /embed_all, "
            "/embed_sparse, /predict, /rerank, /similarity, /tokenize, /decode, /info, /ping, "
            "POST / and /invocations)."
        ),
        "required": ["error", "error_type"],
        "additionalProperties": False,
        "properties": {
            "error": {"type": "string", "minLength": 1},
            "error_type": {
                "type": "string",
                "enum": ["Validation", "Empty", "Overloaded", "Unhealthy", "Backend"],
            },
        },
    },
    COHERE_ERROR: {
        "type": "object",
        "description": "Cohere's error body: every non-2xx answer of the /v2 routes.",
        "required": ["message"],
        "additionalProperties": False,
        "properties": {"message": {"type": "string", "minLength": 1}},
    },
}
# Each error shape the protos declare (rpc/edge.py) -> its definition above.
ERRORS_BY_SHAPE = {
    "openai": OPENAI_ERROR,
    "ollama": OLLAMA_ERROR,
    "cohere": COHERE_ERROR,
    "rerank": RERANK_ERROR,
    "tei": TEI_ERROR,
}


def include_dirs() -> list[Path]:
    """protoc's -I: our protos, googleapis-common-protos' and grpcio-tools' well-known types."""
    google_api = importlib.util.find_spec("google.api")
    grpc_tools = importlib.util.find_spec("grpc_tools")
    assert google_api and google_api.submodule_search_locations, "googleapis-common-protos"
    assert grpc_tools and grpc_tools.origin, "grpcio-tools"
    google_protos = Path(next(iter(google_api.submodule_search_locations))).parents[1]
    return [PROTO_ROOT, google_protos, Path(grpc_tools.origin).parent / "_proto"]


def ensure_plugin(plugin: Path | None = None) -> Path:
    """The pinned protoc-gen-openapiv2, installed into .tools/bin with `go install` if needed."""
    path = plugin or TOOLS_BIN / "protoc-gen-openapiv2"
    if path.exists() and _plugin_version(path) == PLUGIN_VERSION:
        return path
    if plugin is not None:
        raise SystemExit(f"{plugin} is not protoc-gen-openapiv2 {PLUGIN_VERSION}")
    go = shutil.which("go")
    if go is None:
        raise SystemExit(
            f"protoc-gen-openapiv2 {PLUGIN_VERSION} is not in {TOOLS_BIN} and Go is not "
            f"installed: install Go, or run `go install {PLUGIN_MODULE}@{PLUGIN_VERSION}` "
            "elsewhere and pass the binary with --plugin."
        )
    TOOLS_BIN.mkdir(parents=True, exist_ok=True)
    print(f"installing protoc-gen-openapiv2 {PLUGIN_VERSION} into {TOOLS_BIN}", file=sys.stderr)
    subprocess.run(
        [go, "install", f"{PLUGIN_MODULE}@{PLUGIN_VERSION}"],
        check=True,
        env={**os.environ, "GOBIN": str(TOOLS_BIN)},
    )
    return path


def _plugin_version(path: Path) -> str | None:
    try:
        reply = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    words = reply.stdout.split()  # "Version v2.31.0, commit ..., built at ..."
    return words[1].rstrip(",") if len(words) > 1 else None


def run_protoc(plugin: Path) -> tuple[dict[str, Any], descriptor_pb2.FileDescriptorSet]:
    """The plugin's Swagger 2.0 and the descriptor set of the same protoc run."""
    with tempfile.TemporaryDirectory(prefix="embedd-openapi-") as tmp:
        out = Path(tmp)
        descriptor_path = out / "descriptor.pb"
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            *(f"-I{path}" for path in include_dirs()),
            f"--plugin=protoc-gen-openapiv2={plugin}",
            f"--openapiv2_out={out}",
            f"--openapiv2_opt={','.join(PLUGIN_OPTIONS)}",
            "--include_imports",
            f"--descriptor_set_out={descriptor_path}",
            PROTO,
        ]
        subprocess.run(command, check=True, cwd=REPO)
        swagger: dict[str, Any] = json.loads((out / "embedd.swagger.json").read_text())
        descriptors = descriptor_pb2.FileDescriptorSet.FromString(descriptor_path.read_bytes())
    return swagger, descriptors


def post_process(
    swagger: dict[str, Any], descriptors: descriptor_pb2.FileDescriptorSet, version: str
) -> dict[str, Any]:
    """The plugin's Swagger adjusted to what the transcoder accepts and prints."""
    messages = {
        message.name: message
        for file in descriptors.file
        if file.package == PACKAGE
        for message in file.message_type
    }
    definitions: dict[str, Any] = swagger["definitions"]
    requests: set[str] = set()
    responses: set[str] = set()
    for path, methods in swagger["paths"].items():
        for verb, operation in methods.items():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "body":
                    requests.add(_ref_name(parameter["schema"]))
            if HTTP_BODY in _refs(operation["responses"]):
                _http_body(operation, path, verb)
            answer = operation["responses"].get("200", {}).get("schema", {})
            if answer.get("type") == "array":  # a ListValue (TEI's answers): any JSON items
                answer["items"] = {}
            responses.update(_refs(operation["responses"]))
            operation["responses"]["default"] = {
                "description": "An error, in the route's own error shape.",
                "schema": {"$ref": f"#/definitions/{_error_shape(path, verb)}"},
            }
    responses = _closure(responses, definitions)
    for name, schema in definitions.items():
        message = messages.get(name)
        if message is None:
            continue
        if name in requests:
            _adjust_request(schema, message)
        if name in responses:
            _adjust_response(schema, message)
    referenced = _closure(requests | responses, definitions)
    swagger["definitions"] = {
        **{name: schema for name, schema in definitions.items() if name in referenced},
        **ERROR_DEFINITIONS,
    }
    swagger["info"] = {
        "title": "embedd REST API (OpenAI, Ollama, Cohere, Jina and TEI routes through Envoy)",
        "version": version,
        "description": (
            "Generated from protos/embedd/v1/embedder.proto by `python -m tools.openapi` "
            f"(protoc-gen-openapiv2 {PLUGIN_VERSION}); see docs/rest.md. Unknown fields and "
            "unknown query parameters are ignored; null means not set."
        ),
    }
    return {key: swagger[key] for key in ("swagger", "info", *swagger) if key in swagger}


def _error_shape(path: str, verb: str) -> str:
    """The error body of a REST path and verb: its service's declared shape (rpc/edge.py)."""
    return ERRORS_BY_SHAPE[edge.shape_of_path(path, verb)]


def _http_body(operation: dict[str, Any], path: str, verb: str) -> None:
    """An HttpBody answer: the server's bytes as they are (none for HEAD); plain text unless
    HTTP_BODY_ANSWERS says otherwise."""
    if path in HTTP_BODY_ANSWERS:
        media_types, schema = HTTP_BODY_ANSWERS[path]
        operation["produces"] = media_types
        operation["responses"]["200"] = {
            "description": "NDJSON, one such object a line; with stream false, one object.",
            "schema": schema,
        }
        return
    operation["produces"] = ["text/plain"]
    answer: dict[str, Any] = {"description": "The text."}
    if verb != "head":
        answer["schema"] = {"type": "string"}
    operation["responses"]["200"] = answer


def _adjust_request(schema: dict[str, Any], message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        prop = schema["properties"][field.name]
        if field.type == F.TYPE_INT32:
            prop.update(INT32)
        if field.type_name == ".google.protobuf.Value":  # any JSON, null included
            prop.setdefault("description", VALUE_DESCRIPTION)
        else:
            prop["x-nullable"] = True


def _adjust_response(schema: dict[str, Any], message: descriptor_pb2.DescriptorProto) -> None:
    required = []
    for field in message.field:
        prop = schema["properties"][field.name]
        if field.type == F.TYPE_UINT32:
            prop.get("items", prop).update(UINT32)
        if field.type_name == ".google.protobuf.ListValue":  # the plugin says: objects
            prop.update({"type": "array", "items": {}})
        if field.proto3_optional:  # printed only when set
            continue
        if field.label == F.LABEL_REPEATED or field.type != F.TYPE_MESSAGE:
            required.append(field.name)
    if required:
        schema["required"] = required
    schema["additionalProperties"] = False


def _ref_name(schema: dict[str, Any]) -> str:
    ref: str = schema["$ref"]
    return ref.rsplit("/", 1)[-1]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value.rsplit("/", 1)[-1]
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _closure(names: set[str], definitions: dict[str, Any]) -> set[str]:
    """The definitions reachable from ``names`` through $ref."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or name not in definitions:
            continue
        seen.add(name)
        todo.extend(_refs(definitions[name]))
    return seen


def project_version() -> str:
    with (REPO / "pyproject.toml").open("rb") as file:
        version: str = tomllib.load(file)["project"]["version"]
    return version


def render(spec: dict[str, Any]) -> str:
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def generate(plugin: Path | None = None) -> str:
    swagger, descriptors = run_protoc(ensure_plugin(plugin))
    return render(post_process(swagger, descriptors, project_version()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.openapi", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the output is stale")
    parser.add_argument("--plugin", type=Path, help="a protoc-gen-openapiv2 binary to use")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"default: {OUTPUT}")
    args = parser.parse_args(argv)
    text = generate(args.plugin)
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is out of date: run `python -m tools.openapi`", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
