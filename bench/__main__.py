"""``python -m bench`` (``make bench``): embedd and its peers in one run on this machine.

1. The engines in-process, no server: llama.cpp and ONNX Runtime in every configuration worth
   trying (the ceiling of each, and so what embedd's engine=auto choice rests on), and one
   text at a time.
2. The floor: a gRPC server that does nothing, under ghz (when ``.tools/bin/ghz`` exists).
3. The servers, every one on its defaults and all of them up at once: embedd (`embedd run`:
   gRPC and REST through Envoy), embedd with ``--int8``, and each peer installed here (TEI,
   Infinity, Ollama, llama-cpp-python's server; bench/peers.py says how each is found). The
   legs (1 caller x 1 text, 16 callers x 1 text, 4 callers x 32 texts) run interleaved:
   every system in turn on one leg before the next leg, as this machine's speed drifts over
   minutes; ghz loads gRPC and vegeta every REST server (bench/loadgen.py). Then each
   server's memory after the load (PSS over its process tree), embedd's EmbedStream, and
   the STS-B score of each server's vectors.

The first 1,200 STS-B test sentences and ~200-token passages built from consecutive
sentences. Prints the tables and writes docs/benchmarks/latest.md and latest.png.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench import ceiling, lanes, loadgen, peers, procs, quality, report
from bench.loadgen import Endpoint
from bench.report import GRPC, GRPC_INT8, REST, STREAM, BenchRun, Leg
from bench.texts import REPO, TextSet, load_text_sets

DEFAULT_MODEL = REPO / "models" / "all-minilm-l6-v2.gguf"
GHZ = REPO / ".tools" / "bin" / "ghz"
VEGETA = REPO / ".tools" / "bin" / "vegeta"
OUT_DIR = REPO / "docs" / "benchmarks"
MODEL_NAME = "all-minilm-l6-v2"
SENTENCES = 1200  # the "same 1,200 STS-B sentences": the first ones of the test split
STREAM_BATCH = 64
PAUSE_S = 0.004  # about a lone caller's round trip between two requests
LLAMA_EMBED_TEXTS = 500  # llama-cpp-python's own API is a reference row: fewer texts
RSS_INTERVAL_S = 0.5
T = TypeVar("T")
NO_CACHE = ("--cache-mb", "0")

# What a run can be limited to with --only.
CEILING, FLOOR, EMBEDD, INT8, LANES = "ceiling", "floor", "embedd", "int8", "lanes"
TEI, INFINITY, OLLAMA, LLAMA_SERVER = "tei", "infinity", "ollama", "llama-cpp-python"
PARTS = (CEILING, FLOOR, EMBEDD, INT8, LANES, TEI, INFINITY, OLLAMA, LLAMA_SERVER)
# The bulk pack sizes the lanes part tries (the first is the server's default).
LANES_BULK_BATCH_TOKENS = (64, 256)
PEER_PARTS = {
    peers.TEI: TEI,
    peers.INFINITY: INFINITY,
    peers.OLLAMA: OLLAMA,
    peers.LLAMA_SERVER: LLAMA_SERVER,
}


@dataclass(frozen=True)
class Profile:
    """How much of everything a run does."""

    ceiling_s: float  # each in-process configuration runs this long
    ceiling_texts: dict[str, int]  # ... on the text set cycled to this many texts
    one_text_samples: dict[str, int]
    leg_s: float  # closed-loop seconds per leg
    warmup_s: float  # before each leg, the same load
    stream_texts: dict[str, int]
    stsb_pairs: int | None  # None: all 1,379


FULL = Profile(
    ceiling_s=6.0,
    ceiling_texts={"sentences": 12_000, "passages": 1_500},
    one_text_samples={"sentences": 300, "passages": 40},
    leg_s=6.0,
    warmup_s=1.0,
    stream_texts={"sentences": 10_000, "passages": 640},
    stsb_pairs=None,
)
QUICK = Profile(
    ceiling_s=1.5,
    ceiling_texts={"sentences": 3_000, "passages": 300},
    one_text_samples={"sentences": 100, "passages": 10},
    leg_s=1.5,
    warmup_s=0.3,
    stream_texts={"sentences": 1_000, "passages": 64},
    stsb_pairs=200,
)


def _say(text: str) -> None:
    print(text, flush=True)


# --- the engines in-process ----------------------------------------------------------------


def _cycled(text_set: TextSet, count: int) -> TextSet:
    """The text set's texts in turn until there are ``count`` of them."""
    rows = list(itertools.islice(itertools.cycle(range(len(text_set.texts))), count))
    return TextSet(
        text_set.name,
        [text_set.texts[row] for row in rows],
        [text_set.token_ids[row] for row in rows],
    )


