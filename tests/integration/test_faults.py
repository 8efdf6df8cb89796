"""Fault tests under load that print what they measured: sent, answered, failed, lost.

A request is "lost" when it got no answer at all before its deadline (a hang); "failed" when
it got a status that is not one the scenario allows.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, MODELS_DIR
from tests.fakes import FakeLoader, on_token, process_crash, slow, worker_killed
from tests.servers import ServerProcess, ServerThread

DOG = 12  # the fake vocabulary's "dog"
MESSAGES: dict[str, str] = {}  # the last message seen per status (for failure reports)


def _load(
    target: str, callers: int, requests_each: int, make: Callable[[int], pb.EmbedRequest]
) -> Counter[str]:
    """Closed-loop callers; counts answers by status name ('LOST' when none came)."""
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def caller(number: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.EmbedderStub(channel)
            for sent in range(requests_each):
                try:
                    stub.Embed(make(number * requests_each + sent), timeout=60)
                    name = "OK"
                except grpc.RpcError as error:
                    code = error.code()
                    name = "LOST" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name
                    with lock:
                        MESSAGES[name] = error.details() or ""
                with lock:
                    outcomes[name] += 1

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return outcomes


def _report(scenario: str, sent: int, outcomes: Counter[str], allowed: set[str]) -> None:
    answered = sum(count for name, count in outcomes.items() if name != "LOST")
    failed = sum(count for name, count in outcomes.items() if name not in allowed | {"LOST"})
    print(
        f"\n{scenario}: sent {sent}, answered {answered}, failed {failed}, "
        f"lost {outcomes['LOST']} ({dict(outcomes)})"
    )
    assert answered == sent and failed == 0 and outcomes["LOST"] == 0


@pytest.mark.slow  # a real server flooded (~35 s here)
def test_overload_flood_is_refused_at_once_never_lost(tmp_path: Path) -> None:
    (tmp_path / f"{DEFAULT_MODEL}.gguf").symlink_to(
        (MODELS_DIR / f"{DEFAULT_MODEL}.gguf").resolve()
    )
    with ServerProcess.start(tmp_path, ["--max-queued-texts", "16"]) as server:
        started = time.perf_counter()
        outcomes = _load(
            server.target,
            callers=32,
            requests_each=8,
            make=lambda n: pb.EmbedRequest(
                texts=[f"flood sentence {n} number {i}" for i in range(4)]
            ),
        )
        seconds = time.perf_counter() - started
    _report(
        "overload flood (real model, queue bound 16)",
        32 * 8,
        outcomes,
        {"OK", "RESOURCE_EXHAUSTED"},
    )
    assert outcomes["RESOURCE_EXHAUSTED"] > 0, "the flood should have filled the queue"
    assert outcomes["OK"] > 0
    print(f"took {seconds:.1f}s")


def test_worker_crashes_under_load_answer_every_caller(tmp_path: Path) -> None:
    # Every batch holding "dog" kills its worker.
    loader = FakeLoader(slow(0.001, on_token(DOG, worker_killed)))
    with ServerThread.with_fake_models(tmp_path, loader) as server:

        def make(n: int) -> pb.EmbedRequest:
            return pb.EmbedRequest(texts=["dog" if n % 10 == 0 else "cat", "hello"])

        outcomes = _load(server.target, callers=8, requests_each=25, make=make)
        replaced = server.server.registry.loaded_models()[0].pool.replaced
    _report("worker crashes under load (fake engine)", 8 * 25, outcomes, {"OK", "UNAVAILABLE"})
    assert outcomes["UNAVAILABLE"] > 0 and replaced > 0
    print(f"workers replaced: {replaced}")


def _worker_processes(server_pid: int) -> list[int]:
    """The server's llama.cpp worker processes (its children running engines.worker_main)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        if parent == server_pid and b"embedd_server.engines.worker_main" in command:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def _wait_for_workers(server_pid: int, count: int, exclude: set[int]) -> list[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = _worker_processes(server_pid)
        if len(pids) == count and not exclude & set(pids):
            return pids
        time.sleep(0.1)
    raise AssertionError(f"expected {count} new worker processes, have {pids}")


def _wait_until_dead(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return  # reaped
        if state == "Z":
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} outlived SIGKILL")


