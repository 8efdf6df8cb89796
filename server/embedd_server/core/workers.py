"""The worker pool of one model: N threads, each owning one engine.

A worker takes a batch of inputs from the queue, makes it one :class:`Pack` (validated there,
once) and hands it to its engine as is: a session on ONNX Runtime's shared one, a llama.cpp
context, or a worker process that gets the pack's bytes. ONNX Runtime and llama.cpp release the
GIL while they compute, so worker threads of one process run in parallel.

Failures are contained here. A worker whose engine raises fails only that batch's callers
(INTERNAL) and goes on. A worker that dies, or whose decode outlives ``worker_timeout_s``
(hung), hands its callers a retryable UNAVAILABLE and is replaced by a fresh worker with a new
engine; a hung thread that ever comes back finds itself retired and leaves. Only when no
worker can be started is the queue closed and every waiting caller answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from embedd_server.compute.engine import Engine, EngineDied, FloatMatrix
from embedd_server.compute.pack import Pack
from embedd_server.core.scheduler import FairQueue, WorkItem, request_ids
from embedd_server.errors import InternalError, Unavailable
from embedd_server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Worker:
    number: int
    engine: Engine
    batch: list[WorkItem] = field(default_factory=list)
    busy_since: float | None = None  # time.monotonic() when the current decode began
    retired: bool = False
    thread: threading.Thread | None = None


def _pack(items: list[WorkItem], *, token_states: bool) -> Pack:
    """The one pack of a batch's items (validated here, once; engines take it as is)."""
    return Pack.of(
        [item.token_ids for item in items],
        [item.pooling_start for item in items],
        [item.token_type_start for item in items],
        token_states=token_states,
    )


