"""The scheduler between callers (asyncio) and workers (threads).

A request becomes a :class:`Job` of one work item per input. Workers take items from a
:class:`FairQueue`: new jobs in arrival order, taking turns with the jobs already started,
which rotate item by item. So a one-text request never waits behind another caller's
2048-text batch (at most one of its inputs), the batch still advances under a stream of new
calls, and calls are served in arrival order (no starvation at the tail). The queue is
bounded in items; a job that does not fit is refused at once
(:class:`~embedd_server.errors.Overloaded`). Cancelled and expired jobs are dropped before
their remaining items cost compute.

Every job ends exactly once: with its vectors, or with an error delivered to its caller.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from embedd_server.compute.engine import FloatMatrix
from embedd_server.errors import (
    Cancelled,
    DeadlineExceeded,
    EmbeddError,
    Overloaded,
    Unavailable,
)


class Job:
    """One request's inputs, its result matrix and the future its caller awaits.

    Created on the event loop; items are delivered from worker threads, and the future is
    resolved on the loop through ``call_soon_threadsafe`` once, when the last item lands or
    the first error happens.
    """

    # Whether the job wants every token's hidden state rather than pooled vectors.
    token_states = False

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        dimensions: int,
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
        *,
        request_id: str = "",
        pooling_starts: Sequence[int] | None = None,
        token_type_starts: Sequence[int] | None = None,
    ) -> None:
        self.sequences = sequences
        # Per input, the first token pooling counts (a model pooling without its prompt).
        self.pooling_starts = pooling_starts
        # Per input, the first token of type 1 (a cross-encoder's document); None: type 0.
        self.token_type_starts = token_type_starts
        self.deadline = deadline
        self.request_id = request_id  # for log lines written by the workers
        self.result: FloatMatrix = np.empty((len(sequences), dimensions), dtype=np.float32)
        self.future: asyncio.Future[FloatMatrix] = loop.create_future()
        self._loop = loop
        self._lock = threading.Lock()
        self._remaining = len(sequences)
        self._next_index = 0
        self._untaken_tokens = sum(map(len, sequences))  # per input, not per token
        self._done = False
        self.created_at = time.monotonic()
        self.started_at: float | None = None  # when a worker took its first input (metrics)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def done(self) -> bool:
        return self._done

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def take_index(self) -> int | None:
        """The next input to compute, or None when all were handed out (queue lock held)."""
        if self._next_index >= len(self.sequences):
            return None
        index = self._next_index
        self._next_index += 1
        self._untaken_tokens -= len(self.sequences[index])
        return index

    def next_length(self) -> int:
        """Tokens of the next input to hand out (0 when none is left)."""
        if self._next_index >= len(self.sequences):
            return 0
        return len(self.sequences[self._next_index])

    @property
    def untaken(self) -> int:
        return len(self.sequences) - self._next_index

    @property
    def untaken_tokens(self) -> int:
        return self._untaken_tokens

    def deliver(self, index: int, vector: npt.NDArray[np.float32]) -> None:
        """Stores one input's vector (worker thread); resolves the future after the last."""
        with self._lock:
            if self._done:
                return
            self.result[index] = vector
            self._remaining -= 1
            if self._remaining:
                return
            self._done = True
        self._loop.call_soon_threadsafe(_set_result, self.future, self.result)

    def fail(self, error: EmbeddError) -> None:
        """Ends the job with an error (any thread); later deliveries are ignored."""
        with self._lock:
            if self._done:
                return
            self._done = True
        self._loop.call_soon_threadsafe(_set_exception, self.future, error)

    def cancel(self) -> None:
        """The caller went away: drop what has not run yet (any thread)."""
        self.fail(Cancelled("The caller cancelled the request."))


class TokenStatesJob(Job):
    """A job for every token's last hidden state (TEI's /embed_all), from an engine that
    gives them (:func:`~embedd_server.compute.engine.gives_token_states`): its future resolves
    with the tokens of all its inputs, one row each, in order (``[total tokens, hidden]``)."""

    token_states = True

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        loop: asyncio.AbstractEventLoop,
        deadline: float | None = None,
        *,
        request_id: str = "",
    ) -> None:
        super().__init__(sequences, 0, loop, deadline, request_id=request_id)
        self._states: list[npt.NDArray[np.float32]] = [self.result] * len(sequences)

    def deliver(self, index: int, vector: npt.NDArray[np.float32]) -> None:
        """Stores one input's token states (worker thread); resolves the future after the
        last."""
        with self._lock:
            if self._done:
                return
            self._states[index] = vector
            self._remaining -= 1
            if self._remaining:
                return
            self._done = True
            self.result = np.concatenate(self._states)
        self._loop.call_soon_threadsafe(_set_result, self.future, self.result)


def _set_result(future: asyncio.Future[FloatMatrix], value: FloatMatrix) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[FloatMatrix], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def request_ids(items: Sequence[WorkItem]) -> list[str]:
    """The request ids of the jobs some work items belong to, each once, in order."""
    return list(dict.fromkeys(item.job.request_id for item in items if item.job.request_id))


