"""The worker pool of one model: N threads, each owning one engine.

llama-cpp-python releases the GIL inside llama.cpp, so worker threads of one process compute
in parallel (shared notes: two single-thread contexts in two threads gave 563 texts/s against
296 for one), and share the model's weights instead of loading them once per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from embedd_server.engine import Engine
from embedd_server.errors import InternalError, Unavailable
from embedd_server.scheduler import FairQueue, WorkItem

log = logging.getLogger(__name__)


class WorkerPool:
    """Threads that take work items from one queue and run them on their own engine."""

    def __init__(
        self,
        model_name: str,
        queue: FairQueue,
        engine_factory: Callable[[], Engine],
        workers: int,
        *,
        batch_tokens: int,
        batch_sequences: int,
        on_all_dead: Callable[[], None] | None = None,
    ) -> None:
        self._model_name = model_name
        self._queue = queue
        self._engine_factory = engine_factory
        self._size = workers
        self._batch_tokens = batch_tokens
        self._batch_sequences = batch_sequences
        self._on_all_dead = on_all_dead
        self._threads: list[threading.Thread] = []
        self._alive = 0
        self._stopping = False
        self._lock = threading.Lock()

    @property
    def alive(self) -> int:
        """Workers that are running (health reports NOT_SERVING at 0)."""
        return self._alive

    def start(self) -> None:
        """Creates every engine first (so a load error surfaces here), then the threads."""
        engines = [self._engine_factory() for _ in range(self._size)]
        for number, engine in enumerate(engines):
            thread = threading.Thread(
                target=self._run,
                args=(engine,),
                name=f"worker-{self._model_name}-{number}",
                daemon=True,
            )
            self._threads.append(thread)
        self._alive = len(self._threads)
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Lets the workers finish what is queued, then joins them (engines are freed)."""
        self._stopping = True
        self._queue.close()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, engine: Engine) -> None:
        batch: list[WorkItem] = []
        try:
            while batch := self._queue.take_batch(self._batch_tokens, self._batch_sequences):
                self._compute(engine, batch)
        except BaseException:  # the thread ends here either way; say so loudly
            log.exception("worker of %s died", self._model_name)
            for item in batch:
                item.job.fail(Unavailable("The worker computing this request died; retry it."))
        finally:
            engine.close()
            self._worker_ended()

    def _compute(self, engine: Engine, batch: list[WorkItem]) -> None:
        live = [item for item in batch if not item.job.done]  # skip cancelled/failed jobs
        if not live:
            return
        try:
            vectors = engine.embed_batch([item.token_ids for item in live])
        except Exception:
            log.exception("engine of %s failed on a batch", self._model_name)
            for item in live:
                item.job.fail(InternalError())
            return
        for item, vector in zip(live, vectors, strict=True):
            item.job.deliver(item.index, vector)

    def _worker_ended(self) -> None:
        with self._lock:
            self._alive -= 1
            last = self._alive == 0
        if last and not self._stopping:
            # Nobody is left to run queued work: refuse new work, answer every waiting caller.
            error = Unavailable(f"No worker of model {self._model_name} is running; retry later.")
            self._queue.close(error)
            self._queue.fail_all(error)
            if self._on_all_dead is not None:
                self._on_all_dead()
