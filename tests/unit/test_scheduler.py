"""The fair queue: round-robin between jobs, bounds, cancellation, deadlines, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from embedd_server.core.scheduler import FairQueue, Job, WorkItem
from embedd_server.errors import Cancelled, DeadlineExceeded, Overloaded, Unavailable


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()


def _job(loop: asyncio.AbstractEventLoop, count: int, deadline: float | None = None) -> Job:
    return Job([[index] for index in range(count)], 2, loop, deadline)


def _take(queue: FairQueue) -> WorkItem | None:
    batch = queue.take_batch(max_tokens=0, max_items=1)
    return batch[0] if batch else None


def _drain(queue: FairQueue, count: int) -> list[tuple[Job, int]]:
    taken = []
    for _ in range(count):
        item = _take(queue)
        assert item is not None
        taken.append((item.job, item.index))
    return taken


def test_a_small_job_waits_for_at_most_one_item_of_a_big_one(
    loop: asyncio.AbstractEventLoop,
) -> None:
    queue = FairQueue(max_items=10_000)
    big, small = _job(loop, 2048), _job(loop, 1)
    queue.submit(big)
    first = _take(queue)
    assert first is not None and first.job is big
    queue.submit(small)
    order = [job for job, _ in _drain(queue, 3)]
    assert small in order[:2]
    assert order.count(big) == 2
    assert queue.queued_items == 2048 - 3


def test_new_jobs_are_served_in_arrival_order(loop: asyncio.AbstractEventLoop) -> None:
    queue = FairQueue(max_items=100)
    jobs = [_job(loop, 1) for _ in range(5)]
    for job in jobs:
        queue.submit(job)
    assert [job for job, _ in _drain(queue, 5)] == jobs


def test_items_of_one_job_keep_their_order_and_indexes(loop: asyncio.AbstractEventLoop) -> None:
    queue = FairQueue(max_items=100)
    jobs = [_job(loop, 3) for _ in range(3)]
    for job in jobs:
        queue.submit(job)
    taken = _drain(queue, 9)
    for job in jobs:
        assert [index for owner, index in taken if owner is job] == [0, 1, 2]
    assert queue.queued_items == 0


def test_a_jobs_inputs_are_handed_out_shortest_first_under_their_own_indexes(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # Packs of like lengths: the engine pads each batch to its longest input.
    lengths = [5, 1, 9, 3, 3, 7]
    job = Job([[1] * n for n in lengths], 2, loop)
    queue = FairQueue(max_items=100)
    queue.submit(job)
    first = queue.take_batch(max_tokens=7, max_items=10)  # 1 + 3 + 3 fit, then 5 does not
    assert [item.index for item in first] == [1, 3, 4]
    assert [len(item.token_ids) for item in first] == [1, 3, 3]
    rest = [item.index for _ in range(3) for item in queue.take_batch(0, 1)]
    assert rest == [0, 5, 2]
    for index, n in enumerate(lengths):
        job.deliver(index, np.full(2, n, dtype=np.float32))
    loop.run_until_complete(job.future)
    assert job.result[:, 0].tolist() == lengths  # each row where its input was


def test_a_job_that_does_not_fit_is_refused_at_once(loop: asyncio.AbstractEventLoop) -> None:
    queue = FairQueue(max_items=5)
    queue.submit(_job(loop, 4))
    with pytest.raises(Overloaded, match="queue is full"):
        queue.submit(_job(loop, 2))
    queue.submit(_job(loop, 1))  # what fits still goes in


def test_cancelled_and_expired_jobs_are_dropped_before_compute(
    loop: asyncio.AbstractEventLoop,
) -> None:
    queue = FairQueue(max_items=100)
    cancelled = _job(loop, 5)
    expired = _job(loop, 5, deadline=time.monotonic() - 1)
    live = _job(loop, 2)
    for job in (cancelled, expired, live):
        queue.submit(job)
    cancelled.cancel()
    taken = _drain(queue, 2)
    assert {job for job, _ in taken} == {live}
    assert queue.queued_items == 0
    loop.run_until_complete(asyncio.sleep(0))
    with pytest.raises(Cancelled):
        cancelled.future.result()
    with pytest.raises(DeadlineExceeded):
        expired.future.result()


def test_job_resolves_once_with_every_row_in_place(loop: asyncio.AbstractEventLoop) -> None:
    job = _job(loop, 3)
    for index in (2, 0, 1):
        job.deliver(index, np.full(2, index, dtype=np.float32))
    job.fail(Unavailable("late failure is ignored"))
    result = loop.run_until_complete(job.future)
    assert result.tolist() == [[0, 0], [1, 1], [2, 2]]


def test_fail_all_answers_every_waiting_caller_and_close_releases_workers(
    loop: asyncio.AbstractEventLoop,
) -> None:
    queue = FairQueue(max_items=100)
    jobs = [_job(loop, 2) for _ in range(3)]
    for job in jobs:
        queue.submit(job)
    queue.fail_all(Unavailable("no worker"))
    queue.close()
    assert _take(queue) is None
    loop.run_until_complete(asyncio.sleep(0))
    for job in jobs:
        with pytest.raises(Unavailable):
            job.future.result()
    with pytest.raises(Unavailable, match="shutting down"):
        queue.submit(_job(loop, 1))


def test_batches_pack_items_of_several_jobs_within_the_token_budget(
    loop: asyncio.AbstractEventLoop,
) -> None:
    queue = FairQueue(max_items=100)
    short = Job([[1] * 10] * 6, 2, loop)
    long = Job([[2] * 300], 2, loop)
    other = Job([[3] * 10] * 2, 2, loop)
    for job in (short, long, other):
        queue.submit(job)
    taken: list[list[WorkItem]] = []
    while queue.queued_items:
        taken.append(queue.take_batch(max_tokens=64, max_items=32))
    for batch in taken:
        tokens = sum(len(item.token_ids) for item in batch)
        assert tokens <= 64 or len(batch) == 1  # an input over the budget runs alone
    assert [[item.job for item in batch] for batch in taken if long in {i.job for i in batch}] == [
        [long]
    ]
    for job in (short, other):  # every input of every job, each once, in order per job
        indexes = [item.index for batch in taken for item in batch if item.job is job]
        assert indexes == list(range(len(job)))
    assert max(len(batch) for batch in taken) > 1  # short inputs of both jobs were packed


def test_the_queue_is_bounded_in_tokens_too(loop: asyncio.AbstractEventLoop) -> None:
    queue = FairQueue(max_items=100, max_tokens=50)
    queue.submit(Job([[1] * 30], 2, loop))
    with pytest.raises(Overloaded, match="30 of 50 tokens"):
        queue.submit(Job([[2] * 25], 2, loop))
    queue.submit(Job([[3] * 20], 2, loop))  # what fits still goes in
    lone = FairQueue(max_items=100, max_tokens=50)
    lone.submit(Job([[4] * 80], 2, loop))  # alone, even an oversized job is served


def _lane_job(loop: asyncio.AbstractEventLoop, count: int, lane: str, tokens: int = 1) -> Job:
    return Job([[7] * tokens for _ in range(count)], 2, loop, lane=lane)


def test_interactive_work_goes_first_and_bulk_gets_its_bounded_share(
    loop: asyncio.AbstractEventLoop,
) -> None:
    queue = FairQueue(max_items=1000, bulk_share=4)
    bulk = _lane_job(loop, 100, "bulk")
    queue.submit(bulk)
    queries = [_lane_job(loop, 1, "interactive") for _ in range(9)]
    for query in queries:
        queue.submit(query)
    order = [job for job, _ in _drain(queue, 12)]
    # Three queries, then one bulk item, while both lanes wait; then bulk alone.
    assert order[:4] == [*queries[:3], bulk]
    assert order[4:7] == queries[3:6] and order[7] is bulk
    assert order[8:11] == queries[6:9] and order[11] is bulk


def test_a_pack_holds_one_lane_only(loop: asyncio.AbstractEventLoop) -> None:
    queue = FairQueue(max_items=1000)
    bulk = _lane_job(loop, 10, "bulk")
    query = _lane_job(loop, 1, "interactive")
    queue.submit(bulk)
    queue.submit(query)
    first = queue.take_batch(max_tokens=1000, max_items=32)
    assert [item.job for item in first] == [query]  # not filled up with bulk work
    assert {item.job for item in queue.take_batch(max_tokens=1000, max_items=32)} == {bulk}


def test_bulk_packs_are_short_only_while_interactive_work_is_recent(
    loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    queue = FairQueue(max_items=1000, bulk_batch_tokens=8)
    queue.submit(_lane_job(loop, 50, "bulk", tokens=4))
    assert len(queue.take_batch(max_tokens=64, max_items=32)) == 16  # no caller around: full
    queue.submit(query := _lane_job(loop, 1, "interactive"))
    assert [item.job for item in queue.take_batch(max_tokens=64, max_items=32)] == [query]
    assert len(queue.take_batch(max_tokens=64, max_items=32)) == 2  # 8 tokens: short
    now[0] += 1.5  # the caller went quiet
    assert len(queue.take_batch(max_tokens=64, max_items=32)) == 16


def test_a_job_names_a_known_lane(loop: asyncio.AbstractEventLoop) -> None:
    with pytest.raises(ValueError, match="lane"):
        Job([[1]], 2, loop, lane="urgent")
    with pytest.raises(ValueError, match="bulk_share"):
        FairQueue(max_items=1, bulk_share=0)
