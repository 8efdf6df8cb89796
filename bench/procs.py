"""Child processes of the benchmark (servers, Envoy, the peers), and their CPU and memory as
psutil reports them.

Everything listens on loopback on free ports, every start has a deadline, and every process
started here is stopped (SIGTERM, then SIGKILL) by its context manager.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

from bench.texts import REPO
from embedd_server.run import probes
from embedd_server.run.probes import free_port

BENCH_DIR = REPO / ".bench"
LOG_DIR = BENCH_DIR / "logs"
MIB = 1024 * 1024
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0


def ensure_bench_dir() -> Path:
    """``.bench/`` (outputs nobody commits: venvs, data files, logs); it ignores itself."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    ignore = BENCH_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return BENCH_DIR


# Every server the bench starts is told to phone nobody: ONNX Runtime's official builds upload
# telemetry unless told not to (embedd, TEI and Infinity load it), Ollama looks up its cloud at
# start, Infinity and the Hugging Face hub send usage statistics.
OFFLINE = {
    "ORT_DISABLE_TELEMETRY": "1",
    "OLLAMA_NO_CLOUD": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "INFINITY_ANONYMOUS_USAGE_STATS": "0",
}


def clean_environment() -> dict[str, str]:
    """This environment without EMBEDD_* variables: servers run with default settings."""
    return {key: value for key, value in os.environ.items() if not key.startswith("EMBEDD_")}


# --- processes, through psutil ---------------------------------------------------------------


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def descendants(pid: int) -> list[int]:
    """The process and all its descendants (e.g. `embedd run`, its workers and its Envoy)."""
    process = _process(pid)
    if process is None:
        return [pid]
    try:
        return [pid, *(child.pid for child in process.children(recursive=True))]
    except psutil.Error:
        return [pid]


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of one process (all its threads), or of its thread ``tid``;
    0 if it is gone."""
    process = _process(pid)
    try:
        if process is None:
            return 0.0
        if tid is None:
            times = process.cpu_times()
            return times.user + times.system
        thread = next((t for t in process.threads() if t.id == tid), None)
        return thread.user_time + thread.system_time if thread else 0.0
    except psutil.Error:
        return 0.0


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (0 if it is gone)."""
    process = _process(pid)
    try:
        return process.memory_info().rss / MIB if process else 0.0
    except psutil.Error:
        return 0.0


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and its descendants (e.g. worker processes), in MiB."""
    return sum(rss_mib(member) for member in descendants(pid))


def pss_mib(pid: int) -> float:
    """Proportional resident memory of a process in MiB: each page it shares with others
    counted as its share (0 if it is gone)."""
    process = _process(pid)
    try:
        return float(process.memory_full_info().pss) / MIB if process else 0.0
    except psutil.Error:
        return 0.0


def tree_pss_mib(pid: int) -> float:
    """The memory a process and its descendants hold together, in MiB: their PSS summed, so
    the weights worker processes map from one file count once, not once per process."""
    return sum(pss_mib(member) for member in descendants(pid))


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot."""
    times = psutil.cpu_times()
    return float(sum(times)) - times.idle - getattr(times, "iowait", 0.0)


def process_name(pid: int) -> str:
    process = _process(pid)
    try:
        return process.name() if process else ""
    except psutil.Error:
        return ""


def cpu_model() -> str:
    """The CPU's model name (psutil has none: /proc/cpuinfo's first "model name")."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return "unknown CPU"


class CpuMeter:
    """CPU used during a leg by the server tree, this process, reaped children, and the rest
    of the machine (other people's work on a shared machine: noise)."""

    def __init__(self, server_pid: int | None) -> None:
        self._server_pid = server_pid
        self._server_pids = descendants(server_pid) if server_pid else []

    def __enter__(self) -> CpuMeter:
        self._wall = time.perf_counter()
        self._server = self._server_cpu()
        self._helper = self._helper_cpu()
        self._main = self._main_thread_cpu()
        self._own = time.process_time()
        self._children = _reaped_children_cpu()
        self._busy = machine_busy_seconds()
        self._workers = self._worker_cpus()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.server_cpu = self._server_cpu() - self._server
        self.helper_cpu = self._helper_cpu() - self._helper  # the server tree's Envoy
        # The server's main thread: its event loop (gRPC handlers, tokenizing, protobuf).
        self.main_thread_cpu = self._main_thread_cpu() - self._main
        self.own_cpu = time.process_time() - self._own
        self.children_cpu = _reaped_children_cpu() - self._children
        self.busy = machine_busy_seconds() - self._busy
        self.workers_cpu = sum(
            max(0.0, cpu - self._workers.get(pid, 0.0)) for pid, cpu in self._worker_cpus().items()
        )

    def _worker_cpus(self) -> dict[int, float]:
        """CPU seconds by pid of this process's live descendants when no server is measured:
        an in-process measurement's engine worker processes (its own work, not noise: they
        are reaped, and so counted in ``children_cpu``, only once the engines close)."""
        if self._server_pid is not None:
            return {}
        return {pid: cpu_seconds(pid) for pid in descendants(os.getpid())[1:]}

    def _server_cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self._server_pids)

    def _main_thread_cpu(self) -> float:
        return cpu_seconds(self._server_pid, self._server_pid) if self._server_pid else 0.0

    def _helper_cpu(self) -> float:
        return sum(
            cpu_seconds(pid) for pid in self._server_pids[1:] if process_name(pid) == "envoy"
        )

    def cores(self, cpu: float) -> float:
        return cpu / self.seconds if self.seconds > 0 else 0.0

    @property
    def other_cpu(self) -> float:
        """Busy CPU not accounted to the server, the load generator, this process or its
        worker processes."""
        accounted = self.server_cpu + self.own_cpu + self.children_cpu + self.workers_cpu
        return max(0.0, self.busy - accounted)


