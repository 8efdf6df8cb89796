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

from bench.ceiling import (
    CeilingResult,
    Configuration,
    SingleTextLatency,
    configurations,
    decode_all,
    engine_settings,
)
from bench.families import EngineResult, FamiliesBench, FamilyResult
from bench.loadgen import (
    Endpoint,
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
    OLLAMA,
    PEER,
    REST,
    STREAM,
    TEI,
    BenchRun,
    Leg,
    comparison_table,
    engine_choice,
    evaluate_targets,
    evaluate_tei_targets,
    fmt_ms,
    fmt_rate,
    fmt_ratio,
    markdown_table,
    percentile,
    render_markdown,
)
from bench.rerank import (
    InProcess,
    RerankBench,
    ServedLeg,
    render_document,
    render_section,
    served_leg,
    summary_line,
)
from bench.texts import build_passages, read_sentences
from embedd_server.compute.engine import FloatMatrix
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings
from embedd_server.core.tokenization import Counted, TokenizedPairs, TokenSpan
from embedd_server.model.catalog import ModelInfo

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
    assert (
        "| sentences | llama.cpp | 2 threads x 1-thread ctx | 1 per decode **(ceiling)** | 500 |"
        in text
    )
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

    def embed(self, pack: Pack) -> npt.NDArray[np.float32]:
        self.packs.append(pack.lengths.tolist())
        return np.ones((len(pack), self.dimensions), dtype=np.float32)

    @property
    def alive(self) -> bool:
        return True

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def _packs(
    batch_tokens: int,
    batch_sequences: int = 32,
    max_seconds: float = math.inf,
    max_packs: float = math.inf,
) -> list[list[int]]:
    engine = _RecordingEngine()
    settings = EngineSettings(batch_tokens=batch_tokens, batch_sequences=batch_sequences)
    sequences = [[1] * 10, [1] * 10, [1] * 10, [1] * 200, [1] * 5]
    done, _ = decode_all([engine], sequences, settings, max_seconds, max_packs)
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
    short = list(configurations("llama.cpp", long_texts=False))
    assert len(short) == 9
    assert Configuration("llama.cpp", "2 processes x 1 thread", "packs ≤128 tok", 128) in short
    long = configurations("llama.cpp", long_texts=True)
    assert [config.pack_tokens for config in long] == [0, 0, 0]
    onnx = list(configurations("onnxruntime", long_texts=False))
    assert [(c.layout, c.pack_tokens, c.int8) for c in onnx] == [
        ("2 processes x 2 threads", 256, False),  # the server's default
        ("2 processes x 2 threads", 2048, False),
        ("2 processes x 1 thread", 256, False),
        ("1 session x 2 threads", 256, False),
        ("2 processes x 2 threads", 256, True),
    ]
    assert list(configurations("onnxruntime", long_texts=True)) == onnx
    with pytest.raises(ValueError):
        list(configurations("tensorrt", long_texts=False))


def test_a_configuration_is_the_servers_settings() -> None:
    onnx = engine_settings(Configuration("onnxruntime", "2 threads x 1-thread session", "", 2048))
    assert (onnx.engine, onnx.workers, onnx.threads_per_worker) == ("onnxruntime", 2, 1)
    assert onnx.onnx_threads == 1
    assert (onnx.batch_tokens, onnx.onnx_batch_tokens, onnx.int8) == (2048, 2048, False)
    llama = engine_settings(Configuration("llama.cpp", "2 processes x 1 thread", "", 0))
    assert (llama.engine, llama.worker_processes, llama.batch_tokens) == ("llama.cpp", True, 0)
    assert llama.onnx_batch_tokens == EngineSettings().onnx_batch_tokens
    int8 = engine_settings(Configuration("onnxruntime", "1 session x 2 threads", "", 256, True))
    assert (int8.workers, int8.threads_per_worker, int8.int8) == (1, 2, True)


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


# --- issue 11: embedd against the peers ---------------------------------------------------------


def _shape(
    system: str, concurrency: int, per_request: int, texts_per_s: float, **extra: float
) -> Leg:
    return dataclasses.replace(
        _leg(system, concurrency, texts_per_s, 5.0, 9.0),
        texts_per_request=per_request,
        **extra,  # type: ignore[arg-type]
    )


PEER_LEGS = [
    _shape(GRPC, 1, 1, 300),
    _shape(REST, 1, 1, 250),
    _shape(TEI, 1, 1, 280),
    _shape(GRPC, 16, 1, 500, server_cores=1.5, rss_mib=180.0),
    _shape(REST, 16, 1, 400, rss_mib=200.0),
    _shape(TEI, 16, 1, 410, server_cores=1.6, rss_mib=250.0),
    _shape(GRPC, 4, 32, 800),
    _shape(REST, 4, 32, 600),
    _shape(TEI, 4, 32, 470),
    _shape(STREAM, 1, 64, 720),
    _shape(OLLAMA, 16, 1, 0),
]


def test_targets_against_tei_are_ratios_on_the_same_leg() -> None:
    targets = {t.name: t for t in evaluate_tei_targets(PEER_LEGS, "sentences")}
    assert targets["1 caller x 1 text, gRPC"].met is True  # 300 / 280
    assert targets["1 caller x 1 text, REST"].met is False  # 250 / 280
    assert targets["16 callers x 1 text, gRPC"].met is True  # 500 / 410 = 1.22 >= 1.2
    assert targets["16 callers x 1 text, gRPC"].goal == "≥ 1.2x TEI"
    assert targets["16 callers x 1 text, gRPC"].measured == "1.22x (500 vs 410 texts/s)"
    assert targets["16 callers x 1 text, REST"].met is False  # 400 / 410
    assert targets["4 callers x 32 texts, gRPC"].met is True  # 800 / 470 = 1.70
    assert targets["4 callers x 32 texts, REST"].met is False  # 600 / 470 = 1.28
    stream = targets["EmbedStream, gRPC"]  # against TEI's bulk leg, 4 x 32
    assert (stream.goal, stream.met) == ("≥ 1.5x TEI 4 callers x 32 texts", True)
    assert stream.measured == "1.53x (720 vs 470 texts/s)"


def test_targets_against_tei_are_unknown_without_tei() -> None:
    legs = [leg for leg in PEER_LEGS if leg.system != TEI]
    targets = evaluate_tei_targets(legs, "sentences")
    assert len(targets) == 7
    assert all(t.met is None and t.measured == "not measured" for t in targets)