def _rows(engine: Engine, items: list[WorkItem]) -> tuple[list[FloatMatrix], int]:
    """Each item's answer, in order: its pooled vector, or its tokens' hidden states for a
    job that wants them; and the tokens computed. One pack and one engine call per kind the
    batch holds (nearly always one: /embed_all's jobs are the only ones wanting states)."""
    rows: list[FloatMatrix] = [np.empty(0, dtype=np.float32)] * len(items)
    tokens = 0
    for token_states in (False, True):
        chosen = [i for i, item in enumerate(items) if item.job.token_states == token_states]
        if not chosen:
            continue
        pack = _pack([items[i] for i in chosen], token_states=token_states)
        answer = engine.embed(pack)
        tokens += len(pack.tokens)
        parts = pack.split_rows(answer) if token_states else answer
        for i, part in zip(chosen, parts, strict=True):
            rows[i] = part
    return rows, tokens


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
        timeout_s: float = 60.0,
        on_all_dead: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._model_name = model_name
        self._queue = queue
        self._engine_factory = engine_factory
        self._size = workers
        self._batch_tokens = batch_tokens
        self._batch_sequences = batch_sequences
        self._timeout_s = timeout_s
        self._on_all_dead = on_all_dead
        self._workers: set[_Worker] = set()
        self._next_number = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._launching = 0  # replacements whose engine is being created
        self._launched = threading.Condition(self._lock)
        self.replaced = 0  # workers replaced after a crash or hang (metrics, tests)
        metrics = metrics or Metrics()
        # Bound once: the worker loop observes each batch without label look-ups.
        self._observe_compute = metrics.compute_time.observe
        self._observe_texts = metrics.batch_texts.observe
        self._observe_tokens = metrics.batch_tokens.observe
        self._replacements = metrics.worker_replacements.labels(model_name)

    @property
    def alive(self) -> int:
        """Workers in service (health reports NOT_SERVING at 0)."""
        return len(self._workers)

    def start(self) -> None:
        """Creates every engine first (so a load error surfaces here), then the threads."""
        engines = [self._engine_factory() for _ in range(self._size)]
        for engine in engines:
            self._launch(engine)
        watchdog = threading.Thread(
            target=self._watch, name=f"watchdog-{self._model_name}", daemon=True
        )
        watchdog.start()

    def stop(self, timeout: float | None = None) -> None:
        """Lets the workers finish what is queued, then joins them (engines are freed)."""
        self._stopping.set()
        self._queue.close()
        # Workers in service drain the queue; retired (hung) threads are not waited for.
        with self._lock:
            self._launched.wait_for(lambda: self._launching == 0, timeout)
            workers = list(self._workers)
        for worker in workers:
            if worker.thread is not None:
                worker.thread.join(timeout)

    def _launch(self, engine: Engine) -> None:
        # Started under the lock: stop() must never see a worker whose thread has not begun
        # (a replacement launched while the pool stops), as join() refuses such a thread.
        with self._lock:
            worker = _Worker(self._next_number, engine)
            self._next_number += 1
            worker.thread = threading.Thread(
                target=self._run,
                args=(worker,),
                name=f"worker-{self._model_name}-{worker.number}",
                daemon=True,
            )
            self._workers.add(worker)
            worker.thread.start()

    def _run(self, worker: _Worker) -> None:
        try:
            while not worker.retired:
                batch = self._queue.take_batch(self._batch_tokens, self._batch_sequences)
                if not batch:
                    break  # closed and drained
                worker.batch, worker.busy_since = batch, time.monotonic()
                self._compute_on(worker, batch)
                worker.batch, worker.busy_since = [], None
        except EngineDied as exc:  # its process crashed, or the watchdog killed it
            if not worker.retired:
                log.error(
                    "worker %d of %s died: %s",
                    worker.number,
                    self._model_name,
                    exc,
                    extra={"request_ids": request_ids(worker.batch)},
                )
                self._replace(worker, "The worker computing this request died; retry it.")
        except BaseException:  # the thread ends here either way; say so loudly
            log.exception(
                "worker %d of %s died",
                worker.number,
                self._model_name,
                extra={"request_ids": request_ids(worker.batch)},
            )
            self._replace(worker, "The worker computing this request died; retry it.")
        finally:
            if worker.retired:  # replaced after a hang or crash: nobody else uses this engine
                worker.engine.close()
            else:
                self._leave(worker)

    def _compute_on(self, worker: _Worker, batch: list[WorkItem]) -> None:
        """Runs a batch on the worker's engine, renewing an engine process that has ended.

        Embedding is idempotent, and a process that died may not have read the pack yet: a
        pack whose process ends is run once more on a new one. Dying again raises
        EngineDied, which ends the worker and answers its callers UNAVAILABLE."""
        if not worker.engine.alive:
            self._renew_engine(worker, "its engine process ended while idle")
        try:
            self._compute(worker.engine, batch)
        except EngineDied as exc:
            if worker.retired:  # killed by the watchdog: its callers have an answer
                raise
            self._renew_engine(worker, f"{exc}; retrying its pack once")
            self._compute(worker.engine, batch)

    def _renew_engine(self, worker: _Worker, why: str) -> None:
        """The engine's process ended: the worker starts a new one and goes on."""
        log.error(
            "worker %d of %s: %s; starting a new engine process",
            worker.number,
            self._model_name,
            why,
            extra={"request_ids": request_ids(worker.batch)},
        )
        worker.engine.close()
        worker.engine = self._engine_factory()
        self.replaced += 1
        self._replacements.inc()

    def _compute(self, engine: Engine, batch: list[WorkItem]) -> None:
        live = [item for item in batch if not item.job.done]  # skip cancelled/failed jobs
        if not live:
            return
        started = time.perf_counter()
        try:
            rows, tokens = _rows(engine, live)
        except EngineDied:
            raise  # the worker is replaced; its callers get UNAVAILABLE
        except Exception:
            log.exception(
                "engine of %s failed on a batch",
                self._model_name,
                extra={"request_ids": request_ids(live)},
            )
            for item in live:
                item.job.fail(InternalError())
            return
        self._observe_compute(time.perf_counter() - started)
        self._observe_texts(len(live))
        self._observe_tokens(tokens)
        for item, vector in zip(live, rows, strict=True):
            item.job.deliver(item.index, vector)

    def _watch(self) -> None:
        """Replaces workers whose decode has run longer than the timeout."""
        interval = min(1.0, self._timeout_s / 4)
        while not self._stopping.wait(interval):
            now = time.monotonic()
            for worker in list(self._workers):
                started = worker.busy_since
                if started is not None and now - started > self._timeout_s:
                    log.error(
                        "worker %d of %s hung for %.1fs: replacing it",
                        worker.number,
                        self._model_name,
                        now - started,
                        extra={"request_ids": request_ids(worker.batch)},
                    )
                    self._replace(worker, "The worker computing this request hung; retry it.")
                    worker.engine.abort()  # a process engine is killed; a thread is left

    def _replace(self, worker: _Worker, message: str) -> None:
        """Retires a worker, answers the callers it held, and starts a new one."""
        with self._lock:
            if worker.retired or worker not in self._workers:
                return
            worker.retired = True
            self._workers.discard(worker)
            replacing = not self._stopping.is_set()
            if replacing:
                self._launching += 1  # stop() waits for this replacement to be in service
        for item in worker.batch:
            item.job.fail(Unavailable(message))
        if not replacing:
            return self._check_empty()
        try:
            engine = self._engine_factory()
        except Exception:
            log.exception("could not start a replacement worker for %s", self._model_name)
            return self._check_empty()
        else:
            self.replaced += 1
            self._replacements.inc()
            self._launch(engine)
        finally:
            with self._lock:
                self._launching -= 1
                self._launched.notify_all()

    def _leave(self, worker: _Worker) -> None:
        """A worker ended normally (queue closed): free its engine."""
        with self._lock:
            self._workers.discard(worker)
        worker.engine.close()
        self._check_empty()

    def _check_empty(self) -> None:
        if self._workers or self._stopping.is_set():
            return
        # Nobody is left to run queued work: refuse new work, answer every waiting caller.
        error = Unavailable(f"No worker of model {self._model_name} is running; retry later.")
        self._queue.close(error)
        self._queue.fail_all(error)
        if self._on_all_dead is not None:
            self._on_all_dead()
