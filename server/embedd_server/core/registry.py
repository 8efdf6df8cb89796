"""The model catalogue and the models loaded from it.

Every ``<name>.gguf`` in the models directory (and in the built-in models directory, where
the models directory has no file of that name) is a model named ``<name>`` (plus aliases from
the settings); the directories are read on each look-up, so models added or removed appear or
disappear without a restart. A model loads on first use or on an explicit load: its weights
once, then one engine per worker; concurrent first requests wait for that one load.

Loaded models are used through leases (:meth:`ModelRegistry.use`). A model is retired (taken
out of service, then freed once its leases end) when its keep_alive runs out, when its file
disappears, on an explicit unload, or to make room under the memory budget. A retired model is
never handed out again, so no caller sees a pool that is being built or torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embedd_server.core.catalog import EMBED, ModelInfo, read_model_info
from embedd_server.core.durations import parse_duration
from embedd_server.core.engine_settings import EngineSettings, LoadOptions
from embedd_server.core.errors import (
    ModelLoadError,
    ModelNotEmbedding,
    ModelNotFound,
    Overloaded,
    shorten,
)
from embedd_server.core.scheduler import FairQueue
from embedd_server.core.tokenization import (
    HuggingFaceTokenizer,
    LlamaTokenizer,
    Tokenizer,
    gguf_tokenizer,
)
from embedd_server.core.workers import WorkerPool
from embedd_server.engines.base import Runtime, RuntimeLoader
from embedd_server.metrics import Metrics, ModelGauges

log = logging.getLogger(__name__)

_REAP_INTERVAL_S = 0.25


@dataclass
class LoadedModel:
    """A model ready to serve: tokenizer, queue, worker pool, and its lease bookkeeping."""

    info: ModelInfo
    runtime: Runtime
    tokenizer: Tokenizer
    queue: FairQueue
    pool: WorkerPool
    load_seconds: float
    options: LoadOptions
    keep_alive_s: float  # after each use; math.inf: forever
    expires_at: float = math.inf  # time.monotonic()
    last_used: float = field(default_factory=time.monotonic)
    leases: int = 0
    retired: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def dimensions(self) -> int:
        return self.runtime.dimensions

    @property
    def vocab_size(self) -> int:
        return self.runtime.vocab_size


class ModelRegistry:
    """Finds models in the models directory and keeps the loaded ones."""

    def __init__(
        self,
        settings: EngineSettings,
        loader: RuntimeLoader,
        on_worker_loss: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._loader = loader
        self._on_worker_loss = on_worker_loss
        self._loaded: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._default_keep_alive = _keep_alive_seconds(settings.keep_alive)
        self._reaper: asyncio.Task[None] | None = None
        self._wake_reaper = asyncio.Event()
        self.loads = 0  # how many loads happened (for tests and metrics)
        self.metrics = metrics or Metrics()
        self.metrics.watch(self._gauges)

    # --- the catalogue ---------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self._settings.models_dir

    def resolve(self, name: str) -> str:
        """The model a request means: '' is the default model; aliases map to models."""
        name = name or self._settings.default_model
        return self._settings.aliases.get(name, name)

    def _model_dirs(self) -> list[Path]:
        """Where models are looked for, first match wins: models_dir, then the built-in one."""
        builtin = self._settings.builtin_models_dir
        return [self.models_dir, *([Path(builtin)] if builtin else [])]

    def catalogue(self) -> list[ModelInfo]:
        """Every model of the models directories, by name."""
        found: dict[str, Path] = {}
        for directory in reversed(self._model_dirs()):  # the first directory's files win
            if directory.is_dir():
                found |= {path.stem: path for path in directory.glob("*.gguf")}
        infos = []
        for path in (found[name] for name in sorted(found)):
            try:
                infos.append(read_model_info(path))
            except ModelLoadError as exc:  # one broken file must not hide the others
                log.warning("skipping %s: %s", path.name, exc.message)
        return infos

    def info(self, name: str) -> ModelInfo:
        """The catalogue entry of a model, or ModelNotFound listing the available ones."""
        name = self.resolve(name)
        path = None
        if _plausible_name(name):  # before any path is built from it
            paths = (directory / f"{name}.gguf" for directory in self._model_dirs())
            path = next((candidate for candidate in paths if candidate.is_file()), None)
        if path is None:
            available = ", ".join(info.name for info in self.catalogue()) or "none"
            raise ModelNotFound(
                f"The model '{shorten(name)}' does not exist. Available models: {available}.",
                param="model",
            )
        return read_model_info(path)

    def is_loaded(self, name: str) -> bool:
        return self.resolve(name) in self._loaded

    def info_of_loaded(self, name: str) -> ModelInfo | None:
        """The catalogue entry of a loaded model, without reading the models directory."""
        loaded = self._loaded.get(self.resolve(name))
        return None if loaded is None else loaded.info

    def engine_of(self, name: str) -> str:
        """The engine serving a loaded model ("llama.cpp", "onnxruntime"); "" when not loaded
        (the choice is made at load: embedd_server.engines.choice)."""
        model = self._loaded.get(self.resolve(name))
        return model.runtime.engine_name if model is not None else ""

    def loaded_models(self) -> Sequence[LoadedModel]:
        return list(self._loaded.values())

    def _gauges(self) -> list[ModelGauges]:
        # Called from the metrics HTTP thread: list() copies the values atomically (GIL).
        return [
            ModelGauges(m.info.name, m.queue.queued_items, m.queue.queued_tokens, m.pool.alive)
            for m in list(self._loaded.values())
        ]

    # --- using models ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def use(self, name: str, keep_alive_s: float | None = None) -> AsyncIterator[LoadedModel]:
        """A lease on the loaded model (loading it first); keep_alive counts from its end."""
        model = await self.get(name)
        model.leases += 1
        model.idle.clear()
        try:
            yield model
        finally:
            model.leases -= 1
            model.last_used = time.monotonic()
            seconds = model.keep_alive_s if keep_alive_s is None else keep_alive_s
            model.expires_at = model.last_used + seconds
            if model.leases == 0:
                model.idle.set()
                if seconds <= 0:
                    self._wake_reaper.set()

    async def get(self, name: str, options: LoadOptions | None = None) -> LoadedModel:
        """The loaded model, loading it first if needed (one load for concurrent callers)."""
        name = self.resolve(name)
        loaded = self._loaded.get(name)
        if loaded is not None and (options is None or options == loaded.options):
            return loaded
        async with self._load_locks.setdefault(name, asyncio.Lock()):
            loaded = self._loaded.get(name)
            if loaded is not None and options is not None and options != loaded.options:
                await self._retire(loaded, "reloading with other options")
                loaded = None
            if loaded is None:
                loaded = await self._load(self.info(name), options or LoadOptions())
                self._loaded[name] = loaded
        return loaded

    async def load(
        self, name: str, options: LoadOptions, keep_alive_s: float | None
    ) -> LoadedModel:
        """An explicit load; keep_alive (if given) becomes the model's idle time."""
        model = await self.get(name, options)
        if keep_alive_s is not None:
            model.keep_alive_s = keep_alive_s
            model.expires_at = time.monotonic() + keep_alive_s
            self._wake_reaper.set()
        return model

    async def unload(self, name: str) -> ModelInfo:
        """Retires a loaded model: new calls load it afresh, calls in flight finish first."""
        info = self.info(name)
        loaded = self._loaded.get(info.name)
        if loaded is not None:
            await self._retire(loaded, "unload requested")
        return info

    # --- loading and retiring ------------------------------------------------------------------

    async def _load(self, info: ModelInfo, options: LoadOptions) -> LoadedModel:
        if info.task == EMBED and not info.embedding and not options.pooling:
            raise ModelNotEmbedding(
                f"Model does not support embeddings: '{info.name}' has no pooling of its own "
                f"(pooling '{info.pooling}', a causal LM?). Load it with a pooling type, e.g. "
                f'POST /v1/models/load {{"model": "{info.name}", "embedding": true, '
                '"pooling": "mean"}.',
                param="model",
            )
        await self._make_room(info)
        loaded = await asyncio.to_thread(self._build, info, options)
        self.loads += 1
        self.metrics.model_loads.labels(info.name).inc()
        return loaded

    def _build(self, info: ModelInfo, options: LoadOptions) -> LoadedModel:
        started = time.perf_counter()
        runtime = self._loader(info, self._settings, options)
        try:
            tokenizer = _tokenizer_for(info, runtime)
            queue = FairQueue(self._settings.max_queued_texts, self._settings.max_queued_tokens)
            pool = WorkerPool(
                info.name,
                queue,
                runtime.new_engine,
                self._settings.workers,
                batch_tokens=_pack_tokens(runtime, self._settings),
                batch_sequences=self._settings.batch_sequences,
                timeout_s=self._settings.worker_timeout_s,
                on_all_dead=lambda: self._workers_lost(info.name),
                metrics=self.metrics,
            )
            pool.start()
        except BaseException:
            runtime.close()
            raise
        seconds = time.perf_counter() - started
        log.info(
            "loaded model %s (%s, %d dims, %d workers) in %.2fs",
            info.name,
            info.quantization,
            runtime.dimensions,
            self._settings.workers,
            seconds,
        )
        keep = math.inf if info.name == self._settings.default_model else self._default_keep_alive
        model = LoadedModel(info, runtime, tokenizer, queue, pool, seconds, options, keep)
        model.expires_at = time.monotonic() + keep
        model.idle.set()
        return model

    async def _make_room(self, info: ModelInfo) -> None:
        """Unloads least recently used idle models until ``info`` fits the memory budget."""
        budget = self._settings.memory_budget_mb * 1024 * 1024
        if not budget:
            return
        while self._bytes_loaded() + info.file_size_bytes > budget:
            idle = [m for m in self._loaded.values() if m.leases == 0 and m.info != info]
            if not idle:
                raise Overloaded(
                    f"Loading '{info.name}' ({info.file_size_bytes >> 20} MiB) would exceed the "
                    f"memory budget of {self._settings.memory_budget_mb} MiB, and the loaded "
                    f"models ({self._bytes_loaded() >> 20} MiB) are in use. Retry later, unload "
                    "a model, or raise --memory-budget-mb.",
                    param="model",
                )
            await self._retire(min(idle, key=lambda m: m.last_used), "memory budget")

    def _bytes_loaded(self) -> int:
        return sum(model.info.file_size_bytes for model in self._loaded.values())

    async def _retire(self, model: LoadedModel, reason: str) -> None:
        if model.retired:
            return
        model.retired = True
        if self._loaded.get(model.info.name) is model:
            del self._loaded[model.info.name]
        log.info("unloading model %s (%s)", model.info.name, reason)
        await model.idle.wait()  # calls in flight finish first
        await asyncio.to_thread(model.pool.stop)
        model.runtime.close()

    def _workers_lost(self, name: str) -> None:
        if self._on_worker_loss is not None:
            self._on_worker_loss(name)

    # --- expiry --------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts unloading expired and deleted models (call on the server's event loop)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake_reaper.wait(), _REAP_INTERVAL_S)
            self._wake_reaper.clear()
            await self.reap()

    async def reap(self) -> None:
        """Retires idle models whose keep_alive ran out and models whose file is gone."""
        now = time.monotonic()
        for model in list(self._loaded.values()):
            if not model.info.path.exists():
                await self._retire(model, "its file was removed")
            elif model.leases == 0 and now >= model.expires_at:
                await self._retire(model, "keep_alive expired")

    async def close(self) -> None:
        """Stops expiry, then drains and frees every loaded model."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for model in list(self._loaded.values()):
            await self._retire(model, "shutting down")


def _plausible_name(name: str) -> bool:
    """A name that can be a file stem in the models directory (no paths, not too long)."""
    return (
        0 < len(name.encode("utf-8", "surrogatepass")) <= 200
        and "/" not in name
        and "\x00" not in name
        and not name.startswith(".")
    )


def _keep_alive_seconds(text: str) -> float:
    seconds = parse_duration(text)
    return math.inf if seconds < 0 else seconds


def _tokenizer_for(info: ModelInfo, runtime: Runtime) -> Tokenizer:
    """The model's own tokenizer.json; else that tokenizer rebuilt from the GGUF's vocabulary
    (a file from llama.cpp's converter or Ollama); else, warned, llama.cpp's tokenizer."""
    if info.hf_tokenizer_json:
        return HuggingFaceTokenizer(info.hf_tokenizer_json)
    rebuilt = gguf_tokenizer(info.path)
    if rebuilt.json is not None:
        log.info(
            "%s has no tokenizer.huggingface.json: tokenizing with the Hugging Face tokenizer "
            "rebuilt from its vocabulary",
            info.name,
        )
        return HuggingFaceTokenizer(rebuilt.json)
    log.warning(
        "%s: no exact tokenizer (no tokenizer.huggingface.json, and %s); using llama.cpp's "
        "tokenizer, whose token ids can differ from the model's own tokenizer; re-create the "
        "file with `embedd import` from the Hugging Face directory for exact tokenization",
        info.name,
        rebuilt.reason,
    )
    return LlamaTokenizer(runtime.tokenize, runtime.token_text)


def _pack_tokens(runtime: Runtime, settings: EngineSettings) -> int:
    """Most tokens of one worker's pack: llama.cpp attends over the whole pack (small packs
    pay), ONNX Runtime pads each length bucket inside it (bigger packs pay)."""
    if runtime.engine_name.startswith("onnxruntime"):
        return settings.onnx_batch_tokens
    return settings.batch_tokens
