"""The scheduler between callers (asyncio) and workers (threads).

A request becomes a :class:`Job` of one work item per input. Workers take items from a
:class:`FairQueue`: new jobs in arrival order, taking turns with the jobs already started,
which rotate item by item. So a one-text request never waits behind another caller's
2048-text batch (at most one of its inputs), the batch still advances under a stream of new
calls, and calls are served in arrival order (no starvation at the tail). The queue is
bounded in items; a job that does not fit is refused at once
(:class:`~embedd_server.errors.Overloaded`). Cancelled and expired jobs are dropped before
their remaining items cost compute.

Each job is in one of two lanes (issue 24): ``interactive`` (a search query: someone waits)
or ``bulk`` (a re-index: throughput matters, a few milliseconds don't). Workers serve the
interactive lane first; while both lanes wait, one item in every ``bulk_share`` goes to bulk,
so bulk never starves. A pack holds the work of one lane only, so an interactive pack never
waits for bulk work to fill it; and while interactive work has arrived lately
(``INTERACTIVE_RECENT_S``), bulk packs are cut to ``bulk_batch_tokens``, so that a query that
arrives while every worker computes bulk work waits for a short pack, not a full one. With no
interactive caller around, bulk packs are full size. With ``bulk_free_workers`` (default 0),
bulk leaves that many workers free while interactive work is recent, so a query need not wait
for a bulk input at all; on two cores that costs bulk about half its throughput
(bench/lanes.py).

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

INTERACTIVE, BULK = "interactive", "bulk"
LANES = (INTERACTIVE, BULK)
# How long after an interactive job arrives bulk packs stay short: a closed-loop caller sends
# its next query within milliseconds of its answer, so one second covers a live one.
INTERACTIVE_RECENT_S = 1.0


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
        lane: str = INTERACTIVE,
    ) -> None:
        if lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, not {lane!r}")
        self.lane = lane
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
        # Inputs are handed out shortest first: a pack then holds inputs of like lengths, and
        # the engine pads each batch to its longest (4 callers x 32 STS-B sentences: padding
        # 1.24x -> 1.19x, 413-458 -> 578-581 texts/s in-process: docs/design.md, "Scheduling").
        self._order: list[int] = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
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
        """The next input to compute (the shortest not yet handed out), or None when all
        were handed out (queue lock held)."""
        if self._next_index >= len(self.sequences):
            return None
        index = self._order[self._next_index]
        self._next_index += 1
        self._untaken_tokens -= len(self.sequences[index])
        return index

    def next_length(self) -> int:
        """Tokens of the next input to hand out (0 when none is left)."""
        if self._next_index >= len(self.sequences):
            return 0
        return len(self.sequences[self._order[self._next_index]])

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
        lane: str = INTERACTIVE,
    ) -> None:
        super().__init__(sequences, 0, loop, deadline, request_id=request_id, lane=lane)
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


class _Lane:
    """One lane's jobs: new ones first come, first served; started ones round-robin."""

    def __init__(self) -> None:
        self.fresh: deque[Job] = deque()  # no input taken yet
        self.started: deque[Job] = deque()  # partly taken: one input each in turn
        self.fresh_turn = False

    def __bool__(self) -> bool:
        return bool(self.fresh or self.started)


