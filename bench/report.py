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
PEER = "llama-cpp-python server"
TARGET_SET = "sentences"  # the targets are stated on STS-B sentences


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
    other_cores: float = 0.0  # other processes on the machine during the leg: noise
    note: str = ""
    # Re-measured in-process just before this leg (this machine's speed drifts over minutes):
    # the best ceiling configuration's texts/s, or for a one-caller leg one text's p50 ms.
    reference: float | None = None

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


@dataclass(frozen=True)
class Floor:
    """The do-nothing gRPC server under ghz at 16 callers, paced at ``target`` x the
    ceiling's rate: the cores the RPCs and the load generator take before any embedding."""

    cores: int
    target: float  # the pace, as a fraction of the ceiling's texts/s
    requests_per_s: float
    server_cores: float
    generator_cores: float

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

    def best_ceiling(self, text_set: str) -> CeilingResult | None:
        results = self.ceiling.get(text_set) or []
        return max(results, key=lambda result: result.texts_per_s, default=None)


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


def headline_ratios(
    ceiling_tps: float | None, legs: Sequence[Leg], text_set: str
) -> list[tuple[str, float | None, float | None, float | None]]:
    """(what, ours/ceiling, ours/ceiling re-measured just before the leg, ours/peer) for gRPC
    c=16, REST c=16 and the bulk stream; the peer's figure is its REST at concurrency 16 (it
    has no gRPC and no stream)."""
    peer = _rate(find_leg(legs, PEER, text_set, 16))
    rows = [
        ("gRPC, concurrency 16", find_leg(legs, GRPC, text_set, 16)),
        ("REST, concurrency 16", find_leg(legs, REST, text_set, 16)),
        ("EmbedStream bulk", find_stream(legs, text_set)),
    ]
    return [
        (
            name,
            ratio(_rate(leg), ceiling_tps),
            ratio(_rate(leg), leg.reference if leg else None),
            ratio(_rate(leg), peer),
        )
        for name, leg in rows
    ]


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


def render_markdown(run: BenchRun) -> str:
    out: list[str] = []
    mode = "quick (`--quick`: short legs, numbers are rough)" if run.quick else "full"
    out.append("# embedd benchmark: latest run\n")
    out.append(
        f"- Machine: {run.cpu_model}, {run.cores} cores. Date: {run.date}. Run: {mode}, "
        f"{run.seconds / 60:.1f} min.\n"
        f"- Command: `{run.command}`. Same machine, GGUF and texts for every row; the load "
        "generator shares the cores with the server (its CPU use is a column, and so is the "
        "CPU other processes on the machine used during the leg).\n"
        f"- sentence-transformers in-process: {run.sentence_transformers}."
    )
    for note in [*run.notes, noise_note(run)]:
        out.append(f"- {note}")
    out.append("")

    ceiling = run.best_ceiling(TARGET_SET)
    one_text = run.one_text.get(TARGET_SET)
    out.append("## Targets (issue 4; STS-B sentences, one text per request)\n")
    targets = evaluate_targets(
        ceiling.texts_per_s if ceiling else None,
        one_text.p50_ms if one_text else None,
        run.legs,
        TARGET_SET,
    )
    out.append(
        markdown_table(
            ["target", "goal", "measured", "verdict"],
            [[t.name, t.goal, t.measured, _verdict(t.met)] for t in targets],
        )
    )
    out.append("")

    if run.floor is not None:
        out.append(render_floor(run.floor))
        out.append("")

    out.append("## Headline ratios\n")
    rows = []
    for text_set in run.ceiling:
        best = run.best_ceiling(text_set)
        for name, vs_ceiling, vs_adjacent, vs_peer in headline_ratios(
            best.texts_per_s if best else None, run.legs, text_set
        ):
            rows.append(
                [
                    text_set,
                    name,
                    fmt_ratio(vs_ceiling),
                    fmt_ratio(vs_adjacent),
                    fmt_ratio(vs_peer),
                ]
            )
    out.append(
        markdown_table(
            [
                "texts",
                "embedd",
                "÷ ceiling (start of run)",
                "÷ ceiling re-measured just before the leg",
                "÷ peer (REST c=16)",
            ],
            rows,
        )
    )
    out.append("")

    out.append("## Engine ceiling (llama-cpp-python in-process, no server)\n")
    rows = []
    for text_set, results in run.ceiling.items():
        best = run.best_ceiling(text_set)
        for result in results:
            mark = " **(ceiling)**" if result is best else ""
            rows.append(
                [
                    text_set,
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
        "layout",
        "decodes",
        "texts/s",
        "tokens/s",
        "CPU ms/text",
        "texts",
        "others' cores",
    ]
    out.append(markdown_table(headers, rows))
    out.append("")
    rows = [
        [name, fmt_ms(latency.p50_ms), fmt_ms(latency.p99_ms), str(latency.samples)]
        for name, latency in run.one_text.items()
    ]
    out.append(
        "One text at a time in-process (tokenize + decode + normalize, one 1-thread context: "
        "the server's worker), back to back: the reference for concurrency 1. The paused row "
        "shows what the idle time between a lone caller's requests costs the engine here "
        "(the weights leave the caches):\n"
    )
    out.append(markdown_table(["texts", "p50 ms", "p99 ms", "samples"], rows))
    out.append("")

    out.append("## Servers under closed-loop load\n")
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
                f"{leg.other_cores:.2f}",
                leg.note,
            ]
        )
    out.append(
        markdown_table(
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
                "server cores (event loop)",
                "server CPU ms/text",
                "others' cores",
                "note",
            ],
            rows,
        )
    )
    out.append("")
    out.append("![throughput and latency against concurrency](latest.png)\n")
    return "\n".join(out)


