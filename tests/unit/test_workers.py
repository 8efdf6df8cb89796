"""A model's WorkerPool alone, on the fake engine: batches, failures, replacements, stop().

No server and no gRPC: jobs go straight into a FairQueue, and each test gives the fake
engine its own behaviour.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pytest

from embedd_server.compute.engine import Engine
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import LoadOptions
from embedd_server.core.scheduler import FairQueue, Job
from embedd_server.core.workers import WorkerPool
from embedd_server.errors import EmbeddError, InternalError, Unavailable
from embedd_server.model.catalog import ModelInfo, read_model_info
from tests.fakes import (
    Behaviour,
    FakeRuntime,
    FloatMatrix,
    engine_error,
    fake_vectors,
    gated,
    on_token,
    process_crash,
    worker_killed,
    write_fake_gguf,
)
from tests.waiting import wait_until

CAT, DOG = 7, 12
DIMENSIONS = 8


@pytest.fixture(scope="module")
def info(tmp_path_factory: pytest.TempPathFactory) -> ModelInfo:
    return read_model_info(write_fake_gguf(tmp_path_factory.mktemp("models") / "m.gguf"))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The loop jobs resolve their futures on; run_until_complete() waits for them."""
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


class _Pools:
    """Builds pools over the fake engine and stops every one at the end of the test."""

    def __init__(self, info: ModelInfo) -> None:
        self._info = info
        self.pools: list[WorkerPool] = []

    def start(
        self,
        behaviour: Behaviour = fake_vectors,
        workers: int = 1,
        *,
        max_engines: int | None = None,
        engine_factory: Callable[[], Engine] | None = None,
        batch_tokens: int = 64,
        batch_sequences: int = 8,
        timeout_s: float = 60.0,
        on_all_dead: Callable[[], None] | None = None,
    ) -> tuple[WorkerPool, FairQueue, FakeRuntime]:
        """A started pool of model "m" whose engines behave as ``behaviour``."""
        runtime = FakeRuntime(self._info, LoadOptions(), behaviour, max_engines)
        queue = FairQueue(1000)
        pool = WorkerPool(
            "m",
            queue,
            engine_factory or runtime.new_engine,
            workers,
            batch_tokens=batch_tokens,
            batch_sequences=batch_sequences,
            timeout_s=timeout_s,
            on_all_dead=on_all_dead,
        )
        pool.start()
        self.pools.append(pool)
        return pool, queue, runtime


@pytest.fixture
def pools(info: ModelInfo, loop: asyncio.AbstractEventLoop) -> Iterator[_Pools]:
    """Pools stopped before the loop their jobs answer on is closed."""
    made = _Pools(info)
    yield made
    for pool in made.pools:
        pool.stop(timeout=5)


def _job(loop: asyncio.AbstractEventLoop, *sequences: Sequence[int]) -> Job:
    return Job(list(sequences), DIMENSIONS, loop)


def _result(loop: asyncio.AbstractEventLoop, job: Job, timeout: float = 5) -> FloatMatrix:
    return loop.run_until_complete(asyncio.wait_for(job.future, timeout))


def _error(loop: asyncio.AbstractEventLoop, job: Job, timeout: float = 5) -> EmbeddError:
    with pytest.raises(EmbeddError) as caught:
        _result(loop, job, timeout)
    return caught.value


# --- running batches -----------------------------------------------------------------------------