def test_the_comparison_table_has_a_column_per_system_and_a_row_per_leg() -> None:
    run = BenchRun(cpu_model="Test CPU", cores=2, quick=True, date="d", command="make bench")
    run.legs = PEER_LEGS
    run.stsb = {GRPC: 82.03, REST: 82.03, TEI: 82.04}
    table = comparison_table(run, "sentences")
    lines = table.splitlines()
    assert lines[0] == (
        "| leg | embedd gRPC | embedd REST (Envoy) | TEI | Infinity | Ollama "
        "| llama-cpp-python server | embedd gRPC --int8 |"
    )
    assert lines[2] == (
        "| 1 caller x 1 text, texts/s (p50) | 300 (p50 5.00 ms) | 250 (p50 5.00 ms) "
        "| 280 (p50 5.00 ms) | — | — | — | — |"
    )
    assert lines[3].startswith("| 16 callers x 1 text, texts/s | 500 | 400 | 410 | — | — |")
    assert lines[5].startswith("| EmbedStream, texts/s | 720 |  |  |")
    assert lines[6].startswith("| server CPU per text, ms (16 callers) | 3.00 | 0.00 | 3.90 |")
    assert lines[7].startswith(
        "| server memory, MiB (most during its legs) | 180 | 200 | 250 | — |"
    )
    assert lines[8].startswith("| STS-B, Spearman x100 of cosines | 82.03 | 82.03 | 82.04 | — |")


def test_the_report_shows_the_peers_and_both_engines() -> None:
    run = BenchRun(
        cpu_model="Test CPU",
        cores=2,
        quick=False,
        date="d",
        command="make bench",
        serving_engine="onnxruntime",
    )
    run.ceiling["sentences"] = [
        CeilingResult(
            "packs ≤2048 tok",
            "2 threads x 1-thread session",
            2048,
            1300,
            1,
            2.0,
            engine="onnxruntime",
        ),
        CeilingResult(
            "packs ≤2048 tok",
            "2 threads x 1-thread session",
            2048,
            3000,
            1,
            2.0,
            engine="onnxruntime",
            int8=True,
        ),
        CeilingResult("1 per decode", "2 processes x 1 thread", 0, 700, 1, 2.0),
    ]
    run.legs = PEER_LEGS
    run.peers = ["TEI 1.9.3: /x/text-embeddings-router", "Infinity: skipped, not installed"]
    # The ceiling is the engine embedd serves with, never its int8 configuration.
    best = run.best_ceiling("sentences")
    assert best is not None and (best.engine, best.int8, best.texts) == ("onnxruntime", False, 1300)
    llama = run.best_ceiling("sentences", "llama.cpp")
    assert llama is not None and llama.texts == 700
    assert run.engines() == ["onnxruntime", "llama.cpp"]
    assert engine_choice(run) == (
        "embedd's default (engine=auto) serves this model with **onnxruntime**. Each engine's "
        "best configuration in-process: sentences: onnxruntime 650, llama.cpp 350 texts/s "
        "(onnxruntime 1.86x llama.cpp)."
    )
    text = render_markdown(run)
    assert "- TEI 1.9.3: /x/text-embeddings-router" in text
    assert "- Infinity: skipped, not installed" in text
    assert "| 16 callers x 1 text, gRPC | ≥ 1.2x TEI | 1.22x (500 vs 410 texts/s) | met |" in text
    assert "| sentences | onnxruntime int8 | 2 threads x 1-thread session |" in text
    assert "packs ≤2048 tok **(ceiling)** | 650 |" in text
    assert "Issue 4's targets" in text


def test_rotations_put_every_system_first_in_turn() -> None:
    from bench.__main__ import rotations

    orders = list(rotations(["a", "b", "c"], 4))
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert list(rotations([], 2)) == [[], []]


def test_each_leg_runs_on_every_system_before_the_next_leg() -> None:
    import os

    from bench import __main__ as bench_main
    from bench.texts import TextSet

    calls: list[tuple[str, int, int]] = []

    class Recorded(bench_main.System):
        def load(self, requests: Sequence[bytes], concurrency: int, seconds: float) -> LoadResult:
            per_request = 32 if len(requests) == 1 else 1
            calls.append((self.name, concurrency, per_request))
            return LoadResult(len(requests), 0, 0.01, [0.001] * len(requests), "", "fake")

        def requests(self, text_set: TextSet, per_request: int) -> list[bytes]:
            return [b"x"] * (64 // per_request)

    profile = dataclasses.replace(bench_main.QUICK, leg_s=0.0, warmup_s=0.0)
    run = BenchRun(cpu_model="c", cores=2, quick=True, date="d", command="c")
    systems = [Recorded("A", os.getpid()), Recorded("B", os.getpid())]
    sentences = TextSet("sentences", ["t"] * 64, [[101, 7, 102]] * 64)
    bench_main.interleaved_legs(run, systems, [sentences], profile, None)
    legs = [(leg.system, leg.concurrency, leg.texts_per_request) for leg in run.legs]
    assert legs == [
        ("A", 1, 1),
        ("B", 1, 1),  # leg 1 on every system,
        ("B", 16, 1),
        ("A", 16, 1),  # then leg 2, B first this time,
        ("A", 4, 32),
        ("B", 4, 32),
    ]
    assert calls[:2] == [("A", 1, 1), ("A", 1, 1)]  # a warm-up, then the leg
    assert all(leg.rss_mib and leg.rss_mib > 0 for leg in run.legs)  # this process's RSS


def test_only_takes_known_parts() -> None:
    from bench.__main__ import PARTS, parse_args

    assert parse_args([]).only == set(PARTS)
    assert parse_args(["--only", "tei, embedd"]).only == {"tei", "embedd"}
    with pytest.raises(SystemExit):
        parse_args(["--only", "tei,vllm"])


# --- peers ------------------------------------------------------------------------------------


def _executable(path: Path) -> Path:
    path.write_text("#!/bin/sh\necho 'text-embeddings-router 1.9.3'\n")
    path.chmod(0o755)
    return path


def test_a_peer_is_found_by_its_variable_or_on_path(tmp_path: Path) -> None:
    from bench.peers import resolve_program

    router = _executable(tmp_path / "run-tei.sh")
    on_path = {"text-embeddings-router": "/usr/bin/text-embeddings-router"}.get
    found, why = resolve_program(
        {"EMBEDD_BENCH_TEI": str(router)}, "EMBEDD_BENCH_TEI", ["text-embeddings-router"], on_path
    )
    assert (found, why) == (router, "")
    found, _ = resolve_program({}, "EMBEDD_BENCH_TEI", ["text-embeddings-router"], on_path)
    assert found == Path("/usr/bin/text-embeddings-router")
    names = ["text-embeddings-router", str(tmp_path / "tei" / "text-embeddings-router")]
    found, why = resolve_program({}, "EMBEDD_BENCH_TEI", names, lambda _: None)
    assert found is None
    assert why == (
        "not installed (set $EMBEDD_BENCH_TEI, or put text-embeddings-router on PATH or at "
        f"{tmp_path}/tei/text-embeddings-router)"
    )
    found, why = resolve_program(
        {"EMBEDD_BENCH_TEI": str(tmp_path / "nope")},
        "EMBEDD_BENCH_TEI",
        ["text-embeddings-router"],
        on_path,
    )
    assert found is None and "is not an executable file" in why
    venv_program = _executable(tmp_path / "infinity_emb")  # a path among the names
    found, _ = resolve_program({}, "X", [str(venv_program), "infinity_emb"], lambda _: None)
    assert found == venv_program


def test_a_peer_without_its_model_directory_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import peers
    from bench.peers import TEI as TEI_NAME
    from bench.peers import Missing, Peer, find_tei, resolve_model_dir

    assert resolve_model_dir({}, "M", tmp_path)[0] is None
    (tmp_path / "model.onnx").write_bytes(b"")
    assert resolve_model_dir({"M": str(tmp_path)}, "M", Path("/nowhere")) == (tmp_path, "")
    router = _executable(tmp_path / "text-embeddings-router")
    skipped = find_tei({"EMBEDD_BENCH_TEI": str(router), "EMBEDD_BENCH_TEI_MODEL": "/nowhere"})
    assert (
        isinstance(skipped, Missing)
        and "no model.onnx in $EMBEDD_BENCH_TEI_MODEL" in skipped.reason
    )
    found = find_tei({"EMBEDD_BENCH_TEI": str(router), "EMBEDD_BENCH_TEI_MODEL": str(tmp_path)})
    assert isinstance(found, Peer)
    assert (found.system, found.version) == (TEI_NAME, "1.9.3")  # from `router --version`
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path / "no-peers")
    assert isinstance(find_tei({}, lambda _: None), Missing)