def plot(run: BenchRun, path: Path) -> None:
    """Throughput and p50/p99 latency against concurrency, one row per text set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text_sets = list(run.ceiling) or sorted({leg.text_set for leg in run.legs})
    figure, axes = plt.subplots(
        len(text_sets), 2, figsize=(12, 4.2 * len(text_sets)), squeeze=False
    )
    styles = {GRPC: "tab:blue", REST: "tab:green", PEER: "tab:red"}
    concurrencies = sorted({leg.concurrency for leg in run.legs if leg.system != STREAM}) or [1]
    for row, text_set in enumerate(text_sets):
        throughput, latency = axes[row]
        for system, color in styles.items():
            legs = sorted(
                (
                    leg
                    for leg in run.legs
                    if leg.system == system
                    and leg.text_set == text_set
                    and leg.texts_per_request == 1
                    and leg.texts
                ),
                key=lambda leg: leg.concurrency,
            )
            if not legs:
                continue
            xs = [leg.concurrency for leg in legs]
            throughput.plot(xs, [leg.texts_per_s for leg in legs], "o-", color=color, label=system)
            latency.plot(xs, [leg.p50_ms for leg in legs], "o-", color=color, label=f"{system} p50")
            latency.plot(
                xs,
                [leg.p99_ms for leg in legs],
                "s--",
                color=color,
                alpha=0.6,
                label=f"{system} p99",
            )
        best = run.best_ceiling(text_set)
        if best is not None:
            throughput.axhline(
                best.texts_per_s, color="black", linestyle=":", label="engine ceiling"
            )
        stream = find_stream(run.legs, text_set)
        if stream is not None and stream.texts:
            throughput.axhline(
                stream.texts_per_s, color="tab:purple", linestyle="-.", label="EmbedStream bulk"
            )
        for axis in (throughput, latency):
            axis.set_xscale("log", base=2)
            axis.set_xticks(concurrencies, [str(value) for value in concurrencies])
            axis.set_xlabel("concurrent callers (one text per request)")
            axis.grid(True, alpha=0.3)
        throughput.set_ylabel("texts/s")
        throughput.set_ylim(bottom=0)
        throughput.set_title(f"{text_set}: throughput")
        latency.set_yscale("log")
        latency.set_ylabel("latency, ms")
        latency.set_title(f"{text_set}: latency p50 (solid) and p99 (dashed)")
        throughput.legend(fontsize=8)
        latency.legend(fontsize=7)
    figure.suptitle(
        f"embedd on {run.cpu_model}, {run.cores} cores ({'quick' if run.quick else 'full'} run)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
