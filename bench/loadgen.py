"""The load generators, run as they come: ghz for gRPC, vegeta for REST; their JSON reports read.

Every leg is a closed loop: each of ``concurrency`` callers sends a request, waits for its
answer and sends the next, until the leg's duration is up; calls in flight then finish and
count. The requests are written to a file before the leg (ghz's JSON array of messages,
vegeta's JSON targets, one per line) and taken in turn, so the generator spends its CPU on the
network, not on building requests. Both are Go programs installed into ``.tools/bin`` by
``make ghz`` and ``make vegeta`` (pinned versions).
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUEST_TIMEOUT_S = 60.0
GRACE_S = 90.0  # beyond the leg's duration before a generator is killed
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GHZ = "ghz"
VEGETA = "vegeta"


@dataclass(frozen=True)
class LoadResult:
    """What one leg of closed-loop load gave, as the generator reported it."""

    requests: int  # answered OK
    errors: int
    seconds: float
    p50_s: float | None = None  # the generator's own percentiles of the calls' latencies
    p99_s: float | None = None
    first_error: str = ""
    generator: str = ""


def failed(generator: str, seconds: float, why: str) -> LoadResult:
    """A leg whose generator gave no report."""
    return LoadResult(0, 1, seconds, first_error=why, generator=generator)


def _run(command: Sequence[str], duration_s: float) -> tuple[str, str]:
    """The command's stdout ("" when it timed out) and the tail of its stderr."""
    try:
        done = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=duration_s + GRACE_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "", "timed out"
    return done.stdout, (done.stderr or done.stdout).strip()[-300:]


# --- ghz (gRPC) ------------------------------------------------------------------------------


def parse_ghz_json(text: str) -> LoadResult:
    """ghz's ``--format json`` report: counts by status, total time (nanoseconds) and its own
    latency distribution (p50 and p99 read from it)."""
    report: dict[str, Any] = json.loads(text)
    statuses: dict[str, int] = report.get("statusCodeDistribution") or {}
    ok = int(statuses.get("OK", 0))
    total = int(report.get("count", 0))
    by_percent = {
        int(entry["percentage"]): entry["latency"] / 1e9
        for entry in report.get("latencyDistribution") or []
    }
    errors_by_text: dict[str, int] = report.get("errorDistribution") or {}
    return LoadResult(
        requests=ok,
        errors=max(0, total - ok),
        seconds=int(report.get("total", 0)) / 1e9,
        p50_s=by_percent.get(50),
        p99_s=by_percent.get(99),
        first_error=next(iter(errors_by_text), ""),
        generator=GHZ,
    )


def ghz_command(
    ghz: Path,
    target: str,
    data_file: Path,
    *,
    concurrency: int,
    duration_s: float,
    call: str = "embedd.v1.Embedder.Embed",
    rps: float | None = None,
) -> list[str]:
    """ghz over server reflection, closed loop for ``duration_s`` (or paced at ``rps``
    requests per second), JSON report on stdout without the per-call details."""
    pacing = ["--rps", f"{max(1, round(rps))}"] if rps else []
    return [
        str(ghz),
        "--insecure",
        "--call",
        call,
        "--data-file",
        str(data_file),
        "--concurrency",
        str(concurrency),
        "--duration",
        f"{duration_s:g}s",
        "--duration-stop",
        "wait",  # calls in flight at the end finish and count
        "--timeout",
        f"{REQUEST_TIMEOUT_S:g}s",
        "--max-recv-message-size",
        f"{MAX_MESSAGE_BYTES}",
        "--disable-template-data",
        "--disable-template-functions",
        *pacing,
        "--format",
        "json",
        target,
    ]


def run_ghz(
    ghz: Path,
    target: str,
    data_file: Path,
    concurrency: int,
    duration_s: float,
    *,
    rps: float | None = None,
) -> LoadResult:
    command = ghz_command(
        ghz, target, data_file, concurrency=concurrency, duration_s=duration_s, rps=rps
    )
    stdout, why = _run(command, duration_s)
    if not stdout.strip().startswith("{"):
        return failed(GHZ, duration_s, f"ghz failed: {why}")
    return parse_ghz_json(stdout)


def ghz_data(messages: Sequence[Sequence[str]]) -> str:
    """ghz's data file: a JSON array of EmbedRequest messages, sent in turn."""
    return json.dumps([{"texts": list(texts)} for texts in messages], ensure_ascii=False)