def test_workers_compute_every_input_of_every_job_in_order(
    pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    pool, queue, _ = pools.start(workers=2)
    jobs = [_job(loop, *([2, 4 + n % 10, 3] for n in range(count))) for count in (1, 5, 40)]
    for job in jobs:
        queue.submit(job)
    for job in jobs:
        np.testing.assert_array_equal(_result(loop, job), fake_vectors(job.sequences, DIMENSIONS))
    assert pool.alive == 2 and pool.replaced == 0


def test_a_batch_holds_at_most_batch_sequences_inputs_and_batch_tokens_tokens(
    pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    sizes: list[list[int]] = []

    def recording(sequences: Sequence[Sequence[int]], dimensions: int) -> FloatMatrix:
        sizes.append([len(ids) for ids in sequences])
        return fake_vectors(sequences, dimensions)

    _, queue, _ = pools.start(recording, batch_sequences=4, batch_tokens=10)
    short = _job(loop, *([n] for n in range(10)))
    queue.submit(short)
    _result(loop, short)
    assert [len(batch) for batch in sizes] == [4, 4, 2]
    sizes.clear()
    # Three tokens each: three fit in 10 tokens; an input longer than the budget runs alone.
    mixed = _job(loop, *([CAT] * 3 for _ in range(4)), [DOG] * 12)
    queue.submit(mixed)
    _result(loop, mixed)
    assert sizes == [[3, 3, 3], [3], [12]]


# --- failures ------------------------------------------------------------------------------------


def test_an_engine_error_fails_its_batch_internal_and_the_worker_goes_on(
    pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    pool, queue, _ = pools.start(on_token(DOG, engine_error))
    failing, fine = _job(loop, [2, DOG, 3], [2, CAT, 3]), _job(loop, [2, CAT, 3])
    queue.submit(failing)
    error = _error(loop, failing)
    assert isinstance(error, InternalError)
    assert "secret" not in error.message  # the engine's own words stay in the log
    queue.submit(fine)
    assert _result(loop, fine).shape == (1, DIMENSIONS)
    assert pool.alive == 1 and pool.replaced == 0


def test_a_dead_worker_answers_its_callers_and_is_replaced(
    pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    pool, queue, _ = pools.start(on_token(DOG, worker_killed), workers=2)
    doomed = [_job(loop, [2, DOG, 3]) for _ in range(3)]
    for job in doomed:
        queue.submit(job)
    for job in doomed:
        error = _error(loop, job)
        assert isinstance(error, Unavailable) and "died" in error.message
    fine = _job(loop, *([2, CAT, 3] for _ in range(20)))
    queue.submit(fine)
    assert _result(loop, fine).shape == (20, DIMENSIONS)
    # Callers are answered before the replacement's engine is made: wait for it.
    wait_until(lambda: pool.alive == 2, "the dead worker replaced")
    assert pool.replaced >= 1


def test_a_pack_whose_engine_process_ends_runs_once_more_on_a_new_engine(
    pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    crashes = 0

    def crash_once() -> None:
        nonlocal crashes
        crashes += 1
        if crashes == 1:
            process_crash()

    pool, queue, _ = pools.start(on_token(DOG, crash_once))
    job = _job(loop, [2, DOG, 3], [2, CAT, 3])
    queue.submit(job)
    np.testing.assert_array_equal(_result(loop, job), fake_vectors(job.sequences, DIMENSIONS))
    assert crashes == 2 and pool.replaced == 1 and pool.alive == 1


def test_a_pack_that_ends_two_engine_processes_is_answered_unavailable(
    pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    pool, queue, runtime = pools.start(on_token(DOG, process_crash))
    job = _job(loop, [2, DOG, 3])
    queue.submit(job)
    assert isinstance(_error(loop, job), Unavailable)
    fine = _job(loop, [2, CAT, 3])
    queue.submit(fine)
    assert _result(loop, fine).shape == (1, DIMENSIONS)
    assert sum(DOG in ids for ids in runtime.calls) == 2  # once more, not more
    assert pool.replaced == 2  # the renewed engine, then the worker after its second death


class _EndedEngine:
    """An engine whose process has ended while it was idle."""

    dimensions = DIMENSIONS
    alive = False

    def __init__(self) -> None:
        self.closed = False

    def embed(self, pack: Pack) -> FloatMatrix:
        raise AssertionError("an ended engine must not be given a pack")

    def abort(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_an_engine_that_ended_while_idle_is_renewed_before_its_next_pack(
    info: ModelInfo, pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    ended = _EndedEngine()
    live = FakeRuntime(info, LoadOptions())
    engines: list[Engine] = [ended, live.new_engine()]
    pool, queue, _ = pools.start(engine_factory=lambda: engines.pop(0))
    job = _job(loop, [2, CAT, 3])
    queue.submit(job)
    assert _result(loop, job).shape == (1, DIMENSIONS)
    assert ended.closed and pool.replaced == 1 and pool.alive == 1


def test_a_hung_worker_is_replaced_and_its_callers_get_unavailable(
    pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    unhang = threading.Event()
    pool, queue, _ = pools.start(
        on_token(DOG, functools.partial(unhang.wait, 10)), workers=1, timeout_s=0.2
    )
    try:
        hung = _job(loop, [2, DOG, 3])
        queue.submit(hung)
        started = time.monotonic()
        error = _error(loop, hung)
        assert isinstance(error, Unavailable) and "hung" in error.message
        assert time.monotonic() - started < 2
        # The replacement serves others while the hung thread is still stuck.
        fine = _job(loop, [2, CAT, 3])
        queue.submit(fine)
        assert _result(loop, fine).shape == (1, DIMENSIONS)
        assert pool.alive == 1 and pool.replaced == 1
    finally:
        unhang.set()


def test_when_no_worker_can_start_every_waiting_caller_is_answered(
    pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    gate = threading.Event()
    all_dead = threading.Event()
    pool, queue, runtime = pools.start(
        gated(gate, on_token(DOG, worker_killed)),
        max_engines=1,  # the worker's engine, and no replacement
        on_all_dead=all_dead.set,
    )
    in_flight = _job(loop, [2, DOG, 3])
    queue.submit(in_flight)
    wait_until(lambda: runtime.calls, "the worker holds it inside its decode")
    waiting = [_job(loop, [2, CAT, 3]), _job(loop, [2, CAT, 3], [2, CAT, 3])]
    for job in waiting:
        queue.submit(job)
    gate.set()
    assert "died" in _error(loop, in_flight).message
    for job in waiting:
        error = _error(loop, job)
        assert isinstance(error, Unavailable) and "No worker of model m" in error.message
    assert all_dead.wait(5) and pool.alive == 0
    with pytest.raises(Unavailable, match="No worker"):
        queue.submit(_job(loop, [2, CAT, 3]))  # refused at once, never queued


# --- stop() --------------------------------------------------------------------------------------


def test_stop_lets_the_workers_finish_what_is_queued(
    pools: _Pools, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    pool, queue, _ = pools.start(gated(gate), workers=2)
    jobs = [_job(loop, *([2, CAT, 3] for _ in range(10))) for _ in range(3)]
    for job in jobs:
        queue.submit(job)
    closed = threading.Event()  # set once stop() has closed the queue, with work still queued
    close = queue.close

    def close_and_tell(reason: EmbeddError | None = None) -> None:
        close(reason)
        closed.set()

    monkeypatch.setattr(queue, "close", close_and_tell)
    stopper = threading.Thread(target=pool.stop, kwargs={"timeout": 5})
    stopper.start()
    assert closed.wait(5), "stop() did not close the queue"
    assert queue.queued_items > 0  # what stop() must let the workers finish
    gate.set()
    stopper.join(10)
    assert not stopper.is_alive() and pool.alive == 0
    for job in jobs:
        assert _result(loop, job).shape == (10, DIMENSIONS)
    with pytest.raises(Unavailable, match="shutting down"):
        queue.submit(_job(loop, [2, CAT, 3]))


def test_stop_while_a_replacement_worker_is_launched_joins_it(
    pools: _Pools, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: stop() listed a replacement whose thread existed but had not started,
    and join() raised "cannot join thread before it is started"."""
    launching, proceed = threading.Event(), threading.Event()

    class SlowStart(threading.Thread):
        """Holds the start of the replacement of worker 0 until the test says go."""

        def start(self) -> None:
            if self.name == "worker-m-1":
                launching.set()
                proceed.wait(5)
            super().start()

    pool, queue, _ = pools.start(on_token(DOG, worker_killed))
    monkeypatch.setattr("embedd_server.core.workers.threading.Thread", SlowStart)
    job = _job(loop, [2, DOG, 3])
    queue.submit(job)  # worker 0 dies on it: its thread launches worker 1
    assert launching.wait(5), "no replacement was launched"

    errors: list[BaseException] = []

    def stop() -> None:
        try:
            pool.stop(timeout=5)
        except BaseException as exc:
            errors.append(exc)

    stopper = threading.Thread(target=stop)
    stopper.start()
    stopper.join(0.5)  # before the fix, join() on the unstarted thread raised at once
    proceed.set()
    stopper.join(10)
    assert not stopper.is_alive()
    assert errors == []
    assert pool.alive == 0  # the replacement was started, then joined as it left
    assert isinstance(_error(loop, job), Unavailable)


class _TimedEngine:
    """A fake engine that notes when it was closed."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.closed_at: float | None = None

    @property
    def dimensions(self) -> int:
        return self._engine.dimensions

    def embed(self, pack: Pack) -> FloatMatrix:
        return self._engine.embed(pack)

    @property
    def alive(self) -> bool:
        return self._engine.alive

    def abort(self) -> None:
        self._engine.abort()

    def close(self) -> None:
        self.closed_at = time.monotonic()
        self._engine.close()


def test_stop_waits_for_a_replacement_whose_engine_is_being_created(
    info: ModelInfo, pools: _Pools, loop: asyncio.AbstractEventLoop
) -> None:
    runtime = FakeRuntime(info, LoadOptions(), on_token(DOG, worker_killed))
    creating, go_on = threading.Event(), threading.Event()
    engines: list[_TimedEngine] = []

    def new_engine() -> Engine:
        if engines:  # the replacement: its engine takes a while to start
            creating.set()
            go_on.wait(5)
        engines.append(_TimedEngine(runtime.new_engine()))
        return engines[-1]

    pool, queue, _ = pools.start(engine_factory=new_engine)
    queue.submit(_job(loop, [2, DOG, 3]))  # worker 0 dies: its thread makes a new engine
    assert creating.wait(5)
    stopped_at: list[float] = []

    def stop() -> None:
        pool.stop(5)
        stopped_at.append(time.monotonic())

    stopper = threading.Thread(target=stop)
    stopper.start()
    stopper.join(0.5)  # today stop() returns at once, before the replacement even exists
    go_on.set()
    stopper.join(10)
    wait_until(
        lambda: len(engines) == 2 and engines[1].closed_at is not None,
        "the replacement's engine closed",
    )
    replacement_closed = engines[1].closed_at
    assert replacement_closed is not None and replacement_closed <= stopped_at[0]
