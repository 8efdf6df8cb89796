"""The model catalogue and the models loaded from it.

Every ``<name>.gguf`` in the models directory is a model named ``<name>``. A model is loaded
on first use (or at start for the default model): its weights once, then one engine per
worker. Concurrent first requests for a model wait for one load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from embedd_server.engine import Engine, LlamaRuntime
from embedd_server.errors import ModelLoadError, ModelNotEmbedding, ModelNotFound
from embedd_server.model_info import ModelInfo, read_model_info
from embedd_server.scheduler import FairQueue
from embedd_server.settings import Settings
from embedd_server.tokenization import HuggingFaceTokenizer, LlamaTokenizer, Tokenizer
from embedd_server.workers import WorkerPool

log = logging.getLogger(__name__)


class Runtime(Protocol):
    """A model loaded by an engine backend (llama.cpp, or a fake in unit tests)."""

    @property
    def dimensions(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def new_engine(self) -> Engine: ...

    def tokenize(self, text: bytes) -> list[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def close(self) -> None: ...


RuntimeLoader = Callable[[ModelInfo, Settings], Runtime]


def load_llama_runtime(info: ModelInfo, settings: Settings) -> Runtime:
    """The production loader: llama.cpp on the GGUF file."""
    return LlamaRuntime(
        info.path,
        max_tokens=max(settings.batch_tokens, info.max_input_tokens),
        max_sequences=settings.batch_sequences,
        n_threads=settings.threads_per_worker,
        n_gpu_layers=settings.n_gpu_layers,
    )


@dataclass
class LoadedModel:
    """A model ready to serve: tokenizer, queue and worker pool."""

    info: ModelInfo
    runtime: Runtime
    tokenizer: Tokenizer
    queue: FairQueue
    pool: WorkerPool
    load_seconds: float

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
        settings: Settings,
        loader: RuntimeLoader = load_llama_runtime,
        on_worker_loss: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._loader = loader
        self._on_worker_loss = on_worker_loss
        self._loaded: dict[str, LoadedModel] = {}
        self._load_locks: dict[str, asyncio.Lock] = {}

    @property
    def models_dir(self) -> Path:
        return self._settings.models_dir

    def resolve(self, name: str) -> str:
        """The model a request means: its name, or the default model for ''."""
        return name or self._settings.default_model

    def catalogue(self) -> list[ModelInfo]:
        """Every model in the models directory, by name."""
        paths = sorted(self.models_dir.glob("*.gguf")) if self.models_dir.is_dir() else []
        infos = []
        for path in paths:
            try:
                infos.append(read_model_info(path))
            except ModelLoadError as exc:  # one broken file must not hide the others
                log.warning("skipping %s: %s", path.name, exc.message)
        return infos

    def info(self, name: str) -> ModelInfo:
        """The catalogue entry of a model, or ModelNotFound listing the available ones."""
        name = self.resolve(name)
        path = self.models_dir / f"{name}.gguf"
        if "/" in name or not path.is_file():
            available = ", ".join(info.name for info in self.catalogue()) or "none"
            raise ModelNotFound(
                f"The model '{name}' does not exist. Available models: {available}.",
                param="model",
            )
        return read_model_info(path)

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def loaded_models(self) -> Sequence[LoadedModel]:
        return list(self._loaded.values())

    async def get(self, name: str) -> LoadedModel:
        """The loaded model, loading it first if needed (one load for concurrent callers)."""
        name = self.resolve(name)
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        lock = self._load_locks.setdefault(name, asyncio.Lock())
        async with lock:
            loaded = self._loaded.get(name)
            if loaded is None:
                info = self.info(name)
                loaded = await asyncio.to_thread(self._load, info)
                self._loaded[name] = loaded
        return loaded

    def _load(self, info: ModelInfo) -> LoadedModel:
        if not info.embedding:
            raise ModelNotEmbedding(
                f"Model '{info.name}' does not support embeddings (its pooling type is "
                f"'{info.pooling}').",
                param="model",
            )
        started = time.perf_counter()
        runtime = self._loader(info, self._settings)
        try:
            tokenizer = self._tokenizer_for(info, runtime)
            queue = FairQueue(self._settings.max_queued_texts)
            pool = WorkerPool(
                info.name,
                queue,
                runtime.new_engine,
                self._settings.workers,
                batch_tokens=self._settings.batch_tokens,
                batch_sequences=self._settings.batch_sequences,
                on_all_dead=lambda: self._workers_lost(info.name),
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
        return LoadedModel(info, runtime, tokenizer, queue, pool, seconds)

    @staticmethod
    def _tokenizer_for(info: ModelInfo, runtime: Runtime) -> Tokenizer:
        if info.hf_tokenizer_json:
            return HuggingFaceTokenizer(info.hf_tokenizer_json)
        log.info("%s has no tokenizer.huggingface.json: using llama.cpp's tokenizer", info.name)
        return LlamaTokenizer(runtime.tokenize, runtime.token_text)

    def _workers_lost(self, name: str) -> None:
        if self._on_worker_loss is not None:
            self._on_worker_loss(name)

    async def close(self, timeout: float | None = None) -> None:
        """Drains and frees every loaded model."""
        loaded, self._loaded = list(self._loaded.values()), {}
        for model in loaded:
            await asyncio.to_thread(model.pool.stop, timeout)
            model.runtime.close()
