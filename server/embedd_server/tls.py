"""The server's TLS material (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``): checked at
start, before anything listens, so that a wrong file is one clear line instead of a failed
handshake for every caller later.

``embedd serve`` hands the bytes to grpc (:func:`load_server_tls`); ``embedd run`` only checks
the files (:func:`check_server_tls`): Envoy reads them itself. Nothing here logs or puts into
an exception the content of a file: only its path, its mode, and what is wrong with it.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

from embedd_server.settings import Settings, env_name

log = logging.getLogger(__name__)

# Permission bits of a private key that earn a warning: anything for others, and group write
# or execute (group read is fine: a dedicated group such as ssl-cert is common practice).
TOO_OPEN_KEY_BITS = stat.S_IRWXO | stat.S_IWGRP | stat.S_IXGRP


class TlsError(ValueError):
    """A TLS file is missing, unreadable or not what its setting says (the message says which
    and what to do; never the file's content)."""


@dataclass(frozen=True)
class ServerTls:
    """The PEM bytes a TLS server needs. repr() shows none of them."""

    certificate_chain: bytes = field(repr=False)
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = field(default=None, repr=False)  # mTLS when set

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def check_server_tls(settings: Settings) -> None:
    """Raises TlsError when TLS is asked for and its files are not a certificate chain with its
    matching private key (and, for mTLS, a readable CA bundle); warns about a private key that
    others may read. A no-op without TLS."""
    if not settings.tls:
        return
    cert = _existing(settings.tls_cert, "tls_cert")
    key = _existing(settings.tls_key, "tls_key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_refuse_password)
    except _EncryptedKey:
        raise TlsError(
            f"tls_key {key} is encrypted; nobody is there to type its passphrase: give it "
            "unencrypted (e.g. `openssl pkey -in encrypted.pem -out key.pem`, mode 0600)."
        ) from None
    except ssl.SSLError as exc:
        raise TlsError(
            f"tls_cert {cert} and tls_key {key} are not a PEM certificate chain and its "
            f"matching unencrypted private key ({exc.reason or exc.__class__.__name__}): give "
            "the server certificate (intermediates after it) and the key it was issued for."
        ) from None
    if settings.tls_client_ca:
        ca = _existing(settings.tls_client_ca, "tls_client_ca")
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as exc:
            raise TlsError(
                f"tls_client_ca {ca} holds no PEM CA certificate "
                f"({exc.reason or exc.__class__.__name__}): give the certificate(s) of the CA "
                "that signs your clients' certificates."
            ) from None
    _warn_if_open(key)


def load_server_tls(settings: Settings) -> ServerTls | None:
    """The checked TLS material of these settings; None when they serve plaintext."""
    if not settings.tls:
        return None
    check_server_tls(settings)
    client_ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return ServerTls(
        Path(settings.tls_cert).read_bytes(), Path(settings.tls_key).read_bytes(), client_ca
    )


def _existing(name: str, setting: str) -> Path:
    path = Path(name).expanduser()
    if not path.is_file():
        raise TlsError(
            f"{setting}: {path} is not a file; give the PEM file's path with "
            f"--{setting.replace('_', '-')} or {env_name(setting)}."
        )
    if not os.access(path, os.R_OK):
        raise TlsError(f"{setting}: {path} is not readable by this user (uid {os.getuid()}).")
    return path


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    # Called only for an encrypted key (instead of a prompt on the terminal).
    raise _EncryptedKey


def _warn_if_open(key: Path) -> None:
    mode = stat.S_IMODE(key.stat().st_mode)
    if mode & TOO_OPEN_KEY_BITS:
        log.warning(
            "TLS private key %s has mode %04o: others may read or replace it; "
            "chmod 600 it (640 for a dedicated group)",
            key,
            mode,
        )
