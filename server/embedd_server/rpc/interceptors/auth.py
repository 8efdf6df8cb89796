"""Who may call: API keys, admin keys and per-caller rate limits, as one gRPC server interceptor.

When API keys are configured, every RPC but the health checks (the gRPC health service, the
Health RPC behind GET /health and TEI's GET /ping, public in TEI too) must present one (an admin
key does too), as ``authorization: Bearer <key>`` or ``x-api-key: <key>`` metadata (Envoy passes
the REST headers of the same names through). A rate limit is a token bucket per API key, or per
client address when keys are off: the address Envoy determined (``x-embedd-client-address``) when
the call carries Envoy's proxy secret, else the call's own gRPC peer; what a caller claims
(X-Forwarded-For, metadata) never picks its bucket.

Model control (LoadModel, UnloadModel: loading with options that every caller of the model
then shares, pinning a keep_alive, unloading) needs an admin key (:class:`ModelControl`). With
no admin key configured it is refused, except on a server without any key whose listeners are
all on loopback, for callers on loopback: a developer's machine works without keys, while a
server that listens beyond loopback, or has API keys, never leaves model control open.

Refusals go through :func:`embedd_server.rpc.status.abort`, like every other error, so REST
callers get 401 / 403 / 429 bodies in their API's shape.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from embedd_server.errors import EmbeddError, PermissionDenied, RateLimited, Unauthenticated
from embedd_server.rpc.interceptors.handlers import (
    Handler,
    WrappingInterceptor,
    behaviour_of,
    same_kind,
)
from embedd_server.rpc.status import BodyShape, abort, body_shape_for
from embedd_server.settings import Settings, SettingsError

log = logging.getLogger(__name__)

# Set by our Envoy on every call it forwards (envoy/envoy.yaml.tmpl, edge hardening): the
# client address it determined, and the secret that proves Envoy wrote it.
CLIENT_ADDRESS_HEADER = "x-embedd-client-address"
PROXY_SECRET_HEADER = "x-embedd-proxy-secret"
OPEN_PREFIX = "/grpc.health.v1.Health/"  # health checks (Envoy's, Kubernetes') need no key
# GET /health, for load balancers; GET /ping, TEI's (SageMaker's) health check.
OPEN_METHODS = frozenset({"/embedd.v1.Embedder/Health", "/embedd.v1.Tei/TeiPing"})
# Model control: what changes the models every caller shares (POST /v1/models/load, /unload).
MODEL_CONTROL_METHODS = frozenset(
    {"/embedd.v1.Embedder/LoadModel", "/embedd.v1.Embedder/UnloadModel"}
)
MODEL_CONTROL = "Model control (loading a model with options or a keep_alive, unloading one)"
HOW_TO_SEND = "Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
Clock = Callable[[], float]
Metadata = Sequence[tuple[str, str | bytes]]


def read_keys_file(path: Path, setting: str = "api_keys_file") -> list[str]:
    """The keys in ``path``: one per line; '#' starts a comment; blank lines are ignored.
    A file that cannot be read or holds no key is a SettingsError naming it (and ``setting``)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SettingsError(f"{setting}: cannot read {path}: {reason}") from None
    keys = [key for line in lines if (key := line.split("#", 1)[0].strip())]
    if not keys:  # an empty file must not silently turn the keys off
        raise SettingsError(f"{setting}: {path} holds no keys")
    return keys


def _keys_of(listed: str, file: str, setting: str) -> list[str]:
    keys = [key.strip() for key in listed.split(",") if key.strip()]
    return keys + (read_keys_file(Path(file), setting) if file else [])


