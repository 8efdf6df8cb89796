"""The REST edge as the protos declare it: each service's routes and their error shape.

Every service of ``embedd.v1`` that binds REST routes (``google.api.http``) declares once, with
the ``embedd.v1.rest`` service option (``protos/embedd/v1/rest.proto``), the error shape its
routes speak and the path prefixes it answers for. Everything that needs "which error shape
does this route speak" reads it from here: the server's error bodies (``rpc/status.py``), the
route table of Envoy's Lua filter and the services of its transcoder
(``embedd_server.run.envoy``), the OpenAPI description (``tools/openapi.py``).

Which shape a REST request gets, before any route is known (Envoy's replies to an unknown path
or a bad body are shaped by it too): at ``/``, the shape of the route bound to the request's
verb (the GET route's for a verb with none); elsewhere the longest path that claims it, where
a route's path claims itself and the paths under it (a templated path the literal part before
its first variable), and a service's ``path_prefixes`` claim every path they start; a path
nothing claims speaks the native service's shape.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from google.api import annotations_pb2  # type: ignore[import-untyped]
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor

from embedd.v1 import embedder_pb2, rest_pb2

NATIVE_SERVICE = "Embedder"
ROOT = "/"
_SHAPE_PREFIX = "ERROR_SHAPE_"


@dataclass(frozen=True)
class Route:
    """One REST binding: ``verb`` lower case (get, post, head...), ``path`` as declared."""

    verb: str
    path: str
    service: str  # full name: embedd.v1.Ollama
    method: str  # RPC name: OllamaEmbed
    shape: str  # openai, ollama, cohere, rerank, tei

    @property
    def grpc_path(self) -> str:
        """The gRPC method path the transcoder rewrites the request to."""
        return f"/{self.service}/{self.method}"


@dataclass(frozen=True)
class Claim:
    """Paths that speak ``shape``: ``prefix`` itself and the paths under it (``whole``), or
    every path starting with ``prefix``."""

    prefix: str
    whole: bool
    shape: str

    def matches(self, bare_path: str) -> bool:
        """Whether a path without its query string is claimed."""
        if self.whole:
            return bare_path == self.prefix or bare_path.startswith(self.prefix + "/")
        return bare_path.startswith(self.prefix)


def services() -> tuple[ServiceDescriptor, ...]:
    """Every service of embedd.v1, the native one first."""
    return tuple(embedder_pb2.DESCRIPTOR.services_by_name.values())


def shape_names() -> tuple[str, ...]:
    """Every error shape's name (openai, ollama, ...), in the enum's order."""
    return tuple(
        _shape_name(value.number)
        for value in rest_pb2.ErrorShape.DESCRIPTOR.values
        if value.number != rest_pb2.ERROR_SHAPE_UNSPECIFIED
    )


def _shape_name(value: int) -> str:
    return rest_pb2.ErrorShape.Name(value).removeprefix(_SHAPE_PREFIX).lower()  # type: ignore[arg-type]


def _rest_option(service: ServiceDescriptor) -> rest_pb2.RestApi:
    options = service.GetOptions()
    if not options.HasExtension(rest_pb2.rest):
        raise ValueError(f"service {service.full_name} declares no (embedd.v1.rest) option")
    option: rest_pb2.RestApi = options.Extensions[rest_pb2.rest]
    return option


def shape_of_service(service: ServiceDescriptor) -> str:
    """The error shape a service declares for its routes."""
    shape = _rest_option(service).error_shape
    if shape == rest_pb2.ERROR_SHAPE_UNSPECIFIED:
        raise ValueError(f"service {service.full_name} declares no error_shape")
    return _shape_name(shape)


@functools.cache
def routes() -> tuple[Route, ...]:
    """Every REST binding of every service, in declaration order."""
    found: list[Route] = []
    for service in services():
        for method in service.methods:
            rule = method.GetOptions().Extensions[annotations_pb2.http]
            for binding in (rule, *rule.additional_bindings):
                pattern = binding.WhichOneof("pattern")
                if not pattern:
                    continue
                custom = pattern == "custom"
                verb = binding.custom.kind.lower() if custom else pattern
                path = binding.custom.path if custom else getattr(binding, pattern)
                shape = shape_of_service(service)
                found.append(Route(verb, path, service.full_name, method.name, shape))
    return tuple(found)


@functools.cache
def shapes_by_method() -> dict[str, str]:
    """The error shape of every RPC (/embedd.v1.Ollama/OllamaEmbed -> ollama), routes or not."""
    found: dict[str, str] = {}
    for service in services():
        shape = shape_of_service(service)
        for method in service.methods:
            found[f"/{service.full_name}/{method.name}"] = shape
    return found


def default_shape() -> str:
    """The shape of the paths nothing claims: the native service's."""
    return shape_of_service(embedder_pb2.DESCRIPTOR.services_by_name[NATIVE_SERVICE])


@functools.cache
def claims() -> tuple[Claim, ...]:
    """Every claim on paths other than the root, the longest prefix first."""
    found: dict[tuple[str, bool], str] = {}
    for route in routes():
        if route.path == ROOT:
            continue
        literal, variable, _ = route.path.partition("{")
        found.setdefault((literal, not variable), route.shape)
    for service in services():
        for prefix in _rest_option(service).path_prefixes:
            found.setdefault((prefix, False), shape_of_service(service))
    # A route's claim on itself adds nothing to its service's prefix claim on the same path.
    for (prefix, whole), shape in list(found.items()):
        if whole and found.get((prefix, False)) == shape:
            del found[(prefix, whole)]
    ordered = sorted(found.items(), key=lambda item: (-len(item[0][0]), item[0][1]))
    return tuple(Claim(prefix, whole, shape) for (prefix, whole), shape in ordered)


@functools.cache
def root_shapes() -> dict[str, str]:
    """The shape of ``/`` by verb (lower case); ``*`` for verbs no route binds there."""
    found = {route.verb: route.shape for route in routes() if route.path == ROOT}
    found["*"] = found.get("get", default_shape())
    return found


def shape_of_path(path: str, verb: str) -> str:
    """The error shape of a REST request (the rules of this module's docstring)."""
    bare = path.partition("?")[0]
    if bare == ROOT:
        shapes = root_shapes()
        return shapes.get(verb.lower(), shapes["*"])
    return next((claim.shape for claim in claims() if claim.matches(bare)), default_shape())


def rest_services() -> tuple[str, ...]:
    """The full names of the services that bind REST routes (the transcoder's services)."""
    bound = {route.service for route in routes()}
    return tuple(service.full_name for service in services() if service.full_name in bound)


def idempotent_methods() -> dict[str, tuple[str, ...]]:
    """Each service's RPCs marked ``idempotency_level = IDEMPOTENT`` (Envoy retries them)."""
    idempotent = descriptor_pb2.MethodOptions.IDEMPOTENT
    found = {
        service.name: tuple(
            method.name
            for method in service.methods
            if method.GetOptions().idempotency_level == idempotent
        )
        for service in services()
    }
    return {name: methods for name, methods in found.items() if methods}
