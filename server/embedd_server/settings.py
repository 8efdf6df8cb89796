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

from embedd_server.core.engine_settings import ENGINES, EngineSettings

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
    envoy_admin_port: int = _opt("Port of Envoy's admin interface (loopback only).", 9901)
    models_dir: Path = _opt(
        "Directory of GGUF models; each <name>.gguf is a model.", Path("models")
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
        "existing OpenAI code works unchanged.",
        "",
    )
    keep_alive: str = _opt(
        "How long a model other than the default stays loaded when idle, as Ollama's "
        'keep_alive: a duration ("5m", "1h"), seconds, 0 (unload after each request) or '
        "negative (forever). Requests may set their own. The default model stays loaded.",
        "5m",
    )
    memory_budget_mb: int = _opt(
        "Memory the loaded models may take together, in MiB (their GGUF sizes); 0 means no "
        "limit. Loading past it first unloads the least recently used idle models, then "
        "refuses with RESOURCE_EXHAUSTED (HTTP 429).",
        0,
    )
    workers: int = _opt(
        "Workers of each loaded model, each owning one engine (an ONNX Runtime session or a "
        "llama.cpp context). On CPU, one worker per core was fastest (docs/design.md).",
        2,
    )
    worker_processes: bool = _opt(
        "Run each worker's engine (ONNX Runtime session or llama.cpp context) in a process of "
        "its own (true) or in a thread of the server (false). Both were equally fast on 2 CPU "
        "cores; with processes a crash in llama.cpp costs one worker process (its pack runs "
        "again on a new one), not the server, and a hung decode can be killed. Each process "
        "takes some memory of its own (llama.cpp's share the memory-mapped weights; "
        "docs/design.md). With GPU offload (n_gpu_layers != 0) workers are always threads, so "
        "the GPU holds one copy of the weights.",
        True,
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
        "and of each padded batch the pack is run as (inputs x the longest, sorted by length); "
        "an input longer than this still runs, alone. 256 beat 2048 (docs/design.md). The "
        "engine's own default, 8192, applies only where it is built directly (tests, bench).",
        256,
    )
    onnx_threads: int = _opt(
        "ONNX Runtime engine: threads of each worker's session; 0 means the cores this process "
        "may use. They wait without spinning, so a lone request uses every core and busy "
        "workers share them (measured in docs/design.md).",
        0,
    )
    int8: bool = _opt(
        "ONNX Runtime engine: int8 weights (dynamic quantization at load). Faster, but the "
        "vectors change (lower STS-B; each vector depends slightly on its batch): opt-in.",
        False,
    )
    max_inputs_per_request: int = _opt("Most inputs one request may carry.", 2048)
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
    max_message_mb: int = _opt("Largest gRPC message, in MiB, either way.", 64)
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
    log_level: str = _opt("Log level: debug, info, warning or error.", "info")
    log_json: bool = _opt("Write logs as one JSON object per line.", False)

    def __post_init__(self) -> None:
        checks = [
            (self.workers >= 1, "workers must be at least 1"),
            (self.threads_per_worker >= 1, "threads_per_worker must be at least 1"),
            (0 <= self.grpc_port <= 65535, "grpc_port must be 0..65535"),
            (0 <= self.http_port <= 65535, "http_port must be 0..65535"),
            (0 <= self.envoy_admin_port <= 65535, "envoy_admin_port must be 0..65535"),
            (self.batch_tokens >= 1, "batch_tokens must be at least 1"),
            (self.batch_sequences >= 1, "batch_sequences must be at least 1"),
            (self.max_inputs_per_request >= 1, "max_inputs_per_request must be at least 1"),
            (self.max_queued_texts >= 1, "max_queued_texts must be at least 1"),
            (self.max_queued_tokens >= 1, "max_queued_tokens must be at least 1"),
            (self.stream_window >= 1, "stream_window must be at least 1"),
            (self.max_message_mb >= 1, "max_message_mb must be at least 1"),
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
        ]
        problems = [message for ok, message in checks if not ok]
        problems += _alias_problems(self.model_aliases)
        problems += _duration_problems("keep_alive", self.keep_alive)
        if problems:
            raise SettingsError("; ".join(problems))

    @property
    def aliases(self) -> dict[str, str]:
        """model_aliases as a mapping alias -> model."""
        pairs = (item.split("=", 1) for item in self.model_aliases.split(",") if item.strip())
        return {alias.strip(): model.strip() for alias, model in pairs}

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

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


def _duration_problems(name: str, text: str) -> list[str]:
    from embedd_server.core.durations import parse_duration
    from embedd_server.core.errors import InvalidInput

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


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def _convert(name: str, kind: Any, raw: Any) -> Any:
    """Turns a string (flag, env) or TOML value into the field's type."""
    try:
        if kind in (bool, "bool"):
            return raw if isinstance(raw, bool) else _parse_bool(str(raw))
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
        help_text = f"{f.metadata['help']} Default: {default}. Env: {env_name(f.name)}."
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        if f.type in (bool, "bool"):
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
        value = getattr(settings, f.name)
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        environment[env_name(f.name)] = text
    return environment