def measure_ceiling(run: BenchRun, model: Path, text_set: TextSet, profile: Profile) -> None:
    """Every configuration of both engines, each for ``profile.ceiling_s`` on the texts in
    turn (so that no configuration runs out of texts and idles a thread at the end)."""
    sample = _cycled(text_set, profile.ceiling_texts[text_set.name])
    results: list[ceiling.CeilingResult] = []
    long_texts = sample.mean_tokens > 128
    for engine in ceiling.ENGINES:
        for config in ceiling.configurations(engine, long_texts):
            with procs.CpuMeter(None) as meter:
                done, seconds = ceiling.measure_configuration(
                    model, sample.token_ids, config, profile.ceiling_s
                )
            tokens = sum(len(ids) for ids in sample.token_ids[:done])
            result = ceiling.CeilingResult(
                config.label,
                config.layout,
                config.pack_tokens,
                done,
                tokens,
                seconds,
                meter.cores(meter.other_cpu),
                engine=config.engine,
                int8=config.int8,
            )
            results.append(result)
            _say(
                f"  ceiling {text_set.name:9} {result.engine_label:16} {config.layout:28} "
                f"{config.label:16} {report.fmt_rate(result.texts_per_s):>6} texts/s  "
                f"others {result.other_cores:.2f}"
            )
    if not long_texts:
        with procs.CpuMeter(None) as meter:
            done, seconds = ceiling.run_llama_embed(
                model, sample.texts[:LLAMA_EMBED_TEXTS], 2, profile.ceiling_s
            )
        tokens = sum(len(ids) for ids in sample.token_ids[:done])
        result = ceiling.CeilingResult(
            "Llama.embed, 32 texts/call",
            "1 ctx x 2 threads",
            -1,
            done,
            tokens,
            seconds,
            meter.cores(meter.other_cpu),
        )
        results.append(result)
        _say(
            f"  ceiling {text_set.name:9} {'llama.cpp':16} {'Llama.embed (its API)':28} "
            f"{'32 texts/call':16} {report.fmt_rate(result.texts_per_s):>6} texts/s"
        )
    run.ceiling[text_set.name] = results


def measure_one_text(
    run: BenchRun, model: Path, text_set: TextSet, profile: Profile, encode: ceiling.Encode
) -> None:
    samples = profile.one_text_samples[text_set.name]
    for engine in ceiling.ENGINES:
        latency = ceiling.single_text_latency(model, text_set.texts, encode, samples, engine=engine)
        run.one_text[f"{engine}, {text_set.name}"] = latency
        _say(
            f"  one {text_set.name[:-1]} in-process, {engine}: p50 {latency.p50_ms:.2f} ms, "
            f"p99 {latency.p99_ms:.2f} ms"
        )
    if text_set.name == report.TARGET_SET:  # what a lone caller's pauses cost the engine
        engine = run.serving_engine
        paused = ceiling.single_text_latency(
            model, text_set.texts, encode, samples, pause_s=PAUSE_S, engine=engine
        )
        name = f"{engine}, {text_set.name}, {PAUSE_S * 1000:g} ms pause before each"
        run.one_text[name] = paused
        _say(f"  the same on {engine} after a {PAUSE_S * 1000:g} ms pause: p50 {paused.p50_ms:.2f}")


