"""TLS settings and files without a server: what is refused (and how it is said), the key's
permission warning, the client's channel choice, the CLI flags, Envoy's rendered TLS block
(validated by Envoy itself) and what `embedd run`'s servers behind Envoy are told."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]

from embedd._convert import connection
from embedd_server.cli.main import build_parser
from embedd_server.run.envoy import (
    render_compose_envoy_config,
    render_envoy_config,
    validate_envoy_config,
)
from embedd_server.run.replicas import backend_settings, replica_settings
from embedd_server.settings import (
    Settings,
    SettingsError,
    child_environment,
    load_settings,
    settings_from_argv,
)
from embedd_server.tls import ServerTls, TlsError, check_server_tls, load_server_tls
from tests.tls_certs import Pki, _openssl, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_settings(pki: Pki, mutual: bool = False, **changes: object) -> Settings:
    client_ca = str(pki.ca) if mutual else ""
    return Settings(
        tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=client_ca
    ).replace(**changes)


def pem_body_lines(path: Path) -> list[str]:
    """The base64 lines of a PEM file: what must never appear in a log or a message."""
    return [line for line in path.read_text().splitlines() if line and "-----" not in line]


# --- settings ---------------------------------------------------------------------------------


def test_tls_settings_from_flags_environment_and_config(tmp_path: Path) -> None:
    flags = settings_from_argv(["--tls-cert", "c.pem", "--tls-key", "k.pem"])
    assert (flags.tls_cert, flags.tls_key, flags.tls_client_ca, flags.tls) == (
        "c.pem",
        "k.pem",
        "",
        True,
    )
    environ = {"EMBEDD_TLS_CERT": "c", "EMBEDD_TLS_KEY": "k", "EMBEDD_TLS_CLIENT_CA": "ca"}
    assert load_settings(environ=environ).tls_client_ca == "ca"
    assert not Settings().tls


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tls_cert": "c.pem"}, "tls_cert and tls_key go together"),
        ({"tls_key": "k.pem"}, "tls_cert and tls_key go together"),
        ({"tls_client_ca": "ca.pem"}, "tls_client_ca (mutual TLS) needs tls_cert"),
    ],
)
def test_incomplete_tls_settings_are_refused(changes: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(**changes)  # type: ignore[arg-type]


def test_help_explains_the_tls_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("serve", "run"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for fragment in (
            "--tls-cert",
            "EMBEDD_TLS_KEY",
            "--tls-client-ca",
            "0600",
            "Envoy's port (REST and native gRPC alike)",
            "restart to rotate",
        ):
            assert fragment in text, (command, fragment)


# --- the files ----------------------------------------------------------------------------------


def test_good_files_load_and_show_no_bytes(pki: Pki) -> None:
    material = load_server_tls(tls_settings(pki, mutual=True))
    assert isinstance(material, ServerTls) and material.mutual
    assert material.private_key == pki.server_key.read_bytes()
    assert "PRIVATE" not in repr(material) and "BEGIN" not in repr(material)
    assert load_server_tls(Settings()) is None


def test_a_key_of_another_certificate_is_one_clear_line(pki: Pki) -> None:
    settings = tls_settings(pki, tls_key=str(pki.client_key))
    with pytest.raises(TlsError) as caught:
        check_server_tls(settings)
    message = str(caught.value)
    assert str(pki.server_cert) in message and str(pki.client_key) in message
    assert "matching" in message
    for line in pem_body_lines(pki.client_key) + pem_body_lines(pki.server_cert):
        assert line not in message


def test_missing_files_name_the_setting(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(TlsError, match=r"tls_key: .*nope.pem is not a file.*EMBEDD_TLS_KEY"):
        check_server_tls(tls_settings(pki, tls_key=str(tmp_path / "nope.pem")))
    with pytest.raises(TlsError, match=r"tls_client_ca: .* is not a file"):
        check_server_tls(tls_settings(pki, tls_client_ca=str(tmp_path / "nope.pem")))


def test_a_client_ca_that_is_no_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(TlsError, match="holds no PEM CA certificate"):
        check_server_tls(tls_settings(pki, tls_client_ca=str(junk)))


def test_an_encrypted_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    encrypted = tmp_path / "encrypted.key"
    _openssl(
        "pkey", "-in", pki.server_key, "-out", encrypted, "-aes256", "-passout", "pass:secret"
    )  # fmt: skip
    with pytest.raises(TlsError, match="is encrypted"):
        check_server_tls(tls_settings(pki, tls_key=str(encrypted)))


@pytest.mark.parametrize(("mode", "warned"), [(0o600, False), (0o640, False), (0o644, True)])
def test_a_key_others_may_read_gets_a_warning(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, warned: bool
) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.server_key, key)
    key.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="embedd_server.tls"):
        check_server_tls(tls_settings(pki, tls_key=str(key)))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warnings) == warned, warnings
    if warned:
        assert str(key) in warnings[0] and "0644" in warnings[0] and "chmod 600" in warnings[0]
        assert not any(line in warnings[0] for line in pem_body_lines(key))


# --- embedd run: Envoy terminates, the servers behind it stay plaintext on the loopback --------


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_the_servers_behind_envoy_get_no_tls_and_only_the_loopback(pki: Pki, host: str) -> None:
    settings = tls_settings(pki, mutual=True, grpc_host=host, replicas=2, grpc_port=17000)
    backend = backend_settings(settings)
    assert (backend.tls_cert, backend.tls_key, backend.tls_client_ca) == ("", "", "")
    assert backend.grpc_host == "127.0.0.1"
    environment = child_environment(replica_settings(backend, 1, 17001), base={})
    assert environment["EMBEDD_TLS_CERT"] == environment["EMBEDD_TLS_KEY"] == ""
    assert environment["EMBEDD_GRPC_HOST"] == "127.0.0.1"


def test_without_tls_the_servers_keep_their_host() -> None:
    settings = Settings(grpc_host="0.0.0.0")
    assert backend_settings(settings) is settings
    assert Settings(grpc_host="::1").without_tls().grpc_host == "::1"  # already loopback


def test_envoys_tls_block_is_valid_for_envoy(pki: Pki, tmp_path: Path) -> None:
    for mutual in (False, True):
        text = render_envoy_config(tls_settings(pki, mutual), upstreams=["127.0.0.1:50051"])
        listener = yaml.safe_load(text)["static_resources"]["listeners"][0]
        context = listener["filter_chains"][0]["transport_socket"]["typed_config"]
        common = context["common_tls_context"]
        assert common["alpn_protocols"] == ["h2", "http/1.1"]
        assert common["tls_certificates"][0]["private_key"] == {"filename": str(pki.server_key)}
        assert context.get("require_client_certificate", False) is mutual
        assert ("validation_context" in common) is mutual
        config = tmp_path / f"envoy-{mutual}.yaml"
        config.write_text(text)
        validate_envoy_config(config)
    plain = yaml.safe_load(render_envoy_config(Settings(), upstreams=["127.0.0.1:50051"]))
    assert "transport_socket" not in plain["static_resources"]["listeners"][0]["filter_chains"][0]


def test_composes_envoy_takes_tls_from_its_environment(pki: Pki) -> None:
    environ = {
        "EMBEDD_TLS_CERT": str(pki.server_cert),
        "EMBEDD_TLS_KEY": str(pki.server_key),
        "EMBEDD_TLS_CLIENT_CA": str(pki.ca),
    }
    text = render_compose_envoy_config(load_settings(environ=environ), "server")
    chain = yaml.safe_load(text)["static_resources"]["listeners"][0]["filter_chains"][0]
    assert chain["transport_socket"]["typed_config"]["require_client_certificate"] is True


# --- the client's channel -------------------------------------------------------------------------


def test_the_client_picks_tls_from_the_scheme_the_flag_or_the_files(pki: Pki) -> None:
    assert connection("127.0.0.1:1", max_message_mb=1).credentials is None
    assert connection("http://127.0.0.1:1", max_message_mb=1).target == "127.0.0.1:1"
    secure = connection("https://host:443/", max_message_mb=1)
    assert secure.target == "host:443" and secure.credentials is not None
    assert connection("host:1", max_message_mb=1, tls=True).credentials is not None
    by_file = connection("host:1", max_message_mb=1, tls_ca=pki.ca, tls_server_name="x")
    assert by_file.credentials is not None
    assert ("grpc.ssl_target_name_override", "x") in by_file.options
    assert "BEGIN" not in repr(by_file)


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ("http://h:1", {"tls": True}, "http:// .plaintext. but TLS options"),
        ("http://h:1", {"tls_ca": b"x"}, "http:// .plaintext. but TLS options"),
        ("https://h:1", {"tls": False}, "tls=False contradicts"),
        ("h:1", {"tls_cert": b"x"}, "tls_cert and tls_key go together"),
    ],
)
def test_contradicting_client_tls_options_are_refused(
    target: str, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        connection(target, max_message_mb=1, **options)  # type: ignore[arg-type]


def test_the_cli_tls_flags_do_not_touch_the_servers_settings(pki: Pki) -> None:
    args = build_parser().parse_args(
        ["embed", "x", "--tls-ca", str(pki.ca), "--tls-cert", "c", "--tls-key", "k", "--tls"]
    )
    assert (args.client_tls, args.client_tls_ca, args.client_tls_cert) == (True, str(pki.ca), "c")
    assert load_settings(args, environ={}) == Settings()  # not the server's tls_cert