def _reaped_children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class RssSampler:
    """Samples a process's resident memory every ``interval`` seconds in a thread; with
    ``tree``, the PSS summed over it and its descendants (:func:`tree_pss_mib`)."""

    def __init__(self, pid: int, interval: float = 0.2, *, tree: bool = False) -> None:
        self._pid = pid
        self._interval = interval
        self._measure = tree_pss_mib if tree else rss_mib
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._measure(self._pid))
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --- managed child processes ---------------------------------------------------------------


@dataclass
class Child:
    """A started process, its log and its addresses."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for pid in reversed(descendants(self.process.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_S)


def start_child(
    name: str,
    command: Sequence[str],
    ready: Callable[[], bool],
    timeout: float = START_TIMEOUT_S,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO,
) -> Child:
    """Starts ``command`` (log in .bench/logs/<name>.log; this environment without EMBEDD_*
    variables, plus ``env``; in ``cwd``) and polls ``ready`` until true."""
    ensure_bench_dir()
    log_path = LOG_DIR / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**clean_environment(), **OFFLINE, **(env or {})},
            cwd=cwd,
        )
    child = Child(name, process, log_path)

    def exited() -> str | None:
        code = process.poll()
        return None if code is None else f"exited with code {code}:\n{child.log_tail()}"

    try:
        probes.wait_until(ready, timeout, name, gone=exited, interval=0.2)
    except TimeoutError as error:
        child.stop()
        raise TimeoutError(f"{error}:\n{child.log_tail()}") from None
    except BaseException:
        child.stop()
        raise
    return child


class Children:
    """Every child started in a ``with`` block is stopped when it ends, last first."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def add(self, child: Child) -> Child:
        self._children.append(child)
        return child

    def add_embedd(self, server: Embedd) -> Embedd:
        self.add(server.child)
        return server

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        while self._children:
            self._children.pop().stop()


@dataclass(frozen=True)
class Embedd:
    """An embedd server: gRPC target, REST base URL (when Envoy runs), the process."""

    child: Child
    grpc_target: str
    rest_url: str | None


def start_embedd(
    models_dir: Path, with_envoy: bool, *, name: str = "", extra: Sequence[str] = ()
) -> Embedd:
    """`embedd serve` (gRPC only) or `embedd run` (gRPC + Envoy's REST) with default
    settings (and the flags in ``extra``) on free loopback ports (metrics too)."""
    grpc_port = free_port()
    command = [
        sys.executable,
        "-m",
        "embedd_server.cli.main",
        "run" if with_envoy else "serve",
        "--grpc-port",
        str(grpc_port),
        "--models-dir",
        str(models_dir),
        "--shutdown-grace-s",
        "2",
        *extra,
    ]
    if "--metrics-port" not in extra:  # metrics stay on, off the default port: two can run
        command += ["--metrics-port", str(free_port())]
    target = f"127.0.0.1:{grpc_port}"
    checks = [functools.partial(probes.grpc_serving, target)]
    rest_url = None
    if with_envoy:
        http_port = free_port()
        command += ["--http-port", str(http_port)]
        rest_url = f"http://127.0.0.1:{http_port}"
        checks.append(functools.partial(probes.http_ok, rest_url + "/v1/models"))

    def ready() -> bool:
        return all(check() for check in checks)

    name = name or ("embedd-run" if with_envoy else "embedd-serve")
    return Embedd(start_child(name, command, ready), target, rest_url)


def start_floor() -> Embedd:
    """``python -m bench.floor``: the do-nothing gRPC server (see bench/floor.py)."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "bench.floor", str(port)]
    ready = functools.partial(probes.grpc_serving, target)
    return Embedd(start_child("floor", command, ready), target, None)
