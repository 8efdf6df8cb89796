"""A throw-away PKI for the TLS tests, made with the machine's ``openssl``: a CA, a server
certificate for localhost / 127.0.0.1 / ::1, a client certificate signed by the same CA, and a
second, unrelated CA with its own client certificate (the "wrong CA" cases). EC P-256 keys:
quick to make (the whole set in well under a second)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing of this server's or its clients'
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


def make_pki(directory: Path) -> Pki:
    """Creates the files in ``directory`` (keys mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "ca")
    other_ca = _ca(directory, "other-ca")
    server = _leaf(
        directory,
        "server",
        ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\nextendedKeyUsage=serverAuth\n",
    )
    client = _leaf(directory, "client", ca, "extendedKeyUsage=clientAuth\n")
    other_client = _leaf(directory, "other-client", other_ca, "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client_cert=client[0],
        client_key=client[1],
        other_ca=other_ca[0],
        other_client_cert=other_client[0],
        other_client_key=other_client[1],
    )


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)
    return path


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key = _key(directory / f"{name}.key")
    cert = directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-new", "-key", key, "-out", cert, "-days", DAYS,
        "-subj", f"/CN=embedd test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key = _key(directory / f"{name}.key")
    request = directory / f"{name}.csr"
    cert = directory / f"{name}.pem"
    ext_file = directory / f"{name}.ext"
    ext_file.write_text("basicConstraints=CA:FALSE\n" + extensions)
    _openssl("req", "-new", "-key", key, "-out", request, "-subj", f"/CN=embedd test {name}")
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-out", cert, "-days", DAYS, "-extfile", ext_file,
    )  # fmt: skip
    return cert, key


def _openssl(*args: str | Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], check=True, capture_output=True, text=True, timeout=30
    )