def test_versions_are_read_from_what_the_programs_print() -> None:
    from bench.peers import version_in

    assert version_in("text-embeddings-router 1.9.3\n") == "1.9.3"
    assert version_in("Warning: could not connect\nWarning: client version is 0.24.0\n") == "0.24.0"
    assert version_in("0.0.78\n") == "0.0.78"
    assert version_in("1.32.0rc1") == "1.32.0rc1"
    assert version_in("no version here") == ""


def test_peer_commands(tmp_path: Path) -> None:
    from bench.peers import infinity_command, modelfile, ollama_environment, tei_command

    router = tmp_path / "router"
    router.write_bytes(b"\x7fELF...")
    assert tei_command(router, Path("/m"), 8080) == [
        str(router),
        "--model-id",
        "/m",
        "--hostname",
        "127.0.0.1",
        "--port",
        "8080",
    ]
    wrapper = _executable(tmp_path / "run-tei.sh")  # run-tei.sh MODEL_DIR PORT
    assert tei_command(wrapper, Path("/m"), 8080) == [str(wrapper), "/m", "8080"]
    command = infinity_command(Path("/v/bin/infinity_emb"), "optimum", "minilm", 7997)
    assert command[:4] == ["/v/bin/infinity_emb", "v2", "--model-id", "."]
    assert command[command.index("--engine") + 1] == "optimum"
    assert command[command.index("--pooling-method") + 1] == "mean"  # not its "auto": CLS
    assert command[-2:] == ["--port", "7997"]
    env = ollama_environment(11434)
    assert env["OLLAMA_HOST"] == "127.0.0.1:11434"
    assert env["OLLAMA_MODELS"].endswith(".bench/ollama-models")
    assert modelfile(Path("/models/m.gguf")) == "FROM /models/m.gguf\n"


def test_an_endpoint_builds_openai_requests() -> None:
    endpoint = Endpoint("http://127.0.0.1:7997", "/embeddings", "minilm")
    assert (endpoint.host, endpoint.port) == ("127.0.0.1", 7997)
    head, _, body = endpoint.request(["a b"]).partition(b"\r\n\r\n")
    assert head.startswith(b"POST /embeddings HTTP/1.1\r\nHost: 127.0.0.1:7997\r\n")
    assert json.loads(body) == {"model": "minilm", "input": "a b", "encoding_format": "float"}


# --- STS-B from a server's vectors ----------------------------------------------------------


def test_parse_embeddings_puts_the_vectors_in_input_order() -> None:
    from bench.quality import parse_embeddings

    payload = {"data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1, 0]}]}
    assert parse_embeddings(payload, 2).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError):
        parse_embeddings(payload, 3)
    with pytest.raises(ValueError):
        parse_embeddings({"error": "overloaded"}, 1)


