"""The vector cache and the priority lanes as the service wires them (fake engine): what is
counted, what is never cached, which lane a request lands in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.compute.settings import EngineSettings
from embedd_server.core import scheduler
from embedd_server.core.scheduler import BULK, INTERACTIVE
from embedd_server.core.service import choose_lane
from embedd_server.rpc.native_routes import params_from_request
from embedd_server.run.probes import free_port
from tests.servers import ServerThread
from tests.unit.test_metrics import scrape, value

TEXTS = ["a b", "ccc dddd eeeee"]  # the fake tokenizer maps words by length: other tokens


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread.with_fake_models(tmp_path, cache_mb=1, metrics_port=free_port()) as server:
        yield server


def embed(server: ServerThread, request: pb.EmbedRequest) -> tuple[pb.EmbedResponse, str]:
    with grpc.insecure_channel(server.target) as channel:
        reply, call = pb_grpc.EmbedderStub(channel).Embed.with_call(request, timeout=30)
    return reply, str(dict(call.trailing_metadata()).get("x-embedd-cache", ""))


def test_hits_misses_and_bytes_are_counted_and_hits_never_reach_the_engine(
    server: ServerThread,
) -> None:
    first, header = embed(server, pb.EmbedRequest(texts=TEXTS))
    assert header == "hits=0 misses=2"
    queued = value(scrape(server), "embedd_stage_duration_seconds_count", stage="queue")
    again, header = embed(server, pb.EmbedRequest(texts=TEXTS))
    assert header == "hits=2 misses=0"
    assert again.embeddings == first.embeddings
    samples = scrape(server)
    assert value(samples, "embedd_stage_duration_seconds_count", stage="queue") == queued
    assert value(samples, "embedd_cache_hits_total", model="fake") == 2
    assert value(samples, "embedd_cache_misses_total", model="fake") == 2
    assert value(samples, "embedd_cache_bytes") > 0


def test_unloading_a_model_drops_its_rows(server: ServerThread) -> None:
    embed(server, pb.EmbedRequest(model="other", texts=TEXTS))
    with grpc.insecure_channel(server.target) as channel:
        pb_grpc.EmbedderStub(channel).UnloadModel(pb.UnloadModelRequest(model="other"))
    assert embed(server, pb.EmbedRequest(model="other", texts=TEXTS))[1] == "hits=0 misses=2"


def test_int8_never_caches(tmp_path: Path) -> None:
    port = free_port()
    with ServerThread.with_fake_models(
        tmp_path, cache_mb=1, int8=True, metrics_port=port
    ) as server:
        for _ in range(2):
            assert embed(server, pb.EmbedRequest(texts=TEXTS))[1] == ""
        samples = scrape(server)
        assert value(samples, "embedd_cache_hits_total", model="fake") == 0
        assert value(samples, "embedd_cache_bytes") == 0


def test_cache_mb_zero_caches_nothing(tmp_path: Path) -> None:
    with ServerThread.with_fake_models(tmp_path, cache_mb=0) as server:
        for _ in range(2):
            assert embed(server, pb.EmbedRequest(texts=TEXTS))[1] == ""


def test_lanes_by_size_unless_named() -> None:
    settings = EngineSettings(bulk_above_inputs=64, bulk_above_tokens=1000)
    assert choose_lane(64, 1000, settings) == INTERACTIVE
    assert choose_lane(65, 100, settings) == BULK
    assert choose_lane(1, 1001, settings) == BULK


def test_embed_stream_is_bulk_unless_it_names_a_lane() -> None:
    assert params_from_request(pb.EmbedRequest(texts=["x"]), stream=True).bulk_by_default
    assert params_from_request(pb.EmbedRequest(texts=["x"])).lane is None
    named = params_from_request(pb.EmbedRequest(texts=["x"], lane=pb.LANE_INTERACTIVE))
    assert named.lane == INTERACTIVE


def test_a_bad_lane_header_is_invalid_argument(server: ServerThread) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        for lane in ("urgent", ""):
            with pytest.raises(grpc.RpcError) as raised:
                stub.Embed(pb.EmbedRequest(texts=["x"]), metadata=(("x-embedd-lane", lane),))
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            stub.Embed(pb.EmbedRequest(texts=["x"], lane=7))  # type: ignore[arg-type]
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bulk_leaves_a_worker_free_while_interactive_work_is_recent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler, "INTERACTIVE_RECENT_S", 0.3)
    loop = asyncio.new_event_loop()
    queue = scheduler.FairQueue(100, bulk_free_workers=1)
    for _ in range(2):
        queue.submit(scheduler.Job([[1, 2]], 4, loop, lane=BULK))

    def take() -> list[scheduler.WorkItem]:
        return queue.take_batch(max_tokens=2, max_items=1)

    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
        assert first.submit(take).result()[0].job.lane == BULK  # the first computes bulk
        queue.submit(scheduler.Job([[3]], 4, loop, lane=INTERACTIVE))
        assert second.submit(take).result()[0].job.lane == INTERACTIVE
        started = time.monotonic()
        assert second.submit(take).result()[0].job.lane == BULK  # once the query is not recent
        assert time.monotonic() - started > 0.1
    loop.close()
