"""The gRPC server: wiring, health, reflection, and a symmetric start/stop lifecycle."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from embedd.v1 import embedder_pb2
from embedd_server.compute.engine import RuntimeLoader
from embedd_server.core.registry import ModelRegistry
from embedd_server.core.service import EmbeddingService
from embedd_server.engines.choice import load_runtime
from embedd_server.errors import EmbeddError
from embedd_server.metrics import Metrics, MetricsPortError
from embedd_server.rpc.backend import Backend
from embedd_server.rpc.interceptors import auth
from embedd_server.rpc.interceptors.access_log import RequestContextInterceptor
from embedd_server.rpc.interceptors.decode_guard import DecodeGuard
from embedd_server.rpc.reflection import enable_reflection
from embedd_server.rpc.services import add_services, service_names
from embedd_server.settings import Settings
from embedd_server.tls import ServerTls, TlsError, load_server_tls

log = logging.getLogger(__name__)

SERVICE_NAME = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
# Metadata (headers) one call may carry: above Envoy's max_request_headers_kb (60) plus the
# headers Envoy adds and HPACK's 32 bytes per entry.
MAX_METADATA_BYTES = 128 * 1024
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(RuntimeError):
    """The server could not start (port in use, default model missing...)."""


class EmbeddServer:
    """The gRPC server of one process. ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings, loader: RuntimeLoader = load_runtime) -> None:
        self.settings = settings
        self.metrics = Metrics()
        engine_settings = settings.engine_settings()
        self.registry = ModelRegistry(
            engine_settings, loader, on_worker_loss=self._on_worker_loss, metrics=self.metrics
        )
        self.service = EmbeddingService(engine_settings, self.registry)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # grpc.aio objects belong to the event loop they are made on: created in start().
        self.health: health_aio.HealthServicer | None = None
        self.serving = False  # what the health service last reported for this server
        self._server: aio.Server | None = None

    def _build_server(self, health_servicer: health_aio.HealthServicer) -> aio.Server:
        server = aio.server(
            # Request ids first, so calls refused by access control are logged and counted too.
            interceptors=[
                RequestContextInterceptor(self.metrics),
                *auth.interceptors(self.settings),
                # Innermost: it swaps the request deserializer, which refuses a message
                # over max_request_bytes undecoded.
                DecodeGuard(self.settings.max_request_bytes),
            ],
            options=[
                ("grpc.max_receive_message_length", self.settings.max_receive_bytes),
                ("grpc.max_send_message_length", self.settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # grpcio's defaults (8 KiB soft, 16 KiB hard; between them it refuses at
                # random) are below what Envoy lets through (max_request_headers_kb): REST
                # callers' headers are bounded by Envoy with a 431, not here.
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
            ],
        )
        backend = Backend(
            self.service,
            self.settings.stream_window,
            serving=lambda: self.serving,
            openai_truncate=self.settings.openai_truncate,
            max_answer_bytes=self.settings.max_message_bytes,
        )
        add_services(server, backend)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        enable_reflection((*service_names(), health.SERVICE_NAME), server)
        return server

    async def start(self) -> int:
        """Binds the port, loads the default model, then reports SERVING. Returns the port."""
        self._loop = asyncio.get_running_loop()
        try:  # before any grpc object exists: nothing to clean up after a bad file
            tls = load_server_tls(self.settings)
        except TlsError as exc:
            raise StartupError(str(exc)) from None
        self.health = health_aio.HealthServicer()
        self._server = server = self._build_server(self.health)
        try:
            self.port = _add_port(server, self.settings.grpc_address, tls)
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen on {self.settings.grpc_address} ({exc}); is another server "
                "running there? Choose another port with --grpc-port / EMBEDD_GRPC_PORT."
            ) from None
        if self.settings.metrics_port:
            try:
                self.metrics.serve(self.settings.metrics_port)
            except MetricsPortError as exc:
                raise StartupError(str(exc)) from None
        await self._set_health(NOT_SERVING)
        await server.start()
        self.registry.start()
        log.info(
            "gRPC listening on %s:%d (%s)",
            self.settings.grpc_host,
            self.port,
            _transport(self.settings),
        )
        try:
            await self.registry.get(self.settings.default_model)
        except EmbeddError as exc:
            await server.stop(0)
            await asyncio.to_thread(self.metrics.close)  # waits out its poll interval
            raise StartupError(f"default model: {exc.message}") from None
        await self._set_health(SERVING)
        log.info("serving; default model %s", self.settings.default_model)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, refuse new calls, let calls in flight finish, then free models."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self._set_health(NOT_SERVING)
        log.info("draining: calls in flight get up to %.0fs", grace)
        if self._server is not None:
            await self._server.stop(grace)
        await self.registry.close()
        await asyncio.to_thread(self.metrics.close)
        log.info("stopped")

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        self.serving = status == SERVING
        if self.health is not None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)

    def _on_worker_loss(self, model: str) -> None:
        # Called from a worker thread; the health servicer lives on the event loop.
        if model == self.settings.default_model and self._loop is not None:
            log.error("every worker of the default model died: reporting NOT_SERVING")
            asyncio.run_coroutine_threadsafe(self._set_health(NOT_SERVING), self._loop)


# --- TLS ------------------------------------------------------------------------------------


def _add_port(server: aio.Server, address: str, tls: ServerTls | None) -> int:
    """Binds the gRPC port: TLS (mutual with a client CA) when there is TLS material, else
    plaintext."""
    if tls is None:
        return server.add_insecure_port(address)
    credentials = grpc.ssl_server_credentials(
        [(tls.private_key, tls.certificate_chain)],
        root_certificates=tls.client_ca,
        require_client_auth=tls.mutual,
    )
    return server.add_secure_port(address, credentials)


def _transport(settings: Settings) -> str:
    if not settings.tls:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca else "TLS"


async def serve(settings: Settings, loader: RuntimeLoader = load_runtime) -> None:
    """Runs the server until SIGTERM/SIGINT, then shuts it down gracefully."""
    server = EmbeddServer(settings, loader)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    await server.start()
    await stop_requested.wait()
    log.info("signal received: shutting down")
    await server.stop()
