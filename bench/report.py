"""Results of one benchmark run: percentiles, the issue's targets, Markdown and the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.ceiling import CeilingResult, SingleTextLatency

GRPC = "embedd gRPC"
REST = "embedd REST (Envoy)"
STREAM = "embedd EmbedStream"
GRPC_INT8 = "embedd gRPC --int8"
TEI = "TEI"
INFINITY = "Infinity"
OLLAMA = "Ollama"
PEER = "llama-cpp-python server"
# The comparison's columns, in order: issue 11's five, then the other peer and embedd --int8.
SYSTEMS = (GRPC, REST, TEI, INFINITY, OLLAMA, PEER, GRPC_INT8)
TARGET_SET = "sentences"  # issue 4's targets are stated on STS-B sentences

# The legs every system runs: (concurrency, texts per request).
LEG_SHAPES = ((1, 1), (16, 1), (4, 32))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), numpy's linear interpolation; NaN when there are none."""
    return float(np.percentile(values, q)) if len(values) else math.nan


@dataclass(frozen=True)
class Leg:
    """One measured load: a system, a text set, a concurrency and request size."""

    system: str
    text_set: str
    concurrency: int
    texts_per_request: int
    texts: int  # embedded OK
    errors: int
    seconds: float
    mean_tokens: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    generator: str = ""
    generator_cores: float = 0.0
    server_cores: float = 0.0
    loop_cores: float = 0.0  # the server's main thread (event loop), part of server_cores
    helper_cores: float = 0.0  # embedd's Envoy (REST legs), part of server_cores
    other_cores: float = 0.0  # other processes on the machine during the leg: noise
    note: str = ""
    # Re-measured in-process just before this leg (this machine's speed drifts over minutes):
    # the best ceiling configuration's texts/s, or for a one-caller leg one text's p50 ms.
    reference: float | None = None
    # The server's memory, the most seen during the leg: PSS summed over its processes (shared
    # pages, such as weights mapped by several worker processes, counted once).
    rss_mib: float | None = None

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.texts_per_s * self.mean_tokens

    @property
    def server_cpu_ms_per_text(self) -> float | None:
        """CPU the server (all its threads and children) spent per text embedded."""
        rate = self.texts_per_s
        return self.server_cores / rate * 1000 if rate else None


@dataclass(frozen=True)
class Target:
    """One of the issue's targets: what it asks, what was measured, whether it is met
    (None: not measured in this run)."""

    name: str
    goal: str
    measured: str
    met: bool | None
    value: float | None = None  # the measured ratio, where the target is one
    bound: float | None = None  # the ratio the goal sets


@dataclass(frozen=True)
class Floor:
    """The do-nothing gRPC server under ghz at 16 callers, paced at ``target`` x the
    ceiling's rate: the cores the RPCs and the load generator take before any embedding."""

    cores: int
    target: float  # the pace, as a fraction of the ceiling's texts/s
    requests_per_s: float
    server_cores: float
    generator_cores: float
    # ghz's p50 at one caller, unpaced: what a lone caller's RPC costs with nothing to compute
    lone_p50_ms: float | None = None

    @property
    def overhead_cores(self) -> float:
        return self.server_cores + self.generator_cores

    @property
    def best_ratio(self) -> float:
        """The highest ratio to the ceiling reachable when the engine is as fast as in the
        ceiling and the overhead grows with the rate: r * cores + overhead * r / target =
        cores."""
        return self.cores / (self.cores + self.overhead_cores / self.target)