# --- vegeta (REST) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a REST server takes OpenAI-shaped embedding requests."""

    base_url: str  # http://127.0.0.1:PORT
    route: str  # /v1/embeddings, or /embeddings (Infinity)
    model: str  # the request's "model"

    @property
    def url(self) -> str:
        return self.base_url + self.route

    def body(self, texts: Sequence[str]) -> bytes:
        """OpenAI's POST /v1/embeddings body; one text is sent as a string."""
        return openai_embedding_body(texts, self.model)


def openai_embedding_body(texts: Sequence[str], model: str) -> bytes:
    """OpenAI's POST /v1/embeddings body; one text is sent as a string."""
    payload: dict[str, Any] = {
        "model": model,
        "input": texts[0] if len(texts) == 1 else list(texts),
        "encoding_format": "float",
    }
    return json.dumps(payload, ensure_ascii=False).encode()


def vegeta_targets(endpoint: Endpoint, messages: Sequence[Sequence[str]]) -> str:
    """vegeta's JSON targets (``-format=json``), one POST per line, its body base64: the
    requests embedding each of ``messages``, sent in turn."""
    lines = (
        json.dumps(
            {
                "method": "POST",
                "url": endpoint.url,
                "header": {"Content-Type": ["application/json"]},
                "body": base64.b64encode(endpoint.body(texts)).decode("ascii"),
            }
        )
        for texts in messages
    )
    return "".join(line + "\n" for line in lines)


def vegeta_attack_command(
    vegeta: Path, targets_file: Path, results_file: Path, *, concurrency: int, duration_s: float
) -> list[str]:
    """vegeta as a closed loop: ``-rate=0`` sends as fast as ``concurrency`` workers can, each
    waiting for its answer (keep-alive connections); binary results into ``results_file``."""
    return [
        str(vegeta),
        "attack",
        "-format=json",
        f"-targets={targets_file}",
        "-rate=0",
        f"-workers={concurrency}",
        f"-max-workers={concurrency}",
        f"-duration={duration_s:g}s",
        f"-timeout={REQUEST_TIMEOUT_S:g}s",
        f"-output={results_file}",
    ]


def vegeta_report_command(vegeta: Path, results_file: Path) -> list[str]:
    return [str(vegeta), "report", "-type=json", str(results_file)]


def parse_vegeta_json(text: str) -> LoadResult:
    """vegeta's ``report -type=json``: requests, their status codes, the attack's duration
    plus the wait for the last answers (nanoseconds), and its latency percentiles."""
    report: dict[str, Any] = json.loads(text)
    statuses: dict[str, int] = report.get("status_codes") or {}
    ok = int(statuses.get("200", 0))
    latencies: dict[str, float] = report.get("latencies") or {}
    errors: list[str] = report.get("errors") or []
    return LoadResult(
        requests=ok,
        errors=max(0, int(report.get("requests", 0)) - ok),
        seconds=(int(report.get("duration", 0)) + int(report.get("wait", 0))) / 1e9,
        p50_s=latencies["50th"] / 1e9 if ok and "50th" in latencies else None,
        p99_s=latencies["99th"] / 1e9 if ok and "99th" in latencies else None,
        first_error=errors[0] if errors else "",
        generator=VEGETA,
    )


def run_vegeta(vegeta: Path, targets_file: Path, concurrency: int, duration_s: float) -> LoadResult:
    """One closed-loop leg of the targets in ``targets_file``; the results are kept beside it
    (``.bin``) until the next leg on the same file."""
    results = targets_file.with_suffix(".bin")
    attack = vegeta_attack_command(
        vegeta, targets_file, results, concurrency=concurrency, duration_s=duration_s
    )
    results.unlink(missing_ok=True)  # a failed attack must not leave the last leg's results
    _, why = _run(attack, duration_s)
    if not results.exists() or results.stat().st_size == 0:
        return failed(VEGETA, duration_s, f"vegeta attack failed: {why}")
    stdout, why = _run(vegeta_report_command(vegeta, results), 0.0)
    if not stdout.strip().startswith("{"):
        return failed(VEGETA, duration_s, f"vegeta report failed: {why}")
    return parse_vegeta_json(stdout)