class FairQueue:
    """Queue of jobs bounded in inputs and in tokens, shared by the workers of one model."""

    def __init__(
        self,
        max_items: int,
        max_tokens: int = 1 << 62,
        *,
        bulk_share: int = 8,
        bulk_batch_tokens: int | None = None,
        bulk_free_workers: int = 0,
    ) -> None:
        """``bulk_share``: while both lanes wait, one item in this many goes to bulk.
        ``bulk_batch_tokens``: the token bound of a bulk pack while interactive work is
        recent (None: the worker's own). ``bulk_free_workers``: workers bulk leaves free
        while interactive work is recent."""
        if bulk_share < 1:
            raise ValueError("bulk_share must be at least 1")
        self._max_items = max_items
        self._max_tokens = max_tokens
        self._bulk_share = bulk_share
        self._bulk_batch_tokens = bulk_batch_tokens
        self._lanes = {INTERACTIVE: _Lane(), BULK: _Lane()}
        self._interactive_streak = 0  # interactive packs taken since the last bulk one
        self._last_interactive = -INTERACTIVE_RECENT_S  # time.monotonic() of the last arrival
        self._queued_items = 0
        self._queued_tokens = 0
        self._workers: set[int] = set()  # the threads that take packs (thread idents)
        self._bulk_busy: set[int] = set()  # ... of them, those computing a bulk pack now
        self._bulk_free_workers = bulk_free_workers
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
            self._lanes[job.lane].fresh.append(job)
            if job.lane == INTERACTIVE:
                self._last_interactive = time.monotonic()
            self._queued_items += len(job)
            self._queued_tokens += tokens
            for _ in range(min(len(job), len(self._idle))):
                self._idle.pop().notify()

    def take_batch(self, max_tokens: int, max_items: int) -> list[WorkItem]:
        """Blocks until work is ready, then takes items of one lane round-robin across its
        jobs while they fit in ``max_tokens`` (the first item always fits; a bulk pack's
        bound is lower while interactive work is recent). Empty once closed and drained."""
        me = threading.get_ident()
        with self._lock:
            self._workers.add(me)
            self._bulk_busy.discard(me)  # asking again: its last pack is done
            while True:
                lane = self._next_lane()
                if lane is None:
                    if self._closed is not None:
                        return []
                    self._wait_idle(self._bulk_held_for())
                    continue
                if batch := self._fill(lane, max_tokens, max_items):
                    if lane is self._lanes[BULK]:
                        self._bulk_busy.add(me)
                    return batch
                # The lane held only ended or expired jobs (dropped now): look again.

    def _fill(self, lane: _Lane, max_tokens: int, max_items: int) -> list[WorkItem]:
        """A pack from one lane (queue lock held); empty when its jobs had all ended."""
        now = time.monotonic()
        short = self._bulk_batch_tokens
        if lane is self._lanes[BULK] and short is not None and self._interactive_recent(now):
            max_tokens = min(max_tokens, short)
        first = self._pop_item(lane, None, now)
        if first is None:
            return []
        batch, budget = [first], max_tokens - len(first.token_ids)
        while len(batch) < max_items and (item := self._pop_item(lane, budget, now)) is not None:
            batch.append(item)
            budget -= len(item.token_ids)
        return batch

    def _interactive_recent(self, now: float) -> bool:
        return now - self._last_interactive < INTERACTIVE_RECENT_S

    def _next_lane(self) -> _Lane | None:
        """The lane the next pack comes from (queue lock held): interactive first, bulk
        once in ``bulk_share`` packs while both wait; None when both are empty."""
        interactive, bulk = self._lanes[INTERACTIVE], self._lanes[BULK]
        if interactive and (not bulk or self._interactive_streak < self._bulk_share - 1):
            self._interactive_streak += 1
            return interactive
        if bulk and not interactive and self._bulk_held_for() is not None:
            return None  # this worker stays free for the next query
        if bulk:
            self._interactive_streak = 0
            return bulk
        return None

    def _bulk_held_for(self) -> float | None:
        """How long bulk work must wait for this worker (queue lock held): while interactive
        work is recent, bulk leaves ``bulk_free_workers`` free (always one of them at
        least); None: it need not wait."""
        free = self._bulk_free_workers
        if not free or len(self._bulk_busy) < max(1, len(self._workers) - free):
            return None
        left = INTERACTIVE_RECENT_S - (time.monotonic() - self._last_interactive)
        return left if left > 0 else None

    def _wait_idle(self, timeout: float | None = None) -> None:
        """Waits (queue lock held) until submit() or close() wakes this worker, or
        ``timeout`` seconds (None: no limit) have passed."""
        waiter = threading.Condition(self._lock)
        self._idle.append(waiter)
        try:
            waiter.wait(timeout)
        finally:
            if waiter in self._idle:  # woken by a timeout or spuriously: not popped
                self._idle.remove(waiter)

    def _pop_item(self, lane: _Lane, max_tokens: int | None, now: float) -> WorkItem | None:
        """The lane's next input, if it fits in max_tokens (None: any size). New jobs and
        jobs already started take turns, so a one-text call waits for at most one input of a
        big batch, and a big batch still advances while new calls keep arriving."""
        lane.fresh_turn = not lane.fresh_turn
        first, second = (
            (lane.fresh, lane.started) if lane.fresh_turn else (lane.started, lane.fresh)
        )
        return self._pop_from(lane, first, max_tokens, now) or self._pop_from(
            lane, second, max_tokens, now
        )

    def _pop_from(
        self, lane: _Lane, jobs: deque[Job], max_tokens: int | None, now: float
    ) -> WorkItem | None:
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
            if job.started_at is None:
                job.started_at = now
            self._queued_items -= 1
            self._queued_tokens -= len(job.sequences[index])
            if job.untaken:
                lane.started.append(job)  # rotate: the next input goes to another job
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
            jobs = [job for lane in self._lanes.values() for job in (*lane.fresh, *lane.started)]
            for lane in self._lanes.values():
                lane.fresh.clear()
                lane.started.clear()
            self._queued_items = 0
            self._queued_tokens = 0
        for job in jobs:
            job.fail(error)