@dataclass
class BenchRun:
    cpu_model: str
    cores: int
    quick: bool
    date: str
    command: str
    seconds: float = 0.0
    ceiling: dict[str, list[CeilingResult]] = field(default_factory=dict)
    one_text: dict[str, SingleTextLatency] = field(default_factory=dict)
    legs: list[Leg] = field(default_factory=list)
    sentence_transformers: str = "n/a (no torch)"
    notes: list[str] = field(default_factory=list)
    floor: Floor | None = None
    serving_engine: str = ""  # the engine embedd's default (engine=auto) picks for the model
    peers: list[str] = field(default_factory=list)  # each peer's version, or why it was skipped
    stsb: dict[str, float] = field(default_factory=dict)  # system -> STS-B Spearman x100
    stsb_pairs: int = 0
    # system -> its server's PSS in MiB once every leg has run (gRPC and REST: one server)
    memory_after: dict[str, float] = field(default_factory=dict)

    def best_ceiling(self, text_set: str, engine: str | None = None) -> CeilingResult | None:
        """The fastest configuration of ``engine`` (by default the one embedd serves this
        model with) at its default weights (int8 changes the vectors: never the ceiling)."""
        engine = engine or self.serving_engine
        results = [
            result
            for result in self.ceiling.get(text_set) or []
            if not result.int8 and (not engine or result.engine == engine)
        ]
        return max(results, key=lambda result: result.texts_per_s, default=None)

    def serving_one_text(self, text_set: str) -> SingleTextLatency | None:
        """One text's in-process latency on the engine embedd serves this model with."""
        return self.one_text.get(f"{self.serving_engine}, {text_set}")

    def engines(self) -> list[str]:
        """The engines measured in-process, in the order measured."""
        return list(
            dict.fromkeys(result.engine for results in self.ceiling.values() for result in results)
        )


NOISY_CORES = 0.2  # other processes' CPU during a measurement beyond which it is unreliable


def noise_note(run: BenchRun) -> str:
    """How much other processes used the cores during the measurements."""
    values = [leg.other_cores for leg in run.legs] + [
        result.other_cores for results in run.ceiling.values() for result in results
    ]
    if not values:
        return "No measurements."
    noisy = sum(value > NOISY_CORES for value in values)
    worst = max(values)
    if not noisy:
        return (
            f"Quiet machine: other processes used at most {worst:.2f} cores during any measurement."
        )
    return (
        f"**Shared machine: other processes used more than {NOISY_CORES} cores during "
        f"{noisy} of {len(values)} measurements (up to {worst:.2f} of {run.cores} cores); "
        "treat the ratios as rough and re-run on a quiet machine.**"
    )


def find_leg(
    legs: Sequence[Leg], system: str, text_set: str, concurrency: int, texts_per_request: int = 1
) -> Leg | None:
    for leg in legs:
        if (leg.system, leg.text_set, leg.concurrency, leg.texts_per_request) == (
            system,
            text_set,
            concurrency,
            texts_per_request,
        ):
            return leg
    return None