def test_stsb_of_a_server_whose_cosines_follow_the_gold_scores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bench import quality
    from tests.metrics import StsB

    gold = np.array([0.5, 4.5, 2.0, 3.0])
    stsb = StsB(["a", "b", "c", "a"], ["w", "x", "y", "z"], gold)
    angles = {"a": 0.0, "b": 0.0, "c": 0.0, "w": 1.4, "x": 0.1, "y": 0.9, "z": 0.5}
    asked: list[list[str]] = []

    def embed(endpoint: Endpoint, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        asked.append(list(texts))
        return np.array([[math.cos(angles[t]), math.sin(angles[t])] for t in texts], np.float32)

    monkeypatch.setattr(quality, "embed", embed)
    score = quality.stsb_of(Endpoint("http://h:1", "/v1/embeddings", "m"), stsb)
    assert score == pytest.approx(100.0)
    assert asked == [["a", "b", "c", "w", "x", "y", "z"]]  # each sentence once


# --- issue 13: the rerank part ------------------------------------------------------------------


class _TypeRecordingEngine(_RecordingEngine):
    """Records the token type starts each pack came with (None: called without any)."""

    dimensions = 1

    def __init__(self) -> None:
        super().__init__()
        self.types: list[list[int] | None] = []
        self.closed = False

    def embed(self, pack: Pack) -> npt.NDArray[np.float32]:
        assert not pack.pools_from_starts  # a worker pools a cross-encoder's pairs whole
        # None: a pack without a second segment (computed as texts are)
        self.types.append(pack.token_type_starts.tolist() if pack.two_segments else None)
        return super().embed(pack)

    def close(self) -> None:
        self.closed = True


class _FakeRuntime:
    """A runtime handing out type-recording engines."""

    engine_name = "onnxruntime"
    dimensions = 1
    vocab_size = 10

    def __init__(self) -> None:
        self.engines: list[_TypeRecordingEngine] = []

    def new_engine(self) -> _TypeRecordingEngine:
        self.engines.append(_TypeRecordingEngine())
        return self.engines[-1]

    def tokenize(self, text: bytes) -> list[int]:
        return [1] * len(text)

    def token_text(self, token_id: int) -> str:
        return str(token_id)

    def close(self) -> None:
        pass


def test_rerank_queries_are_a_sentence_then_the_next_ones_as_its_documents() -> None:
    from bench.rerank import all_pairs, build_queries

    sentences = [f"s{i}" for i in range(10)]
    queries = build_queries(sentences, 3, 2)
    assert [(q.query, q.documents) for q in queries] == [
        ("s0", ["s1", "s2"]),
        ("s3", ["s4", "s5"]),
        ("s6", ["s7", "s8"]),
    ]
    assert all_pairs(queries)[:3] == [("s0", "s1"), ("s0", "s2"), ("s3", "s4")]
    assert len(all_pairs(queries)) == 6
    with pytest.raises(ValueError, match="need 12 sentences"):
        build_queries(sentences, 4, 2)
    with pytest.raises(ValueError):
        build_queries(sentences, 1, 0)


def test_rerank_requests_are_serialized_rerank_messages() -> None:
    from bench.rerank import RerankQuery, rerank_requests
    from embedd.v1 import embedder_pb2

    [raw] = rerank_requests([RerankQuery("q", ["a", "b"])], "tiny-bert-reranker")
    request = embedder_pb2.RerankRequest.FromString(raw)
    assert (request.model, request.query, list(request.documents)) == (
        "tiny-bert-reranker",
        "q",
        ["a", "b"],
    )
    # Every document scored and none echoed back: the answer carries scores only.
    assert not request.HasField("top_n") and not request.return_documents
    assert not request.raw_scores


def test_the_engines_get_token_type_starts_as_a_worker_passes_them() -> None:
    engine = _TypeRecordingEngine()
    settings = EngineSettings(batch_tokens=256)
    sequences = [[1] * 5, [1] * 6, [1] * 4]
    assert decode_all([engine], sequences, settings, token_type_starts=[2, 3, 4])[0] == 3
    assert engine.types == [[2, 3, 4]]  # one pack; the last pair has no type-1 token
    # No pair of a pack with a type-1 token (XLM-R's template): the engine gets none.
    engine = _TypeRecordingEngine()
    decode_all([engine], sequences, settings, token_type_starts=[5, 6, 4])
    assert engine.types == [None]
    engine = _TypeRecordingEngine()
    decode_all([engine], sequences, settings)  # texts, as the ceiling runs them
    assert engine.types == [None]


def test_cycled_pairs_keep_each_pairs_token_type_start() -> None:
    from bench.rerank import cycled
    from embedd_server.core.tokenization import TokenizedPairs

    pairs = TokenizedPairs([[1, 2, 3], [4, 5]], [2, 1])
    more = cycled(pairs, 5)
    assert more.sequences == [[1, 2, 3], [4, 5], [1, 2, 3], [4, 5], [1, 2, 3]]
    assert more.token_type_starts == [2, 1, 2, 1, 2]
    assert cycled(TokenizedPairs([], []), 3).sequences == []


def test_packs_and_layout_follow_the_servers_choice_for_the_engine() -> None:
    from bench.rerank import layout_label, pack_tokens

    settings = EngineSettings()
    assert pack_tokens("onnxruntime", settings) == settings.onnx_batch_tokens
    assert pack_tokens("onnxruntime int8", settings) == settings.onnx_batch_tokens
    assert pack_tokens("llama.cpp", settings) == settings.batch_tokens
    assert layout_label("onnxruntime", settings) == (
        "2 worker threads x all cores' threads, packs ≤256 tok"
    )
    threads = EngineSettings(worker_processes=False, threads_per_worker=2)
    assert layout_label("llama.cpp", threads) == "2 worker threads x 2 threads, packs ≤128 tok"


def test_in_process_rerank_runs_one_engine_per_worker_on_every_pair() -> None:
    from bench.rerank import measure_in_process
    from embedd_server.core.tokenization import TokenizedPairs

    runtime = _FakeRuntime()
    pairs = TokenizedPairs([[1] * 10, [1] * 12], [4, 6])
    result = measure_in_process(runtime, pairs, EngineSettings(workers=2), 30.0, count=100)
    assert result.pairs == 100 and result.seconds > 0  # all of them, after the warm-up
    assert result.pairs_per_s == pytest.approx(100 / result.seconds)
    assert result.layout.startswith("2 worker threads") and result.layout.endswith("≤256 tok")
    assert len(runtime.engines) == 2 and all(engine.closed for engine in runtime.engines)
    packs = [pack for engine in runtime.engines for pack in engine.packs]
    types = [types for engine in runtime.engines for types in engine.types]
    # Packs of at most 256 tokens (ONNX Runtime's default), each with its pairs' type starts.
    assert all(sum(pack) <= 256 for pack in packs)
    assert all(t is not None and set(t) <= {4, 6} for t in types)


def _rerank_bench(served: Sequence[tuple[int, int, int]], tiny: bool = True) -> RerankBench:
    """8,000 pairs in 2 s in-process; served: (callers, requests, errors) legs of 2 s."""
    return RerankBench(
        model="tiny-bert-reranker",
        source="/shared/models/tiny-bert-reranker",
        description="bert, f32, hidden 64, 2 layers",
        engine="onnxruntime",
        queries=128,
        documents=16,
        mean_pair_tokens=29.8,
        max_tokens=160,
        in_process=InProcess("2 worker processes x all cores' threads, packs ≤256 tok", 8000, 2.0),
        served=[
            served_leg(
                LoadResult(requests, errors, 2.0, [0.004, 0.005, 0.020] if requests else []),
                concurrency,
                16,
                server_cores=1.5,
                loop_cores=0.6,
                generator_cores=0.1,
            )
            for concurrency, requests, errors in served
        ],
        tiny=tiny,
    )


def test_served_pairs_per_second_and_the_ratio_to_in_process() -> None:
    bench = _rerank_bench([(1, 100, 0), (4, 200, 1)])
    one, four = bench.served
    assert (one.pairs, one.pairs_per_s) == (1600, 800.0)  # 100 requests x 16 pairs in 2 s
    assert (four.pairs, four.pairs_per_s) == (3200, 1600.0)
    assert bench.in_process is not None and bench.in_process.pairs_per_s == 4000.0
    assert bench.ratio(one) == pytest.approx(0.2)
    assert bench.ratio(four) == pytest.approx(0.4)
    assert bench.busiest() is four
    assert one.p50_ms == pytest.approx(5.0) and four.errors == 1
    none = _rerank_bench([(4, 0, 3)])
    assert none.ratio(none.served[0]) is None  # nothing answered: no ratio
    assert summary_line(none) == "Served / in-process: not measured."


def test_the_rerank_section_shows_every_measurement_and_the_ratio() -> None:
    bench = _rerank_bench([(1, 100, 0), (4, 200, 1)])
    text = render_section(bench)
    assert text.startswith("## Reranking: pairs/s served vs the engine in-process")
    assert (
        "| in-process (2 worker processes x all cores' threads, packs ≤256 tok) | 4,000 | 1.00x |"
        in text
    )
    assert "| served, gRPC Rerank, 1 caller x 16 documents | 800 | 0.20x | 5.00 |" in text
    assert "| served, gRPC Rerank, 4 callers x 16 documents | 1,600 | 0.40x |" in text
    assert "| 200 (3,200 pairs), 1 errors: no detail | 1.50 (0.60) | 0.10 | 0.00 |" in text
    assert "Served / in-process at 4 callers: **0.40x** (1,600 vs 4,000 pairs/s)." in text
    assert "tiny random-weight test model" in text and "ratio is the point" in text
    assert "tiny random-weight" not in render_section(_rerank_bench([(1, 1, 0)], tiny=False))
    assert "Shared machine" not in text  # no other process used the cores
    noisy = _rerank_bench([(1, 100, 0)])
    noisy.served = [dataclasses.replace(noisy.served[0], other_cores=0.9)]
    assert "other processes used up to 0.90 cores" in render_section(noisy)
    document = render_document(
        bench, cpu_model="Test CPU", cores=2, date="2026-11-29", command="make bench", quick=True
    )
    assert document.startswith("# embedd benchmark: reranking")
    assert "Test CPU, 2 cores" in document
    assert "`make bench`; `--only rerank` runs this part alone." in document
    assert "## Reranking" in document


def test_latest_md_holds_the_rerank_section_or_links_the_last_one() -> None:
    run = BenchRun(cpu_model="CPU", cores=2, quick=True, date="d", command="make bench")
    text = render_markdown(run)
    assert "Not measured in this run: the last rerank measurement is in [rerank.md]" in text
    run.rerank_section = "## Reranking: measured\n\nthe table"
    text = render_markdown(run)
    assert "## Reranking: measured\n\nthe table" in text
    assert "The same section on its own: [rerank.md](rerank.md)." in text
    assert "Not measured in this run" not in text


def test_the_rerank_part_is_chosen_by_default_or_alone() -> None:
    from bench.__main__ import FULL, QUICK, RERANK, parse_args
    from bench.rerank import DEFAULT_RERANKER

    assert RERANK in parse_args([]).only
    args = parse_args(["--only", "rerank", "--reranker", "/models/x"])
    assert args.only == {"rerank"} and args.reranker == Path("/models/x")
    assert parse_args([]).reranker == DEFAULT_RERANKER
    assert DEFAULT_RERANKER.name == "tiny-bert-reranker"
    # Well under a minute of legs: in-process, then 2 served legs with their warm-ups.
    assert 3 * FULL.rerank_s + 2 * FULL.rerank_warmup_s < 20
    assert QUICK.rerank_s < FULL.rerank_s


def test_the_grpc_generator_calls_the_method_it_is_given() -> None:
    import grpc

    from bench.loadgen import _grpc_load
    from bench.rerank import RERANK_METHOD, RerankQuery, rerank_requests
    from embedd.v1 import embedder_pb2 as pb
    from embedd.v1 import embedder_pb2_grpc as pb_grpc

    queries: list[str] = []

    class Reranker(pb_grpc.EmbedderServicer):
        async def Rerank(self, request: pb.RerankRequest, context: object) -> pb.RerankResponse:
            queries.append(request.query)
            return pb.RerankResponse(model=request.model)

    async def serve_and_load() -> LoadResult:
        server = grpc.aio.server()
        pb_grpc.add_EmbedderServicer_to_server(Reranker(), server)  # type: ignore[abstract]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            requests = rerank_requests([RerankQuery("q1", ["d"]), RerankQuery("q2", ["d"])], "m")
            return await _grpc_load(f"127.0.0.1:{port}", requests, 2, 0.2, RERANK_METHOD)
        finally:
            await server.stop(0)

    result = asyncio.run(serve_and_load())
    assert result.requests == len(queries) > 0 and result.errors == 0
    assert set(queries) == {"q1", "q2"}  # the requests in turn, to Rerank


def test_only_rerank_writes_its_own_report_and_leaves_latest_md_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.__main__ as main_module
    from bench import ceiling, rerank
    from bench.texts import TextSet

    texts = TextSet("sentences", ["a b"], [[1, 2, 3]])
    monkeypatch.setattr(ceiling, "auto_engine", lambda model: "onnxruntime")
    monkeypatch.setattr(
        main_module, "load_text_sets", lambda model: (texts, dataclasses.replace(texts), None)
    )
    asked: list[tuple[Path, float, float]] = []

    def run_rerank(source: Path, *, seconds: float, warmup_s: float, say: object) -> RerankBench:
        asked.append((source, seconds, warmup_s))
        return _rerank_bench([(1, 100, 0), (4, 200, 0)])

    monkeypatch.setattr(rerank, "run_rerank", run_rerank)
    (tmp_path / "latest.md").write_text("the last full run\n")
    reranker = tmp_path / "tiny-x"
    args = ["--only", "rerank", "--quick", "--out", str(tmp_path), "--reranker", str(reranker)]
    assert main_module.main(args) == 0
    assert asked == [(reranker, 1.5, 0.3)]  # --quick's short legs
    assert (tmp_path / "latest.md").read_text() == "the last full run\n"
    written = (tmp_path / "rerank.md").read_text()
    assert written.startswith("# embedd benchmark: reranking")
    assert "Served / in-process at 4 callers: **0.40x**" in written
    assert "`make bench BENCH_ARGS='--only rerank --quick --out" in written


# --- issue 20: the families part -----------------------------------------------------------------


def _model_info(**changes: object) -> ModelInfo:
    """A small BERT embedding model's catalogue entry, with ``changes``."""
    info = ModelInfo(
        name="tiny-x",
        path=Path("/nowhere/tiny-x/tiny-x.gguf"),
        architecture="bert",
        dimensions=4,
        context_length=64,
        max_input_tokens=6,
        pooling="mean",
        quantization="f16",
        normalizes=True,
        vocab_size=100,
        hf_tokenizer_json=None,
        file_size_bytes=0,
        created=0,
        family="bert",
    )
    return dataclasses.replace(info, **changes)  # type: ignore[arg-type]


class _WordTokenizer:
    """[1] + one id per word (its length) + [2]; a pair's document starts after its query's
    [2]. Records what it was asked to encode."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def _ids(self, text: str) -> list[int]:
        self.texts.append(text)
        return [1, *(len(word) for word in text.split()), 2]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._ids(text) for text in texts]

    def encode_truncated(self, text: str, max_tokens: int, direction: str = "right") -> list[int]:
        ids = self._ids(text)
        return [*ids[: max_tokens - 1], 2]

    def encode_bounded(
        self, texts: Sequence[str], max_tokens: int, direction: str = "right"
    ) -> list[Counted]:
        return [
            Counted(ids if len(ids) <= max_tokens else [*ids[: max_tokens - 1], 2], len(ids))
            for ids in self.encode_batch(texts)
        ]

    def id_to_token(self, token_id: int) -> str:
        return str(token_id)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_tokens: int) -> TokenizedPairs:
        sequences = [self._ids(query) + self._ids(document)[1:] for query, document in pairs]
        starts = [len(self._ids(query)) for query, _ in pairs]
        return TokenizedPairs([ids[:max_tokens] for ids in sequences], starts)

    def prompt_length(self, prompt: str, max_tokens: int) -> int:
        return len(self._ids(prompt)) - 1

    def spans(self, text: str, add_special_tokens: bool) -> list[TokenSpan]:
        words: list[TokenSpan] = []
        stop = 0
        for word in text.split():
            start = text.index(word, stop)
            stop = start + len(word)
            words.append(TokenSpan(len(word), word, False, start, stop))
        if not add_special_tokens:
            return words
        return [TokenSpan(1, "[1]", True, 0, 0), *words, TokenSpan(2, "[2]", True, 0, 0)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # A word is known only by its length: decoded as that many x's.
        kept = [i for i in ids if not (skip_special_tokens and i in (1, 2))]
        return " ".join("x" * i for i in kept)


def test_family_requests_are_consecutive_sentences_in_the_rpc_of_the_models_task() -> None:
    from bench.families import rpc_name, task_requests, text_batches
    from embedd.v1 import embedder_pb2 as pb

    sentences = [f"s{i}" for i in range(7)]
    batches = text_batches(sentences, 3)
    assert batches == [["s0", "s1", "s2"], ["s3", "s4", "s5"]]  # the incomplete last one dropped
    with pytest.raises(ValueError, match="need 8 sentences"):
        text_batches(sentences, 8)
    embed = pb.EmbedRequest.FromString(task_requests("embed", "m", batches)[1])
    assert (embed.model, list(embed.texts)) == ("m", ["s3", "s4", "s5"])
    assert not embed.prompt_name and not embed.HasField("prompt")  # the model's default prompt
    sparse = pb.EmbedSparseRequest.FromString(task_requests("sparse", "m", batches)[0])
    assert (sparse.model, list(sparse.texts)) == ("m", ["s0", "s1", "s2"])
    classify = pb.ClassifyRequest.FromString(task_requests("classify", "m", batches)[0])
    assert [(i.text, i.HasField("text_pair")) for i in classify.inputs] == [
        ("s0", False),
        ("s1", False),
        ("s2", False),
    ]
    assert not classify.raw_scores  # probabilities, as a caller gets them by default
    with pytest.raises(ValueError, match="takes no texts"):
        task_requests("rerank", "m", batches)
    assert [rpc_name(task) for task in ("embed", "rerank", "classify", "sparse")] == [
        "Embed",
        "Rerank",
        "Classify",
        "EmbedSparse",
    ]


def test_every_rpc_the_families_part_calls_is_a_method_of_the_embedder_service() -> None:
    from bench.families import METHODS
    from embedd.v1 import embedder_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["Embedder"]
    assert set(METHODS) == {"embed", "rerank", "classify", "sparse"}
    for method in METHODS.values():
        package_service, name = method.strip("/").split("/")
        assert package_service == service.full_name and name in service.methods_by_name


def test_family_texts_are_tokenized_as_the_server_does_for_the_models_task() -> None:
    from bench.families import tokenize_for_task

    texts = ["One two", "Three four five six seven"]
    prompted = _model_info(
        prompts={"query": "Find: ", "document": ""},
        default_prompt_name="query",
        do_lower_case=True,
    )
    tokenizer = _WordTokenizer()
    embed = tokenize_for_task(prompted, tokenizer, texts)
    # The default prompt prepended and lower-cased, as an Embed request naming none gets it;
    # the long text cut to the model's 6 tokens.
    assert tokenizer.texts[:2] == ["find: one two", "find: three four five six seven"]
    assert embed.sequences == [[1, 5, 3, 3, 2], [1, 5, 5, 4, 4, 2]]
    assert embed.token_type_starts == [5, 6]  # texts: no token of type 1
    sparse = tokenize_for_task(
        dataclasses.replace(prompted, declared_task="sparse"), tokenizer, texts
    )
    assert sparse.sequences == embed.sequences
    tokenizer = _WordTokenizer()
    classify = tokenize_for_task(
        dataclasses.replace(prompted, declared_task="classify"), tokenizer, texts
    )
    assert tokenizer.texts[:2] == texts  # a classifier reads the texts as they are
    assert classify.sequences[0] == [1, 3, 3, 2]


def test_a_rerankers_pairs_keep_token_types_only_where_the_model_has_them() -> None:
    from bench.families import tokenize_pairs

    pairs = [("a b", "c"), ("a", "b c d e f g")]
    bert = _model_info(pooling="rank", pair_token_types=True)
    typed = tokenize_pairs(bert, _WordTokenizer(), pairs)
    assert typed.token_type_starts == [4, 3]  # the document's first token
    assert typed.sequences[1] == [1, 1, 2, 1, 1, 1]  # cut to the model's 6 tokens
    untyped = tokenize_pairs(
        dataclasses.replace(bert, pair_token_types=False), _WordTokenizer(), pairs
    )
    assert untyped.sequences == typed.sequences
    assert untyped.token_type_starts == [6, 6]  # type 0 throughout: the server passes none


def test_a_family_workload_is_requests_of_its_task_and_the_same_inputs_tokenized() -> None:
    from bench.families import TEXTS_PER_REQUEST, build_workload
    from bench.rerank import DOCUMENTS, QUERIES, RerankQuery
    from embedd.v1 import embedder_pb2 as pb

    sentences = [f"w{i} x" for i in range(QUERIES * (DOCUMENTS + 1) + 5)]
    embed = build_workload(_model_info(), _WordTokenizer(), sentences)
    assert embed.task == "embed" and embed.per_request == TEXTS_PER_REQUEST
    assert len(embed.requests) == len(sentences) // TEXTS_PER_REQUEST
    assert len(embed.tokenized.sequences) == len(embed.requests) * TEXTS_PER_REQUEST
    assert embed.first == sentences[:TEXTS_PER_REQUEST]
    assert embed.mean_tokens == 4.0
    reranker = build_workload(_model_info(pooling="rank"), _WordTokenizer(), sentences)
    assert reranker.task == "rerank" and reranker.per_request == DOCUMENTS
    assert len(reranker.requests) == QUERIES
    assert len(reranker.tokenized.sequences) == QUERIES * DOCUMENTS
    assert reranker.first == RerankQuery(sentences[0], sentences[1 : DOCUMENTS + 1])
    assert pb.RerankRequest.FromString(reranker.requests[0]).query == sentences[0]


def test_the_in_process_job_is_bounded_by_its_result_matrix() -> None:
    from bench.families import IN_PROCESS_RESULT_BYTES, IN_PROCESS_TEXTS, in_process_count

    assert in_process_count(64) == IN_PROCESS_TEXTS
    wide = 30_522  # a SPLADE model's vocabulary: its dimensions
    assert in_process_count(wide) == IN_PROCESS_RESULT_BYTES // (4 * wide) < IN_PROCESS_TEXTS


def test_a_served_answer_is_checked_for_its_tasks_shape() -> None:
    from bench.families import classes_fault, embeddings_fault, sparse_fault

    vectors = np.ones((2, 4), dtype=np.float32)
    assert embeddings_fault(vectors, 2, 4) == ""
    assert "shape (2, 4), expected (3, 4)" in embeddings_fault(vectors, 3, 4)
    vectors[1, 2] = np.nan
    assert embeddings_fault(vectors, 2, 4) == "non-finite values"

    def sparse(
        indices: list[int], values: list[float]
    ) -> tuple[npt.NDArray[np.int64], FloatMatrix]:
        return np.array(indices, dtype=np.int64), np.array(values, dtype=np.float32)

    good = [sparse([1, 5], [0.5, 1.0]), sparse([], [])]
    assert sparse_fault(good, 2, 10) == ""
    assert "1 vectors for 2 texts" in sparse_fault(good[:1], 2, 10)
    assert "not ascending" in sparse_fault([sparse([5, 1], [1.0, 1.0])], 1, 10)
    assert "not ascending" in sparse_fault([sparse([1, 10], [1.0, 1.0])], 1, 10)  # past vocab
    assert "not positive" in sparse_fault([sparse([1, 2], [1.0, 0.0])], 1, 10)
    assert classes_fault([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]], 2, 3) == ""
    assert "1 classifications for 2 texts" in classes_fault([[0.7, 0.2, 0.1]], 2, 3)
    assert "2 labels, the model has 3" in classes_fault([[0.7, 0.3]], 1, 3)
    assert "not highest first" in classes_fault([[0.2, 0.7, 0.1]], 1, 3)


def _families_bench() -> FamiliesBench:
    """tiny-a measured on both engines (ONNX Runtime its auto choice, 4,000 texts/s), tiny-b
    refused by ONNX Runtime and failing on llama.cpp, tiny-c not imported."""

    def legs(requests: tuple[int, int], errors: int = 0) -> list[ServedLeg]:
        return [
            served_leg(
                LoadResult(count, errors, 2.0, [0.004]),
                callers,
                16,
                server_cores=1.6,
                other_cores=0.1,
            )
            for callers, count in zip((1, 4), requests, strict=True)
        ]

    in_process = InProcess(
        "2 worker threads x all cores' threads, packs ≤256 tok", 8000, 2.0, engine_cores=1.6
    )
    return FamiliesBench(
        source="../shared/models",
        leg_s=2.0,
        models=[
            FamilyResult(
                "tiny-a",
                family="bert",
                task="embed",
                mean_tokens=15.5,
                auto_engine="onnxruntime",
                engines=[
                    EngineResult("onnxruntime", in_process, legs((100, 200))),
                    EngineResult(
                        "llama.cpp",
                        dataclasses.replace(in_process, pairs=4000, other_cores=0.8),
                        legs((50, 0), errors=3),
                    ),
                ],
            ),
            FamilyResult(
                "tiny-b",
                family="qwen3",
                task="embed",
                auto_engine="llama.cpp",
                engines=[
                    EngineResult("onnxruntime", refusal="architecture 'qwen3'"),
                    EngineResult("llama.cpp", error="it broke"),
                ],
            ),
            FamilyResult("tiny-c", import_error="config.json describes a foo model"),
        ],
    )


def test_the_families_table_has_a_row_per_model_and_engine_measured() -> None:
    from bench.families import table_rows

    bench = _families_bench()
    onnx, llama = bench.models[0].engines
    assert onnx.ratio(onnx.leg(1)) == pytest.approx(0.2)  # 800 texts/s served vs 4,000
    assert onnx.ratio(onnx.leg(4)) == pytest.approx(0.4)
    assert llama.ratio(llama.leg(4)) is None  # nothing answered: no ratio
    assert llama.other_cores == 0.8
    # The server took 1.6 cores for 1,600 texts/s, the engines 1.6 for 4,000: 2.5x the CPU.
    assert onnx.cpu_ratio(onnx.leg(4)) == pytest.approx(2.5)
    assert llama.cpu_ratio(llama.leg(4)) is None
    assert onnx.in_process is not None
    unknown = dataclasses.replace(onnx.in_process, engine_cores=0.0)
    no_cores = EngineResult("onnxruntime", unknown, onnx.served)
    assert no_cores.cpu_ratio(no_cores.leg(4)) is None  # the engines' CPU unknown
    model = ["`tiny-a`", "bert", "embed"]
    onnx_row = [*model, "onnxruntime (auto)", "15.5", "4,000", "800", "1,600", "0.20x / 0.40x"]
    llama_row = [*model, "llama.cpp", "15.5", "2,000", "400 (3 errors)", "—", "0.20x / —"]
    assert table_rows(bench) == [[*onnx_row, "2.50x", "0.10"], [*llama_row, "—", "0.80"]]


def test_the_families_section_says_what_the_numbers_mean_and_what_was_not_measured() -> None:
    from bench.families import render_document, render_section

    bench = _families_bench()
    text = render_section(bench)
    assert text.startswith("## Families: texts/s per model family and engine (issue 20)")
    assert "tiny random-weight test models" in text and "absolute texts/s say nothing" in text
    assert "served/in-process ratio" in text
    assert "| `tiny-a` | bert | embed | onnxruntime (auto) | 15.5 | 4,000 | 800 | 1,600 |" in text
    assert "| 0.20x / 0.40x | 2.50x | 0.10 |" in text
    assert "a served/in-process ratio above 1x is that" in text  # the noise line explains
    assert "- `tiny-c`: not imported: config.json describes a foo model" in text
    assert "- `tiny-b` on onnxruntime: refused: architecture 'qwen3'" in text
    assert "- `tiny-b` on llama.cpp: **failed**: it broke" in text
    assert "other processes used up to 0.80 cores" in text
    assert "`--quick`" not in text
    bench.auto_only = True
    assert "on the engine `engine=auto` picks only (`--quick`)" in render_section(bench)
    empty = render_section(FamiliesBench(source="x"))
    assert "No model was measured." in empty and "Shared machine" not in empty
    document = render_document(
        bench, cpu_model="Test CPU", cores=2, date="2026-12-07", command="make bench", quick=True
    )
    assert document.startswith("# embedd benchmark: model families")
    assert "Test CPU, 2 cores" in document
    assert "`make bench`; `--only families` runs this part alone." in document


def test_a_model_the_importer_refuses_is_listed_with_the_errors_first_line(
    tmp_path: Path,
) -> None:
    from bench.families import measure_model, model_dirs

    source = tmp_path / "models" / "tiny-foo"
    source.mkdir(parents=True)
    config = {"architectures": ["FooModel"], "model_type": "foo", "hidden_size": 8}
    (source / "config.json").write_text(json.dumps(config))
    (tmp_path / "models" / "not-a-model").mkdir()
    assert model_dirs(tmp_path / "models") == [source]
    said: list[str] = []
    result = measure_model(source, tmp_path / "out", ["a b"] * 40, 0.1, 0.1, say=said.append)
    assert result.model == "tiny-foo" and not result.engines and not result.family
    assert "foo" in result.import_error and "\n" not in result.import_error
    assert said == [f"tiny-foo: not imported: {result.import_error}"]


def test_each_engine_is_asked_as_the_server_asks_it_when_forced() -> None:
    from bench.families import auto_engine, engine_refusal

    bert = _model_info()
    assert engine_refusal(bert, "onnxruntime") == engine_refusal(bert, "llama.cpp") == ""
    assert auto_engine(bert) == "onnxruntime"
    qwen3 = _model_info(architecture="qwen3", pooling="last", family="qwen3")
    assert "architecture 'qwen3'" in engine_refusal(qwen3, "onnxruntime")
    assert auto_engine(qwen3) == "llama.cpp"
    quantized = _model_info(quantization="q8_0")
    assert "q8_0 weights" in engine_refusal(quantized, "onnxruntime")


def test_an_engine_that_fails_is_reported_and_the_part_goes_on() -> None:
    from bench.families import Workload, measure_engine

    workload = Workload("embed", TokenizedPairs([[1, 2]], [2]), [b""], 1, ["a"])
    said: list[str] = []
    result = measure_engine(_model_info(), workload, "llama.cpp", 0.1, 0.1, say=said.append)
    assert result.in_process is None and not result.served and not result.refusal
    assert result.error and "\n" not in result.error  # the missing file, in one line
    assert said == [f"  llama.cpp: failed: {result.error}"]


def test_the_families_part_is_chosen_by_default_or_alone_and_kept_short() -> None:
    from bench.__main__ import FAMILIES, FULL, QUICK, parse_args
    from bench.families import CONCURRENCIES, DEFAULT_MODELS

    assert FAMILIES in parse_args([]).only
    args = parse_args(["--only", "families", "--families", "/models"])
    assert args.only == {"families"} and args.families == Path("/models")
    assert parse_args([]).families == DEFAULT_MODELS == Path(DEFAULT_MODELS).parent / "models"
    # Per model and engine: in-process, then each served leg after its warm-up, under 3 s
    # (some 26 of them, each also starting its engines and server: a few minutes in all).
    legs = len(CONCURRENCIES)
    assert (legs + 1) * FULL.families_s + legs * FULL.families_warmup_s < 3.0
    assert not FULL.families_auto_only and QUICK.families_auto_only
    assert QUICK.families_s < FULL.families_s


def test_only_families_writes_its_own_report_and_leaves_latest_md_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bench.__main__ as main_module
    from bench import ceiling, families
    from bench.texts import TextSet

    texts = TextSet("sentences", ["a b"], [[1, 2, 3]])
    monkeypatch.setattr(ceiling, "auto_engine", lambda model: "onnxruntime")
    monkeypatch.setattr(
        main_module, "load_text_sets", lambda model: (texts, dataclasses.replace(texts), None)
    )
    asked: list[tuple[Path, float, float, bool]] = []

    def run_families(
        models: Path, *, seconds: float, warmup_s: float, say: object, auto_only: bool
    ) -> FamiliesBench:
        asked.append((models, seconds, warmup_s, auto_only))
        return _families_bench()

    monkeypatch.setattr(families, "run_families", run_families)
    (tmp_path / "latest.md").write_text("the last full run\n")
    args = ["--only", "families", "--quick", "--out", str(tmp_path), "--families", str(tmp_path)]
    assert main_module.main(args) == 0
    assert asked == [(tmp_path, 0.3, 0.1, True)]  # --quick: short, the auto engine only
    assert (tmp_path / "latest.md").read_text() == "the last full run\n"
    assert not (tmp_path / "rerank.md").exists()
    written = (tmp_path / "families.md").read_text()
    assert written.startswith("# embedd benchmark: model families")
    assert "| `tiny-a` | bert | embed | onnxruntime (auto) |" in written
    assert "`make bench BENCH_ARGS='--only families --quick --out" in written


def test_latest_md_holds_the_families_section_or_links_the_last_one() -> None:
    run = BenchRun(cpu_model="CPU", cores=2, quick=True, date="d", command="make bench")
    text = render_markdown(run)
    assert "Not part of this run: the last measurement of every model family is in " in text
    assert "[families.md](families.md)" in text
    run.families_section = "## Families: measured\n\nthe table"
    text = render_markdown(run)
    assert (
        "## Families: measured\n\nthe table\n\nThe same section on its own: [families.md]" in text
    )
    assert "Not part of this run: the last measurement of every model family" not in text


def test_the_cpu_meter_counts_live_worker_processes_as_the_measurements_own() -> None:
    import subprocess
    import sys

    from bench.procs import CpuMeter

    # A child that burns 0.3 s of CPU, says so, then waits (alive, not reaped) for its stdin.
    burn = (
        "import sys, time\n"
        "while time.process_time() < 0.3: pass\n"
        "print('done', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with CpuMeter(None) as meter:
        child = subprocess.Popen(
            [sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert child.stdout is not None and child.stdout.readline() == "done\n"
    child.communicate("")
    assert meter.children_cpu == 0.0  # reaped only after the meter stopped
    assert meter.workers_cpu >= 0.25  # its CPU (in clock ticks) is the measurement's ...
    # ... not other processes' (to the rounding of the sums of CPU seconds)
    assert meter.other_cpu <= max(0.0, meter.busy - meter.workers_cpu) + 1e-9


def test_the_word_tokenizer_fake_spans_and_decodes_as_its_ids_say() -> None:
    fake = _WordTokenizer()
    spans = fake.spans("abcd  efg", add_special_tokens=True)
    assert [(s.id, s.special, s.start, s.stop) for s in spans] == [
        (1, True, 0, 0),
        (4, False, 0, 4),
        (3, False, 6, 9),
        (2, True, 0, 0),
    ]
    assert [s.id for s in spans] == fake.encode_batch(["abcd  efg"])[0]
    assert fake.decode([1, 4, 3, 2], skip_special_tokens=True) == "xxxx xxx"
    assert fake.decode([1, 4, 2], skip_special_tokens=False) == "x xxxx xx"
