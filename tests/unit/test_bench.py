"""The benchmark's pure parts: percentiles, packing, passages, ghz reports, HTTP framing,
the target table. No model, no server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bench.ceiling import CeilingResult, SingleTextLatency, configurations, decode_all
from bench.loadgen import (
    LoadResult,
    _http_load,
    ghz_command,
    ghz_data,
    http_post,
    openai_embedding_body,
    parse_ghz_json,
    parse_response_head,
    read_response,
)
from bench.report import (
    GRPC,
    PEER,
    REST,
    STREAM,
    BenchRun,
    Leg,
    evaluate_targets,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    headline_ratios,
    markdown_table,
    percentile,
    render_markdown,
)
from bench.texts import build_passages, read_sentences
from embedd_server.core.engine_settings import EngineSettings

# A trimmed `ghz -O json` report (durations in nanoseconds), as ghz v0.121.0 writes it.
GHZ_REPORT = {
    "date": "2026-11-20T23:07:34Z",
    "endReason": "timeout",
    "options": {"call": "embedd.v1.Embedder.Embed", "host": "127.0.0.1:50051", "CPUs": 2},
    "count": 6,
    "total": 2_000_000_000,
    "average": 5_000_000,
    "fastest": 4_000_000,
    "slowest": 9_000_000,
    "rps": 3.0,
    "errorDistribution": {"rpc error: code = Unavailable desc = overloaded": 1},
    "statusCodeDistribution": {"OK": 5, "Unavailable": 1},
    "latencyDistribution": [
        {"percentage": 10, "latency": 4_000_000},
        {"percentage": 50, "latency": 5_000_000},
        {"percentage": 99, "latency": 9_000_000},
    ],
    "histogram": [{"mark": 0.004, "count": 3, "frequency": 0.5}],
    "details": [
        {"timestamp": "2026-11-20T23:07:34Z", "latency": 9_000_000, "error": "", "status": "OK"},
        {"timestamp": "2026-11-20T23:07:34Z", "latency": 4_000_000, "error": "", "status": "OK"},
        {"timestamp": "2026-11-20T23:07:34Z", "latency": 5_000_000, "error": "", "status": "OK"},
        {"timestamp": "2026-11-20T23:07:34Z", "latency": 6_000_000, "error": "", "status": "OK"},
        {"timestamp": "2026-11-20T23:07:34Z", "latency": 5_000_000, "error": "", "status": "OK"},
        {
            "timestamp": "2026-11-20T23:07:34Z",
            "latency": 1_000_000,
            "error": "rpc error: code = Unavailable desc = overloaded",
            "status": "Unavailable",
        },
    ],
}


# --- percentiles and formatting -------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_number_formats() -> None:
    assert fmt_rate(523.4) == "523"
    assert fmt_rate(1523.4) == "1,523"
    assert fmt_rate(20.66) == "20.7"
    assert fmt_rate(None) == "—"
    assert fmt_ms(4.931) == "4.93"
    assert fmt_ms(46.64) == "46.6"
    assert fmt_ms(math.nan) == "—"
    assert fmt_ratio(0.6329) == "0.63x"
    assert fmt_ratio(None) == "—"


def test_markdown_table() -> None:
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n| --- | --- |\n| 1 | 2 |"


# --- targets --------------------------------------------------------------------------------


def _leg(system: str, concurrency: int, texts_per_s: float, p50: float, p99: float) -> Leg:
    return Leg(
        system=system,
        text_set="sentences",
        concurrency=concurrency,
        texts_per_request=64 if system == STREAM else 1,
        texts=int(texts_per_s * 10),
        errors=0,
        seconds=10.0,
        mean_tokens=14.0,
        p50_ms=p50,
        p99_ms=p99,
    )


LEGS = [
    _leg(GRPC, 1, 190, 4.9, 8.0),
    _leg(GRPC, 16, 450, 40.0, 130.0),
    _leg(REST, 16, 380, 45.0, 90.0),
    _leg(STREAM, 1, 480, math.nan, math.nan),
    _leg(PEER, 16, 140, 110.0, 150.0),
]


def test_targets_met_and_missed() -> None:
    targets = {t.name: t for t in evaluate_targets(500.0, 3.7, LEGS, "sentences")}
    assert targets["gRPC c=16 vs ceiling"].met is True  # 450 / 500 = 0.90
    assert targets["gRPC c=16 vs ceiling"].measured == "0.90x (450 vs 500 texts/s)"
    assert targets["gRPC c=16 vs peer"].met is True  # 450 / 140 = 3.2
    assert targets["REST c=16 vs ceiling"].met is False  # 0.76
    assert targets["c=1 p50 overhead"].met is True  # 4.9 - 3.7 = 1.2 ms
    assert targets["c=1 p50 overhead"].measured.startswith("+1.20 ms")
    assert targets["EmbedStream vs ceiling"].met is True  # 0.96
    assert targets["p99/p50 at c=16"].met is False  # 130 / 40 = 3.25
    assert targets["p99/p50 at c=16"].measured == "3.25x (130.0 / 40.0 ms)"


def test_targets_without_measurements_are_unknown() -> None:
    targets = evaluate_targets(None, None, [], "sentences")
    assert [t.met for t in targets] == [None] * 6
    assert all(t.measured == "not measured" for t in targets)


def test_headline_ratios_use_the_peers_rest_c16() -> None:
    rows = {name: (c, p) for name, c, _, p in headline_ratios(500.0, LEGS, "sentences")}
    assert rows["gRPC, concurrency 16"] == pytest.approx((0.9, 450 / 140))
    assert rows["EmbedStream bulk"] == pytest.approx((0.96, 480 / 140))
    assert headline_ratios(None, [], "passages")[0] == ("gRPC, concurrency 16", None, None, None)


def test_a_reference_measured_just_before_a_leg_is_what_its_target_compares_with() -> None:
    legs = [
        dataclasses.replace(LEGS[0], reference=4.5),  # one text in-process, re-measured
        dataclasses.replace(LEGS[1], reference=600.0),  # the ceiling, re-measured
        *LEGS[2:],
    ]
    targets = {t.name: t for t in evaluate_targets(500.0, 3.7, legs, "sentences")}
    assert targets["gRPC c=16 vs ceiling"].met is False  # 450 / 600 = 0.75, not 0.90
    assert targets["gRPC c=16 vs ceiling"].measured == (
        "0.75x (450 vs 600 texts/s, ceiling re-measured just before)"
    )
    assert targets["c=1 p50 overhead"].measured.startswith("+0.40 ms (4.90 vs 4.50 ms")
    assert targets["REST c=16 vs ceiling"].measured == "0.76x (380 vs 500 texts/s)"
    assert targets["gRPC c=16 vs peer"].measured == "3.21x (450 vs 140 texts/s)"
    rows = {name: adjacent for name, _, adjacent, _ in headline_ratios(500.0, legs, "sentences")}
    assert rows["gRPC, concurrency 16"] == pytest.approx(0.75)
    assert rows["REST, concurrency 16"] is None


def test_markdown_report_names_the_machine_the_ceiling_and_verdicts() -> None:
    run = BenchRun(
        cpu_model="Test CPU", cores=2, quick=True, date="2026-11-20", command="make bench"
    )
    run.ceiling["sentences"] = [
        CeilingResult("1 per decode", "2 threads x 1-thread ctx", 0, 1000, 14000, 2.0),
        CeilingResult("packs ≤128 tok", "2 threads x 1-thread ctx", 128, 1000, 14000, 2.5),
    ]
    run.one_text["sentences"] = SingleTextLatency(3.7, 5.0, 300)
    run.legs = LEGS
    text = render_markdown(run)
    assert "Test CPU, 2 cores" in text
    assert "| sentences | 2 threads x 1-thread ctx | 1 per decode **(ceiling)** | 500 |" in text
    assert "| gRPC c=16 vs ceiling | ≥ 0.85x ceiling | 0.90x (450 vs 500 texts/s) | met |" in text
    assert "**missed**" in text
    assert "latest.png" in text


def test_c1_overhead_beyond_two_ms_is_missed() -> None:
    targets = {t.name: t for t in evaluate_targets(500.0, 2.5, LEGS, "sentences")}
    assert targets["c=1 p50 overhead"].met is False  # 4.9 - 2.5 = 2.4 ms
    assert targets["c=1 p50 overhead"].measured == "+2.40 ms (4.90 vs 2.50 ms)"


# --- ghz ------------------------------------------------------------------------------------


def test_parse_ghz_json_counts_ok_calls_and_their_latencies() -> None:
    result = parse_ghz_json(json.dumps(GHZ_REPORT))
    assert result.requests == 5
    assert result.errors == 1
    assert result.seconds == 2.0
    assert result.latencies == [0.004, 0.005, 0.005, 0.006, 0.009]  # OK calls, sorted
    assert result.first_error.startswith("rpc error: code = Unavailable")
    assert result.generator == "ghz"


def test_parse_ghz_json_without_details_uses_its_distribution() -> None:
    report = {key: value for key, value in GHZ_REPORT.items() if key != "details"}
    result = parse_ghz_json(json.dumps(report))
    assert result.latencies == [0.005, 0.009]
    assert percentile(result.latencies, 0) == 0.005


def test_ghz_command_and_data() -> None:
    command = ghz_command(
        Path("/g/ghz"), "127.0.0.1:1", Path("d.json"), concurrency=16, duration_s=8
    )
    assert command[0] == "/g/ghz"
    assert command[command.index("--concurrency") + 1] == "16"
    assert command[command.index("--duration") + 1] == "8s"
    assert command[command.index("--format") + 1] == "json"
    assert command[-1] == "127.0.0.1:1"
    assert json.loads(ghz_data([["a"], ["b", "ü"]])) == [{"texts": ["a"]}, {"texts": ["b", "ü"]}]


# --- HTTP framing ---------------------------------------------------------------------------


def test_http_request_bytes() -> None:
    body = openai_embedding_body(["The cat"], "m")
    assert json.loads(body) == {"model": "m", "input": "The cat", "encoding_format": "float"}
    assert json.loads(openai_embedding_body(["a", "b"], "m"))["input"] == ["a", "b"]
    request = http_post("127.0.0.1", 8080, "/v1/embeddings", body)
    head, _, sent = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert sent == body


def test_parse_response_head() -> None:
    head = parse_response_head(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 12\r\n\r\n"
    )
    assert (head.status, head.content_length, head.chunked, head.close) == (200, 12, False, False)
    chunked = parse_response_head(
        b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
    )
    assert (chunked.status, chunked.chunked, chunked.close) == (429, True, True)
    with pytest.raises(ValueError):
        parse_response_head(b"SSH-2.0\r\n\r\n")


def test_read_response_consumes_exactly_one_response() -> None:
    async def read_two() -> tuple[int, int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
            b"HTTP/1.1 503 Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"rest"
        )
        reader.feed_eof()
        first = await read_response(reader)
        second = await read_response(reader)
        return first.status, second.status, await reader.read()

    assert asyncio.run(read_two()) == (200, 503, b"rest")


# --- texts and packing ----------------------------------------------------------------------


def test_build_passages_reaches_the_target_without_passing_the_limit() -> None:
    sentences = [f"s{i}" for i in range(10)]
    counts = [60, 60, 60, 60, 300, 60, 100, 100, 60, 10]
    passages = build_passages(sentences, counts, target=200, limit=256, specials=2)
    # 2+60*4=242 >= 200 -> one passage; "s4" alone is too long; 2+60+100=162, +100 > 256:
    # restart at "s7"; 2+100+60=162, +10=172: an unfinished tail, dropped.
    assert passages == ["s0 s1 s2 s3"]
    assert build_passages(["a", "b"], [150, 60], target=200, limit=256) == ["a b"]
    with pytest.raises(ValueError):
        build_passages(["a"], [1, 2])


def test_read_sentences(tmp_path: Path) -> None:
    path = tmp_path / "sts.csv"
    path.write_text(
        'main-captions\tMSRvid\t2012test\t0001\t5.0\tA "girl" sings.\tA girl is singing.\n'
        "main-news\theadlines\t2015\t0002\t1.0\tStocks fell.\t \n"
    )
    assert read_sentences(path) == ['A "girl" sings.', "A girl is singing.", "Stocks fell."]


class _RecordingEngine:
    """An engine that records the length of each sequence of each pack it decodes."""

    dimensions = 2

    def __init__(self) -> None:
        self.packs: list[list[int]] = []

    def embed_batch(self, sequences: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        self.packs.append([len(ids) for ids in sequences])
        return np.ones((len(sequences), self.dimensions), dtype=np.float32)

    @property
    def alive(self) -> bool:
        return True

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def _packs(batch_tokens: int, batch_sequences: int = 32, **limits: float) -> list[list[int]]:
    engine = _RecordingEngine()
    settings = EngineSettings(batch_tokens=batch_tokens, batch_sequences=batch_sequences)
    sequences = [[1] * 10, [1] * 10, [1] * 10, [1] * 200, [1] * 5]
    done, _ = decode_all([engine], sequences, settings, **limits)
    assert done == sum(map(len, engine.packs))
    return engine.packs


def test_the_ceiling_packs_consecutive_sequences_as_the_servers_queue_does() -> None:
    assert _packs(0) == [[10], [10], [10], [200], [5]]  # one per decode
    assert _packs(25) == [[10, 10], [10], [200], [5]]
    assert _packs(256, batch_sequences=2) == [[10, 10], [10, 200], [5]]
    assert _packs(25, max_packs=2) == [[10, 10], [10]]
    assert _packs(25, max_seconds=0) == []
    assert decode_all([_RecordingEngine()], [], EngineSettings())[0] == 0


def test_every_engine_takes_packs_from_the_same_queue() -> None:
    engines = [_RecordingEngine(), _RecordingEngine()]
    sequences = [[1] * 10] * 100
    done, _ = decode_all(engines, sequences, EngineSettings(batch_tokens=30))
    assert done == 100
    assert sorted(len(pack) for engine in engines for pack in engine.packs) == [1] + [3] * 33


def test_configurations() -> None:
    short = list(configurations(long_texts=False))
    assert len(short) == 9
    assert ("2 processes x 1 thread", "packs ≤128 tok", 128) in short
    assert [pack_tokens for _, _, pack_tokens in configurations(long_texts=True)] == [0, 0, 0]


def test_the_floor_bounds_the_reachable_ratio() -> None:
    from bench.report import Floor, render_floor

    floor = Floor(cores=2, target=0.85, requests_per_s=430, server_cores=0.23, generator_cores=0.27)
    # r * 2 + 0.50 * r / 0.85 = 2: the engine's share and the overhead fill the two cores
    assert floor.best_ratio == pytest.approx(2 / (2 + 0.50 / 0.85))
    assert "**0.77x the ceiling**" in render_floor(floor)


def test_the_http_generator_keeps_each_caller_in_a_closed_loop() -> None:
    async def serve_and_load() -> LoadResult:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(asyncio.IncompleteReadError):  # the caller hung up
                while head := await reader.readuntil(b"\r\n\r\n"):
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                    status = b"200 OK" if body == b"{}" else b"503 Unavailable"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        requests = [http_post("127.0.0.1", port, "/", body) for body in (b"{}", b"{}", b"[]")]
        async with server:
            return await _http_load("127.0.0.1", port, requests, 2, 0.2)

    result = asyncio.run(serve_and_load())
    assert result.requests > 0 and result.generator == "asyncio http"
    # The callers take the requests in turn from one cycle: every third one fails.
    assert result.errors == (result.requests + result.errors) // 3
    assert result.first_error == "HTTP 503"
    assert result.latencies == sorted(result.latencies) and len(result.latencies) == result.requests