def find_stream(legs: Sequence[Leg], text_set: str) -> Leg | None:
    return next((leg for leg in legs if leg.system == STREAM and leg.text_set == text_set), None)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def fmt_rate(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _rate(leg: Leg | None) -> float | None:
    return None if leg is None or leg.texts == 0 else leg.texts_per_s


def evaluate_targets(
    ceiling_tps: float | None, one_text_ms: float | None, legs: Sequence[Leg], text_set: str
) -> list[Target]:
    """The issue's targets on one text set."""
    grpc16 = find_leg(legs, GRPC, text_set, 16)
    grpc1 = find_leg(legs, GRPC, text_set, 1)
    rest16 = find_leg(legs, REST, text_set, 16)
    peer16 = find_leg(legs, PEER, text_set, 16)
    stream = find_stream(legs, text_set)
    targets: list[Target] = []

    def versus(name: str, goal: float, ours: Leg | None, base: float | None, what: str) -> None:
        # A ceiling re-measured just before the leg replaces the run's ceiling.
        adjacent = what == "ceiling" and ours is not None and ours.reference is not None
        if adjacent:
            base = ours.reference  # type: ignore[union-attr]
        value = ratio(_rate(ours), base)
        measured = (
            "not measured"
            if value is None
            else f"{fmt_ratio(value)} ({fmt_rate(_rate(ours))} vs {fmt_rate(base)} texts/s"
            + (", ceiling re-measured just before)" if adjacent else ")")
        )
        targets.append(
            Target(name, f"≥ {goal:g}x {what}", measured, None if value is None else value >= goal)
        )

    versus("gRPC c=16 vs ceiling", 0.85, grpc16, ceiling_tps, "ceiling")
    versus("gRPC c=16 vs peer", 3.0, grpc16, _rate(peer16), "peer (REST c=16)")
    versus("REST c=16 vs ceiling", 0.8, rest16, ceiling_tps, "ceiling")

    if grpc1 is not None and grpc1.reference is not None:
        one_text_ms = grpc1.reference
    if grpc1 is None or grpc1.p50_ms is None or one_text_ms is None:
        targets.append(Target("c=1 p50 overhead", "≤ 2 ms over in-process", "not measured", None))
    else:
        gap = grpc1.p50_ms - one_text_ms
        when = ", in-process re-measured just before" if grpc1.reference is not None else ""
        targets.append(
            Target(
                "c=1 p50 overhead",
                "≤ 2 ms over in-process",
                f"{gap:+.2f} ms ({fmt_ms(grpc1.p50_ms)} vs {fmt_ms(one_text_ms)} ms{when})",
                gap <= 2.0,
            )
        )

    versus("EmbedStream vs ceiling", 0.9, stream, ceiling_tps, "ceiling")

    if grpc16 is None or not grpc16.p50_ms or grpc16.p99_ms is None:
        targets.append(Target("p99/p50 at c=16", "≤ 3x", "not measured", None))
    else:
        spread = grpc16.p99_ms / grpc16.p50_ms
        targets.append(
            Target(
                "p99/p50 at c=16",
                "≤ 3x",
                f"{spread:.2f}x ({fmt_ms(grpc16.p99_ms)} / {fmt_ms(grpc16.p50_ms)} ms)",
                spread <= 3.0,
            )
        )
    return targets


def leg_label(concurrency: int, texts_per_request: int) -> str:
    callers = "caller" if concurrency == 1 else "callers"
    texts = "text" if texts_per_request == 1 else "texts"
    return f"{concurrency} {callers} x {texts_per_request} {texts}"


@dataclass(frozen=True)
class TeiTarget:
    """One of issue 22's leg targets: embedd's texts/s over TEI's on the same leg."""

    system: str  # GRPC or REST
    concurrency: int
    texts_per_request: int
    goal: float

    @property
    def name(self) -> str:
        transport = "gRPC" if self.system == GRPC else "REST"
        return f"{leg_label(self.concurrency, self.texts_per_request)}, {transport}"


# Issue 22: a lone caller and 16 callers >= 1.0x TEI over gRPC and >= 0.9x over REST; 4 callers
# x 32 texts over gRPC >= 1.5x; memory after the load <= 1.5x TEI's.
TEI_TARGETS = (
    TeiTarget(GRPC, 1, 1, 1.0),
    TeiTarget(REST, 1, 1, 0.9),
    TeiTarget(GRPC, 16, 1, 1.0),
    TeiTarget(REST, 16, 1, 0.9),
    TeiTarget(GRPC, 4, 32, 1.5),
)
MEMORY_GOAL = 1.5  # embedd's PSS after the load over TEI's, at most


def evaluate_tei_targets(
    legs: Sequence[Leg], text_set: str, memory_after: dict[str, float] | None = None
) -> list[Target]:
    """Issue 22's targets: embedd's texts/s over TEI's on each leg of ``text_set``, same run;
    and embedd's memory after the load (server, workers, Envoy) over TEI's."""
    targets: list[Target] = []
    for target in TEI_TARGETS:
        shape = (text_set, target.concurrency, target.texts_per_request)
        ours = _rate(find_leg(legs, target.system, *shape))
        tei = _rate(find_leg(legs, TEI, *shape))
        value = ratio(ours, tei)
        measured = (
            "not measured"
            if value is None
            else f"{fmt_ratio(value)} ({fmt_rate(ours)} vs {fmt_rate(tei)} texts/s)"
        )
        met = None if value is None else value >= target.goal
        goal = f"≥ {target.goal:g}x TEI"
        targets.append(Target(target.name, goal, measured, met, value, target.goal))
    memory = memory_after or {}
    ours_mib, tei_mib = memory.get(GRPC), memory.get(TEI)
    value = ratio(ours_mib, tei_mib)
    measured = (
        "not measured"
        if value is None
        else f"{fmt_ratio(value)} ({ours_mib:.0f} vs {tei_mib:.0f} MiB)"
    )
    targets.append(
        Target(
            "memory after the load (PSS: server, workers, Envoy)",
            f"≤ {MEMORY_GOAL:g}x TEI's",
            measured,
            None if value is None else value <= MEMORY_GOAL,
            value,
            MEMORY_GOAL,
        )
    )
    return targets


CPU_BOUND_SHARE = 0.9  # a leg whose processes used this share of the cores was bounded by CPU


def what_bounds(run: BenchRun, target: TeiTarget, text_set: str = TARGET_SET) -> str:
    """What bounds embedd on one of issue 22's legs, from this run's measurements: for a lone
    caller the latency, split into the engine's call (in-process) and the path around it (with
    the floor's RPC that does nothing); for the loaded legs the cores, split into the server,
    the load generator and other processes, with the server's CPU per text beside TEI's and
    the engine's alone. Empty when a leg is missing."""
    shape = (text_set, target.concurrency, target.texts_per_request)
    ours, tei = find_leg(run.legs, target.system, *shape), find_leg(run.legs, TEI, *shape)
    if ours is None or tei is None or not ours.texts or not tei.texts:
        return ""
    if target.concurrency == 1:
        return _latency_bound(run, target, ours, tei, text_set)
    return _cpu_bound(run, ours, tei, text_set)


def _latency_bound(run: BenchRun, target: TeiTarget, ours: Leg, tei: Leg, text_set: str) -> str:
    if ours.p50_ms is None or tei.p50_ms is None:
        return ""
    parts = [f"latency: p50 {fmt_ms(ours.p50_ms)} vs TEI's {fmt_ms(tei.p50_ms)} ms"]
    grpc = find_leg(run.legs, GRPC, text_set, 1, 1)
    one_text = run.serving_one_text(text_set)
    engine_ms = (grpc.reference if grpc else None) or (one_text.p50_ms if one_text else None)
    if target.system == GRPC and engine_ms is not None:
        path = f"the engine's call {fmt_ms(engine_ms)} ms in-process, the path around it "
        path += f"{fmt_ms(ours.p50_ms - engine_ms)} ms"
        if run.floor is not None and run.floor.lone_p50_ms is not None:
            path += f" (an RPC that does nothing: {fmt_ms(run.floor.lone_p50_ms)} ms)"
        parts.append(path)
    if target.system == REST and grpc is not None and grpc.p50_ms is not None:
        parts.append(f"Envoy and JSON {fmt_ms(ours.p50_ms - grpc.p50_ms)} ms over gRPC's p50")
    return "; ".join(parts)


def _cpu_bound(run: BenchRun, ours: Leg, tei: Leg, text_set: str) -> str:
    used = ours.server_cores + ours.generator_cores + ours.other_cores
    head = (
        "CPU" if used >= CPU_BOUND_SHARE * run.cores else f"not CPU ({run.cores - used:.2f} idle)"
    )
    inside = [f"event loop {ours.loop_cores:.2f}"] if ours.loop_cores else []
    inside += [f"Envoy {ours.helper_cores:.2f}"] if ours.helper_cores else []
    server = f"server {ours.server_cores:.2f}" + (f" ({', '.join(inside)})" if inside else "")
    parts = [
        f"{head}: {server} + {ours.generator or 'load generator'} "
        f"{ours.generator_cores:.2f} + others {ours.other_cores:.2f} of {run.cores} cores",
        f"server CPU {fmt_ms(ours.server_cpu_ms_per_text)} ms/text vs TEI's "
        f"{fmt_ms(tei.server_cpu_ms_per_text)}",
    ]
    best = run.best_ceiling(text_set)
    if best is not None and best.texts_per_s:
        engine_ms = run.cores / best.texts_per_s * 1000
        parts.append(f"the engine alone {fmt_ms(engine_ms)} ms/text at its ceiling")
    return "; ".join(parts)


def _cell(leg: Leg | None, with_p50: bool) -> str:
    if leg is None:
        return "—"
    if leg.texts == 0:
        return f"failed ({leg.note or 'no answer'})" if leg.errors else "—"
    text = fmt_rate(leg.texts_per_s)
    if with_p50:
        text += f" (p50 {fmt_ms(leg.p50_ms)} ms)"
    if leg.errors:
        text += f", {leg.errors} errors"
    return text


def comparison_table(run: BenchRun, text_set: str, systems: Sequence[str] = SYSTEMS) -> str:
    """Issue 11's table for one text set: texts/s of every leg on every system, then the
    server's CPU per text and memory, and the STS-B score of its vectors."""
    rows: list[list[str]] = []
    for concurrency, per_request in LEG_SHAPES:
        label = leg_label(concurrency, per_request)
        cells = [
            _cell(find_leg(run.legs, system, text_set, concurrency, per_request), concurrency == 1)
            for system in systems
        ]
        rows.append([label + (", texts/s (p50)" if concurrency == 1 else ", texts/s"), *cells])
    stream = find_stream(run.legs, text_set)
    rows.append(
        ["EmbedStream, texts/s", *[_cell(stream, False) if s == GRPC else "" for s in systems]]
    )
    busiest = [find_leg(run.legs, system, text_set, 16) for system in systems]
    rows.append(
        [
            "server CPU per text, ms (16 callers)",
            *[fmt_ms(leg.server_cpu_ms_per_text) if leg and leg.texts else "—" for leg in busiest],
        ]
    )
    rows.append(
        [
            "server memory, MiB (most during its legs)",
            *[_peak_rss(run.legs, system, text_set) for system in systems],
        ]
    )
    rows.append(
        [
            "server memory after the load, MiB",
            *[
                f"{run.memory_after[system]:.0f}" if system in run.memory_after else "—"
                for system in systems
            ],
        ]
    )
    rows.append(
        [
            "STS-B, Spearman x100 of cosines",
            *[f"{run.stsb[system]:.2f}" if system in run.stsb else "—" for system in systems],
        ]
    )
    return markdown_table(["leg", *systems], rows)


def _peak_rss(legs: Sequence[Leg], system: str, text_set: str) -> str:
    values = [
        leg.rss_mib
        for leg in legs
        if leg.system == system and leg.text_set == text_set and leg.rss_mib is not None
    ]
    return f"{max(values):.0f}" if values else "—"


def engine_choice(run: BenchRun) -> str:
    """The engines' in-process ceilings side by side: what engine=auto's choice rests on."""
    if not run.serving_engine:
        return ""
    parts = []
    for text_set in run.ceiling:
        rates = {
            engine: best.texts_per_s
            for engine in run.engines()
            if (best := run.best_ceiling(text_set, engine)) is not None
        }
        if not rates:
            continue
        part = f"{text_set}: " + ", ".join(f"{e} {fmt_rate(r)}" for e, r in rates.items())
        served = rates.get(run.serving_engine)
        versus = [
            f"{run.serving_engine} {fmt_ratio(ratio(served, rate))} {engine}"
            for engine, rate in rates.items()
            if engine != run.serving_engine and served is not None
        ]
        parts.append(part + " texts/s" + (f" ({', '.join(versus)})" if versus else ""))
    return (
        f"embedd's default (engine=auto) serves this model with **{run.serving_engine}**. "
        "Each engine's best configuration in-process: " + "; ".join(parts) + "."
    )


def render_floor(floor: Floor) -> str:
    """What the gRPC stack and ghz alone take from the cores at the c=16 target's rate."""
    return (
        "## The floor: what one RPC costs before any embedding\n\n"
        "`python -m bench.floor` serves the same `Embed` RPC on grpc.aio with fixed vectors "
        f"(no tokenizing, no model). Under ghz at 16 callers paced at {floor.target:g}x the "
        f"ceiling ({fmt_rate(floor.requests_per_s)} requests/s), it used "
        f"{floor.server_cores:.2f} cores and ghz {floor.generator_cores:.2f}: "
        f"{floor.overhead_cores:.2f} of the {floor.cores} cores are gone before the engine "
        "runs. With the engine exactly as fast as in the ceiling and this overhead growing "
        "with the rate, one text per request at 16 callers can reach at most "
        f"**{fmt_ratio(floor.best_ratio)} the ceiling** on this machine."
        + (
            ""
            if floor.lone_p50_ms is None
            else f" A lone caller's RPC to it takes {fmt_ms(floor.lone_p50_ms)} ms (ghz's p50)."
        )
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "—"}[met]


def _request_label(leg: Leg) -> str:
    if leg.system == STREAM:
        return f"stream, batches of {leg.texts_per_request}"
    plural = "s" if leg.texts_per_request > 1 else ""
    return f"c={leg.concurrency}, {leg.texts_per_request} text{plural}/req"


def _targets_table(targets: Sequence[Target]) -> str:
    return markdown_table(
        ["target", "goal", "measured", "verdict"],
        [[t.name, t.goal, t.measured, _verdict(t.met)] for t in targets],
    )


def _ceiling_table(run: BenchRun) -> str:
    rows = []
    for text_set, results in run.ceiling.items():
        best = {engine: run.best_ceiling(text_set, engine) for engine in run.engines()}
        for result in results:
            mark = " **(ceiling)**" if result is best.get(result.engine) else ""
            rows.append(
                [
                    text_set,
                    result.engine_label,
                    result.layout,
                    result.name + mark,
                    fmt_rate(result.texts_per_s),
                    fmt_rate(result.tokens_per_s),
                    fmt_ms(run.cores / result.texts_per_s * 1000 if result.texts_per_s else None),
                    str(result.texts),
                    f"{result.other_cores:.2f}",
                ]
            )
    headers = [
        "texts",
        "engine",
        "layout",
        "packs",
        "texts/s",
        "tokens/s",
        "CPU ms/text",
        "texts",
        "others' cores",
    ]
    return markdown_table(headers, rows)


def _legs_table(run: BenchRun) -> str:
    rows = []
    for leg in run.legs:
        rows.append(
            [
                leg.text_set,
                leg.system,
                _request_label(leg),
                fmt_rate(leg.texts_per_s),
                fmt_rate(leg.tokens_per_s),
                fmt_ms(leg.p50_ms),
                fmt_ms(leg.p99_ms),
                str(leg.texts) + (f" ({leg.errors} errors)" if leg.errors else ""),
                f"{leg.generator} {leg.generator_cores:.2f}",
                f"{leg.server_cores:.2f} ({leg.loop_cores:.2f})",
                fmt_ms(leg.server_cpu_ms_per_text),
                "—" if leg.rss_mib is None else f"{leg.rss_mib:.0f}",
                f"{leg.other_cores:.2f}",
                leg.note,
            ]
        )
    return markdown_table(
        [
            "texts",
            "system",
            "load",
            "texts/s",
            "tokens/s",
            "p50 ms",
            "p99 ms",
            "texts done",
            "load generator, cores",
            "server cores (main thread)",
            "server CPU ms/text",
            "server memory MiB",
            "others' cores",
            "note",
        ],
        rows,
    )


def render_markdown(run: BenchRun) -> str:
    out: list[str] = []
    mode = "quick (`--quick`: short legs, numbers are rough)" if run.quick else "full"
    out.append("# embedd benchmark: latest run\n")
    out.append(
        f"- Machine: {run.cpu_model}, {run.cores} cores. Date: {run.date}. Run: {mode}, "
        f"{run.seconds / 60:.1f} min.\n"
        f"- Command: `{run.command}`. Same machine, model and texts for every system, every "
        "server on its defaults, all of them up for the whole run and measured in turn, leg "
        "by leg (interleaved: this machine's speed drifts over minutes). Every leg is a closed "
        "loop: ghz for gRPC, vegeta (`-rate=0`, one keep-alive connection a worker) with "
        "OpenAI-shaped requests for every REST server, both reporting in JSON; the generator "
        "shares the cores with the server: its CPU is a column, and so is the CPU other "
        "processes used during the leg. CPU and memory are psutil's.\n"
        f"- sentence-transformers in-process: {run.sentence_transformers}."
    )
    for note in [*run.notes, noise_note(run)]:
        out.append(f"- {note}")
    out.append("")

    if run.peers:
        out.append("## Systems\n")
        out.extend(f"- {line}" for line in run.peers)
        out.append("")

    text_sets = list(dict.fromkeys(leg.text_set for leg in run.legs))
    if text_sets:
        out.append(render_issue22(run))
        out.append("")
        out.append("## embedd and the peers, texts/s\n")
        for text_set in text_sets:
            out.append(f"### {text_set.capitalize()}\n")
            out.append(comparison_table(run, text_set))
            out.append("")
        if run.stsb:
            out.append(
                f"STS-B: Spearman x100 of the cosines of {run.stsb_pairs:,} sentence pairs of the "
                "STS-B test split against the gold scores, from each server's own vectors "
                "(embedd's gRPC and REST share a server and so a score). `--int8` is opt-in: "
                "faster, at the score shown. Server memory is the PSS summed over the server's "
                "processes (worker processes, Envoy for embedd, Ollama's runner), the most "
                "seen during its legs.\n"
            )

    if run.ceiling:
        out.append("## Engines in-process (no server)\n")
        choice = engine_choice(run)
        if choice:
            out.append(choice + "\n")
        out.append(_ceiling_table(run))
        out.append("")
    rows = [
        [name, fmt_ms(latency.p50_ms), fmt_ms(latency.p99_ms), str(latency.samples)]
        for name, latency in run.one_text.items()
    ]
    if rows:
        out.append(
            "One text at a time in-process (tokenize + decode + normalize on one single-thread "
            "engine: the server's worker), back to back: the reference for one caller. The "
            "paused row shows what the idle time between a lone caller's requests costs the "
            "engine here (the weights leave the caches):\n"
        )
        out.append(markdown_table(["engine, texts", "p50 ms", "p99 ms", "samples"], rows))
        out.append("")

    ceiling = run.best_ceiling(TARGET_SET)
    one_text = run.serving_one_text(TARGET_SET)
    out.append(
        f"## Issue 4's targets (STS-B sentences, one text per request, against the "
        f"{run.serving_engine or 'engine'} ceiling)\n"
    )
    out.append(
        _targets_table(
            evaluate_targets(
                ceiling.texts_per_s if ceiling else None,
                one_text.p50_ms if one_text else None,
                run.legs,
                TARGET_SET,
            )
        )
    )
    out.append("")

    if run.floor is not None:
        out.append(render_floor(run.floor))
        out.append("")

    out.append("## Every leg\n")
    out.append(_legs_table(run))
    out.append("")
    out.append("![texts/s of every leg on every system](latest.png)\n")
    if any(t.value is not None for t in evaluate_tei_targets(run.legs, TARGET_SET)):
        out.append(f"![issue 22's ratios to TEI and their goals]({TARGETS_PLOT})\n")
    return "\n".join(out)


def render_issue22(run: BenchRun) -> str:
    """Issue 22's targets: each leg's ratio to TEI on STS-B sentences, and the memory after
    the load, with the verdicts; for each missed leg, what bounds it."""
    targets = evaluate_tei_targets(run.legs, TARGET_SET, run.memory_after)
    bounds = {target.name: what_bounds(run, target) for target in TEI_TARGETS}
    rows = [
        [
            t.name,
            t.goal,
            t.measured,
            _verdict(t.met),
            bounds.get(t.name, "") if t.met is False else "",
        ]
        for t in targets
    ]
    table = markdown_table(["target", "goal", "measured", "verdict", "what bounds it"], rows)
    return f"## Issue 22 targets (against TEI, same run, {TARGET_SET})\n\n{table}"


def plot(run: BenchRun, path: Path) -> None:
    """texts/s of every leg on every system, grouped by leg, one panel per text set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text_sets = list(dict.fromkeys(leg.text_set for leg in run.legs)) or ["sentences"]
    systems = [s for s in SYSTEMS if any(leg.system == s for leg in run.legs)]
    shapes = [*LEG_SHAPES, (0, 0)]  # (0, 0): the stream
    labels = [leg_label(c, n) for c, n in LEG_SHAPES] + ["EmbedStream"]
    colors = dict(
        zip(
            SYSTEMS,
            ["tab:blue", "tab:green", "tab:red", "tab:orange", "tab:brown", "tab:gray", "tab:cyan"],
            strict=True,
        )
    )
    figure, axes = plt.subplots(
        len(text_sets), 1, figsize=(12, 4.2 * len(text_sets)), squeeze=False
    )
    width = 0.8 / max(1, len(systems))
    for row, text_set in enumerate(text_sets):
        axis = axes[row][0]
        for number, system in enumerate(systems):
            values = []
            for concurrency, per_request in shapes:
                if concurrency == 0:
                    leg = find_stream(run.legs, text_set) if system == GRPC else None
                else:
                    leg = find_leg(run.legs, system, text_set, concurrency, per_request)
                values.append(leg.texts_per_s if leg is not None and leg.texts else 0.0)
            xs = [x + (number - (len(systems) - 1) / 2) * width for x in range(len(shapes))]
            axis.bar(xs, values, width, label=system, color=colors[system])
        ceiling = run.best_ceiling(text_set)
        if ceiling is not None:
            axis.axhline(
                ceiling.texts_per_s,
                color="black",
                linestyle=":",
                label=f"{ceiling.engine} in-process ceiling",
            )
        axis.set_xticks(range(len(shapes)), labels)
        axis.set_ylabel("texts/s")
        axis.set_title(f"{text_set}: texts/s")
        axis.grid(True, axis="y", alpha=0.3)
        axis.legend(fontsize=8, ncol=2)
    figure.suptitle(
        f"embedd and its peers on {run.cpu_model}, {run.cores} cores "
        f"({'quick' if run.quick else 'full'} run)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


TARGETS_PLOT = "latest-targets.png"


def plot_targets(run: BenchRun, path: Path) -> bool:
    """Issue 22's ratios to TEI beside the goal of each (False, nothing written, when TEI
    was not measured)."""
    targets = [
        t
        for t in evaluate_tei_targets(run.legs, TARGET_SET, run.memory_after)
        if t.value is not None
    ]
    if not targets:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(12, 4.2))
    xs = range(len(targets))
    colors = ["tab:green" if t.met else "tab:red" for t in targets]
    axis.bar(xs, [t.value or 0.0 for t in targets], 0.6, color=colors, label="embedd / TEI")
    axis.scatter(
        xs, [t.bound or 0.0 for t in targets], marker="_", s=900, color="black", label="goal"
    )
    axis.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    axis.set_xticks(
        xs, [t.name.replace(" (PSS", "\n(PSS").replace(", ", ",\n", 1) for t in targets]
    )
    axis.tick_params(axis="x", labelsize=8)
    axis.set_ylabel("embedd / TEI")
    axis.set_title(
        "Issue 22 targets: green met, red missed (memory: at most the goal; speed: at least)"
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