class References:
    """In-process references re-measured just before an embedd leg that issue 4's targets
    compare with the engine: this machine's speed drifts over minutes (one text took 3.6-4.1
    ms in some minutes and 7-8 ms in others of the same session, with nothing else running),
    so a ratio to a ceiling measured minutes earlier can be off by more than the gaps being
    measured."""

    SECONDS = 3.0
    ONE_TEXT_SAMPLES = 100

    def __init__(
        self, run: BenchRun, model: Path, encode: ceiling.Encode, profile: Profile
    ) -> None:
        self._run = run
        self._model = model
        self._encode = encode
        self._profile = profile

    def ceiling_now(self, text_set: TextSet) -> float | None:
        """The serving engine's best configuration of ``text_set``, run again briefly."""
        best = self._run.best_ceiling(text_set.name)
        if best is None:
            return None
        sample = _cycled(text_set, self._profile.ceiling_texts[text_set.name])
        done, seconds = ceiling.measure_configuration(
            self._model, sample.token_ids, best.configuration(), self.SECONDS
        )
        rate = done / seconds if seconds > 0 else None
        _say(f"    ceiling re-measured: {report.fmt_rate(rate or 0)} texts/s")
        return rate

    def one_text_now(self, text_set: TextSet) -> float | None:
        """One text's in-process p50 in ms on the serving engine, measured again."""
        if not self._run.one_text:
            return None
        latency = ceiling.single_text_latency(
            self._model,
            text_set.texts,
            self._encode,
            self.ONE_TEXT_SAMPLES,
            engine=self._run.serving_engine,
        )
        _say(f"    one text in-process re-measured: p50 {latency.p50_ms:.2f} ms")
        return latency.p50_ms

    def for_leg(
        self, system: str, text_set: TextSet, concurrency: int, per_request: int
    ) -> float | None:
        """The reference issue 4 compares this leg with: embedd gRPC on sentences, one text
        a request, at 1 caller (one text's p50) or 16 (the ceiling); else none."""
        if system != GRPC or text_set.name != report.TARGET_SET or per_request != 1:
            return None
        if concurrency == 1:
            return self.one_text_now(text_set)
        if concurrency == 16:
            return self.ceiling_now(text_set)
        return None


def write_ghz_data(name: str, messages: Sequence[Sequence[str]]) -> Path:
    """ghz's data file of these requests, .bench/ghz/<name>.json."""
    data = procs.ensure_bench_dir() / "ghz" / f"{name}.json"
    data.parent.mkdir(exist_ok=True)
    data.write_text(loadgen.ghz_data(messages), encoding="utf-8")
    return data


# --- the floor ---------------------------------------------------------------------------

FLOOR_TARGET = 0.85  # the pace of the floor leg: the c=16 target, as a share of the ceiling


def measure_floor(run: BenchRun, text_set: TextSet, profile: Profile) -> None:
    """The do-nothing server under ghz at 16 callers, paced at the c=16 target's rate."""
    best = run.best_ceiling(text_set.name)
    if best is None:
        _say("  no ceiling measured in this run: no pace for the floor, skipped")
        return
    rate = FLOOR_TARGET * best.texts_per_s
    messages, _ = _messages(text_set, 1)
    data = write_ghz_data(f"floor-{text_set.name}", messages)
    with procs.Children() as children:
        server = children.add_embedd(procs.start_floor())
        loadgen.run_ghz(GHZ, server.grpc_target, data, 4, profile.warmup_s)
        with procs.CpuMeter(server.child.pid) as meter:
            load = loadgen.run_ghz(GHZ, server.grpc_target, data, 16, profile.leg_s, rps=rate)
        # A lone caller, unpaced: the latency of an RPC that computes nothing.
        lone = loadgen.run_ghz(GHZ, server.grpc_target, data, 1, profile.leg_s / 2)
    run.floor = report.Floor(
        cores=run.cores,
        target=FLOOR_TARGET,
        requests_per_s=load.requests / load.seconds if load.seconds else 0.0,
        server_cores=meter.cores(meter.server_cpu),
        generator_cores=meter.cores(meter.children_cpu),
        lone_p50_ms=lone.p50_s * 1000 if lone.p50_s is not None else None,
    )
    _say(
        f"  floor (do-nothing gRPC server, ghz c=16 at {rate:.0f} req/s): server "
        f"{run.floor.server_cores:.2f} cores, ghz {run.floor.generator_cores:.2f} cores, "
        f"best reachable ratio {report.fmt_ratio(run.floor.best_ratio)}; one caller: p50 "
        f"{report.fmt_ms(run.floor.lone_p50_ms)} ms"
    )


