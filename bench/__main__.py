"""``python -m bench`` (``make bench``): the whole benchmark in one run on this machine.

Engine ceiling in-process, then embedd over gRPC (`embedd serve`), its EmbedStream, embedd
over REST through Envoy (`embedd run`), then llama-cpp-python's own server; STS-B sentences
and ~200-token passages. Prints the tables and writes docs/benchmarks/latest.md and
latest.png.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import ceiling, loadgen, peer, procs, report
from bench.report import GRPC, PEER, REST, STREAM, BenchRun, Leg
from bench.texts import REPO, TextSet, load_text_sets

DEFAULT_MODEL = REPO / "models" / "all-minilm-l6-v2.gguf"
GHZ = REPO / ".tools" / "bin" / "ghz"
OUT_DIR = REPO / "docs" / "benchmarks"
MODEL_NAME = "all-minilm-l6-v2"
CONCURRENCIES = (1, 4, 16, 64)
BATCH_TEXTS = 32
BATCH_CONCURRENCY = 4
STREAM_BATCH = 64
PAUSE_S = 0.004  # about a lone ghz caller's round trip between two requests
LLAMA_EMBED_TEXTS = 500  # llama-cpp-python's own API is a reference row: fewer texts


@dataclass(frozen=True)
class Profile:
    """How much of everything a run does."""

    ceiling_texts: dict[str, int]  # texts per ceiling configuration
    ceiling_max_s: float  # a configuration stops taking work after this
    one_text_samples: dict[str, int]
    leg_s: float  # closed-loop seconds per leg
    warmup_s: float
    stream_texts: dict[str, int]


FULL = Profile(
    ceiling_texts={"sentences": 1500, "passages": 160},
    ceiling_max_s=12.0,
    one_text_samples={"sentences": 300, "passages": 40},
    leg_s=8.0,
    warmup_s=1.5,
    stream_texts={"sentences": 10_000, "passages": 640},
)
QUICK = Profile(
    ceiling_texts={"sentences": 300, "passages": 30},
    ceiling_max_s=4.0,
    one_text_samples={"sentences": 100, "passages": 10},
    leg_s=2.0,
    warmup_s=0.5,
    stream_texts={"sentences": 1_000, "passages": 64},
)


def _say(text: str) -> None:
    print(text, flush=True)


# --- engine ceiling -----------------------------------------------------------------------


def measure_ceiling(run: BenchRun, model: Path, text_set: TextSet, profile: Profile) -> None:
    sample = text_set.head(profile.ceiling_texts[text_set.name])
    results: list[ceiling.CeilingResult] = []
    long_texts = sample.mean_tokens > 128
    for layout, label, pack_tokens in ceiling.configurations(long_texts):
        with procs.CpuMeter(None) as meter:
            done, seconds = ceiling.measure_configuration(
                model, sample.token_ids, layout, pack_tokens, profile.ceiling_max_s
            )
        tokens = sum(len(ids) for ids in sample.token_ids[:done])
        result = ceiling.CeilingResult(
            label, layout, pack_tokens, done, tokens, seconds, meter.cores(meter.other_cpu)
        )
        results.append(result)
        _say(
            f"  ceiling {text_set.name:9} {layout:26} {label:16} "
            f"{report.fmt_rate(result.texts_per_s):>6} texts/s  others {result.other_cores:.2f}"
        )
    if not long_texts:
        with procs.CpuMeter(None) as meter:
            done, seconds = ceiling.run_llama_embed(
                model, sample.texts[:LLAMA_EMBED_TEXTS], 2, profile.ceiling_max_s
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
            f"  ceiling {text_set.name:9} {'Llama.embed (its API)':26} {'32 texts/call':16} "
            f"{report.fmt_rate(result.texts_per_s):>6} texts/s"
        )
    run.ceiling[text_set.name] = results


def measure_one_text(
    run: BenchRun, model: Path, text_set: TextSet, profile: Profile, encode: ceiling.Encode
) -> None:
    latency = ceiling.single_text_latency(
        model, text_set.texts, encode, profile.one_text_samples[text_set.name]
    )
    run.one_text[text_set.name] = latency
    _say(
        f"  one {text_set.name[:-1]} in-process: p50 {latency.p50_ms:.2f} ms, "
        f"p99 {latency.p99_ms:.2f} ms"
    )
    if text_set.name == report.TARGET_SET:  # what a lone caller's pauses cost the engine
        paused = ceiling.single_text_latency(
            model, text_set.texts, encode, profile.one_text_samples[text_set.name], PAUSE_S
        )
        run.one_text[f"{text_set.name}, {PAUSE_S * 1000:g} ms pause before each"] = paused
        _say(f"  the same after a {PAUSE_S * 1000:g} ms pause each: p50 {paused.p50_ms:.2f} ms")


class References:
    """In-process references re-measured just before a target leg: this machine's speed
    drifts over minutes (one text took 3.6-4.1 ms in some minutes and 7-8 ms in others of
    the same session, with nothing else running), so a ratio to a ceiling measured minutes
    earlier can be off by more than the gaps being measured."""

    SECONDS = 3.0
    ONE_TEXT_SAMPLES = 100

    def __init__(self, run: BenchRun, model: Path, encode: ceiling.Encode) -> None:
        self._run = run
        self._model = model
        self._encode = encode

    def ceiling_now(self, text_set: TextSet, profile: Profile) -> float | None:
        """The best ceiling configuration of ``text_set``, run again for a few seconds."""
        best = self._run.best_ceiling(text_set.name)
        if best is None:
            return None
        sample = text_set.head(profile.ceiling_texts[text_set.name])
        done, seconds = ceiling.measure_configuration(
            self._model, sample.token_ids, best.layout, best.pack_tokens, self.SECONDS
        )
        rate = done / seconds if seconds > 0 else None
        _say(f"    ceiling re-measured: {report.fmt_rate(rate or 0)} texts/s")
        return rate

    def one_text_now(self, text_set: TextSet) -> float:
        """One text's in-process p50 in ms, measured again."""
        latency = ceiling.single_text_latency(
            self._model, text_set.texts, self._encode, self.ONE_TEXT_SAMPLES
        )
        _say(f"    one text in-process re-measured: p50 {latency.p50_ms:.2f} ms")
        return latency.p50_ms


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
        return
    rate = FLOOR_TARGET * best.texts_per_s
    messages, _ = _messages(text_set, 1)
    data = write_ghz_data(f"floor-{text_set.name}", messages)
    with procs.Children() as children:
        server = children.add_embedd(procs.start_floor())
        loadgen.run_ghz(GHZ, server.grpc_target, data, 4, profile.warmup_s)
        with procs.CpuMeter(server.child.pid) as meter:
            load = loadgen.run_ghz(GHZ, server.grpc_target, data, 16, profile.leg_s, rps=rate)
    run.floor = report.Floor(
        cores=run.cores,
        target=FLOOR_TARGET,
        requests_per_s=load.requests / load.seconds if load.seconds else 0.0,
        server_cores=meter.cores(meter.server_cpu),
        generator_cores=meter.cores(meter.children_cpu),
    )
    _say(
        f"  floor (do-nothing gRPC server, ghz c=16 at {rate:.0f} req/s): server "
        f"{run.floor.server_cores:.2f} cores, ghz {run.floor.generator_cores:.2f} cores, "
        f"best reachable ratio {report.fmt_ratio(run.floor.best_ratio)}"
    )


