"""TLS and mutual TLS on real listeners, with a CA made by the test (tests/tls_certs.py).

- `embedd serve` alone (the in-process server over the fake engine): grpc's own TLS.
- Envoy (the project's rendered config) terminating TLS in front of a plaintext server: REST
  with OpenAI's client and urllib, native gRPC with the Python client, on one port.
- `embedd run` on the real default model, mutual TLS, two replicas: the supervisor's probes
  and Envoy's health checks keep working (the replicas behind Envoy stay plaintext on the
  loopback), and neither the key nor the certificates are ever logged.

Each protocol: TLS works with the CA; a client that trusts another CA is refused; plaintext
on the TLS port is refused. Under mTLS: a client certificate of the CA works, none or one of
another CA is refused.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from embedd import AsyncClient, Client, Unavailable
from embedd_server.cli.main import main
from embedd_server.rpc.server import EmbeddServer, StartupError
from embedd_server.run.probes import free_port
from embedd_server.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS_DIR
from tests.envoy_proc import EnvoyProcess
from tests.fakes import FakeLoader
from tests.servers import ServerThread
from tests.tls_certs import Pki, make_pki

TEXTS = ["hello world", "the cat sat"]
REFUSED = (OSError, http.client.HTTPException)  # ssl.SSLError and resets are OSErrors


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_overrides(pki: Pki, mutual: bool) -> dict[str, Any]:
    return {
        "tls_cert": str(pki.server_cert),
        "tls_key": str(pki.server_key),
        "tls_client_ca": str(pki.ca) if mutual else "",
    }


def client_cert(pki: Pki) -> dict[str, Any]:
    return {"tls_cert": pki.client_cert, "tls_key": pki.client_key}


def pem_body_lines(*paths: Path) -> list[str]:
    return [
        line
        for path in paths
        for line in path.read_text().splitlines()
        if line and "-----" not in line
    ]


def assert_refused(target: str, **options: Any) -> None:
    """A gRPC call with these options fails with UNAVAILABLE (the handshake), not a reply."""
    with Client(target, timeout=10, **options) as client, pytest.raises(Unavailable):
        client.embed("x")


# --- embedd serve alone: grpc's TLS ---------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    models = tmp_path_factory.mktemp("models")
    with ServerThread.with_fake_models(models, **tls_overrides(pki, mutual=False)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    models = tmp_path_factory.mktemp("models")
    with ServerThread.with_fake_models(models, **tls_overrides(pki, mutual=True)) as server:
        yield server


def test_serve_tls_answers_a_client_that_trusts_its_ca(tls_server: ServerThread, pki: Pki) -> None:
    with Client(tls_server.target, tls_ca=pki.ca, timeout=10) as client:
        assert client.health()
        vectors = client.embed(TEXTS)
    assert vectors.shape == (2, 8)
    with Client(f"https://localhost:{tls_server.port}", tls_ca=pki.ca.read_bytes()) as client:
        np.testing.assert_array_equal(client.embed(TEXTS), vectors)  # by name, CA as bytes


def test_serve_tls_with_the_asyncio_client(tls_server: ServerThread, pki: Pki) -> None:
    async def embed() -> Any:
        async with AsyncClient(tls_server.target, tls_ca=pki.ca, timeout=10) as client:
            return await client.embed(TEXTS)

    assert asyncio.run(embed()).shape == (2, 8)


def test_serve_tls_refuses_plaintext_and_another_ca(tls_server: ServerThread, pki: Pki) -> None:
    assert_refused(tls_server.target)  # plaintext on the TLS port
    assert_refused(tls_server.target, tls_ca=pki.other_ca)
    with Client(tls_server.target, tls_ca=pki.ca, timeout=10) as client:
        assert client.health()  # the same port, with the right CA


def test_serve_mtls_wants_a_client_certificate_of_its_ca(
    mtls_server: ServerThread, pki: Pki
) -> None:
    with Client(mtls_server.target, tls_ca=pki.ca, timeout=10, **client_cert(pki)) as client:
        assert client.embed(TEXTS).shape == (2, 8)
    assert_refused(mtls_server.target, tls_ca=pki.ca)  # no client certificate
    assert_refused(  # a client certificate of another CA
        mtls_server.target,
        tls_ca=pki.ca,
        tls_cert=pki.other_client_cert,
        tls_key=pki.other_client_key,
    )
    assert_refused(mtls_server.target)  # plaintext


def test_cli_client_over_mtls(
    mtls_server: ServerThread, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ["--target", mtls_server.target, "--timeout", "10", "--tls-ca", str(pki.ca)]
    certificate = ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    assert main(["embed", "hello", *target, *certificate]) == 0
    assert len(json.loads(capsys.readouterr().out)["embeddings"]) == 1

    assert main(["embed", "hello", *target]) == 2  # no client certificate
    err = capsys.readouterr().err.strip()
    assert err.startswith("embedd embed: ") and "Traceback" not in err
    assert "closed the connection" in err and "--tls-cert" in err  # says what to check

    assert main(["embed", "hello", "--target", mtls_server.target, "--timeout", "10"]) == 2
    assert "if it serves TLS, connect with --tls-ca" in capsys.readouterr().err  # plaintext

    other = ["--target", mtls_server.target, "--timeout", "10", "--tls-ca", str(pki.other_ca)]
    assert main(["embed", "hello", *other, *certificate]) == 2
    assert "TLS handshake" in capsys.readouterr().err


def test_serve_refuses_to_start_on_a_mismatched_key(pki: Pki, tmp_path: Path) -> None:
    settings = Settings(
        grpc_port=0, models_dir=tmp_path, metrics_port=0, **tls_overrides(pki, mutual=False)
    ).replace(tls_key=str(pki.client_key))
    with pytest.raises(StartupError, match="matching"):
        asyncio.run(EmbeddServer(settings, FakeLoader()).start())


def test_serve_never_logs_tls_material(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "open.key"
    shutil.copy(pki.server_key, key)
    key.chmod(0o644)
    overrides = {**tls_overrides(pki, mutual=True), "tls_key": str(key)}
    with caplog.at_level("DEBUG"), ServerThread.with_fake_models(tmp_path, **overrides) as server:
        assert_refused(server.target, tls_ca=pki.ca)
        with Client(server.target, tls_ca=pki.ca, **client_cert(pki)) as client:
            client.embed("x")
    logged = caplog.text
    assert "mutual TLS" in logged  # the listening line says how it listens
    assert f"TLS private key {key} has mode 0644" in logged
    for line in pem_body_lines(key, pki.server_cert, pki.ca):
        assert line not in logged


# --- Envoy terminating TLS in front of a plaintext server -----------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread.with_fake_models(tmp_path_factory.mktemp("models")) as server:
        yield server


@pytest.fixture(scope="module")
def tls_envoy(
    backend: ServerThread, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProcess]:
    workdir = tmp_path_factory.mktemp("envoy-tls")
    with EnvoyProcess.start([backend.target], workdir, **tls_overrides(pki, False)) as envoy:
        yield envoy


@pytest.fixture(scope="module")
def mtls_envoy(
    backend: ServerThread, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EnvoyProcess]:
    workdir = tmp_path_factory.mktemp("envoy-mtls")
    with EnvoyProcess.start([backend.target], workdir, **tls_overrides(pki, True)) as envoy:
        yield envoy


def https_url(envoy: EnvoyProcess, path: str, host: str = "127.0.0.1") -> str:
    return f"https://{host}:{envoy.settings.http_port}{path}"


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def post_embeddings(url: str, context: ssl.SSLContext | None) -> dict[str, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps({"input": TEXTS, "model": "fake"}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10, context=context) as reply:
        assert reply.status == 200
        body: dict[str, Any] = json.loads(reply.read())
        return body


def openai_embed(envoy: EnvoyProcess, context: ssl.SSLContext) -> list[list[float]]:
    with (
        openai.DefaultHttpxClient(verify=context, timeout=10) as http_client,
        openai.OpenAI(
            base_url=https_url(envoy, "/v1"),
            api_key="unused",
            max_retries=0,
            http_client=http_client,
        ) as client,
    ):
        reply = client.embeddings.create(input=TEXTS, model="fake")
    return [item.embedding for item in reply.data]


def test_envoy_tls_rest_with_openai_and_urllib(tls_envoy: EnvoyProcess, pki: Pki) -> None:
    vectors = openai_embed(tls_envoy, tls_context(pki.ca))
    assert len(vectors) == 2 and len(vectors[0]) == 8
    body = post_embeddings(https_url(tls_envoy, "/v1/embeddings", "localhost"), tls_context(pki.ca))
    np.testing.assert_allclose([item["embedding"] for item in body["data"]], vectors, rtol=1e-6)


def test_envoy_tls_grpc_on_the_same_port(
    tls_envoy: EnvoyProcess, backend: ServerThread, pki: Pki
) -> None:
    with Client(tls_envoy.grpc_target, tls_ca=pki.ca, timeout=10) as client:
        assert client.health()
        through_envoy = client.embed(TEXTS)
    with Client(backend.target) as direct:
        np.testing.assert_array_equal(through_envoy, direct.embed(TEXTS))


def test_envoy_tls_refuses_plaintext_and_another_ca(tls_envoy: EnvoyProcess, pki: Pki) -> None:
    with pytest.raises(REFUSED):
        post_embeddings(f"http://127.0.0.1:{tls_envoy.settings.http_port}/v1/embeddings", None)
    with pytest.raises(urllib.error.URLError) as caught:
        post_embeddings(https_url(tls_envoy, "/v1/embeddings"), tls_context(pki.other_ca))
    assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)
    with pytest.raises(openai.APIConnectionError):
        openai_embed(tls_envoy, tls_context(pki.other_ca))
    assert_refused(tls_envoy.grpc_target)  # plaintext gRPC
    assert_refused(tls_envoy.grpc_target, tls_ca=pki.other_ca)
    post_embeddings(https_url(tls_envoy, "/v1/embeddings"), tls_context(pki.ca))  # still up


def test_envoy_mtls_rest_wants_a_client_certificate_of_its_ca(
    mtls_envoy: EnvoyProcess, pki: Pki
) -> None:
    url = https_url(mtls_envoy, "/v1/embeddings")
    good = tls_context(pki.ca, pki.client_cert, pki.client_key)
    assert len(post_embeddings(url, good)["data"]) == 2
    assert len(openai_embed(mtls_envoy, good)) == 2
    with pytest.raises(REFUSED):
        post_embeddings(url, tls_context(pki.ca))  # no client certificate
    with pytest.raises(openai.APIConnectionError):
        openai_embed(mtls_envoy, tls_context(pki.ca))
    with pytest.raises(REFUSED):
        post_embeddings(url, tls_context(pki.ca, pki.other_client_cert, pki.other_client_key))
    with pytest.raises(REFUSED):
        post_embeddings(url.replace("https:", "http:"), None)


def test_envoy_mtls_grpc_wants_a_client_certificate_of_its_ca(
    mtls_envoy: EnvoyProcess, pki: Pki
) -> None:
    target = mtls_envoy.grpc_target
    with Client(target, tls_ca=pki.ca, timeout=10, **client_cert(pki)) as client:
        assert client.embed(TEXTS).shape == (2, 8)
    assert_refused(target, tls_ca=pki.ca)
    assert_refused(
        target, tls_ca=pki.ca, tls_cert=pki.other_client_cert, tls_key=pki.other_client_key
    )
    assert_refused(target)


# --- embedd run: mutual TLS on Envoy's port, two plaintext replicas on the loopback -----------


def test_embedd_run_mtls_with_replicas(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    shutil.copy(pki.server_key, key)
    key.chmod(0o644)  # too open: a warning, not a refusal
    http_port = free_port()
    log_path = tmp_path / "run.log"
    command = [
        sys.executable, "-m", "embedd_server.cli.main", "run",
        "--replicas", "2", "--workers", "1", "--models-dir", str(MODELS_DIR),
        "--engine", "llama.cpp",  # loads in about a second: TLS does not depend on the engine
        "--http-port", str(http_port),
        "--grpc-host", "0.0.0.0", "--grpc-port", "0", "--metrics-port", "0",
        "--tls-cert", str(pki.server_cert), "--tls-key", str(key),
        "--tls-client-ca", str(pki.ca),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        serving = f"REST on https://127.0.0.1:{http_port} and gRPC over mutual TLS"
        _wait_for_line(process, log_path, serving, timeout=180)
        target = f"localhost:{http_port}"
        with Client(target, tls_ca=pki.ca, timeout=30, **client_cert(pki)) as client:
            assert client.embed(TEXTS, model=DEFAULT_MODEL).shape == (2, 384)
        url = f"https://127.0.0.1:{http_port}/v1/embeddings"
        good = tls_context(pki.ca, pki.client_cert, pki.client_key)
        request = urllib.request.Request(
            url,
            data=json.dumps({"input": "hello", "model": DEFAULT_MODEL}).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30, context=good) as reply:
            assert len(json.loads(reply.read())["data"][0]["embedding"]) == 384
        assert_refused(target, tls_ca=pki.ca)  # no client certificate
        with pytest.raises(REFUSED):
            urllib.request.urlopen(url.replace("https:", "http:"), timeout=10)
    finally:
        process.terminate()
        code = process.wait(60)
    log_text = log_path.read_text(errors="replace")
    assert code == 0, log_text
    assert f"TLS private key {key} has mode 0644" in log_text
    assert "listen in plaintext on 127.0.0.1 only, not on grpc_host 0.0.0.0" in log_text
    for line in pem_body_lines(key, pki.server_cert, pki.ca):
        assert line not in log_text


def _wait_for_line(
    process: subprocess.Popen[bytes], log_path: Path, line: str, timeout: float
) -> None:
    """Polls the log until ``line`` is in it (fails with the log if the process exits)."""
    deadline = time.monotonic() + timeout
    while line not in log_path.read_text(errors="replace"):
        assert process.poll() is None, log_path.read_text(errors="replace")
        assert time.monotonic() < deadline, log_path.read_text(errors="replace")
        time.sleep(0.1)


@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_missing_key_is_one_line_before_anything_starts(
    pki: Pki, tmp_path: Path, command: str
) -> None:
    argv = [
        sys.executable, "-m", "embedd_server.cli.main", command,
        "--http-port", str(free_port()),
        "--grpc-port", "0", "--metrics-port", "0", "--models-dir", str(tmp_path),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(tmp_path / "missing.key"),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert f"embedd {command}: tls_key: " in done.stderr and "is not a file" in done.stderr
    assert "Traceback" not in done.stderr