# --- the servers ---------------------------------------------------------------------------


def _messages(text_set: TextSet, per_request: int) -> tuple[list[list[str]], float]:
    """Requests of ``per_request`` consecutive texts, and the mean tokens of a text in them."""
    count = max(1, len(text_set.texts) // per_request) * per_request
    texts = text_set.texts[:count]
    counts = text_set.token_counts[:count]
    messages = [texts[i : i + per_request] for i in range(0, count, per_request)]
    return messages, sum(counts) / len(counts)


@dataclass
class System:
    """One column of the comparison: a server process and how the load reaches it: ghz with
    ``Embed`` messages over gRPC, or vegeta with OpenAI-shaped POSTs over REST."""

    name: str
    pid: int
    grpc_target: str | None = None
    endpoint: Endpoint | None = None
    _files: dict[tuple[str, int], Path] = field(default_factory=dict, repr=False)

    @property
    def generator(self) -> Path:
        return VEGETA if self.endpoint is not None else GHZ

    def requests_file(self, text_set: TextSet, per_request: int) -> Path:
        """The leg's requests, written once: vegeta's targets or ghz's messages."""
        key = (text_set.name, per_request)
        if key not in self._files:
            messages, _ = _messages(text_set, per_request)
            name = f"{text_set.name}-{per_request}"
            if self.endpoint is not None:
                self._files[key] = write_vegeta_targets(
                    f"{slug(self.name)}-{name}", self.endpoint, messages
                )
            else:
                self._files[key] = write_ghz_data(name, messages)
        return self._files[key]

    def load(self, requests: Path, concurrency: int, seconds: float) -> loadgen.LoadResult:
        if self.endpoint is not None:
            return loadgen.run_vegeta(VEGETA, requests, concurrency, seconds)
        assert self.grpc_target is not None
        return loadgen.run_ghz(GHZ, self.grpc_target, requests, concurrency, seconds)


def slug(name: str) -> str:
    """A file name's part for a system's name."""
    return "-".join(part for part in re.split(r"[^a-z0-9]+", name.lower()) if part)


def write_vegeta_targets(name: str, endpoint: Endpoint, messages: Sequence[Sequence[str]]) -> Path:
    """vegeta's targets file of these requests, .bench/vegeta/<name>.jsonl."""
    targets = procs.ensure_bench_dir() / "vegeta" / f"{name}.jsonl"
    targets.parent.mkdir(exist_ok=True)
    targets.write_text(loadgen.vegeta_targets(endpoint, messages), encoding="utf-8")
    return targets


def _leg_from(
    load: loadgen.LoadResult,
    meter: procs.CpuMeter,
    *,
    system: str,
    text_set: str,
    concurrency: int,
    per_request: int,
    mean_tokens: float,
    generator_cpu: float,
    reference: float | None = None,
    rss_mib: float | None = None,
) -> Leg:
    notes = [
        f"of which Envoy {meter.cores(meter.helper_cpu):.2f} cores" if meter.helper_cpu else "",
        f"first error: {load.first_error}" if load.first_error else "",
    ]
    return Leg(
        system=system,
        text_set=text_set,
        concurrency=concurrency,
        texts_per_request=per_request,
        texts=load.requests * per_request,
        errors=load.errors,
        seconds=load.seconds,
        mean_tokens=mean_tokens,
        p50_ms=None if load.p50_s is None else load.p50_s * 1000,
        p99_ms=None if load.p99_s is None else load.p99_s * 1000,
        generator=load.generator,
        generator_cores=meter.cores(generator_cpu),
        server_cores=meter.cores(meter.server_cpu),
        loop_cores=meter.cores(meter.main_thread_cpu),
        helper_cores=meter.cores(meter.helper_cpu),
        other_cores=meter.cores(meter.other_cpu),
        note="; ".join(note for note in notes if note),
        reference=reference,
        rss_mib=rss_mib,
    )


def _print_leg(leg: Leg) -> None:
    rss = "" if leg.rss_mib is None else f", memory {leg.rss_mib:.0f} MiB"
    _say(
        f"  {leg.system:24} {leg.text_set:9} c={leg.concurrency:<3} x{leg.texts_per_request:<3}"
        f" {report.fmt_rate(leg.texts_per_s):>6} texts/s  p50 {report.fmt_ms(leg.p50_ms):>6} ms"
        f"  p99 {report.fmt_ms(leg.p99_ms):>6} ms  errors {leg.errors}"
        f"  {leg.generator} {leg.generator_cores:.2f} cores, server {leg.server_cores:.2f}"
        f" (main thread {leg.loop_cores:.2f}){rss}, others {leg.other_cores:.2f}"
        + (f"  [{leg.note}]" if leg.errors else "")
    )


def measure_leg(
    system: System,
    text_set: TextSet,
    concurrency: int,
    per_request: int,
    profile: Profile,
    *,
    reference: float | None = None,
) -> Leg:
    """One closed-loop leg on one system, after a short warm-up with the same load (which
    also loads a model a server unloaded while the other systems ran)."""
    requests = system.requests_file(text_set, per_request)
    _, mean_tokens = _messages(text_set, per_request)
    system.load(requests, concurrency, profile.warmup_s)
    with (
        procs.RssSampler(system.pid, RSS_INTERVAL_S, tree=True) as rss,
        procs.CpuMeter(system.pid) as meter,
    ):
        load = system.load(requests, concurrency, profile.leg_s)
    return _leg_from(
        load,
        meter,
        system=system.name,
        text_set=text_set.name,
        concurrency=concurrency,
        per_request=per_request,
        mean_tokens=mean_tokens,
        generator_cpu=meter.children_cpu,  # ghz and vegeta: reaped children of this process
        reference=reference,
        rss_mib=max(rss.samples) if rss.samples else None,
    )


def rotations(systems: Sequence[T], legs: int) -> Iterator[list[T]]:
    """The order of the systems on each leg: rotated by one from leg to leg, so that no
    system always runs first or right after the same other one."""
    for number in range(legs):
        shift = number % len(systems) if systems else 0
        yield [*systems[shift:], *systems[:shift]]


def interleaved_legs(
    run: BenchRun,
    systems: Sequence[System],
    text_sets: Sequence[TextSet],
    profile: Profile,
    references: References | None,
) -> None:
    """Every leg on every system, each leg on all systems before the next leg."""
    plans = [(text_set, shape) for text_set in text_sets for shape in report.LEG_SHAPES]
    for (text_set, (concurrency, per_request)), order in zip(
        plans, rotations(systems, len(plans)), strict=True
    ):
        _say(f" {text_set.name}, {report.leg_label(concurrency, per_request)}:")
        for system in order:
            reference = (
                references.for_leg(system.name, text_set, concurrency, per_request)
                if references
                else None
            )
            leg = measure_leg(
                system, text_set, concurrency, per_request, profile, reference=reference
            )
            run.legs.append(leg)
            _print_leg(leg)


def stream_leg(
    run: BenchRun,
    server: procs.Embedd,
    text_set: TextSet,
    count: int,
    reference: float | None = None,
) -> None:
    from embedd import Client

    counts = text_set.token_counts
    mean_tokens = sum(counts[i % len(counts)] for i in range(count)) / count
    texts = itertools.islice(itertools.cycle(text_set.texts), count)
    rss_before = procs.tree_pss_mib(server.child.pid)
    done = 0
    with (
        Client(server.grpc_target, timeout=300) as client,
        procs.RssSampler(server.child.pid, RSS_INTERVAL_S, tree=True) as rss,
        procs.CpuMeter(server.child.pid) as meter,
    ):
        for batch in client.embed_stream(texts, batch_size=STREAM_BATCH, timeout=900):
            done += len(batch)
    samples = rss.samples or [rss_before]
    leg = Leg(
        system=STREAM,
        text_set=text_set.name,
        concurrency=1,
        texts_per_request=STREAM_BATCH,
        texts=done,
        errors=count - done,
        seconds=meter.seconds,
        mean_tokens=mean_tokens,
        generator="embedd.Client",
        generator_cores=meter.cores(meter.own_cpu),
        server_cores=meter.cores(meter.server_cpu),
        loop_cores=meter.cores(meter.main_thread_cpu),
        helper_cores=meter.cores(meter.helper_cpu),
        other_cores=meter.cores(meter.other_cpu),
        note=(
            f"{count:,} texts, one stream; server memory {rss_before:.0f} MiB before, "
            f"{min(samples):.0f}-{max(samples):.0f} MiB during ({len(samples)} samples)"
        ),
        reference=reference,
        rss_mib=max(samples),
    )
    run.legs.append(leg)
    _print_leg(leg)
    _say(f"    {leg.note}")


@dataclass
class Servers:
    """The servers of a run, started, and each one's systems."""

    systems: list[System] = field(default_factory=list)
    embedd: procs.Embedd | None = None
    stsb: list[tuple[str, Endpoint]] = field(default_factory=list)  # (system, its REST)


def start_servers(
    run: BenchRun,
    children: procs.Children,
    model: Path,
    parts: set[str],
    found: Sequence[peers.Peer | peers.Missing],
) -> Servers:
    """embedd (default, and --int8) and the peers found, all started before any leg."""
    servers = Servers()
    if EMBEDD in parts:
        # The vector cache off: these legs repeat their texts, so with it they would measure
        # cache hits, not the computation the peers do (bench/lanes.py measures the cache).
        server = children.add_embedd(
            procs.start_embedd(model.parent, with_envoy=True, extra=NO_CACHE)
        )
        servers.embedd = server
        endpoint = Endpoint(server.rest_url or "", "/v1/embeddings", MODEL_NAME)
        servers.systems += [
            System(GRPC, server.child.pid, grpc_target=server.grpc_target),
            System(REST, server.child.pid, endpoint=endpoint),
        ]
        servers.stsb.append((GRPC, endpoint))
        _say(f"  embedd run (engine=auto: {run.serving_engine}) pid {server.child.pid}")
    if INT8 in parts:
        server = children.add_embedd(
            procs.start_embedd(
                model.parent,
                with_envoy=True,
                name="embedd-run-int8",
                extra=["--int8", *NO_CACHE],
            )
        )
        servers.systems.append(System(GRPC_INT8, server.child.pid, grpc_target=server.grpc_target))
        servers.stsb.append(
            (GRPC_INT8, Endpoint(server.rest_url or "", "/v1/embeddings", MODEL_NAME))
        )
        _say(f"  embedd run --int8 pid {server.child.pid}")
    for peer in found:
        if not isinstance(peer, peers.Peer):
            continue
        system = report.PEER if peer.system == peers.LLAMA_SERVER else peer.system
        try:
            child, endpoint = peer.launch()
        except (OSError, RuntimeError, TimeoutError, ValueError) as error:
            reason = str(error).splitlines()[0][:300]
            _say(f"  {peer.system} failed to start, skipped: {reason}")
            run.peers.append(f"{peer.system} {peer.version}: **failed to start** ({reason})")
            continue
        children.add(child)
        servers.systems.append(System(system, child.pid, endpoint=endpoint))
        servers.stsb.append((system, endpoint))
        _say(
            f"  {peer.system} {peer.version} pid {child.pid} at {endpoint.base_url}{endpoint.route}"
        )
    return servers


def with_generators(run: BenchRun, systems: Sequence[System]) -> list[System]:
    """The systems whose load generator is installed; the others skipped with the reason."""
    kept = []
    for system in systems:
        if system.generator.exists():
            kept.append(system)
            continue
        why = f"{system.name}: not measured, no {system.generator} (`make {system.generator.name}`)"
        _say(f"  {why}")
        run.notes.append(why)
    return kept


def measure_memory_after(run: BenchRun, systems: Sequence[System]) -> None:
    """Each server's memory once every leg has run: PSS summed over its process tree (the
    server, its worker processes, Envoy), psutil's ``memory_full_info().pss``."""
    for system in systems:
        run.memory_after[system.name] = procs.tree_pss_mib(system.pid)
        _say(f"  {system.name:24} {run.memory_after[system.name]:.0f} MiB")


def measure_stsb(run: BenchRun, servers: Servers, profile: Profile) -> None:
    stsb = quality.stsb_pairs(profile.stsb_pairs)
    run.stsb_pairs = len(stsb.scores)
    for system, endpoint in servers.stsb:
        try:
            score = quality.stsb_of(endpoint, stsb)
        except (OSError, ValueError, KeyError) as error:
            _say(f"  STS-B {system}: failed ({error})")
            run.notes.append(f"STS-B of {system} failed: {str(error)[:200]}")
            continue
        run.stsb[system] = score
        if system == GRPC:  # gRPC and REST: one server, one set of vectors
            run.stsb[REST] = score
        _say(f"  STS-B {system}: {score:.2f}")


def measure_servers(
    run: BenchRun,
    model: Path,
    text_sets: Sequence[TextSet],
    profile: Profile,
    *,
    parts: set[str],
    found: Sequence[peers.Peer | peers.Missing],
    references: References | None,
) -> None:
    with procs.Children() as children:
        _say("starting the servers (each on its defaults):")
        servers = start_servers(run, children, model, parts, found)
        if not servers.systems:
            _say("  no server to measure")
            return
        systems = with_generators(run, servers.systems)
        _say("legs, interleaved:")
        interleaved_legs(run, systems, text_sets, profile, references)
        _say("memory after the load (PSS over each server's processes):")
        measure_memory_after(run, systems)
        if servers.embedd is not None:
            _say("embedd EmbedStream:")
            for text_set in text_sets:
                reference = (
                    references.ceiling_now(text_set)
                    if references and text_set.name == report.TARGET_SET
                    else None
                )
                stream_leg(
                    run, servers.embedd, text_set, profile.stream_texts[text_set.name], reference
                )
        if profile.stsb_pairs != 0:
            _say("STS-B from each server's vectors:")
            measure_stsb(run, servers, profile)


# --- the run ------------------------------------------------------------------------------


def _parts(value: str) -> set[str]:
    chosen = {part.strip() for part in value.split(",") if part.strip()}
    unknown = chosen - set(PARTS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}"
        )
    return chosen


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="short legs, for development")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF file")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where latest.md/png go")
    parser.add_argument(
        "--only",
        type=_parts,
        default=set(PARTS),
        help=f"comma-separated parts to run, of: {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--sets",
        default="sentences,passages",
        help="text sets: sentences, passages or both (default)",
    )
    parser.add_argument("--no-peer", action="store_true", help="no peer server at all")
    parser.add_argument("--no-stsb", action="store_true", help="skip the STS-B scores")
    parser.add_argument("--no-ghz", action="store_true", help="skip the floor (ghz) leg")
    return parser.parse_args(list(argv))