# --- load legs ----------------------------------------------------------------------------


def _messages(text_set: TextSet, per_request: int) -> tuple[list[list[str]], float]:
    """Requests of ``per_request`` consecutive texts, and the mean tokens of a text in them."""
    count = max(1, len(text_set.texts) // per_request) * per_request
    texts = text_set.texts[:count]
    counts = text_set.token_counts[:count]
    messages = [texts[i : i + per_request] for i in range(0, count, per_request)]
    return messages, sum(counts) / len(counts)


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
) -> Leg:
    latencies = load.latencies
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
        p50_ms=report.percentile(latencies, 50) * 1000 if latencies else None,
        p99_ms=report.percentile(latencies, 99) * 1000 if latencies else None,
        generator=load.generator,
        generator_cores=meter.cores(generator_cpu),
        server_cores=meter.cores(meter.server_cpu),
        loop_cores=meter.cores(meter.main_thread_cpu),
        other_cores=meter.cores(meter.other_cpu),
        note="; ".join(note for note in notes if note),
        reference=reference,
    )


def _print_leg(leg: Leg) -> None:
    _say(
        f"  {leg.system:24} {leg.text_set:9} c={leg.concurrency:<3} x{leg.texts_per_request:<3}"
        f" {report.fmt_rate(leg.texts_per_s):>6} texts/s  p50 {report.fmt_ms(leg.p50_ms):>6} ms"
        f"  p99 {report.fmt_ms(leg.p99_ms):>6} ms  errors {leg.errors}"
        f"  {leg.generator} {leg.generator_cores:.2f} cores, server {leg.server_cores:.2f}"
        f" (loop {leg.loop_cores:.2f}), others {leg.other_cores:.2f}"
    )