# The engine that keeps worker processes by default (it can crash); ONNX Runtime's workers are
# threads on one session, whose hung call the watchdog aborts instead.
LLAMA = ["--engine", "llama.cpp"]


def _real_model_dir(tmp_path: Path) -> Path:
    (tmp_path / f"{DEFAULT_MODEL}.gguf").symlink_to(
        (MODELS_DIR / f"{DEFAULT_MODEL}.gguf").resolve()
    )
    return tmp_path


@pytest.mark.slow  # a real server under load, its workers SIGKILLed and replaced (~45 s here)
def test_a_killed_worker_process_costs_its_callers_a_retry_not_the_server(
    tmp_path: Path,
) -> None:
    with ServerProcess.start(_real_model_dir(tmp_path), [*LLAMA, "--workers", "2"]) as server:
        workers = _wait_for_workers(server.process.pid, 2, set())

        def kill_workers() -> None:
            for pid in workers:
                time.sleep(0.5)
                os.kill(pid, signal.SIGKILL)  # as a segfault inside llama.cpp would

        killer = threading.Thread(target=kill_workers)
        killer.start()
        outcomes = _load(
            server.target,
            callers=8,
            requests_each=40,
            make=lambda n: pb.EmbedRequest(texts=[f"sentence number {n} about a dog"]),
        )
        killer.join()
        for pid in workers:  # a SIGKILL lands asynchronously: wait until they are gone
            _wait_until_dead(pid)
        # A worker whose process died while it was idle starts a new one with its next
        # batch (nobody was waiting on it): more load brings both back.
        after = _load(
            server.target,
            callers=4,
            requests_each=10,
            make=lambda n: pb.EmbedRequest(texts=[f"after the kills {n}"]),
        )
        replacements = _wait_for_workers(server.process.pid, 2, set(workers))
        log = server.log()
    _report(
        "worker processes SIGKILLed under load (real model)",
        8 * 40,
        outcomes,
        {"OK", "UNAVAILABLE"},
    )
    errors = [line for line in log.splitlines() if "ERROR" in line]
    assert after == Counter({"OK": 40}), (after, MESSAGES, errors)  # all OK after the kills
    assert "starting a new engine process" in log
    print(f"killed {workers}, replaced by {replacements}")


@pytest.mark.slow  # waits out the worker timeout, then the replacement (~40 s here)
def test_a_hung_worker_process_is_killed_and_replaced(tmp_path: Path) -> None:
    args = [*LLAMA, "--workers", "1", "--worker-timeout-s", "2"]
    with ServerProcess.start(_real_model_dir(tmp_path), args) as server:
        (worker,) = _wait_for_workers(server.process.pid, 1, set())
        os.kill(worker, signal.SIGSTOP)  # its next decode never ends
        started = time.monotonic()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.EmbedderStub(channel)
            try:
                stub.Embed(pb.EmbedRequest(texts=["a decode that hangs"]), timeout=30)
                raise AssertionError("the hung worker's caller got an answer")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            waited = time.monotonic() - started
            (replacement,) = _wait_for_workers(server.process.pid, 1, {worker})
            answer = stub.Embed(pb.EmbedRequest(texts=["served by the new worker"]), timeout=30)
    print(
        f"\nhung worker {worker}: caller answered UNAVAILABLE after {waited:.1f}s; "
        f"replaced by {replacement}"
    )
    assert 2 <= waited < 10
    assert len(answer.embeddings[0].values) == 384
    assert (
        not Path(f"/proc/{worker}").exists()
        or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]
    )


def test_a_pack_that_kills_its_engine_process_twice_is_answered_unavailable(
    tmp_path: Path,
) -> None:
    crashes: list[None] = []

    def crash() -> None:
        crashes.append(None)
        process_crash()

    # A poison input: every engine dies on it.
    with ServerThread.with_fake_models(tmp_path, FakeLoader(on_token(DOG, crash))) as server:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.EmbedderStub(channel)
            with pytest.raises(grpc.RpcError) as poisoned:
                stub.Embed(pb.EmbedRequest(texts=["dog"]), timeout=30)
            fine = stub.Embed(pb.EmbedRequest(texts=["cat"]), timeout=30)
        pool = server.server.registry.loaded_models()[0].pool
    assert poisoned.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(crashes) == 2  # run once more on a new engine, not more
    assert pool.replaced == 2  # the renewed engine, then the worker after the second death
    assert len(fine.embeddings) == 1