def _command_line(argv: Sequence[str]) -> str:
    """How to repeat this run."""
    if not argv:
        return "make bench"
    return "make bench BENCH_ARGS=" + shlex.quote(" ".join(argv))


def find_peers(run: BenchRun, model: Path, parts: set[str]) -> list[peers.Peer | peers.Missing]:
    """The peers this run includes, found (their versions printed) or skipped (why)."""
    wanted = {system for system, part in PEER_PARTS.items() if part in parts}
    if not wanted:
        return []
    if peers.LLAMA_SERVER in wanted:
        installed_s = peers.ensure_peer_venv()
        if installed_s:
            run.notes.append(
                f"llama-cpp-python's venv was installed in this run ({installed_s:.0f}s)."
            )
    found = [
        peer
        for peer in peers.find_peers(model, with_llama_server=peers.LLAMA_SERVER in wanted)
        if peer.system in wanted
    ]
    _say("peers:")
    for peer in found:
        if isinstance(peer, peers.Peer):
            line = f"{peer.system} {peer.version}: {peer.detail}"
        else:
            line = f"{peer.system}: skipped, {peer.reason}"
        _say(f"  {line}")
        run.peers.append(line)
    return found


def _embedd_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("embedd")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _git_commit() -> str:
    """The repository's commit, with "+ changes" when the work tree differs from it."""
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    return commit + (" + changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def _selected_sets(value: str, text_sets: Sequence[TextSet]) -> list[TextSet]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    chosen = [text_set for text_set in text_sets if text_set.name in names]
    if not chosen or len(chosen) != len(names):
        raise SystemExit(f"--sets: choose from {', '.join(t.name for t in text_sets)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    started = time.perf_counter()
    profile = QUICK if args.quick else FULL
    if args.no_stsb:
        profile = Profile(**{**profile.__dict__, "stsb_pairs": 0})
    parts: set[str] = set(args.only)
    if args.no_peer:
        parts -= set(PEER_PARTS.values())
    if args.no_ghz:
        parts.discard(FLOOR)
    model: Path = args.model.resolve()
    procs.ensure_bench_dir()
    run = BenchRun(
        cpu_model=procs.cpu_model(),
        cores=os.cpu_count() or 0,
        quick=args.quick,
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        command=_command_line(arguments),
        serving_engine=ceiling.auto_engine(model),
    )
    _say(
        f"embedd benchmark ({'quick' if args.quick else 'full'}) on {run.cpu_model}, "
        f"{run.cores} cores; parts: {', '.join(p for p in PARTS if p in parts)}; embedd "
        f"serves {model.name} with {run.serving_engine} (engine=auto)"
    )
    if parts & {EMBEDD, INT8}:
        run.peers.append(
            f"embedd {_embedd_version()} ({_git_commit()}): `embedd run` on its defaults "
            f"(engine=auto: {run.serving_engine} for this model; Envoy for REST)"
            + ("; and `embedd run --int8`" if INT8 in parts else "")
        )
    found = find_peers(run, model, parts)
    sentences, passages, tokenizer = load_text_sets(model)
    sentences = sentences.head(SENTENCES)
    text_sets = _selected_sets(args.sets, [sentences, passages])
    run.notes.append(
        f"Texts: the first {len(sentences.texts):,} STS-B test sentences "
        f"({sentences.mean_tokens:.1f} tokens on average) and {len(passages.texts)} passages "
        f"of consecutive sentences ({passages.mean_tokens:.1f} tokens), token counts from the "
        "model's tokenizer."
    )
    _say(run.notes[-1])

    if CEILING in parts:
        _say("the engines in-process (no server):")
        measure_engines(run, model, text_sets, profile, tokenizer.encode_batch)
    if FLOOR in parts and GHZ.exists():
        _say("the floor (a gRPC server that does nothing):")
        measure_floor(run, sentences, profile)
    elif FLOOR in parts:
        _say("the floor: skipped, no .tools/bin/ghz (`make ghz`)")
    references = (
        References(run, model, tokenizer.encode_batch, profile) if CEILING in parts else None
    )
    if parts & {EMBEDD, INT8, *PEER_PARTS.values()}:
        measure_servers(
            run, model, text_sets, profile, parts=parts, found=found, references=references
        )

    if LANES in parts:
        _say("priority lanes and the vector cache (bench/lanes.py):")
        run.notes += lanes.run(model, LANES_BULK_BATCH_TOKENS, profile.leg_s)

    args.out.mkdir(parents=True, exist_ok=True)
    run.seconds = time.perf_counter() - started
    markdown = report.render_markdown(run)
    (args.out / "latest.md").write_text(markdown + "\n", encoding="utf-8")
    report.plot(run, args.out / "latest.png")
    plotted = report.plot_targets(run, args.out / report.TARGETS_PLOT)
    _say("")
    _say(markdown)
    written = "latest.png" + (f" and {report.TARGETS_PLOT}" if plotted else "")
    _say(f"wrote {args.out / 'latest.md'}, {written}; the run took {run.seconds / 60:.1f} min")
    return 0


def measure_engines(
    run: BenchRun,
    model: Path,
    text_sets: Sequence[TextSet],
    profile: Profile,
    encode: ceiling.Encode,
) -> None:
    for text_set in text_sets:
        measure_ceiling(run, model, text_set, profile)
    for text_set in text_sets:
        measure_one_text(run, model, text_set, profile, encode)
    if peers.torch_available():
        tps = peers.sentence_transformers_texts_per_s(text_sets[0].texts[:1000])
        run.sentence_transformers = f"{tps:,.0f} texts/s on {text_sets[0].name} (batch 32)"


if __name__ == "__main__":
    sys.exit(main())