class GrpcLegs:
    """gRPC Embed legs: ghz when installed, else the asyncio generator."""

    def __init__(self, server: procs.Embedd, use_ghz: bool) -> None:
        self.server = server
        self.use_ghz = use_ghz
        self._data: dict[str, Path] = {}  # ghz data files written in this run, by name

    def load(
        self, name: str, messages: Sequence[Sequence[str]], concurrency: int, seconds: float
    ) -> tuple[loadgen.LoadResult, procs.CpuMeter, float]:
        if self.use_ghz:
            if name not in self._data:
                self._data[name] = write_ghz_data(name, messages)
            data = self._data[name]
            with procs.CpuMeter(self.server.child.pid) as meter:
                load = loadgen.run_ghz(GHZ, self.server.grpc_target, data, concurrency, seconds)
            return load, meter, meter.children_cpu
        requests = loadgen.embed_requests(messages)
        with procs.CpuMeter(self.server.child.pid) as meter:
            load = loadgen.grpc_load(self.server.grpc_target, requests, concurrency, seconds)
        return load, meter, meter.own_cpu


def _reference_for(
    references: References | None, text_set: TextSet, profile: Profile, concurrency: int
) -> float | None:
    """The in-process reference a target leg is compared with (sentences at 1 and 16)."""
    if references is None or text_set.name != report.TARGET_SET:
        return None
    if concurrency == 1:
        return references.one_text_now(text_set)
    if concurrency == 16:
        return references.ceiling_now(text_set, profile)
    return None


