"""The one typed settings object.

Every option is a field of :class:`Settings`; the same field is a command-line flag
(``--grpc-port``), an environment variable (``EMBEDD_GRPC_PORT``) and a key of the optional
TOML config file (``grpc_port = 50051``). Precedence: flag > environment > config file >
default. This is the only module that reads the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from embedd_server.compute.settings import ENGINES, EngineSettings

ENV_PREFIX = "EMBEDD_"
CONFIG_ENV = "EMBEDD_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _opt(help_text: str, default: Any, *, secret: bool = False) -> Any:
    """A settings field: its help text is the ``--help`` line of the flag. Secret fields
    stay out of repr() (and so out of logs)."""
    return field(default=default, metadata={"help": help_text}, repr=not secret)


@dataclass(frozen=True)
class Settings:
    """Everything the server, Envoy and the CLI can be told."""

    grpc_host: str = _opt("Address the gRPC server listens on.", "127.0.0.1")
    grpc_port: int = _opt("gRPC port (0 picks a free one).", 50051)
    http_host: str = _opt(
        "Address Envoy's REST listener binds (embedd run); 0.0.0.0 in a container.", "127.0.0.1"
    )
    http_port: int = _opt("Port of Envoy's REST listener (OpenAI and Ollama routes).", 8080)
    # --- Envoy at the edge (embedd run, compose, k8s): admin, timeouts, limits, client address
    envoy_admin_socket: str = _opt(
        "Unix socket of Envoy's admin interface (embedd run), created with mode 0600 in a "
        "directory only this user may enter (0700); empty: a private temporary directory of "
        "the run. The admin interface listens on no TCP port: keep it private, it can stop "
        "Envoy.",
        "",
    )
    envoy_header_timeout_s: float = _opt(
        "Seconds a client gets to send a request's headers once it has started; a slower "
        "connection is closed (slowloris).",
        10.0,
    )
    envoy_idle_timeout_s: float = _opt(
        "Seconds a client connection may stay open with no request in flight, and a request "
        "may go without any data either way, before Envoy closes it.",
        300.0,
    )
    envoy_max_connections: int = _opt(
        "Most client connections Envoy holds open at once (all clients together); past it new "
        "connections are closed at once.",
        10000,
    )
    envoy_max_streams_per_connection: int = _opt(
        "Most concurrent HTTP/2 streams (gRPC calls) on one client connection; a client "
        "queues the rest.",
        100,
    )
    xff_trusted_hops: int = _opt(
        "Proxies in front of Envoy whose X-Forwarded-For entries are trusted (0: Envoy is the "
        "edge and the client address is the connection's peer). Per-address rate limits use "
        "the address Envoy determines this way, never what the client claims.",
        0,
    )
    proxy_secret: str = _opt(
        "Shared secret Envoy sends the servers with each call (x-embedd-proxy-secret) so they "
        "believe the client address it determined (x-embedd-client-address); a call without it "
        "is limited by its own peer address. embedd run makes one per run; set the same value "
        "on Envoy and the servers in compose or Kubernetes. Letters, digits, '-' and '_'.",
        "",
        secret=True,
    )
    models_dir: Path = _opt(
        "Directory of GGUF models; each <name>.gguf is a model. Each file's metadata and "
        "sha256 are read once per version (size and modification time) in background "
        "threads, so listings and requests for unknown models read no model file; files added "
        "or removed are seen without a restart.",
        Path("models"),
    )
    builtin_models_dir: str = _opt(
        "A second directory of GGUF models, looked in after models_dir (a file of the same "
        "name in models_dir wins); empty: none. The container image keeps its default model "
        "here, so a volume mounted at models_dir adds models instead of hiding it.",
        "",
    )
    default_model: str = _opt(
        "Model used when a request names none; loaded at start-up.", "all-minilm-l6-v2"
    )
    model_aliases: str = _opt(
        "Other names for local models, as alias=model pairs separated by commas (in the config "
        "file also a [model_aliases] table), e.g. text-embedding-3-small=all-minilm-l6-v2, so "
        "existing OpenAI code works unchanged. Aliases are listed (GET /v1/models, with "
        "alias_of; Ollama's /api/tags) and answer under their own name; as in Ollama, "
        "NAME:latest and library/NAME mean NAME, for models and aliases alike.",
        "",
    )
    keep_alive: str = _opt(
        "How long a model other than the default stays loaded when idle, as Ollama's "
        'keep_alive: a duration ("5m", "1h"), seconds, 0 (unload after each request) or '
        "negative (forever). Requests may set their own, except for the default model, which "
        "stays loaded (requests' keep_alive for it is ignored; it is never unloaded), and for a "
        "model whose keep_alive an admin set with a load.",
        "5m",
    )
    memory_budget_mb: int = _opt(
        "Memory the loaded models may take together, in MiB (their GGUF sizes); 0 means no "
        "limit. Loading past it first unloads the least recently used idle models, then "
        "refuses with RESOURCE_EXHAUSTED (HTTP 429).",
        0,
    )
    workers: int = _opt(
        "Workers of each loaded model, each taking packs of inputs from the model's queue to "
        "its engine. 0 (auto): for ONNX Runtime in threads one per onnx_threads (the cores): "
        "busy workers run a core each on a single-threaded session, a call alone every core "
        "on a second, both mapping one copy of the weights; 2 for llama.cpp's contexts and "
        "ONNX Runtime's processes (one per core was fastest on 2 cores). 1 for ONNX Runtime "
        "in threads: one session of every core (-62 MiB, slower under load). Measurements: "
        'docs/design.md, "Workers".',
        0,
    )
    worker_processes: bool | None = _opt(
        "Where each worker's engine runs: auto (the default) puts ONNX Runtime's workers in "
        "threads of the server, running on sessions that map one copy of the weights, and "
        "llama.cpp's each in a process of its own; true: a process each for every engine; "
        "false: threads for every engine. Measured on 2 CPU cores (docs/design.md, "
        '"Workers"): ONNX Runtime in threads took half the memory and served single texts as '
        "fast, batches of 32 texts slower than in processes. With "
        "processes a crash in llama.cpp costs one worker process (its pack runs again on a new "
        "one), not the server, and a hung decode can be killed; a hung ONNX Runtime call is "
        "stopped in either place. llama.cpp's processes share the memory-mapped weights. With "
        "GPU offload (n_gpu_layers != 0) workers are always threads, so the GPU holds one copy "
        "of the weights.",
        None,
    )
    threads_per_worker: int = _opt(
        "CPU threads each worker's llama.cpp context uses. workers x threads should not "
        "exceed the cores.",
        1,
    )
    batch_tokens: int = _opt(
        "Most tokens a worker packs into one llama.cpp decode. Packing short inputs of several "
        "requests together pays up to a point: attention runs over the whole pack, so its "
        "cost grows with the square of the pack (measurements in docs/design.md). An input "
        "longer than this still runs, alone.",
        128,
    )
    batch_sequences: int = _opt(
        "Most inputs a worker packs into one decode (llama.cpp) or one padded batch (ONNX "
        "Runtime).",
        32,
    )
    n_gpu_layers: int = _opt(
        "Layers offloaded to the GPU when llama.cpp is built with CUDA (-1: all, 0: CPU only).",
        0,
    )
    engine: str = _opt(
        "Engine of each model: auto (ONNX Runtime for the encoders, their rerankers, "
        "classifiers and SPLADE models with f32/f16 weights on the CPU, where it was measured "
        "exact and faster; llama.cpp for the decoders, quantized files and GPUs), llama.cpp or "
        "onnxruntime. /v1/models says which engine serves each model.",
        "auto",
    )
    onnx_batch_tokens: int = _opt(
        "ONNX Runtime engine: most tokens of one worker's pack (what it takes from the queue) "
        "and slots of each call the pack is run as (rows x width: a BERT graph puts several "
        "short inputs in one row, other graphs pad each input to its batch's longest); an "
        "input longer than this still runs, alone. 256 beat 2048 (docs/design.md). The "
        "engine's own default, 8192, applies only where it is built directly (tests, bench).",
        256,
    )
    onnx_threads: int = _opt(
        "ONNX Runtime engine: intra-op threads of a call that runs alone (in threads: the "
        "session such calls share, beside the single-threaded one that calls running at once "
        "share, when there are several workers; in processes: each worker's own session); 0 "
        "means the cores this process may use, so a lone request uses every core (measured "
        "in docs/design.md).",
        0,
    )
    onnx_spinning: bool | None = _opt(
        "ONNX Runtime engine: let the session's threads spin for work while a call runs (they "
        "stop when the last call returns) instead of sleeping between operators. Auto (the "
        "default): on in threads, where the session of every core serves a call that runs "
        "alone (a lone sentence 1.3 ms sooner), off for processes, whose sessions share the "
        'cores and where spinning measured slower (docs/design.md, "Workers").',
        None,
    )
    int8: bool = _opt(
        "ONNX Runtime engine: int8 weights (dynamic quantization at load). Faster, but the "
        "vectors change (lower STS-B; each vector depends slightly on its batch): opt-in.",
        False,
    )
    max_inputs_per_request: int = _opt("Most inputs one request may carry.", 2048)
    cache_mb: int = _opt(
        "Size of the vector cache in MiB (0: off): each input's raw vector, keyed by the "
        "loaded model's file and options and the input's exact tokens (prompt and truncation "
        "included), so a repeated text costs no compute; least recently used first out, a "
        "model's rows dropped when it unloads. A hit returns the bytes a miss computed. "
        "Nothing is cached under --int8 (a row there depends on its batch).",
        64,
    )
    bulk_share: int = _opt(
        "Priority lanes: while interactive and bulk work both wait, one pack in this many "
        "goes to bulk, so bulk never starves (1: lanes take turns).",
        8,
    )
    bulk_batch_tokens: int = _opt(
        "Priority lanes: the most tokens of a bulk pack while interactive work arrived in the "
        "last second, so that a query waits for a short pack, not a full one (full-size bulk "
        "packs when no interactive caller is around). Measured in `make bench` (lanes).",
        64,
    )
    bulk_free_workers: int = _opt(
        "Priority lanes: workers bulk work leaves free while interactive work arrived in the "
        "last second (0: none), so a query never waits for a bulk input; on two cores 1 cut "
        "the query's p99 behind a stream about in half but bulk's throughput too (make bench).",
        0,
    )
    bulk_above_inputs: int = _opt(
        "Priority lanes: a request with more inputs than this goes to the bulk lane unless it "
        "names its lane (x-embedd-lane header, EmbedRequest.lane); EmbedStream is bulk.",
        64,
    )
    bulk_above_tokens: int = _opt(
        "Priority lanes: a request with more tokens than this goes to the bulk lane unless it "
        "names its lane.",
        8192,
    )
    openai_truncate: bool = _opt(
        "Default of /v1/embeddings' `truncate` field: cut over-long inputs to the model's "
        "limit instead of failing with context_length_exceeded (off: OpenAI's behaviour).",
        False,
    )
    max_queued_texts: int = _opt(
        "Bound of the scheduler's queue, in inputs. A request that does not fit is refused "
        "with RESOURCE_EXHAUSTED (HTTP 429) at once instead of waiting without bound.",
        16384,
    )
    max_queued_tokens: int = _opt(
        "Bound of the scheduler's queue in tokens (what the workers' time depends on): a "
        "request that would take it past this is refused at once with RESOURCE_EXHAUSTED "
        "(HTTP 429). One request alone is always accepted.",
        262_144,
    )
    stream_window: int = _opt(
        "Batches of one EmbedStream the server reads ahead of its answers (flow control).", 4
    )
    max_message_mb: int = _opt(
        "Largest gRPC message, in MiB, either way: what grpcio receives at all (requests are "
        "then held to max_request_bytes) and the largest response it sends.",
        64,
    )
    max_request_bytes: int = _opt(
        "Largest request body, in bytes: a REST body (Envoy answers 413 in the route's error "
        "shape without passing it on) or a gRPC request message (RESOURCE_EXHAUSTED), each "
        "message of a stream alike. Like TEI's 2 MB payload limit; 2 MiB of text is about "
        "500,000 tokens, twice what the scheduler queues (max_queued_tokens). Raise it for "
        "bulk jobs with long texts, or use EmbedStream (the limit is per message). Over-long "
        "texts are cut by characters before tokenizing, so the size of a text costs parsing, "
        "not tokenizing.",
        2 * 1024 * 1024,
    )
    shutdown_grace_s: float = _opt(
        "On SIGTERM/SIGINT, seconds calls in flight get to finish before the server exits.",
        30.0,
    )
    api_keys: str = _opt(
        "Comma-separated API keys. When any key is set (here or in api_keys_file), every call "
        "needs one: 'Authorization: Bearer <key>' or 'x-api-key: <key>' (REST and gRPC "
        "metadata alike); health checks stay open.",
        "",
        secret=True,
    )
    api_keys_file: str = _opt("File with one API key per line ('#' starts a comment).", "")
    admin_api_keys: str = _opt(
        "Comma-separated admin keys, sent like API keys and accepted wherever one is. Model "
        "control needs one: loading a model with options or a keep_alive, and unloading "
        "(POST /v1/models/load and /v1/models/unload, gRPC LoadModel and UnloadModel); other "
        "keys get 403 / PERMISSION_DENIED. With no admin key (here or in admin_api_keys_file) "
        "model control is refused, except on a server with no keys at all whose listeners "
        "(grpc_host, http_host) are all on loopback, for callers on loopback. Requests' "
        "keep_alive never changes the default model or a model whose keep_alive an admin set.",
        "",
        secret=True,
    )
    admin_api_keys_file: str = _opt("File with one admin key per line ('#' starts a comment).", "")
    rate_limit_per_s: float = _opt(
        "Requests per second allowed per API key (per client address when keys are off), as a "
        "token bucket; 0 means no limit. Over it: 429 / RESOURCE_EXHAUSTED with Retry-After.",
        0.0,
    )
    rate_limit_burst: int = _opt(
        "Requests a key may send at once before the rate applies; 0 means one second's worth.",
        0,
    )
    worker_timeout_s: float = _opt(
        "A worker whose decode takes longer than this is taken for hung: its callers get "
        "UNAVAILABLE (retryable) and a new worker replaces it.",
        60.0,
    )
    metrics_port: int = _opt(
        "Port of the Prometheus /metrics endpoint, on 127.0.0.1 only; 0 turns it off.", 9464
    )
    replicas: int = _opt(
        "embedd run: server processes behind Envoy (gRPC ports grpc_port, grpc_port+1, ...), "
        "health-checked and restarted when they die.",
        1,
    )
    # --- TLS (embedd_server.tls) ------------------------------------------------------------
    tls_cert: str = _opt(
        "PEM certificate chain (server certificate first) to serve TLS with; empty: plaintext. "
        "embedd serve: on the gRPC port. embedd run: on Envoy's port (REST and native gRPC "
        "alike), while the gRPC replicas behind Envoy listen in plaintext on 127.0.0.1 only. "
        "Needs tls_key. The files are read at start: restart to rotate them.",
        "",
    )
    tls_key: str = _opt(
        "PEM private key of tls_cert (unencrypted). Keep it readable by this user only "
        "(mode 0600, or 0640 for a dedicated group): a more open file gets a warning.",
        "",
    )
    tls_client_ca: str = _opt(
        "PEM CA certificate(s) of the clients (mutual TLS): with it, every connection must "
        "present a client certificate signed by one of them, or the handshake is refused, "
        "REST and gRPC alike. embedd serve: health checks on its port need one too (embedd "
        "run's own probes use the plaintext loopback behind Envoy). Needs tls_cert.",
        "",
    )
    log_level: str = _opt("Log level: debug, info, warning or error.", "info")
    log_json: bool = _opt("Write logs as one JSON object per line.", False)

    def __post_init__(self) -> None:
        checks = [
            (self.workers >= 0, "workers must not be negative (0: auto)"),
            (self.threads_per_worker >= 1, "threads_per_worker must be at least 1"),
            (0 <= self.grpc_port <= 65535, "grpc_port must be 0..65535"),
            (0 <= self.http_port <= 65535, "http_port must be 0..65535"),
            (self.envoy_header_timeout_s > 0, "envoy_header_timeout_s must be positive"),
            (self.envoy_idle_timeout_s > 0, "envoy_idle_timeout_s must be positive"),
            (self.envoy_max_connections >= 1, "envoy_max_connections must be at least 1"),
            (
                self.envoy_max_streams_per_connection >= 1,
                "envoy_max_streams_per_connection must be at least 1",
            ),
            (self.xff_trusted_hops >= 0, "xff_trusted_hops must not be negative"),
            (
                all(c.isascii() and (c.isalnum() or c in "-_") for c in self.proxy_secret),
                "proxy_secret may hold only letters, digits, '-' and '_'",
            ),
            (self.batch_tokens >= 1, "batch_tokens must be at least 1"),
            (self.batch_sequences >= 1, "batch_sequences must be at least 1"),
            (self.max_inputs_per_request >= 1, "max_inputs_per_request must be at least 1"),
            (self.max_queued_texts >= 1, "max_queued_texts must be at least 1"),
            (self.max_queued_tokens >= 1, "max_queued_tokens must be at least 1"),
            (self.stream_window >= 1, "stream_window must be at least 1"),
            (self.max_message_mb >= 1, "max_message_mb must be at least 1"),
            (self.max_request_bytes >= 1024, "max_request_bytes must be at least 1024"),
            (self.shutdown_grace_s >= 0, "shutdown_grace_s must not be negative"),
            (self.memory_budget_mb >= 0, "memory_budget_mb must not be negative"),
            (self.rate_limit_per_s >= 0, "rate_limit_per_s must not be negative"),
            (self.rate_limit_burst >= 0, "rate_limit_burst must not be negative"),
            (self.worker_timeout_s > 0, "worker_timeout_s must be positive"),
            (0 <= self.metrics_port <= 65535, "metrics_port must be 0..65535"),
            (1 <= self.replicas <= 64, "replicas must be 1..64"),
            (self.log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}"),
            (self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}"),
            (self.onnx_batch_tokens >= 1, "onnx_batch_tokens must be at least 1"),
            (self.onnx_threads >= 0, "onnx_threads must not be negative"),
            (self.cache_mb >= 0, "cache_mb must not be negative"),
            (self.bulk_share >= 1, "bulk_share must be at least 1"),
            (self.bulk_batch_tokens >= 1, "bulk_batch_tokens must be at least 1"),
            (self.bulk_free_workers >= 0, "bulk_free_workers must not be negative"),
            (self.bulk_above_inputs >= 0, "bulk_above_inputs must not be negative"),
            (self.bulk_above_tokens >= 0, "bulk_above_tokens must not be negative"),
        ]
        problems = [message for ok, message in checks if not ok]
        problems += _alias_problems(self.model_aliases)
        problems += _tls_problems(self.tls_cert, self.tls_key, self.tls_client_ca)
        problems += _duration_problems("keep_alive", self.keep_alive)
        if problems:
            raise SettingsError("; ".join(problems))

    @property
    def aliases(self) -> dict[str, str]:
        """model_aliases as a mapping alias -> model."""
        pairs = (item.split("=", 1) for item in self.model_aliases.split(",") if item.strip())
        return {alias.strip(): model.strip() for alias, model in pairs}

    @property
    def tls(self) -> bool:
        """Whether the public listener serves TLS (tls_cert and tls_key are set)."""
        return bool(self.tls_cert)

    def without_tls(self) -> Settings:
        """These settings for a server behind a TLS-terminating Envoy: plaintext gRPC on the
        loopback (embedd run's replicas), so that only Envoy's TLS port is reachable."""
        host = self.grpc_host.strip("[]")
        loopback = host == "localhost" or host.startswith("127.") or host == "::1"
        return self.replace(
            tls_cert="",
            tls_key="",
            tls_client_ca="",
            grpc_host=self.grpc_host if loopback else "127.0.0.1",
        )

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def max_receive_bytes(self) -> int:
        """What grpcio may receive of one message: at least max_request_bytes, so that the
        server's own check (which names the setting) answers a request over that limit."""
        return max(self.max_message_bytes, self.max_request_bytes + 1)

    def engine_settings(self) -> EngineSettings:
        """The part of the settings the core and the engines are configured with."""
        return EngineSettings(
            **{
                f.name: getattr(self, f.name) for f in fields(EngineSettings) if f.name != "aliases"
            },
            aliases=self.aliases,
        )

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _alias_problems(text: str) -> list[str]:
    bad = [item for item in text.split(",") if item.strip() and "=" not in item]
    return [f"model_aliases: '{item.strip()}' is not alias=model" for item in bad]


def _tls_problems(cert: str, key: str, client_ca: str) -> list[str]:
    """What is missing for TLS (files themselves are checked at start, embedd_server.tls)."""
    if bool(cert) != bool(key):
        return ["tls_cert and tls_key go together: give both (or neither, for plaintext)"]
    if client_ca and not cert:
        return ["tls_client_ca (mutual TLS) needs tls_cert and tls_key: the server's own TLS"]
    return []


def _duration_problems(name: str, text: str) -> list[str]:
    from embedd_server.core.durations import parse_duration
    from embedd_server.errors import InvalidInput

    try:
        parse_duration(text)
    except InvalidInput as exc:
        return [f"{name}: {exc.message}"]
    return []


class SettingsError(ValueError):
    """A setting has a value it cannot take; the message names it."""


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


AUTO = "auto"  # how a true/false/auto setting's None is spelled (flag text, env, TOML, --help)
_AUTO_BOOL = "bool | None"  # the annotation of such a setting


def _shown(value: Any) -> Any:
    """A setting's value as a person and an environment variable spell it."""
    if value is None:
        return AUTO
    return ("true" if value else "false") if isinstance(value, bool) else value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _boolean(raw: Any, *, auto: bool) -> bool | None:
    """A boolean setting's value; with ``auto``, "auto" is None (the setting picks per case)."""
    if auto and isinstance(raw, str) and raw.strip().lower() == AUTO:
        return None
    return raw if isinstance(raw, bool) else _parse_bool(str(raw))


def _convert(name: str, kind: Any, raw: Any) -> Any:
    """Turns a string (flag, env) or TOML value into the field's type."""
    try:
        if kind in (bool, "bool", _AUTO_BOOL):
            return _boolean(raw, auto=kind == _AUTO_BOOL)
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        if kind in (Path, "Path"):
            return Path(str(raw)).expanduser()
        if isinstance(raw, dict):  # a TOML table, e.g. [model_aliases]
            return ",".join(f"{key}={value}" for key, value in raw.items())
        return str(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds one flag per settings field; --help shows the default and the env variable."""
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"TOML file with settings (keys are the option names with '_'). Env: {CONFIG_ENV}.",
    )
    defaults = Settings()
    for f in fields(Settings):
        default = getattr(defaults, f.name)
        shown = _shown(default) if f.type == _AUTO_BOOL else default
        help_text = f"{f.metadata['help']} Default: {shown}. Env: {env_name(f.name)}."
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if f.type in (bool, "bool", _AUTO_BOOL):
            parser.add_argument(
                _flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(_flag(f.name), default=argparse.SUPPRESS, help=help_text)


def _from_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"config file {path}: unknown settings {', '.join(unknown)}")
    return data


def load_settings(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    config_path: Path | None = None,
) -> Settings:
    """Builds Settings from flags, the environment and the config file (in that precedence)."""
    environ = os.environ if environ is None else environ
    given = vars(args) if args is not None else {}
    config = given.get("config") or config_path or environ.get(CONFIG_ENV)
    from_env = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX)
    }
    from_file = _from_config_file(Path(config)) if config else {}
    values: dict[str, Any] = {}
    for f in fields(Settings):
        for source in (given, from_env, from_file):
            # A flag left at None was not given: it must not hide the environment.
            if source.get(f.name) is not None:
                values[f.name] = _convert(f.name, f.type, source[f.name])
                break
    return Settings(**values)


def settings_from_argv(argv: Sequence[str]) -> Settings:
    """Convenience for tests and tools: parse flags only (no environment)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_settings(parser.parse_args(list(argv)), environ={})


def child_environment(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child ``embedd serve``: ``base`` (default: this process's) without
    any ``EMBEDD_*`` variable (so no config file either), plus every field of ``settings`` as
    its ``EMBEDD_*`` variable. Secrets travel here, never on a command line."""
    source = os.environ if base is None else base
    environment = {key: value for key, value in source.items() if not key.startswith(ENV_PREFIX)}
    for f in fields(Settings):
        environment[env_name(f.name)] = str(_shown(getattr(settings, f.name)))
    return environment
