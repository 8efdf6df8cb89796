"""Fault tests under load that print what they measured: sent, answered, failed, lost.

A request is "lost" when it got no answer at all before its deadline (a hang); "failed" when
it got a status that is not one the scenario allows.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, MODELS_DIR
from tests.servers import ServerProcess, ServerThread

DOG = 12  # the fake vocabulary's "dog"


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
    with ServerThread.with_fake_models(tmp_path) as server:
        server.runtime.delay = 0.001
        server.runtime.die_on = DOG  # every batch holding "dog" kills its worker

        def make(n: int) -> pb.EmbedRequest:
            return pb.EmbedRequest(texts=["dog" if n % 10 == 0 else "cat", "hello"])

        outcomes = _load(server.target, callers=8, requests_each=25, make=make)
        replaced = server.server.registry.loaded_models()[0].pool.replaced
    _report("worker crashes under load (fake engine)", 8 * 25, outcomes, {"OK", "UNAVAILABLE"})
    assert outcomes["UNAVAILABLE"] > 0 and replaced > 0
    print(f"workers replaced: {replaced}")