def grpc_legs(
    run: BenchRun,
    legs: GrpcLegs,
    text_set: TextSet,
    profile: Profile,
    references: References | None = None,
) -> None:
    plans = [(c, 1) for c in CONCURRENCIES] + [(BATCH_CONCURRENCY, BATCH_TEXTS)]
    warm_messages, _ = _messages(text_set, 1)
    legs.load(f"{text_set.name}-1", warm_messages, 4, profile.warmup_s)
    for concurrency, per_request in plans:
        reference = _reference_for(
            references, text_set, profile, concurrency if per_request == 1 else 0
        )
        messages, mean_tokens = _messages(text_set, per_request)
        load, meter, generator_cpu = legs.load(
            f"{text_set.name}-{per_request}", messages, concurrency, profile.leg_s
        )
        leg = _leg_from(
            load,
            meter,
            system=GRPC,
            text_set=text_set.name,
            concurrency=concurrency,
            per_request=per_request,
            mean_tokens=mean_tokens,
            generator_cpu=generator_cpu,
            reference=reference,
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
    rss_before = procs.rss_mib(server.child.pid)
    done = 0
    with (
        Client(server.grpc_target, timeout=300) as client,
        procs.RssSampler(server.child.pid) as rss,
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
        other_cores=meter.cores(meter.other_cpu),
        note=(
            f"{count:,} texts, one stream; server RSS {rss_before:.0f} MiB before, "
            f"{min(samples):.0f}-{max(samples):.0f} MiB during ({len(samples)} samples)"
        ),
        reference=reference,
    )
    run.legs.append(leg)
    _print_leg(leg)
    _say(f"    {leg.note}")


def rest_legs(
    run: BenchRun,
    *,
    system: str,
    base_url: str,
    server_pid: int,
    text_set: TextSet,
    profile: Profile,
    references: References | None = None,
) -> None:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    messages, mean_tokens = _messages(text_set, 1)
    requests = [
        loadgen.http_post(
            host, int(port), "/v1/embeddings", loadgen.openai_embedding_body(texts, MODEL_NAME)
        )
        for texts in messages
    ]
    loadgen.http_load(host, int(port), requests, 4, profile.warmup_s)
    for concurrency in (1, 16):
        reference = _reference_for(references, text_set, profile, concurrency)
        with procs.CpuMeter(server_pid) as meter:
            load = loadgen.http_load(host, int(port), requests, concurrency, profile.leg_s)
        leg = _leg_from(
            load,
            meter,
            system=system,
            text_set=text_set.name,
            concurrency=concurrency,
            per_request=1,
            mean_tokens=mean_tokens,
            generator_cpu=meter.own_cpu,
            reference=reference,
        )
        run.legs.append(leg)
        _print_leg(leg)


# --- the run ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short legs, for development")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the GGUF file")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where latest.md/png go")
    parser.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python's server")
    parser.add_argument(
        "--no-ghz", action="store_true", help="use the asyncio gRPC load generator, not ghz"
    )
    return parser.parse_args(list(argv))


def _command_line(argv: Sequence[str]) -> str:
    """How to repeat this run."""
    if not argv:
        return "make bench"
    return "make bench BENCH_ARGS=" + shlex.quote(" ".join(argv))


def measure_engine(
    run: BenchRun,
    model: Path,
    text_sets: Sequence[TextSet],
    profile: Profile,
) -> None:
    _say("engine ceiling (in-process, no server):")
    for text_set in text_sets:
        measure_ceiling(run, model, text_set, profile)
    if peer.torch_available():
        tps = peer.sentence_transformers_texts_per_s(text_sets[0].texts[:1000])
        run.sentence_transformers = f"{tps:,.0f} texts/s on sentences (batch 32)"


def measure_servers(
    run: BenchRun,
    model: Path,
    text_sets: Sequence[TextSet],
    profile: Profile,
    *,
    use_ghz: bool,
    with_peer: bool,
    references: References | None = None,
) -> None:
    with procs.Children() as children:
        _say("embedd serve (gRPC, default settings):")
        server = children.add_embedd(procs.start_embedd(model.parent, with_envoy=False))
        generator = GrpcLegs(server, use_ghz)
        for text_set in text_sets:
            grpc_legs(run, generator, text_set, profile, references)
        for text_set in text_sets:
            reference = _reference_for(references, text_set, profile, 16)
            stream_leg(run, server, text_set, profile.stream_texts[text_set.name], reference)
        server.child.stop()

        _say("embedd run (gRPC + Envoy REST):")
        server = children.add_embedd(procs.start_embedd(model.parent, with_envoy=True))
        for text_set in text_sets:
            rest_legs(
                run,
                system=REST,
                base_url=server.rest_url or "",
                server_pid=server.child.pid,
                text_set=text_set,
                profile=profile,
                references=references,
            )
        server.child.stop()

        if with_peer:
            _say("llama-cpp-python's server (the peer):")
            child, url = peer.start_peer(model)
            children.add(child)
            for text_set in text_sets:
                rest_legs(
                    run,
                    system=PEER,
                    base_url=url,
                    server_pid=child.pid,
                    text_set=text_set,
                    profile=profile,
                )
            child.stop()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(arguments)
    started = time.perf_counter()
    profile = QUICK if args.quick else FULL
    model: Path = args.model.resolve()
    procs.ensure_bench_dir()
    run = BenchRun(
        cpu_model=procs.cpu_model(),
        cores=os.cpu_count() or 0,
        quick=args.quick,
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        command=_command_line(arguments),
    )
    use_ghz = GHZ.exists() and not args.no_ghz
    _say(
        f"embedd benchmark ({'quick' if args.quick else 'full'}) on {run.cpu_model}, "
        f"{run.cores} cores; gRPC load: {'ghz' if use_ghz else 'asyncio (no .tools/bin/ghz)'}"
    )
    if not args.no_peer:
        installed_s = peer.ensure_peer_venv()
        if installed_s:
            run.notes.append(f"The peer's venv was installed in this run ({installed_s:.0f}s).")
    sentences, passages, tokenizer = load_text_sets(model)
    text_sets = [sentences, passages]
    run.notes.append(
        f"Texts: {len(sentences.texts)} STS-B test sentences ({sentences.mean_tokens:.1f} tokens "
        f"on average) and {len(passages.texts)} passages of consecutive sentences "
        f"({passages.mean_tokens:.1f} tokens), token counts from the model's tokenizer."
    )
    _say(run.notes[-1])

    measure_engine(run, model, text_sets, profile)
    if use_ghz:
        _say("the floor (a gRPC server that does nothing):")
        measure_floor(run, sentences, profile)
    for text_set in text_sets:  # just before the servers' concurrency-1 legs
        measure_one_text(run, model, text_set, profile, tokenizer.encode_batch)
    measure_servers(
        run,
        model,
        text_sets,
        profile,
        use_ghz=use_ghz,
        with_peer=not args.no_peer,
        references=References(run, model, tokenizer.encode_batch),
    )

    run.seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = report.render_markdown(run)
    (args.out / "latest.md").write_text(markdown + "\n", encoding="utf-8")
    report.plot(run, args.out / "latest.png")
    _say("")
    _say(markdown)
    _say(f"wrote {args.out / 'latest.md'} and latest.png; the run took {run.seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
