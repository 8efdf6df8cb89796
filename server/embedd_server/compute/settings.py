"""What the core needs to know: the engine-level part of the settings, and per-model load options.

The core is handed an :class:`EngineSettings` (built by
:meth:`embedd_server.settings.Settings.engine_settings`), never the whole settings: ports, API
keys and Envoy are the transports' business. Each field's meaning and default are documented
once, on the :class:`~embedd_server.settings.Settings` field of the same name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

# The values of the ``engine`` setting: "auto" picks per model (embedd_server.engines.choice).
ENGINES = ("auto", "llama.cpp", "onnxruntime")
# Engines whose workers run in threads of the server when ``worker_processes`` is auto (None).
_THREADED_ENGINES = ("onnxruntime",)
# Workers per model where ``workers`` is auto (0) and the engine runs one per worker: llama.cpp's
# contexts, ONNX Runtime's processes.
AUTO_WORKERS = 2


@dataclass(frozen=True)
class EngineSettings:
    """Scheduling, models and workers: what the core and the engines are configured with."""

    models_dir: Path = Path("models")
    builtin_models_dir: str = ""  # "": none
    default_model: str = "all-minilm-l6-v2"
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> model
    keep_alive: str = "5m"
    memory_budget_mb: int = 0
    workers: int = 0  # 0: auto, per engine (see workers_for)
    worker_processes: bool | None = None  # None: auto, per engine (see processes_for)
    threads_per_worker: int = 1
    batch_tokens: int = 128
    batch_sequences: int = 32
    n_gpu_layers: int = 0
    max_inputs_per_request: int = 2048
    max_queued_texts: int = 16384
    max_queued_tokens: int = 262_144
    worker_timeout_s: float = 60.0
    log_json: bool = False  # the log format of worker processes' own lines
    engine: str = "auto"  # "auto", "llama.cpp" or "onnxruntime"
    onnx_batch_tokens: int = 256
    onnx_threads: int = 0  # 0: the cores this process may use
    onnx_spinning: bool | None = None  # None: auto (see onnx_spins)
    int8: bool = False
    cache_mb: int = 64
    bulk_share: int = 8
    bulk_batch_tokens: int = 64
    bulk_free_workers: int = 0
    bulk_above_inputs: int = 64
    bulk_above_tokens: int = 8192

    def processes_for(self, engine: str) -> bool:
        """Whether the workers of a model served by ``engine`` ("llama.cpp", "onnxruntime"
        or its "-int8" variant) run in processes of their own: the setting, or for auto ONNX
        Runtime in threads (one session shared by all) and llama.cpp in processes."""
        if self.worker_processes is not None:
            return self.worker_processes
        return not engine.startswith(_THREADED_ENGINES)

    def workers_for(self, engine: str) -> int:
        """How many workers a model served by ``engine`` gets: the setting, or for auto (0)
        one per ONNX Runtime thread (:meth:`onnx_cores`) for ONNX Runtime in threads: busy
        workers run a core each on a single-threaded session, and a call that runs alone
        takes a session of every core (both sessions map one copy of the weights;
        docs/design.md "Workers"); :data:`AUTO_WORKERS` otherwise (one per core was fastest
        for llama.cpp and for ONNX Runtime's processes on 2 cores)."""
        if self.workers:
            return self.workers
        if engine.startswith(_THREADED_ENGINES) and not self.processes_for(engine):
            return self.onnx_cores()
        return AUTO_WORKERS

    def onnx_cores(self) -> int:
        """ONNX Runtime's threads for a call that runs alone: the setting, or the cores
        this process may use."""
        return self.onnx_threads or len(os.sched_getaffinity(0))

    def onnx_spins(self, engine: str) -> bool:
        """Whether ONNX Runtime's session threads spin while a call runs: the setting, or
        for auto in threads, where the session of every core serves one call at a time (its
        threads then wait for no one else's work; spinning stops when the call returns);
        not for processes, whose sessions share the cores."""
        if self.onnx_spinning is not None:
            return self.onnx_spinning
        return not self.processes_for(engine)


@dataclass(frozen=True)
class LoadOptions:
    """Per-model choices of an explicit load."""

    pooling: str | None = None  # for models without pooling of their own
    n_gpu_layers: int | None = None
