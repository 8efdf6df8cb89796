"""Each route's error shape is declared once, by its service in the protos, and read from there.

The server's error bodies (rpc/status.py), the Lua filter's route table and the Envoy config
(embedd_server.run.envoy) and the OpenAPI description (tools/openapi.py) all derive it from
rpc/edge.py, which reads the ``embedd.v1.rest`` service options.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd_server.rpc import edge, services
from embedd_server.rpc.status import BODY_SHAPES, body_shape_for
from embedd_server.run import envoy
from tools import openapi


def test_every_service_declares_its_error_shape_and_has_one_handler_module() -> None:
    names = [service.name for service in edge.services()]
    assert names == ["Embedder", "OpenAI", "Ollama", "Cohere", "Rerank", "Tei"]
    assert [api.SERVICE.name for api in services.APIS] == names
    for service in edge.services():
        assert edge.shape_of_service(service) in edge.shape_names()


def test_every_shape_has_a_body_and_an_openapi_definition() -> None:
    assert set(BODY_SHAPES) == set(edge.shape_names())
    assert set(openapi.ERRORS_BY_SHAPE) == set(edge.shape_names())


def test_the_native_service_keeps_native_messages_only() -> None:
    """No foreign API's message is an argument or answer of embedd.v1.Embedder."""
    foreign = re.compile(r"^(Create|Ollama|Cohere|Tei)")
    native = pb.DESCRIPTOR.services_by_name["Embedder"]
    for method in native.methods:
        for message in (method.input_type, method.output_type):
            assert not foreign.match(message.name), f"{method.name}: {message.name}"


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("/embedd.v1.Embedder/Embed", "openai"),
        ("/embedd.v1.Embedder/ListModels", "openai"),
        ("/embedd.v1.OpenAI/CreateEmbeddings", "openai"),
        ("/embedd.v1.Ollama/OllamaEmbed", "ollama"),
        ("/embedd.v1.Ollama/OllamaPs", "ollama"),
        ("/embedd.v1.Cohere/CohereEmbed", "cohere"),
        ("/embedd.v1.Rerank/CreateRerank", "rerank"),
        ("/embedd.v1.Tei/TeiInvoke", "tei"),
        ("/grpc.health.v1.Health/Check", "openai"),  # not ours: OpenAI's, the default
    ],
)
def test_an_rpc_answers_in_its_services_shape(method: str, shape: str) -> None:
    assert body_shape_for(method) is BODY_SHAPES[shape]


@pytest.mark.parametrize(
    ("path", "verb", "shape"),
    [
        ("/v1/embeddings", "post", "openai"),
        ("/embeddings", "post", "openai"),
        ("/v1/models/some-model", "get", "openai"),
        ("/health", "get", "openai"),
        ("/nowhere", "get", "openai"),
        ("/", "get", "ollama"),
        ("/", "head", "ollama"),
        ("/", "put", "ollama"),
        ("/", "post", "tei"),
        ("/?model=x", "post", "tei"),
        ("/api/embed", "post", "ollama"),
        ("/api/unknown", "get", "ollama"),
        ("/v2/embed", "post", "cohere"),
        ("/v2/unknown", "post", "cohere"),
        ("/v1/rerank", "post", "rerank"),
        ("/v2/rerank", "post", "rerank"),
        ("/v2/rerank/x", "post", "rerank"),
        ("/rerank", "post", "tei"),
        ("/embed", "post", "tei"),
        ("/embed?x=1", "post", "tei"),
        ("/embed/more", "post", "tei"),
        ("/embedx", "post", "openai"),
        ("/embed_all", "post", "tei"),
        ("/invocations", "post", "tei"),
        ("/ping", "get", "tei"),
    ],
)
def test_a_rest_path_speaks_the_shape_of_the_service_that_claims_it(
    path: str, verb: str, shape: str
) -> None:
    assert edge.shape_of_path(path, verb) == shape


def test_each_route_speaks_its_own_services_shape() -> None:
    """The path rules never give a route another service's shape."""
    for route in edge.routes():
        assert edge.shape_of_path(route.path.replace("{model}", "m"), route.verb) == route.shape


def test_the_committed_lua_filter_carries_the_generated_route_table() -> None:
    """envoy/rest_errors.lua's generated block is what the protos say: regenerate it with
    ``python -m embedd_server.run.envoy lua`` (see run/envoy.py) after changing a route."""
    committed = envoy.LUA_FILTER.read_text()
    assert committed == envoy.lua_filter_text(committed)
    for claim in edge.claims():
        assert f'{{"{claim.prefix}", {str(claim.whole).lower()}, "{claim.shape}"}}' in committed


def test_envoy_transcodes_every_service_and_retries_the_idempotent_rpcs() -> None:
    regex = re.compile(envoy.idempotent_regex())
    retried = {route.grpc_path for route in edge.routes() if regex.fullmatch(route.grpc_path)}
    assert "/embedd.v1.OpenAI/CreateEmbeddings" in retried
    assert "/embedd.v1.Ollama/OllamaEmbed" in retried
    assert "/embedd.v1.Embedder/LoadModel" not in retried
    assert not regex.fullmatch("/embedd.v1.Embedder/EmbedStream")
    assert regex.fullmatch("/embedd.v1.Embedder/Embed")
    assert set(edge.rest_services()) == {service.full_name for service in edge.services()}


def test_every_proto_is_compiled_by_make_protos_and_the_image() -> None:
    """A proto file left out of a protoc run leaves an import of the others unresolved."""
    root = Path(__file__).resolve().parents[2]
    protos = sorted(str(path.relative_to(root)) for path in (root / "protos").rglob("*.proto"))
    assert len(protos) >= 2
    for build in ("Makefile", "Containerfile"):
        text = (root / build).read_text()
        assert all(proto in text for proto in protos), build
