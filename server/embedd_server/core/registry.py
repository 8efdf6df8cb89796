"""The model catalogue and the models loaded from it.

Every ``<name>.gguf`` in the models directory (and in the built-in models directory, where
the models directory has no file of that name) is a model named ``<name>`` (plus aliases from
the settings). What the files say is kept in an index (:mod:`embedd_server.core.model_index`)
read off the event loop, once per version of each file; look-ups stat the file and listings
rescan the directories, so models added or removed appear or disappear without a restart.
A model loads on first use or on an explicit load: its weights once, then one engine per
worker; concurrent first requests wait for that one load.

Loaded models are used through leases (:meth:`ModelRegistry.use`). A model is retired (taken
out of service, then freed once its leases end) when its keep_alive runs out, when its file
disappears, on an explicit unload, or to make room under the memory budget. A retired model is
never handed out again, so no caller sees a pool that is being built or torn down.

Every caller of a model shares its one loaded instance, so nothing one caller asks for may
change what the others get: a model's own pooling is never replaced, a loaded model is never
reloaded with other options (unload it first), and a pinned model's keep_alive (the default
model's: forever; one set by an explicit load) is not changed by requests' keep_alive. The
default model is never unloaded, expired or evicted for room.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embedd_server.compute.engine import Runtime, RuntimeLoader
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.core.durations import parse_duration
from embedd_server.core.model_index import ModelIndex
from embedd_server.core.model_names import plain_name
from embedd_server.core.scheduler import FairQueue
from embedd_server.core.tokenization import (
    HuggingFaceTokenizer,
    LlamaTokenizer,
    Tokenizer,
    TokenizerFacts,
)
from embedd_server.core.vector_cache import VectorCache, model_key
from embedd_server.core.workers import WorkerPool
from embedd_server.errors import (
    Conflict,
    InvalidInput,
    ModelLoadError,
    ModelNotEmbedding,
    ModelNotFound,
    Overloaded,
    shorten,
)
from embedd_server.metrics import Metrics, ModelGauges
from embedd_server.model.catalog import EMBED, POOLING_NAMES, ModelInfo
from embedd_server.model.gguf_tokenizer import gguf_tokenizer

log = logging.getLogger(__name__)

_REAP_INTERVAL_S = 0.25
_NO_POOLING = frozenset({POOLING_NAMES[0], POOLING_NAMES[-1]})  # "none", "unspecified"


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
    # Requests' keep_alive leave keep_alive_s alone: the default model, or one whose keep_alive
    # an explicit load (model control) set.
    pinned: bool = False
    expires_at: float = math.inf  # time.monotonic()
    last_used: float = field(default_factory=time.monotonic)
    leases: int = 0
    retired: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # What the tokenizer answers the same way every time, worked out once for this load.
    tokens: TokenizerFacts = field(init=False)
    # This load's part of every vector cache key (core.vector_cache.model_key); b"": its rows
    # are not cached (int8: a row depends on its batch).
    cache_key: bytes = b""

    def __post_init__(self) -> None:
        self.tokens = TokenizerFacts(self.tokenizer)

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
        self._index = ModelIndex(self._model_dirs)
        self.loads = 0  # how many loads happened (for tests and metrics)
        self.metrics = metrics or Metrics()
        self.metrics.watch(self._gauges)
        # One cache for every loaded model, bounded in bytes; a model's rows go with it.
        self.cache = VectorCache(settings.cache_mb * 1024 * 1024)

    # --- the catalogue ---------------------------------------------------------------------

    @property
    def models_dir(self) -> Path:
        return self._settings.models_dir

    def resolve(self, name: str) -> str:
        """The model a request means: '' is the default model; aliases map to models; Ollama's
        ``x:latest`` (and ``library/x``) is ``x`` (core.model_names)."""
        name = self._requested(name)
        return self._settings.aliases.get(name, name)

    def alias_named(self, name: str) -> str:
        """The alias ``name`` means ('' when it names a model itself)."""
        name = self._requested(name)
        return name if name in self._settings.aliases else ""

    def _requested(self, name: str) -> str:
        """The model or alias ``name`` means, before aliases are followed. A model or alias
        literally named with a tag (``x:latest``) keeps its name; else the tag goes."""
        name = name or self._settings.default_model
        plain = plain_name(name)
        if plain == name or name in self._settings.aliases or self._has_file(name):
            return name
        return plain

    def _has_file(self, name: str) -> bool:
        """Whether a models directory holds ``<name>.gguf``."""
        return _plausible_name(name) and any(
            (directory / f"{name}.gguf").is_file() for directory in self._model_dirs()
        )

    def is_default(self, name: str) -> bool:
        """Whether ``name`` (an alias, or '') means the default model."""
        return self.resolve(name) == self.resolve("")

    def _model_dirs(self) -> list[Path]:
        """Where models are looked for, first match wins: models_dir, then the built-in one."""
        builtin = self._settings.builtin_models_dir
        return [self.models_dir, *([Path(builtin)] if builtin else [])]

    async def catalogue(self, *, fresh: bool = False) -> list[ModelInfo]:
        """Every usable model of the models directories, by name, from the index: ``fresh``
        after rescanning the directories (files just added or removed are seen), else as
        indexed (at most one background scan interval old)."""
        return await self._index.models(fresh=fresh)

    async def info(self, name: str) -> ModelInfo:
        """The catalogue entry of a model, or ModelNotFound listing the available ones."""
        return await self.info_of(self.resolve(name))

    async def info_of(self, name: str) -> ModelInfo:
        """:meth:`info` of a name :meth:`resolve` gave (a request resolves its model once)."""
        entry = await self._index.lookup(name) if _plausible_name(name) else None
        if entry is None:
            available = ", ".join(info.name for info in await self.catalogue()) or "none"
            raise ModelNotFound(
                f"The model '{shorten(name)}' does not exist. Available models: {available}.",
                param="model",
            )
        if entry.info is None:
            raise ModelLoadError(entry.error)
        return entry.info

    async def digest(self, info: ModelInfo) -> str:
        """sha256 of the model's file, hex, as the index computed it off the event loop ("" for
        a file replaced or removed since ``info`` was read)."""
        return await self._index.digest(info)

    def is_loaded(self, name: str) -> bool:
        return self.resolve(name) in self._loaded

    def loaded(self, name: str) -> LoadedModel | None:
        """The loaded model of a name :meth:`resolve` gave, if it is loaded (no file is read;
        a request resolves its model once)."""
        return self._loaded.get(name)

    def engine_of(self, name: str) -> str:
        """The engine serving a loaded model ("llama.cpp", "onnxruntime"); "" when not loaded
        (the choice is made at load: embedd_server.engines.choice)."""
        model = self._loaded.get(self.resolve(name))
        return model.runtime.engine_name if model is not None else ""

    def pooling_of(self, name: str) -> str:
        """The pooling a loaded model serves with (a causal LM's is chosen at load); "" when
        it is not loaded."""
        model = self._loaded.get(self.resolve(name))
        return "" if model is None else model.options.pooling or model.info.pooling

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
        async with self.lease(self.resolve(name), keep_alive_s) as model:
            yield model

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str, keep_alive_s: float | None = None
    ) -> AsyncIterator[LoadedModel]:
        """:meth:`use` for a name :meth:`resolve` gave (a request resolves its model once)."""
        model = await self._get(name)
        model.leases += 1
        model.idle.clear()
        try:
            yield model
        finally:
            model.leases -= 1
            model.last_used = time.monotonic()
            # A request's keep_alive applies to models nobody pinned (Ollama's behaviour).
            seconds = model.keep_alive_s if keep_alive_s is None or model.pinned else keep_alive_s
            model.expires_at = model.last_used + seconds
            if model.leases == 0:
                model.idle.set()
                if seconds <= 0:
                    self._wake_reaper.set()

    async def get(self, name: str, options: LoadOptions | None = None) -> LoadedModel:
        """The loaded model, loading it first if needed (one load for concurrent callers).

        ``options`` (an explicit load's) must agree with the model's own pooling and, when it
        is loaded already, with the options it was loaded with: callers share the instance.
        """
        return await self._get(self.resolve(name), options)

    async def _get(self, name: str, options: LoadOptions | None = None) -> LoadedModel:
        """:meth:`get` for a resolved name."""
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded if options is None else self._same_options(loaded, options)
        async with self._load_locks.setdefault(name, asyncio.Lock()):
            loaded = self._loaded.get(name)
            if loaded is not None:
                return loaded if options is None else self._same_options(loaded, options)
            info = await self.info_of(name)
            loaded = await self._load(info, _keeping_own_pooling(info, options or LoadOptions()))
            self._loaded[name] = loaded
        return loaded

    def _same_options(self, loaded: LoadedModel, options: LoadOptions) -> LoadedModel:
        """``loaded`` when ``options`` ask for nothing it does not do; else Conflict."""
        options = _keeping_own_pooling(loaded.info, options)
        gpu_layers = loaded.options.n_gpu_layers
        current = {
            "pooling": loaded.options.pooling or loaded.info.pooling,
            "n_gpu_layers": self._settings.n_gpu_layers if gpu_layers is None else gpu_layers,
        }
        asked = {"pooling": options.pooling, "n_gpu_layers": options.n_gpu_layers}
        changed = [
            key for key, value in asked.items() if value is not None and value != current[key]
        ]
        if not changed:
            return loaded
        name = loaded.info.name
        remedy = (
            "it is the default model, which stays loaded: restart the server with other "
            "settings (e.g. --n-gpu-layers)"
            if self.is_default(name)
            else f'unload it first (POST /v1/models/unload {{"model": "{name}"}}), then '
            "load it with the new options"
        )
        raise Conflict(
            f"Model '{name}' is loaded with "
            + ", ".join(f"{key} {current[key]!r}" for key in changed)
            + ", and every caller of it shares that instance: loading it with "
            + ", ".join(f"{key} {asked[key]!r}" for key in changed)
            + f" would change what they get. To change it, {remedy}.",
            param=changed[0],
        )

    async def load(
        self, name: str, options: LoadOptions, keep_alive_s: float | None
    ) -> LoadedModel:
        """An explicit load (model control). A keep_alive, if given, becomes the model's idle
        time and pins it (requests' keep_alive no longer change it); the default model's is
        forever and stays so."""
        model = await self.get(name, options)
        if keep_alive_s is not None and not self.is_default(model.info.name):
            model.keep_alive_s = keep_alive_s
            model.expires_at = time.monotonic() + keep_alive_s
            model.pinned = True
            self._wake_reaper.set()
        return model

    async def unload(self, name: str) -> ModelInfo:
        """Retires a loaded model: new calls load it afresh, calls in flight finish first.
        The default model stays loaded: unloading it is a Conflict."""
        info = await self.info(name)
        if self.is_default(info.name):
            raise Conflict(
                f"'{info.name}' is the default model, which stays loaded (--default-model); it "
                "cannot be unloaded. To free it, restart the server with another default model.",
                param="model",
            )
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
            queue = FairQueue(
                self._settings.max_queued_texts,
                self._settings.max_queued_tokens,
                bulk_share=self._settings.bulk_share,
                bulk_batch_tokens=self._settings.bulk_batch_tokens,
                bulk_free_workers=self._settings.bulk_free_workers,
            )
            workers = self._settings.workers_for(runtime.engine_name)
            pool = WorkerPool(
                info.name,
                queue,
                runtime.new_engine,
                workers,
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
            workers,
            seconds,
        )
        default = self.is_default(info.name)
        keep = math.inf if default else self._default_keep_alive
        model = LoadedModel(info, runtime, tokenizer, queue, pool, seconds, options, keep, default)
        model.expires_at = time.monotonic() + keep
        model.cache_key = self._cache_key(info, options, runtime)
        model.idle.set()
        return model

    def _cache_key(self, info: ModelInfo, options: LoadOptions, runtime: Runtime) -> bytes:
        """What makes this load's rows what they are, as a cache key: the file (path, size,
        mtime, inode: a rewritten file is another key), the load options and the engine.
        b"" where rows are not cached: the cache is off, or int8 weights, whose dynamic
        quantization makes a row depend on the rest of its batch."""
        if not self.cache.enabled or self._settings.int8:
            return b""
        stat = os.stat(info.path)
        return model_key(
            str(info.path),
            stat.st_size,
            stat.st_mtime_ns,
            stat.st_ino,
            options,
            runtime.engine_name,
        )

    async def _make_room(self, info: ModelInfo) -> None:
        """Unloads least recently used idle models until ``info`` fits the memory budget."""
        budget = self._settings.memory_budget_mb * 1024 * 1024
        if not budget:
            return
        while self._bytes_loaded() + info.file_size_bytes > budget:
            idle = [
                m
                for m in self._loaded.values()
                if m.leases == 0 and m.info != info and not self.is_default(m.info.name)
            ]
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
        if model.cache_key:
            self.cache.forget_model(model.cache_key)
            self.metrics.cache_bytes.set(self.cache.size_bytes)
        await model.idle.wait()  # calls in flight finish first
        await asyncio.to_thread(model.pool.stop)
        model.runtime.close()

    def _workers_lost(self, name: str) -> None:
        if self._on_worker_loss is not None:
            self._on_worker_loss(name)

    # --- expiry --------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts unloading expired and deleted models and indexing the models directories
        in the background (call on the server's event loop)."""
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_forever())
        self._index.start()

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
        """Stops expiry and indexing, then drains and frees every loaded model."""
        await self._index.close()
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for model in list(self._loaded.values()):
            await self._retire(model, "shutting down")


def _keeping_own_pooling(info: ModelInfo, options: LoadOptions) -> LoadOptions:
    """``options`` without a pooling that only repeats the model's own; InvalidInput for one
    that would replace it (every caller of the model would get other vectors)."""
    own = info.pooling if info.pooling not in _NO_POOLING else None
    if options.pooling is None or own is None:
        return options
    if options.pooling == own:
        return dataclasses.replace(options, pooling=None)
    raise InvalidInput(
        f"'{info.name}' pools with '{own}', its own pooling (from its GGUF file); a load "
        f"cannot give it '{shorten(options.pooling)}' instead, since every caller of "
        f"'{info.name}' would then get other vectors. To embed with '{shorten(options.pooling)}' "
        "pooling, make that a model of its own: import it again under another name from a "
        "sentence-transformers directory whose Pooling module selects it (embedd import DIR "
        "--name NAME). Only a model without pooling of its own (a causal LM) takes a pooling "
        "at load.",
        param="pooling",
    )


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
