"""Prometheus metrics of one server, served on 127.0.0.1 only.

Each :class:`Metrics` has its own ``CollectorRegistry`` (not prometheus_client's global one),
so one process may run several servers, as the tests do. Counters and histograms are updated
where things happen, at most once per request or per batch. Gauges of state that is kept
anyway (queue depth, workers alive, models loaded) are read when Prometheus scrapes, so they
cost the hot path nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import start_http_server as _start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # never on a public interface: Envoy is the only way in from outside
LATENCY_BUCKETS = (
    *(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
    *(0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
BATCH_TEXT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class MetricsPortError(RuntimeError):
    """The metrics port cannot be bound; the message names it and the setting."""


@dataclass(frozen=True)
class ModelGauges:
    """What a loaded model reports at each scrape."""

    model: str
    queued_texts: int
    queued_tokens: int
    workers_alive: int


GaugeSource = Callable[[], Sequence[ModelGauges]]


class Metrics:
    """The metrics of one server. Counters and histograms are public attributes; label
    children used on hot paths are bound once here."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "embedd_requests",
            "RPCs answered, by RPC (a REST route counts as the RPC it maps to), model and gRPC "
            "status code name.",
            ["method", "model", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "embedd_request_duration_seconds",
            "Time from an RPC's arrival to its answer, by RPC.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        stages = Histogram(
            "embedd_stage_duration_seconds",
            "Per-stage latency: queue (submitted until a worker takes its first input), "
            "tokenize (per request), compute (one llama.cpp decode of a batch).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = stages.labels("queue")
        self.tokenize_time = stages.labels("tokenize")
        self.compute_time = stages.labels("compute")
        self.batch_texts = Histogram(
            "embedd_batch_size_texts",
            "Inputs per decode.",
            buckets=BATCH_TEXT_BUCKETS,
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "embedd_batch_size_tokens",
            "Tokens per decode.",
            buckets=BATCH_TOKEN_BUCKETS,
            registry=registry,
        )
        self.input_tokens = Counter(
            "embedd_input_tokens", "Tokens of the inputs embedded.", ["model"], registry=registry
        )
        self.truncated_inputs = Counter(
            "embedd_truncated_inputs",
            "Inputs cut to the model's limit (or a request's max_tokens) before embedding.",
            ["model"],
            registry=registry,
        )
        self.worker_replacements = Counter(
            "embedd_worker_replacements",
            "Workers replaced after a crash or a hang.",
            ["model"],
            registry=registry,
        )
        self.model_loads = Counter(
            "embedd_model_loads",
            "Models loaded (first use, explicit load, reload).",
            ["model"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "embedd_cache_hits",
            "Inputs answered from the vector cache, by model.",
            ["model"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "embedd_cache_misses",
            "Inputs looked up in the vector cache and computed, by model.",
            ["model"],
            registry=registry,
        )
        self.cache_bytes = Gauge(
            "embedd_cache_bytes",
            "Bytes the vector cache holds (rows and their bookkeeping).",
            registry=registry,
        )
        # Label children by label values: labels() costs microseconds, a dict look-up nothing.
        self._request_counts: dict[tuple[str, str, str], Counter] = {}
        self._request_durations: dict[str, Histogram] = {}
        self._state = _StateCollector()
        registry.register(self._state)
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, cpu, fds
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def request_done(self, method: str, model: str, code: str, seconds: float) -> None:
        """Counts one answered RPC and observes its duration (event loop only)."""
        key = (method, model, code)
        count = self._request_counts.get(key)
        if count is None:
            count = self._request_counts[key] = self.requests.labels(*key)
        count.inc()
        duration = self._request_durations.get(method)
        if duration is None:
            duration = self._request_durations[method] = self.request_duration.labels(method)
        duration.observe(seconds)

    def watch(self, source: GaugeSource) -> None:
        """Adds a source of per-model gauges, read at every scrape (from the HTTP thread)."""
        self._state.sources.append(source)

    def serve(self, port: int) -> int:
        """Serves /metrics on 127.0.0.1:``port`` in a daemon thread; returns the bound port."""
        try:
            self._http, self._thread = _start_http_server(port, HOST, registry=self.registry)
        except OSError as exc:
            raise MetricsPortError(
                f"cannot serve metrics on {HOST}:{port} ({exc.strerror}); is another server "
                "running there? Choose another port with --metrics-port / EMBEDD_METRICS_PORT, "
                "or 0 to turn metrics off."
            ) from None
        bound: int = self._http.server_port
        log.info("metrics on http://%s:%d/metrics", HOST, bound)
        return bound

    @property
    def address(self) -> tuple[str, int] | None:
        """Where /metrics is served (None when it is not)."""
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stops serving /metrics (if it was served)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class _StateCollector(Collector):
    """Queue depth, workers alive and models loaded, read from the models at scrape time."""

    def __init__(self) -> None:
        self.sources: list[GaugeSource] = []

    def describe(self) -> Iterable[Metric]:
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        return self._families([gauges for source in self.sources for gauges in source()])

    @staticmethod
    def _families(models: Sequence[ModelGauges]) -> list[Metric]:
        texts = GaugeMetricFamily(
            "embedd_queue_texts", "Inputs waiting for a worker.", labels=["model"]
        )
        tokens = GaugeMetricFamily(
            "embedd_queue_tokens", "Tokens of the inputs waiting for a worker.", labels=["model"]
        )
        alive = GaugeMetricFamily(
            "embedd_workers_alive", "Worker threads in service.", labels=["model"]
        )
        for model in models:
            texts.add_metric([model.model], model.queued_texts)
            tokens.add_metric([model.model], model.queued_tokens)
            alive.add_metric([model.model], model.workers_alive)
        loaded = GaugeMetricFamily("embedd_models_loaded", "Models loaded.", value=len(models))
        return [texts, tokens, alive, loaded]
