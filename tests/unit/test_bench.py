"""The benchmark's pure parts: percentiles, packing, passages, ghz and vegeta reports,
the target table. No model, no server."""

from __future__ import annotations

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
from bench.loadgen import (
    Endpoint,
    LoadResult,
    ghz_command,
    ghz_data,
    openai_embedding_body,
    parse_ghz_json,
    parse_vegeta_json,
    vegeta_attack_command,
    vegeta_report_command,
    vegeta_targets,
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
from bench.texts import build_passages, read_sentences
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings

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


def test_parse_ghz_json_counts_ok_calls_and_reads_its_percentiles() -> None:
    result = parse_ghz_json(json.dumps(GHZ_REPORT))
    assert result.requests == 5
    assert result.errors == 1
    assert result.seconds == 2.0
    assert (result.p50_s, result.p99_s) == (0.005, 0.009)  # ghz's own distribution
    assert result.first_error.startswith("rpc error: code = Unavailable")
    assert result.generator == "ghz"
    nothing = parse_ghz_json(json.dumps({"count": 1, "total": 10**9}))
    assert (nothing.requests, nothing.errors, nothing.p50_s) == (0, 1, None)


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


# --- vegeta ---------------------------------------------------------------------------------

# A `vegeta report -type=json` of a leg (durations in nanoseconds), as vegeta v12.13.0 writes it.
VEGETA_REPORT = {
    "latencies": {
        "total": 60_000_000,
        "mean": 6_000_000,
        "50th": 5_000_000,
        "90th": 8_000_000,
        "95th": 9_000_000,
        "99th": 11_000_000,
        "max": 12_000_000,
        "min": 3_000_000,
    },
    "bytes_in": {"total": 70_000, "mean": 7_000},
    "bytes_out": {"total": 900, "mean": 90},
    "earliest": "2026-12-07T12:43:29.120939424Z",
    "latest": "2026-12-07T12:43:31.120939424Z",
    "end": "2026-12-07T12:43:31.129246364Z",
    "duration": 2_000_000_000,
    "wait": 500_000_000,
    "requests": 10,
    "rate": 5.0,
    "throughput": 3.2,
    "success": 0.8,
    "status_codes": {"200": 8, "503": 2},
    "errors": ["503 Service Unavailable"],
}


def test_parse_vegeta_json_counts_ok_answers_over_the_attack_and_its_wait() -> None:
    result = parse_vegeta_json(json.dumps(VEGETA_REPORT))
    assert (result.requests, result.errors) == (8, 2)
    assert result.seconds == 2.5  # the last answers are waited for, and counted
    assert (result.p50_s, result.p99_s) == (0.005, 0.011)
    assert (result.first_error, result.generator) == ("503 Service Unavailable", "vegeta")
    refused = parse_vegeta_json(json.dumps({**VEGETA_REPORT, "status_codes": {"0": 10}}))
    assert (refused.requests, refused.errors, refused.p50_s) == (0, 10, None)


def test_vegeta_runs_a_closed_loop_of_the_targets_in_turn() -> None:
    command = vegeta_attack_command(
        Path("/t/vegeta"), Path("t.jsonl"), Path("t.bin"), concurrency=16, duration_s=6
    )
    assert command[:3] == ["/t/vegeta", "attack", "-format=json"]
    # -rate=0: no pacing, each of the 16 workers sends its next request once answered
    assert {"-rate=0", "-workers=16", "-max-workers=16", "-duration=6s"} <= set(command)
    assert "-targets=t.jsonl" in command and "-output=t.bin" in command
    assert vegeta_report_command(Path("/t/vegeta"), Path("t.bin")) == [
        "/t/vegeta",
        "report",
        "-type=json",
        "t.bin",
    ]


def test_vegeta_targets_are_openai_requests_one_per_line() -> None:
    import base64

    endpoint = Endpoint("http://127.0.0.1:7997", "/embeddings", "minilm")
    lines = vegeta_targets(endpoint, [["a b"], ["c", "ü"]]).splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["method"] == "POST" and first["url"] == "http://127.0.0.1:7997/embeddings"
    assert first["header"] == {"Content-Type": ["application/json"]}
    body = json.loads(base64.b64decode(first["body"]))
    assert body == {"model": "minilm", "input": "a b", "encoding_format": "float"}
    assert json.loads(base64.b64decode(second["body"]))["input"] == ["c", "ü"]
    assert base64.b64decode(second["body"]) == openai_embedding_body(["c", "ü"], "minilm")


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


def test_the_ceiling_packs_sequences_as_the_servers_queue_does() -> None:
    # The queue hands a job's inputs out shortest first.
    assert _packs(0) == [[5], [10], [10], [10], [200]]  # one per decode
    assert _packs(25) == [[5, 10, 10], [10], [200]]
    assert _packs(256, batch_sequences=2) == [[5, 10], [10, 10], [200]]
    assert _packs(25, max_packs=2) == [[5, 10, 10], [10]]
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
        ("1 session x 2 threads, spinning", 256, False),  # the server's default
        ("1 session x 2 threads, spinning", 2048, False),
        ("2 threads x 1-thread session (+2 alone)", 256, False),
        ("2 processes x 2 threads", 256, False),
        ("2 processes x 1 thread", 256, False),
        ("1 session x 2 threads, spinning", 256, True),
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
    int8 = engine_settings(
        Configuration("onnxruntime", "2 threads x 1-thread session (+2 alone)", "", 256, True)
    )
    assert (int8.workers, int8.onnx_threads, int8.int8) == (2, 2, True)
    assert int8.onnx_spins("onnxruntime-int8")  # the session a lone call takes
    alone = engine_settings(
        Configuration("onnxruntime", "1 session x 2 threads, spinning", "", 256)
    )
    assert (alone.workers, alone.onnx_threads) == (1, 2) and alone.onnx_spins("onnxruntime")


def test_the_floor_bounds_the_reachable_ratio() -> None:
    from bench.report import Floor, render_floor

    floor = Floor(cores=2, target=0.85, requests_per_s=430, server_cores=0.23, generator_cores=0.27)
    # r * 2 + 0.50 * r / 0.85 = 2: the engine's share and the overhead fill the two cores
    assert floor.best_ratio == pytest.approx(2 / (2 + 0.50 / 0.85))
    assert "**0.77x the ceiling**" in render_floor(floor)


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


def test_issue_22_targets_are_ratios_to_tei_on_the_same_leg_and_its_memory() -> None:
    memory = {GRPC: 300.0, REST: 300.0, TEI: 180.0}
    targets = {t.name: t for t in evaluate_tei_targets(PEER_LEGS, "sentences", memory)}
    assert targets["1 caller x 1 text, gRPC"].met is True  # 300 / 280
    assert targets["1 caller x 1 text, gRPC"].goal == "≥ 1x TEI"
    assert targets["1 caller x 1 text, REST"].met is False  # 250 / 280 = 0.89 < 0.9
    assert targets["1 caller x 1 text, REST"].measured == "0.89x (250 vs 280 texts/s)"
    assert targets["16 callers x 1 text, gRPC"].measured == "1.22x (500 vs 410 texts/s)"
    assert targets["16 callers x 1 text, REST"].met is True  # 400 / 410 = 0.98 >= 0.9
    assert targets["16 callers x 1 text, REST"].goal == "≥ 0.9x TEI"
    assert targets["4 callers x 32 texts, gRPC"].met is True  # 800 / 470 = 1.70 >= 1.5
    assert "4 callers x 32 texts, REST" not in targets  # a gRPC target only
    memory_target = targets["memory after the load (PSS: server, workers, Envoy)"]
    assert memory_target.goal == "≤ 1.5x TEI's"
    assert memory_target.measured == "1.67x (300 vs 180 MiB)"
    assert memory_target.met is False


def test_a_missed_leg_says_what_bounds_it_from_the_same_run() -> None:
    from bench.report import TEI_TARGETS, Floor, render_issue22, what_bounds

    run = BenchRun(cpu_model="c", cores=2, quick=True, date="d", command="c")
    run.serving_engine = "onnxruntime"
    run.floor = Floor(
        cores=2,
        target=0.85,
        requests_per_s=800,
        server_cores=0.5,
        generator_cores=0.4,
        lone_p50_ms=1.25,
    )
    run.ceiling["sentences"] = [
        CeilingResult(
            "packs", "1 session", 256, texts=1000, tokens=11000, seconds=1.0, engine="onnxruntime"
        )
    ]
    run.legs = [
        _shape(GRPC, 1, 1, 140, p50_ms=7.0, reference=4.0),
        _shape(REST, 1, 1, 110, p50_ms=9.0),
        _shape(TEI, 1, 1, 220, p50_ms=4.5),
        _shape(
            GRPC,
            16,
            1,
            300,
            server_cores=1.5,
            loop_cores=0.3,
            generator_cores=0.4,
            other_cores=0.05,
        ),
        _shape(REST, 16, 1, 200, server_cores=1.8, helper_cores=0.25, generator_cores=0.1),
        _shape(TEI, 16, 1, 360, server_cores=1.8, generator_cores=0.2),
        _shape(GRPC, 4, 32, 400, server_cores=0.9, generator_cores=0.2),
        _shape(TEI, 4, 32, 450, server_cores=1.9),
    ]
    bounds = {target.name: what_bounds(run, target) for target in TEI_TARGETS}
    assert bounds["1 caller x 1 text, gRPC"] == (
        "latency: p50 7.00 vs TEI's 4.50 ms; the engine's call 4.00 ms in-process, the path "
        "around it 3.00 ms (an RPC that does nothing: 1.25 ms)"
    )
    assert bounds["1 caller x 1 text, REST"] == (
        "latency: p50 9.00 vs TEI's 4.50 ms; Envoy and JSON 2.00 ms over gRPC's p50"
    )
    # 1.5 + 0.4 + 0.05 of 2 cores: CPU; 1.5 cores / 300 texts/s = 5 ms a text
    assert bounds["16 callers x 1 text, gRPC"] == (
        "CPU: server 1.50 (event loop 0.30) + load generator 0.40 + others 0.05 of 2 cores; "
        "server CPU 5.00 ms/text vs TEI's 5.00; the engine alone 2.00 ms/text at its ceiling"
    )
    assert bounds["16 callers x 1 text, REST"].startswith(
        "CPU: server 1.80 (Envoy 0.25) + load generator 0.10 + others 0.00 of 2 cores; "
        "server CPU 9.00 ms/text"
    )
    assert bounds["4 callers x 32 texts, gRPC"].startswith("not CPU (0.90 idle): server 0.90")
    run.legs = [leg for leg in run.legs if leg.system != REST]
    assert what_bounds(run, TEI_TARGETS[3]) == ""  # no REST leg at 16 callers
    table = render_issue22(run)
    assert "| what bounds it |" in table.splitlines()[2]
    assert "an RPC that does nothing: 1.25 ms" in table


def test_no_targets_plot_without_tei(tmp_path: Path) -> None:
    from bench.report import plot_targets

    run = BenchRun(cpu_model="c", cores=2, quick=True, date="d", command="c")
    run.legs = [leg for leg in PEER_LEGS if leg.system != TEI]
    assert plot_targets(run, tmp_path / "t.png") is False
    assert not (tmp_path / "t.png").exists()


def test_issue_22_targets_are_unknown_without_tei() -> None:
    legs = [leg for leg in PEER_LEGS if leg.system != TEI]
    targets = evaluate_tei_targets(legs, "sentences", {GRPC: 300.0})
    assert len(targets) == 6
    assert all(t.met is None and t.measured == "not measured" for t in targets)


def test_the_comparison_table_has_a_column_per_system_and_a_row_per_leg() -> None:
    run = BenchRun(cpu_model="Test CPU", cores=2, quick=True, date="d", command="make bench")
    run.legs = PEER_LEGS
    run.stsb = {GRPC: 82.03, REST: 82.03, TEI: 82.04}
    run.memory_after = {GRPC: 300.0, REST: 300.0, TEI: 180.0}
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
    assert lines[8].startswith("| server memory after the load, MiB | 300 | 300 | 180 | — |")
    assert lines[9].startswith("| STS-B, Spearman x100 of cosines | 82.03 | 82.03 | 82.04 | — |")


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
    assert "## Issue 22 targets (against TEI, same run, sentences)" in text
    assert "| 16 callers x 1 text, gRPC | ≥ 1x TEI | 1.22x (500 vs 410 texts/s) | met |" in text
    assert (
        "| memory after the load (PSS: server, workers, Envoy) | ≤ 1.5x TEI's | not measured"
        in text
    )
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
        def load(self, requests: Path, concurrency: int, seconds: float) -> LoadResult:
            per_request = int(requests.stem)
            calls.append((self.name, concurrency, per_request))
            return LoadResult(64 // per_request, 0, 0.01, 0.001, 0.002, "", "fake")

        def requests_file(self, text_set: TextSet, per_request: int) -> Path:
            return Path(f"{per_request}.json")

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


def test_memory_after_the_load_is_each_servers_pss_and_a_missing_generator_skips_its_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from bench import __main__ as bench_main
    from bench.loadgen import Endpoint

    ghz = tmp_path / "ghz"
    ghz.write_text("")
    monkeypatch.setattr(bench_main, "GHZ", ghz)
    monkeypatch.setattr(bench_main, "VEGETA", tmp_path / "absent" / "vegeta")
    run = BenchRun(cpu_model="c", cores=2, quick=True, date="d", command="c")
    grpc = bench_main.System(GRPC, os.getpid(), grpc_target="127.0.0.1:1")
    rest = bench_main.System(REST, os.getpid(), endpoint=Endpoint("http://h:1", "/v1/e", "m"))
    assert bench_main.with_generators(run, [grpc, rest]) == [grpc]
    absent = tmp_path / "absent" / "vegeta"
    assert run.notes == [f"embedd REST (Envoy): not measured, no {absent} (`make vegeta`)"]
    bench_main.measure_memory_after(run, [grpc])
    # This process's PSS (psutil's memory_full_info().pss), summed over its tree: a Python
    # interpreter with numpy loaded holds more than a few MiB.
    assert set(run.memory_after) == {GRPC} and run.memory_after[GRPC] > 5


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
