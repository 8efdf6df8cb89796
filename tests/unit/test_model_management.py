"""Model management on the fake engine: catalogue changes, leases, keep_alive, budget."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.protobuf.struct_pb2 import Value

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.settings import Settings
from tests.fakes import FakeLoader, gated, slow, write_fake_gguf
from tests.servers import ServerThread
from tests.waiting import wait_until


@pytest.fixture
def stub(fake_server: ServerThread) -> Iterator[pb_grpc.EmbedderStub]:
    with grpc.insecure_channel(fake_server.target) as channel:
        yield pb_grpc.EmbedderStub(channel)


@pytest.fixture
def ollama(fake_server: ServerThread) -> Iterator[pb_grpc.OllamaStub]:
    with grpc.insecure_channel(fake_server.target) as channel:
        yield pb_grpc.OllamaStub(channel)


def _running(stub: pb_grpc.EmbedderStub) -> dict[str, str]:
    reply = stub.ListRunning(pb.ListRunningRequest())
    return {model.name: model.expires_at for model in reply.models}


def _error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _trailer_code(error: grpc.RpcError) -> str:
    trailers = dict(cast(grpc.Call, error).trailing_metadata() or ())
    code: str = json.loads(trailers["x-http-error-body"])["error"]["code"]
    return code


def test_models_added_or_removed_show_up_without_restart(
    stub: pb_grpc.EmbedderStub, fake_server: ServerThread
) -> None:
    models_dir = fake_server.settings.models_dir
    shutil.copy(models_dir / "other.gguf", models_dir / "third.gguf")
    assert "third" in [m.id for m in stub.ListModels(pb.ListModelsRequest()).data]
    assert stub.Embed(pb.EmbedRequest(texts=["hello"], model="third")).model == "third"
    assert "third" in _running(stub)
    (models_dir / "third.gguf").unlink()
    assert "third" not in [m.id for m in stub.ListModels(pb.ListModelsRequest()).data]
    wait_until(lambda: "third" not in _running(stub), "'third' unloaded", timeout=3.0)
    runtime = fake_server.loader.runtimes[-1]  # closed by the unload, just after it is listed
    wait_until(lambda: runtime.closed, "'third''s runtime closed", timeout=3.0)


def test_concurrent_first_requests_cause_one_load(
    stub: pb_grpc.EmbedderStub, fake_server: ServerThread
) -> None:
    loads_before = fake_server.server.registry.loads
    futures = [stub.Embed.future(pb.EmbedRequest(texts=["cat"], model="other")) for _ in range(16)]
    assert all(len(f.result().embeddings) == 1 for f in futures)
    assert fake_server.server.registry.loads == loads_before + 1


def test_keep_alive_zero_unloads_after_the_request(
    stub: pb_grpc.EmbedderStub, ollama: pb_grpc.OllamaStub
) -> None:
    request = pb.OllamaEmbedRequest(
        model="other", input=Value(string_value="hello"), keep_alive=Value(number_value=0)
    )
    assert ollama.OllamaEmbed(request).model == "other"
    wait_until(lambda: "other" not in _running(stub), "'other' unloaded", timeout=1.0)


def test_a_short_keep_alive_expires_and_ps_shows_it(stub: pb_grpc.EmbedderStub) -> None:
    stub.LoadModel(pb.LoadModelRequest(model="other", keep_alive=Value(string_value="1s")))
    running = _running(stub)
    assert running["other"].startswith("20") and running["other"].endswith("Z")
    assert running["fake"].startswith("2318-")  # the default model stays loaded
    wait_until(lambda: "other" not in _running(stub), "'other' expired", timeout=3.0)
    assert "fake" in _running(stub)


def test_explicit_unload_lets_calls_in_flight_finish(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(tmp_path, FakeLoader(slow(0.01))) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        stub.LoadModel(pb.LoadModelRequest(model="other"))
        runtime = server.loader.runtimes[-1]
        in_flight = stub.Embed.future(pb.EmbedRequest(texts=["cat"] * 50, model="other"))
        # In flight: the engine has its first batch (the slow engine takes 0.01 s per text).
        wait_until(lambda: runtime.calls, "the engine started on the 50 texts")
        reply = stub.UnloadModel(pb.UnloadModelRequest(model="other"))
        assert reply.message == "Model unloaded successfully" and not reply.model.loaded
        assert len(in_flight.result(timeout=10).embeddings) == 50
        assert runtime.closed and "other" not in _running(stub)


def test_models_without_pooling_need_a_pooling_type(tmp_path: Path) -> None:
    write_fake_gguf(tmp_path / "causal.gguf", pooling=0)
    with (
        ServerThread.with_fake_models(tmp_path) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["hi"], model="causal")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "does not support embeddings" in str(error.details())
        assert _trailer_code(error) == "model_not_embedding"
        refused = _error(lambda: stub.LoadModel(pb.LoadModelRequest(model="x", embedding=False)))
        assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
        bad = _error(lambda: stub.LoadModel(pb.LoadModelRequest(model="causal", pooling="max")))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        loaded = stub.LoadModel(pb.LoadModelRequest(model="causal", pooling="mean"))
        assert loaded.model.loaded and server.loader.runtimes[-1].options.pooling == "mean"
        assert stub.Embed(pb.EmbedRequest(texts=["hi"], model="causal")).model == "causal"


def test_aliases_map_to_local_models(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(
            tmp_path, model_aliases="text-embedding-3-small=other"
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        reply = stub.Embed(pb.EmbedRequest(texts=["hi"], model="text-embedding-3-small"))
    assert reply.model == "other" and len(reply.embeddings[0].values) == 4


def test_memory_budget_evicts_least_recently_used_idle_models(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        write_fake_gguf(tmp_path / f"{name}.gguf", padding_bytes=400_000)
    gate = threading.Event()
    gate.set()
    with (
        ServerThread.with_fake_models(
            tmp_path, FakeLoader(gated(gate)), memory_budget_mb=1
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        for name in ("a", "b", "a"):  # b is now the least recently used
            stub.Embed(pb.EmbedRequest(texts=["hi"], model=name))
        stub.Embed(pb.EmbedRequest(texts=["hi"], model="c"))
        assert set(_running(stub)) == {"a", "c", "fake"}  # the default model is never evicted
        # With every loaded model busy, a load that does not fit is refused at once.
        gate.clear()  # the workers of a and c block inside their next decode
        runtimes = [r for r in server.loader.runtimes if r.info.name in ("a", "c") and not r.closed]
        assert len(runtimes) == 2
        calls_before = [len(runtime.calls) for runtime in runtimes]
        blocked = [
            stub.Embed.future(pb.EmbedRequest(texts=["hi"], model=name)) for name in ("a", "c")
        ]
        wait_until(
            lambda: all(len(r.calls) > n for r, n in zip(runtimes, calls_before, strict=True)),
            "a worker of a and of c inside its decode",
        )
        error = _error(lambda: stub.Embed(pb.EmbedRequest(texts=["hi"], model="b"), timeout=5))
        gate.set()
        assert all(f.result(timeout=5).embeddings for f in blocked)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory budget" in str(error.details())


def test_unknown_models_list_the_available_ones(stub: pb_grpc.EmbedderStub) -> None:
    error = _error(lambda: stub.LoadModel(pb.LoadModelRequest(model="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "Available models: fake, other" in str(error.details())


def test_default_model_is_never_expired_by_the_server_default(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(tmp_path, keep_alive="0.2s") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        stub.Embed(pb.EmbedRequest(texts=["hi"], model="other"))
        stub.Embed(pb.EmbedRequest(texts=["hi"]))
        wait_until(lambda: "other" not in _running(stub), "'other' unloaded", timeout=3.0)
        assert "fake" in _running(stub)


def test_builtin_models_dir_adds_models_and_models_dir_wins(tmp_path: Path) -> None:
    # The container image: its default model in the built-in directory, a mounted models_dir.
    builtin, mounted = tmp_path / "builtin", tmp_path / "mounted"
    builtin.mkdir()
    mounted.mkdir()
    write_fake_gguf(builtin / "fake.gguf")  # the default model, only in the built-in directory
    write_fake_gguf(builtin / "shadowed.gguf", dimensions=4)
    write_fake_gguf(mounted / "shadowed.gguf", dimensions=16)
    write_fake_gguf(mounted / "mine.gguf", dimensions=4)
    settings = Settings(
        grpc_port=0,
        metrics_port=0,
        models_dir=mounted,
        builtin_models_dir=str(builtin),
        default_model="fake",
        workers=1,
    )
    with ServerThread(settings) as server, grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        listed = [m.id for m in stub.ListModels(pb.ListModelsRequest()).data]
        assert listed == ["fake", "mine", "shadowed"]
        assert len(stub.Embed(pb.EmbedRequest(texts=["a"])).embeddings[0].values) == 8
        shadowed = stub.Embed(pb.EmbedRequest(texts=["a"], model="shadowed"))
        assert len(shadowed.embeddings[0].values) == 16  # models_dir's file, not built-in's
        with pytest.raises(grpc.RpcError) as missing:
            stub.Embed(pb.EmbedRequest(texts=["a"], model="../builtin/fake"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


# --- nothing one caller asks for changes what the others get -------------------------------------


def _models(stub: pb_grpc.EmbedderStub) -> dict[str, pb.Model]:
    return {model.id: model for model in stub.ListModels(pb.ListModelsRequest()).data}


def _reap(server: ServerThread) -> None:
    """One pass of the reaper now (it would retire idle models whose keep_alive ran out)."""
    server.call(server.server.registry.reap())


def test_a_load_never_replaces_a_models_own_pooling(
    stub: pb_grpc.EmbedderStub, fake_server: ServerThread
) -> None:
    before = stub.Embed(pb.EmbedRequest(texts=["hello cat"]))
    for model in ("fake", "other"):  # loaded (the default) or not
        request = pb.LoadModelRequest(model=model, pooling="cls")
        error = _error(lambda request=request: stub.LoadModel(request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"'{model}' pools with 'mean', its own pooling" in str(error.details())
        assert "import it again under another name" in str(error.details())
    assert all(runtime.options.pooling is None for runtime in fake_server.loader.runtimes)
    assert stub.Embed(pb.EmbedRequest(texts=["hello cat"])) == before
    assert _models(stub)["fake"].pooling == "mean"
    # Asking for the pooling it has is no change: the loaded instance stays.
    loads = fake_server.server.registry.loads
    assert stub.LoadModel(pb.LoadModelRequest(model="fake", pooling="mean")).model.loaded
    assert fake_server.server.registry.loads == loads


def test_a_loaded_model_is_not_reloaded_with_other_options(tmp_path: Path) -> None:
    write_fake_gguf(tmp_path / "causal.gguf", pooling=0)
    with (
        ServerThread.with_fake_models(tmp_path) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)
        assert _models(stub)["causal"].pooling == "none"
        stub.LoadModel(pb.LoadModelRequest(model="causal", pooling="mean"))
        assert _models(stub)["causal"].pooling == "mean"  # what it serves with, honestly
        before = stub.Embed(pb.EmbedRequest(texts=["hello cat"], model="causal"))
        loads = server.server.registry.loads
        for request in (
            pb.LoadModelRequest(model="causal", pooling="last"),
            pb.LoadModelRequest(model="causal", n_gpu_layers=-1),
        ):
            error = _error(lambda request=request: stub.LoadModel(request))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "every caller of it shares that instance" in str(error.details())
            assert "unload it first" in str(error.details())
            assert _trailer_code(error) == "conflict"
        assert server.server.registry.loads == loads
        assert stub.Embed(pb.EmbedRequest(texts=["hello cat"], model="causal")) == before
        assert _models(stub)["causal"].pooling == "mean"
        # Unloaded first, it may be loaded with another pooling, which the catalogue shows.
        stub.UnloadModel(pb.UnloadModelRequest(model="causal"))
        stub.LoadModel(pb.LoadModelRequest(model="causal", pooling="last"))
        assert _models(stub)["causal"].pooling == "last"
        # The default model cannot be unloaded, so it says to restart instead.
        error = _error(lambda: stub.LoadModel(pb.LoadModelRequest(model="fake", n_gpu_layers=-1)))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "it is the default model, which stays loaded" in str(error.details())


def test_the_default_model_stays_loaded(
    stub: pb_grpc.EmbedderStub, ollama: pb_grpc.OllamaStub, fake_server: ServerThread
) -> None:
    runtime = fake_server.runtime
    error = _error(lambda: stub.UnloadModel(pb.UnloadModelRequest(model="")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'fake' is the default model, which stays loaded" in str(error.details())
    zero = Value(number_value=0)
    ollama.OllamaEmbed(
        pb.OllamaEmbedRequest(model="fake", input=Value(string_value="hi"), keep_alive=zero)
    )
    reply = stub.LoadModel(pb.LoadModelRequest(model="fake", keep_alive=zero))
    assert reply.message.endswith("keep_alive ignored: the default model stays loaded")
    _reap(fake_server)
    assert _running(stub)["fake"].startswith("2318-") and not runtime.closed
    assert fake_server.server.registry.loads == 1


def test_requests_keep_alive_does_not_unpin_a_model_an_admin_pinned(
    stub: pb_grpc.EmbedderStub, ollama: pb_grpc.OllamaStub, fake_server: ServerThread
) -> None:
    stub.LoadModel(pb.LoadModelRequest(model="other", keep_alive=Value(number_value=-1)))
    request = pb.OllamaEmbedRequest(
        model="other", input=Value(string_value="hello"), keep_alive=Value(number_value=0)
    )
    assert ollama.OllamaEmbed(request).model == "other"
    _reap(fake_server)
    assert _running(stub)["other"].startswith("2318-")
    # Unpinned by the admin's unload, the model follows requests' keep_alive again.
    stub.UnloadModel(pb.UnloadModelRequest(model="other"))
    assert ollama.OllamaEmbed(request).model == "other"
    wait_until(lambda: "other" not in _running(stub), "'other' expired", timeout=3.0)
