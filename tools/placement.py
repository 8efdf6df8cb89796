"""Where an engine's workers run, measured against a real server: ``embedd serve`` under
each configuration, loaded over gRPC with 1 caller x 1 text, 16 callers x 1 text and
4 callers x 32 texts, then the memory (PSS) of the server and its worker processes.

    PYTHONPATH=server:client .venv/bin/python -m tools.placement --seconds 5 --rounds 2

Configurations run interleaved (each round runs every one), so drift on a shared machine
hits them alike; each leg's figure is the best of its rounds (the least disturbed run).
The texts are STS-B test sentences (../shared/data/stsbenchmark), one per request, taken in
turn. The load generator is one asyncio process on the same machine (its CPU is counted in
no configuration's favour: it is the same for all).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil

from bench.texts import read_sentences
from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]

# name -> the server's settings (as EMBEDD_* variables) beside the common ones.
CONFIGURATIONS: dict[str, dict[str, str]] = {
    "processes, 2 threads each (the first default)": {"worker_processes": "true"},
    "1 worker, one session, 2 spinning threads (the third default)": {
        "worker_processes": "auto",
        "workers": "1",
    },
    "2 workers, 1 thread each beside a 2-thread session for a lone call (the default)": {
        "worker_processes": "auto",
    },
    "2 workers, one session, 2 threads (the second default)": {
        "worker_processes": "auto",
        "workers": "2",
        "onnx_spinning": "false",
    },
    "2 workers, one session, 1 thread": {
        "worker_processes": "auto",
        "workers": "2",
        "onnx_threads": "1",
    },
}
# (callers, texts per request)
LEGS = ((1, 1), (16, 1), (4, 32))


@dataclass
class Leg:
    """One load leg's figures."""

    texts_per_s: float
    p50_ms: float
    cpu_ms_per_text: float = 0.0  # the server's and its workers' CPU time (less swayed by
    # other load on a shared machine than the rates, and what spinning costs shows in it)


@dataclass
class Figures:
    """A configuration's best figures over the rounds."""

    legs: dict[tuple[int, int], Leg] = field(default_factory=dict)
    pss_mib: float = 0.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _start(settings: dict[str, str], port: int, model: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDD_")}
    env.update(
        {
            "EMBEDD_MODELS_DIR": str(REPO / "models"),
            "EMBEDD_DEFAULT_MODEL": model,
            "EMBEDD_GRPC_PORT": str(port),
            "EMBEDD_METRICS_PORT": "0",
            "EMBEDD_LOG_LEVEL": "warning",
            "PYTHONPATH": f"{REPO / 'server'}:{REPO / 'client'}",
        }
    )
    env.update({f"EMBEDD_{key.upper()}": value for key, value in settings.items()})
    command = [sys.executable, "-m", "embedd_server.cli.main", "serve"]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)


async def _ready(stub: pb_grpc.EmbedderAsyncStub, server: subprocess.Popen[bytes]) -> None:
    """Waits until the server answers an embedding (its model loaded)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            await stub.Embed(pb.EmbedRequest(texts=["ready?"]), timeout=5)
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)  # polling a starting server: nothing to wait on
    raise RuntimeError("the server did not become ready")


async def _leg(
    stub: pb_grpc.EmbedderAsyncStub, texts: Sequence[str], callers: int, per: int, seconds: float
) -> Leg:
    latencies: list[float] = []
    done = 0
    stop = time.perf_counter() + seconds

    async def caller(offset: int) -> None:
        nonlocal done
        index = offset
        while time.perf_counter() < stop:
            batch = [texts[(index + i) % len(texts)] for i in range(per)]
            index += per * callers
            began = time.perf_counter()
            await stub.Embed(pb.EmbedRequest(texts=batch))
            latencies.append(time.perf_counter() - began)
            done += per

    began = time.perf_counter()
    await asyncio.gather(*(caller(n * per) for n in range(callers)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    return Leg(done / elapsed, 1000 * latencies[len(latencies) // 2])


def _family(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the server and the processes under it so far."""
    return sum(sum(p.cpu_times()[:2]) for p in _family(pid))


def _pss_mib(pid: int) -> float:
    """PSS of the server and every process under it, in MiB."""
    root = psutil.Process(pid)
    total = 0
    for process in (root, *root.children(recursive=True)):
        total += process.memory_full_info().pss
    return total / 2**20


async def _measure(
    settings: dict[str, str], model: str, texts: Sequence[str], seconds: float
) -> Figures:
    port = _free_port()
    server = _start(settings, port, model)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbedderStub(channel)
            await _ready(stub, server)
            await _leg(stub, texts, 4, 8, 1.0)  # warm-up
            figures = Figures()
            for callers, per in LEGS:
                cpu = _cpu_s(server.pid)
                leg = await _leg(stub, texts, callers, per, seconds)
                spent = _cpu_s(server.pid) - cpu
                leg.cpu_ms_per_text = 1000 * spent / (leg.texts_per_s * seconds)
                figures.legs[callers, per] = leg
            figures.pss_mib = _pss_mib(server.pid)
            return figures
    finally:
        server.terminate()
        server.wait(30)


def _best(runs: list[Figures]) -> Figures:
    best = Figures(pss_mib=min(run.pss_mib for run in runs))
    # each leg from its fastest run (the least disturbed), its CPU and p50 from that run
    for leg in LEGS:
        fastest = max((run.legs[leg] for run in runs), key=lambda figures: figures.texts_per_s)
        best.legs[leg] = fastest
    return best


def main(argv: Sequence[str] | None = None) -> int:
    """Runs every configuration ``--rounds`` times, interleaved, and prints a table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--seconds", type=float, default=5.0, help="per leg")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="configurations (substrings of the names)")
    args = parser.parse_args(argv)
    texts = read_sentences()
    chosen = {
        name: settings
        for name, settings in CONFIGURATIONS.items()
        if not args.only or any(part in name for part in args.only)
    }
    runs: dict[str, list[Figures]] = {name: [] for name in chosen}
    for round_number in range(args.rounds):
        for name, settings in chosen.items():
            figures = asyncio.run(_measure(settings, args.model, texts, args.seconds))
            runs[name].append(figures)
            legs = ", ".join(
                f"{c}x{p}: {leg.texts_per_s:.0f}/s p50 {leg.p50_ms:.1f} ms "
                f"cpu {leg.cpu_ms_per_text:.2f} ms/text"
                for (c, p), leg in figures.legs.items()
            )
            print(f"round {round_number + 1} {name}: {legs}; PSS {figures.pss_mib:.0f} MiB")
    header = " | ".join(f"{c} caller{'s' * (c > 1)} x {p} text{'s' * (p > 1)}" for c, p in LEGS)
    print(f"\n| configuration | {header} | PSS after load |")
    print("|---" * (len(LEGS) + 2) + "|")
    for name, figures in ((name, _best(found)) for name, found in runs.items()):
        cells = " | ".join(
            f"{leg.texts_per_s:,.0f} texts/s, p50 {leg.p50_ms:.1f} ms, "
            f"{leg.cpu_ms_per_text:.2f} CPU ms/text"
            for leg in figures.legs.values()
        )
        print(f"| {name} | {cells} | {figures.pss_mib:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
