"""Envoy's rendered configuration: Envoy itself accepts it, and it follows the settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedd_server.run.envoy import (
    DESCRIPTOR,
    LUA_FILTER,
    EnvoyConfigError,
    envoy_binary,
    render_envoy_config,
    validate_envoy_config,
    write_envoy_config,
)
from embedd_server.settings import Settings, settings_from_argv


def test_envoy_binary_is_the_venvs() -> None:
    binary = envoy_binary()
    assert binary.exists()
    assert binary.name == "envoy"


def test_default_config_passes_envoy_validate(tmp_path: Path) -> None:
    path = write_envoy_config(Settings(), tmp_path / "envoy.yaml")
    validate_envoy_config(path)  # raises with Envoy's message otherwise
    text = path.read_text()
    assert "port_value: 8080" in text  # REST listener
    assert "admin:" not in text  # no admin interface unless a private socket is given
    assert '{address: "127.0.0.1", port_value: 50051}' in text  # the gRPC upstream
    assert str(DESCRIPTOR.resolve()) in text
    assert str(LUA_FILTER) in text
    assert "${" not in text


def test_ports_limits_and_upstreams_come_from_settings(tmp_path: Path) -> None:
    settings = settings_from_argv(
        [
            "--http-port",
            "18081",
            "--grpc-host",
            "0.0.0.0",
            "--grpc-port",
            "15052",
            "--max-message-mb",
            "8",
        ]
    )
    text = render_envoy_config(settings)
    assert "{address: 127.0.0.1, port_value: 18081}" in text
    assert '{address: "127.0.0.1", port_value: 15052}' in text  # wildcard -> this machine
    assert text.count(f"{8 * 1024 * 1024}") >= 3  # both transcoder limits and buffers
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    validate_envoy_config(path)


@pytest.mark.parametrize(
    ("http_host", "listens_on"),
    [("0.0.0.0", "0.0.0.0"), ("::", '"::"'), ("localhost", "127.0.0.1")],
)
def test_rest_listens_where_http_host_says(tmp_path: Path, http_host: str, listens_on: str) -> None:
    # 0.0.0.0 in a container image: REST must be reachable through a published port.
    settings = settings_from_argv(["--http-host", http_host, "--http-port", "18082"])
    text = render_envoy_config(settings)
    assert f"{{address: {listens_on}, port_value: 18082}}" in text
    assert "admin:" not in text  # never on a TCP port, whatever http_host is
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    validate_envoy_config(path)


def test_several_upstreams_and_a_given_descriptor(tmp_path: Path) -> None:
    descriptor = tmp_path / "copy.pb"
    descriptor.write_bytes(DESCRIPTOR.read_bytes())
    path = write_envoy_config(
        Settings(),
        tmp_path / "envoy.yaml",
        descriptor=descriptor,
        upstreams=["127.0.0.1:50061", "localhost:50062"],
    )
    text = path.read_text()
    assert '{address: "127.0.0.1", port_value: 50061}' in text
    assert '{address: "127.0.0.1", port_value: 50062}' in text
    assert str(descriptor) in text
    validate_envoy_config(path)


def test_missing_descriptor_says_run_make_protos(tmp_path: Path) -> None:
    with pytest.raises(EnvoyConfigError, match="make protos"):
        render_envoy_config(Settings(), descriptor=tmp_path / "absent.pb")


@pytest.mark.parametrize("address", ["127.0.0.1:0", "127.0.0.1", ":50051", "host:port"])
def test_bad_upstream_address_is_refused(address: str) -> None:
    with pytest.raises(EnvoyConfigError, match="host:port"):
        render_envoy_config(Settings(), upstreams=[address])


def test_validate_reports_envoys_message(tmp_path: Path) -> None:
    text = render_envoy_config(Settings()).replace("healthy_panic_threshold", "no_such_field")
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(EnvoyConfigError, match="no_such_field"):
        validate_envoy_config(path)