class KeyStore:
    """The accepted API keys. Checks compare against every key in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(dict.fromkeys(key.encode() for key in keys))

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """The API keys (api_keys and api_keys_file)."""
        return cls(_keys_of(settings.api_keys, settings.api_keys_file, "api_keys_file"))

    @classmethod
    def admin_from_settings(cls, settings: Settings) -> KeyStore:
        """The admin keys (admin_api_keys and admin_api_keys_file)."""
        return cls(
            _keys_of(settings.admin_api_keys, settings.admin_api_keys_file, "admin_api_keys_file")
        )

    def __len__(self) -> int:
        return len(self._keys)

    def accepts(self, presented: str) -> bool:
        # No early exit: the time taken says nothing about which key (or how much of it) matched.
        candidate = presented.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched


class RateLimiter:
    """Token buckets per caller: ``rate`` tokens a second, at most ``burst`` saved up.

    Used from the event loop only, so it needs no lock. A bucket idle long enough to have
    refilled is the same as a new one, so it is dropped: memory grows with the callers seen
    in the last ``burst / rate`` seconds, not with every caller ever seen.
    """

    def __init__(self, rate: float, burst: float = 0, clock: Clock = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst or max(1.0, rate)
        self._clock = clock
        self._refill_s = self.burst / rate
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when); LRU order

    def take(self, caller: str) -> float:
        """Takes a token for ``caller``: 0 when granted, else the seconds until one is due."""
        now = self._clock()
        self._evict_refilled(now)
        tokens, when = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        granted = tokens >= 1
        self._buckets[caller] = (tokens - 1 if granted else tokens, now)  # now the newest
        return 0.0 if granted else (1 - tokens) / self.rate

    @property
    def callers(self) -> int:
        """How many buckets are held."""
        return len(self._buckets)

    def _evict_refilled(self, now: float) -> None:
        for caller, (_, when) in list(self._buckets.items()):
            if now - when < self._refill_s:
                break  # the rest were used more recently
            del self._buckets[caller]


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def presented_key(metadata: Metadata) -> str | None:
    """The key a call carries: ``authorization: Bearer <key>``, else ``x-api-key``."""
    values = {name: _text(value) for name, value in metadata}
    scheme, _, token = values.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return values.get("x-api-key", "").strip() or None


def client_address(metadata: Metadata, peer: str, proxy_secret: str = "") -> str:
    """The caller's host. Through our Envoy (the call carries ``proxy_secret``, which Envoy
    adds and no client can forge): the address Envoy determined from the connection (and
    ``xff_trusted_hops`` proxies' X-Forwarded-For), which it writes over whatever the client
    sent. Otherwise: the gRPC peer without its port; X-Forwarded-For or other metadata a
    direct caller sends is its own claim and is ignored."""
    if proxy_secret:
        values = {name: _text(value) for name, value in metadata}
        presented = values.get(PROXY_SECRET_HEADER, "").encode()
        address = values.get(CLIENT_ADDRESS_HEADER, "").strip()
        if address and hmac.compare_digest(presented, proxy_secret.encode()):
            return address
    kind, _, address = peer.partition(":")  # "ipv4:1.2.3.4:5678", "ipv6:[::1]:5678"
    return address.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer


def is_loopback(host: str) -> bool:
    """Whether a host (an address or "localhost") is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ModelControl:
    """Who may load and unload models: callers with an admin key; with no admin key configured,
    only callers on loopback of a server without keys that listens on loopback only."""

    def __init__(
        self, admin_keys: KeyStore, api_keys: KeyStore, local_only: bool, proxy_secret: str = ""
    ) -> None:
        self._admin_keys = admin_keys
        self._api_keys = api_keys
        self._local_only = local_only
        self._proxy_secret = proxy_secret  # whose client address to believe (client_address)

    @classmethod
    def from_settings(cls, settings: Settings, api_keys: KeyStore) -> ModelControl:
        local_only = is_loopback(settings.grpc_host) and is_loopback(settings.http_host)
        admin_keys = KeyStore.admin_from_settings(settings)
        return cls(admin_keys, api_keys, local_only, settings.proxy_secret)

    @property
    def admin_keys(self) -> KeyStore:
        return self._admin_keys

    def describe(self) -> str:
        """How model control is reached, for the start-up log."""
        if self._admin_keys:
            return f"with one of {len(self._admin_keys)} admin key(s)"
        if self._api_keys or not self._local_only:
            return "off (no admin key)"
        return "open to callers on loopback (no keys; listening on loopback only)"

    def check(self, key: str | None, metadata: Metadata, peer: str) -> None:
        """Raises Unauthenticated or PermissionDenied unless the caller may control models."""
        if self._admin_keys:
            if key is not None and self._admin_keys.accepts(key):
                return
            if key is None:
                raise Unauthenticated(f"{MODEL_CONTROL} needs an admin key; none was sent.")
            if not self._api_keys.accepts(key):
                log.info("refused model control with an unknown key", extra={"peer": peer})
                raise Unauthenticated(f"Incorrect API key provided. {HOW_TO_SEND}")
            raise PermissionDenied(
                f"{MODEL_CONTROL} needs an admin key; this API key is not one. Ask the "
                "server's operator to do it, or for an admin key (--admin-api-keys)."
            )
        local = not self._api_keys and self._local_only
        if local and is_loopback(client_address(metadata, peer, self._proxy_secret)):
            return
        reason = (
            "this server has API keys but no admin key"
            if self._api_keys
            else "this server has no admin key, and without keys it is allowed only from "
            "loopback on a server listening on loopback only"
        )
        raise PermissionDenied(
            f"{MODEL_CONTROL} needs an admin key: {reason}. Start the server with "
            "--admin-api-keys (or --admin-api-keys-file) and send one."
        )


class AccessInterceptor(WrappingInterceptor):
    """Checks the API key, the admin key of model control and the rate limit of every call
    before its handler runs."""

    def __init__(
        self,
        keys: KeyStore,
        limiter: RateLimiter | None,
        control: ModelControl,
        proxy_secret: str = "",
    ) -> None:
        self._keys = keys
        self._limiter = limiter
        self._control = control
        self._proxy_secret = proxy_secret  # whose client address to believe (client_address)

    def wrap(self, handler: Handler, details: grpc.HandlerCallDetails) -> Handler:
        method = details.method
        if method.startswith(OPEN_PREFIX) or method in OPEN_METHODS:
            return handler
        control = method in MODEL_CONTROL_METHODS
        if not control and not self._keys and self._limiter is None:
            return handler  # nothing to check: no per-call cost
        metadata = tuple(details.invocation_metadata or ())

        def check(peer: str) -> None:
            self._admit(metadata, peer, control)

        return _guarded(handler, check, body_shape_for(method))

    def _admit(self, metadata: Metadata, peer: str, control: bool) -> None:
        """Raises Unauthenticated, PermissionDenied or RateLimited when the call may not
        proceed."""
        key = presented_key(metadata)
        if self._keys:
            if key is None:
                raise Unauthenticated(f"Incorrect API key provided: none was sent. {HOW_TO_SEND}")
            admin = self._control.admin_keys
            if not (self._keys.accepts(key) | admin.accepts(key)):  # both, in constant time
                log.info("refused a call with an unknown API key", extra={"peer": peer})
                raise Unauthenticated(f"Incorrect API key provided. {HOW_TO_SEND}")
            caller, scope = key, "API key"
        else:
            caller = client_address(metadata, peer, self._proxy_secret)
            scope = "client address"
        if control:
            self._control.check(key, metadata, peer)
        limiter = self._limiter
        if limiter is not None and (wait := limiter.take(caller)):
            raise RateLimited(
                f"Rate limit exceeded: {limiter.rate:g} requests per second per {scope} "
                f"(bursts of {limiter.burst:g}). Retry in {math.ceil(wait)} s.",
                retry_after_s=wait,
            )


def _guarded(handler: Handler, check: Callable[[str], None], shape: BodyShape) -> Handler:
    """A handler of the same kind as ``handler`` that runs ``check(peer)`` first; a refusal
    ends the call with its error (status, message and REST trailers)."""
    original = behaviour_of(handler)

    async def admit(context: aio.ServicerContext[Any, Any]) -> None:
        try:
            check(context.peer())
        except EmbeddError as error:
            await abort(context, error, shape)

    async def single(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await admit(context)
        return await original(request, context)

    async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        await admit(context)
        async for response in original(request, context):
            yield response

    return same_kind(handler, streaming if handler.response_streaming else single)


def interceptors(settings: Settings) -> list[aio.ServerInterceptor]:
    """The access interceptor of these settings (always one: model control is always guarded;
    other calls pass untouched when keys and rate limits are off).

    Raises SettingsError naming the keys file when it cannot be read.
    """
    keys = KeyStore.from_settings(settings)
    control = ModelControl.from_settings(settings, keys)
    rate = settings.rate_limit_per_s
    limiter = RateLimiter(rate, settings.rate_limit_burst) if rate > 0 else None
    limit = (
        f"{rate:g} calls/s per caller, bursts of {limiter.burst:g}"
        if limiter is not None
        else "off"
    )
    log.info(
        "access: %d API key(s) required; rate limit %s; model control %s",
        len(keys),
        limit,
        control.describe(),
    )
    return [AccessInterceptor(keys, limiter, control, settings.proxy_secret)]