@dataclass(frozen=True)
class WorkItem:
    """One input of one job, handed to one worker."""

    job: Job
    index: int

    @property
    def token_ids(self) -> Sequence[int]:
        return self.job.sequences[self.index]

    @property
    def pooling_start(self) -> int:
        """The first of its tokens that pooling counts (0 but for include_prompt: false)."""
        starts = self.job.pooling_starts
        return 0 if starts is None else starts[self.index]

    @property
    def token_type_start(self) -> int:
        """The first of its tokens with token type 1 (its length: none has)."""
        starts = self.job.token_type_starts
        return len(self.token_ids) if starts is None else starts[self.index]


class FairQueue:
    """Queue of jobs bounded in inputs and in tokens, shared by the workers of one model."""

    def __init__(self, max_items: int, max_tokens: int = 1 << 62) -> None:
        self._max_items = max_items
        self._max_tokens = max_tokens
        self._fresh: deque[Job] = deque()  # no input taken yet: first come, first served
        self._started: deque[Job] = deque()  # partly taken: round-robin, one input each
        self._fresh_turn = False
        self._queued_items = 0
        self._queued_tokens = 0
        self._closed: EmbeddError | None = None  # the error new jobs get once closed
        self._lock = threading.Lock()
        # Idle workers, the most recently idle last: new work wakes the top one. Its engine
        # ran last, so its caches are the warmest (docs/design.md, "Scheduling").
        self._idle: list[threading.Condition] = []

    @property
    def queued_items(self) -> int:
        """Inputs waiting for a worker (for metrics and tests)."""
        return self._queued_items

    @property
    def queued_tokens(self) -> int:
        """Tokens of the inputs waiting for a worker (for metrics)."""
        return self._queued_tokens

    def submit(self, job: Job) -> None:
        """Queues a job, or raises Overloaded/Unavailable at once."""
        with self._lock:
            if self._closed is not None:
                raise self._closed
            if self._queued_items + len(job) > self._max_items:
                raise Overloaded(
                    f"The server's queue is full ({self._queued_items} of {self._max_items} "
                    f"inputs waiting); retry later or send fewer inputs per request."
                )
            tokens = job.untaken_tokens
            # A job larger than the whole token bound still runs when the queue is empty.
            if self._queued_tokens and self._queued_tokens + tokens > self._max_tokens:
                raise Overloaded(
                    f"The server's queue is full ({self._queued_tokens} of {self._max_tokens} "
                    f"tokens waiting); retry later or send less text per request."
                )
            self._fresh.append(job)
            self._queued_items += len(job)
            self._queued_tokens += tokens
            for _ in range(min(len(job), len(self._idle))):
                self._idle.pop().notify()

    def take_batch(self, max_tokens: int, max_items: int) -> list[WorkItem]:
        """Blocks until work is ready, then takes items round-robin across jobs while they
        fit in ``max_tokens`` (the first item always fits). Empty once closed and drained."""
        with self._lock:
            while True:
                first = self._pop_item(max_tokens=None)
                if first is not None:
                    break
                if self._closed is not None:
                    return []
                self._wait_idle()
            batch, budget = [first], max_tokens - len(first.token_ids)
            while len(batch) < max_items and (item := self._pop_item(budget)) is not None:
                batch.append(item)
                budget -= len(item.token_ids)
            return batch

    def _wait_idle(self) -> None:
        """Waits (queue lock held) until submit() or close() wakes this worker."""
        waiter = threading.Condition(self._lock)
        self._idle.append(waiter)
        try:
            waiter.wait()
        finally:
            if waiter in self._idle:  # woken by a timeout or spuriously: not popped
                self._idle.remove(waiter)

    def _pop_item(self, max_tokens: int | None) -> WorkItem | None:
        """The next input, if it fits in max_tokens (None: any size). New jobs and jobs
        already started take turns, so a one-text call waits for at most one input of a big
        batch, and a big batch still advances while new calls keep arriving."""
        now = time.monotonic()
        self._fresh_turn = not self._fresh_turn
        first, second = (
            (self._fresh, self._started) if self._fresh_turn else (self._started, self._fresh)
        )
        return self._pop_from(first, max_tokens, now) or self._pop_from(second, max_tokens, now)

    def _pop_from(self, jobs: deque[Job], max_tokens: int | None, now: float) -> WorkItem | None:
        while jobs:
            job = jobs[0]
            if job.done or job.expired(now):
                jobs.popleft()
                self._queued_items -= job.untaken
                self._queued_tokens -= job.untaken_tokens
                if not job.done:
                    job.fail(DeadlineExceeded("The request's deadline passed while it waited."))
                continue
            if max_tokens is not None and job.next_length() > max_tokens:
                return None
            jobs.popleft()
            index = job.take_index()
            if index is None:
                continue
            if index == 0:
                job.started_at = now
            self._queued_items -= 1
            self._queued_tokens -= len(job.sequences[index])
            if job.untaken:
                self._started.append(job)  # rotate: the next input goes to another job
            return WorkItem(job, index)
        return None

    def close(self, reason: EmbeddError | None = None) -> None:
        """Refuses new jobs (with ``reason``); workers drain what is queued, then get None."""
        with self._lock:
            self._closed = reason or Unavailable(
                "The model is shutting down; retry on another replica."
            )
            while self._idle:
                self._idle.pop().notify()

    def fail_all(self, error: EmbeddError) -> None:
        """Ends every queued job with ``error`` (e.g. when the last worker died)."""
        with self._lock:
            jobs = [*self._fresh, *self._started]
            self._fresh.clear()
            self._started.clear()
            self._queued_items = 0
            self._queued_tokens = 0
        for job in jobs:
            job.fail(error)
