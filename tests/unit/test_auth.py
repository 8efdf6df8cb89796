"""API keys and rate limits: the pieces alone, then the fake-engine server over a real channel."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Value
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.errors import PermissionDenied
from embedd_server.rpc.interceptors.auth import (
    MODEL_CONTROL_METHODS,
    AccessInterceptor,
    KeyStore,
    ModelControl,
    RateLimiter,
    client_address,
    interceptors,
    presented_key,
    read_keys_file,
)
from embedd_server.rpc.server import EmbeddServer
from embedd_server.settings import Settings, SettingsError
from tests.fakes import FakeLoader
from tests.servers import ServerThread

KEY_A, KEY_B = "sk-alpha-0123456789", "sk-bravo-9876543210"
WRONG = "sk-wrong-5555555555"
Metadata = tuple[tuple[str, str], ...]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bearer(key: str) -> Metadata:
    return (("authorization", f"Bearer {key}"),)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def trailers(error: grpc.RpcError) -> dict[str, str]:
    return {item.key: str(item.value) for item in error.trailing_metadata() or ()}


def details(error: grpc.RpcError) -> str:
    return error.details() or ""


def assert_refused(error: grpc.RpcError, code: grpc.StatusCode, http_status: int) -> Any:
    """Checks the status and the REST trailers; returns the decoded REST error body."""
    assert error.code() == code
    meta = trailers(error)
    assert meta["x-http-status"] == str(http_status)
    return json.loads(meta["x-http-error-body"])


# --- the pieces ------------------------------------------------------------------------------


def test_keys_file_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# team keys\n\n{KEY_A}\n  {KEY_B}  # ci\n   \n")
    assert read_keys_file(path) == [KEY_A, KEY_B]
    store = KeyStore.from_settings(Settings(api_keys="sk-c, ,sk-d", api_keys_file=str(path)))
    assert len(store) == 4
    assert all(store.accepts(key) for key in (KEY_A, KEY_B, "sk-c", "sk-d"))
    assert not store.accepts(WRONG)
    assert not store.accepts(KEY_A[:-1])
    assert not store.accepts("")


def test_missing_keys_file_is_a_startup_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.keys"
    settings = Settings(
        grpc_port=0, metrics_port=0, models_dir=tmp_path, api_keys_file=str(missing)
    )
    with pytest.raises(SettingsError, match=r"api_keys_file: cannot read .*nope\.keys"):
        interceptors(settings)
    with pytest.raises(SettingsError, match=r"nope\.keys"):
        asyncio.run(EmbeddServer(settings, FakeLoader()).start())
    empty = tmp_path / "empty.keys"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(SettingsError, match=r"empty\.keys holds no keys"):
        read_keys_file(empty)


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_only_model_control_is_guarded_when_access_control_is_off() -> None:
    [interceptor] = interceptors(Settings())
    assert isinstance(interceptor, AccessInterceptor)
    handler: grpc.RpcMethodHandler[Any, Any] = grpc.unary_unary_rpc_method_handler(
        lambda request, context: request
    )
    for method in ("/embedd.v1.Embedder/Embed", "/embedd.v1.OpenAI/CreateEmbeddings"):
        assert interceptor.wrap(handler, _Details(method)) is handler  # no per-call cost
    for method in MODEL_CONTROL_METHODS:
        assert interceptor.wrap(handler, _Details(method)) is not handler


def test_presented_key_and_client_address() -> None:
    assert presented_key(bearer(KEY_A)) == KEY_A
    assert presented_key((("authorization", f"bearer  {KEY_A} "),)) == KEY_A
    assert presented_key((("x-api-key", KEY_B),)) == KEY_B
    assert presented_key((("authorization", "Basic abc"), ("x-api-key", KEY_B))) == KEY_B
    assert presented_key((("authorization", "Bearer "),)) is None
    assert presented_key(()) is None
    # What a caller claims never counts: X-Forwarded-For, or Envoy's headers without the
    # proxy secret (or with a wrong one); with it, the address Envoy determined.
    claimed = (("x-forwarded-for", "6.6.6.6, 10.0.0.7"), ("x-embedd-client-address", "10.0.0.8"))
    assert client_address(claimed, "ipv4:127.0.0.1:5000") == "127.0.0.1"
    assert client_address(claimed, "ipv4:127.0.0.1:5000", "s3cret") == "127.0.0.1"
    wrong = (*claimed, ("x-embedd-proxy-secret", "guess"))
    assert client_address(wrong, "ipv4:127.0.0.1:5000", "s3cret") == "127.0.0.1"
    proven = (*claimed, ("x-embedd-proxy-secret", "s3cret"))
    assert client_address(proven, "ipv4:127.0.0.1:5000", "s3cret") == "10.0.0.8"
    assert client_address(proven, "ipv4:127.0.0.1:5000") == "127.0.0.1"  # no secret: peer
    assert client_address((), "ipv4:10.1.2.3:5000") == "10.1.2.3"
    assert client_address((), "ipv6:[::1]:5000") == "[::1]"
    assert client_address((), "unix:/tmp/socket") == "unix:/tmp/socket"


def test_token_bucket_rate_burst_and_recovery() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a") == pytest.approx(0.5)
    assert limiter.take("b") == 0  # another caller has its own bucket
    clock.now += 0.5
    assert limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(0.5)
    assert RateLimiter(rate=0.5).burst == 1
    assert RateLimiter(rate=10).burst == 10


def test_idle_buckets_are_evicted() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10, burst=5, clock=clock)  # a bucket refills in 0.5 s
    for caller in range(1000):
        limiter.take(f"client-{caller}")
        clock.now += 0.001
    assert limiter.callers <= 501
    clock.now += 1
    limiter.take("late")
    assert limiter.callers == 1


# --- the server, with keys -------------------------------------------------------------------


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread.with_fake_models(tmp_path, api_keys=f"{KEY_A},{KEY_B}") as server:
        yield server


@pytest.fixture
def channel(keyed_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(keyed_server.target) as channel:
        yield channel


def embed(channel: grpc.Channel, metadata: Metadata = ()) -> pb.EmbedResponse:
    stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
    reply: pb.EmbedResponse = stub.Embed(pb.EmbedRequest(texts=["hello"]), metadata=metadata)
    return reply


def test_no_or_wrong_key_is_unauthenticated(channel: grpc.Channel) -> None:
    for metadata in [(), bearer(WRONG), (("x-api-key", WRONG),), (("authorization", KEY_A),)]:
        error = rpc_error(functools.partial(embed, channel, metadata))
        body = assert_refused(error, grpc.StatusCode.UNAUTHENTICATED, 401)
        assert body["error"]["code"] == "invalid_api_key"
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"].startswith("Incorrect API key provided")
        assert WRONG not in details(error) and KEY_A not in details(error)


def test_bearer_or_x_api_key_is_let_in(channel: grpc.Channel) -> None:
    assert embed(channel, bearer(KEY_A)).model == "fake"
    assert embed(channel, (("x-api-key", KEY_B),)).model == "fake"
    assert embed(channel, (("authorization", f"bearer {KEY_B}"),)).model == "fake"


def test_streams_and_model_management_need_a_key(channel: grpc.Channel) -> None:
    stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
    requests = [pb.EmbedRequest(texts=["hello"]), pb.EmbedRequest(texts=["cat"])]
    error = rpc_error(lambda: list(stub.EmbedStream(iter(requests))))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert len(list(stub.EmbedStream(iter(requests), metadata=bearer(KEY_A)))) == 2
    load = functools.partial(stub.LoadModel, pb.LoadModelRequest(model="other"))
    unload = functools.partial(stub.UnloadModel, pb.UnloadModelRequest(model="other"))
    for call in (load, unload):
        assert rpc_error(call).code() == grpc.StatusCode.UNAUTHENTICATED
        # API keys but no admin key: model control is off for every key.
        error = rpc_error(functools.partial(call, metadata=bearer(KEY_A)))
        body = assert_refused(error, grpc.StatusCode.PERMISSION_DENIED, 403)
        assert "this server has API keys but no admin key" in body["error"]["message"]
        assert "--admin-api-keys" in body["error"]["message"]


def test_ollama_route_gets_ollama_shape(channel: grpc.Channel) -> None:
    stub = pb_grpc.OllamaStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
    error = rpc_error(lambda: stub.OllamaEmbed(pb.OllamaEmbedRequest(model="fake")))
    body = assert_refused(error, grpc.StatusCode.UNAUTHENTICATED, 401)
    assert set(body) == {"error"} and body["error"].startswith("Incorrect API key provided")


def test_health_stays_open_reflection_needs_a_key(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service="embedd.v1.Embedder"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    error = rpc_error(lambda: list(reflection.ServerReflectionInfo(iter([request]))))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    replies = list(reflection.ServerReflectionInfo(iter([request]), metadata=bearer(KEY_B)))
    names = [s.name for s in replies[0].list_services_response.service]
    assert "embedd.v1.Embedder" in names


def test_keys_file_keys_are_accepted(tmp_path: Path) -> None:
    keys = tmp_path / "api.keys"
    keys.write_text(f"# one key\n{KEY_B}\n")
    with (
        ServerThread.with_fake_models(tmp_path / "models", api_keys_file=str(keys)) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        assert embed(channel, (("x-api-key", KEY_B),)).model == "fake"
        assert rpc_error(lambda: embed(channel, bearer(KEY_A))).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )


def test_keys_never_reach_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with (
        ServerThread.with_fake_models(tmp_path, api_keys=f"{KEY_A},{KEY_B}") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        embed(channel, bearer(KEY_A))
        embed(channel, (("x-api-key", KEY_B),))
        rpc_error(lambda: embed(channel, bearer(WRONG)))
        rpc_error(lambda: embed(channel))
    assert "API key" in caplog.text  # the refusals and the start-up line were logged...
    for secret in (KEY_A, KEY_B, WRONG, KEY_A[3:]):
        assert secret not in caplog.text  # ...without the keys


# --- the server, with rate limits ------------------------------------------------------------


def test_rate_limit_per_key_with_retry_after_then_recovery(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(
            tmp_path, api_keys=f"{KEY_A},{KEY_B}", rate_limit_per_s=1, rate_limit_burst=2
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        embed(channel, bearer(KEY_A))
        embed(channel, bearer(KEY_A))
        error = rpc_error(lambda: embed(channel, bearer(KEY_A)))
        body = assert_refused(error, grpc.StatusCode.RESOURCE_EXHAUSTED, 429)
        assert body["error"]["code"] == "rate_limit_exceeded"
        assert trailers(error)["retry-after"] == "1"
        message = details(error)
        assert "1 requests per second per API key" in message and "Retry in 1 s" in message
        assert KEY_A not in message
        assert embed(channel, bearer(KEY_B)).model == "fake"  # each key has its own bucket
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(5):  # health checks are never limited
            health.Check(health_pb2.HealthCheckRequest())
        # Not synchronisation: waiting as long as Retry-After says is what is under test.
        time.sleep(float(trailers(error)["retry-after"]))
        assert embed(channel, bearer(KEY_A)).model == "fake"


def test_rate_limit_per_client_address_without_keys(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(
            tmp_path, rate_limit_per_s=0.5, proxy_secret="s3cret"
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        embed(channel)  # the peer's address: 127.0.0.1
        error = rpc_error(lambda: embed(channel))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert trailers(error)["retry-after"] == "2"
        assert "per client address" in details(error)
        # A direct caller's claims do not pick another bucket (issue 21)...
        for claim in (
            (("x-forwarded-for", "10.0.0.1"),),
            (("x-embedd-client-address", "10.0.0.2"),),
            (("x-embedd-client-address", "10.0.0.3"), ("x-embedd-proxy-secret", "guess")),
        ):
            assert rpc_error(lambda: embed(channel, claim)).code() == (  # noqa: B023
                grpc.StatusCode.RESOURCE_EXHAUSTED
            )
        # ...the address our Envoy determined (it holds the secret) does.
        forwarded = (("x-embedd-client-address", "10.0.0.1"), ("x-embedd-proxy-secret", "s3cret"))
        embed(channel, forwarded)  # another client behind the proxy
        assert rpc_error(lambda: embed(channel, forwarded)).code() == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )


# --- model control: admin keys ------------------------------------------------------------------

ADMIN = "sk-admin-0123456789"


def _control_calls(stub: pb_grpc.EmbedderStub) -> dict[str, Callable[..., Any]]:
    return {
        "load with options": functools.partial(
            stub.LoadModel, pb.LoadModelRequest(model="other", pooling="mean", n_gpu_layers=0)
        ),
        "load with keep_alive": functools.partial(
            stub.LoadModel, pb.LoadModelRequest(model="other", keep_alive=Value(number_value=-1))
        ),
        "unload": functools.partial(stub.UnloadModel, pb.UnloadModelRequest(model="other")),
    }


def test_model_control_needs_an_admin_key(tmp_path: Path) -> None:
    with (
        ServerThread.with_fake_models(
            tmp_path, api_keys=f"{KEY_A}", admin_api_keys=ADMIN
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        for name, call in _control_calls(stub).items():
            error = rpc_error(functools.partial(call, metadata=bearer(KEY_A)))
            body = assert_refused(error, grpc.StatusCode.PERMISSION_DENIED, 403)
            assert body["error"]["code"] == "permission_denied", name
            assert body["error"]["type"] == "invalid_request_error", name
            assert "needs an admin key; this API key is not one" in body["error"]["message"]
            assert KEY_A not in details(error) and ADMIN not in details(error)
            for metadata in [(), bearer(WRONG)]:
                refused = rpc_error(functools.partial(call, metadata=metadata))
                assert refused.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert call(metadata=bearer(ADMIN)).model.id == "other", name
        # An admin key is also an API key; an API key still embeds.
        assert embed(channel, bearer(ADMIN)).model == "fake"
        assert embed(channel, (("x-api-key", KEY_A),)).model == "fake"


def test_admin_keys_alone_guard_model_control_and_leave_embeddings_open(tmp_path: Path) -> None:
    admin_file = tmp_path / "admin.keys"
    admin_file.write_text(f"# operators\n{ADMIN}\n")
    with (
        ServerThread.with_fake_models(
            tmp_path / "models", admin_api_keys_file=str(admin_file)
        ) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        assert embed(channel).model == "fake"
        load = _control_calls(stub)["load with keep_alive"]
        missing = rpc_error(load)
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "needs an admin key; none was sent" in details(missing)
        assert rpc_error(functools.partial(load, metadata=bearer(WRONG))).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert load(metadata=(("x-api-key", ADMIN),)).model.loaded


def test_without_keys_model_control_is_local_only(tmp_path: Path) -> None:
    # The defaults (loopback listeners, no keys): a developer's machine needs no key.
    with (
        ServerThread.with_fake_models(tmp_path / "local") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        assert all(call().model.id == "other" for call in _control_calls(stub).values())
    # Listening beyond loopback (a container's 0.0.0.0) without an admin key: refused, even
    # to a caller on loopback, while embeddings stay open.
    with (
        ServerThread.with_fake_models(tmp_path / "exposed", http_host="0.0.0.0") as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        for name, call in _control_calls(stub).items():
            body = assert_refused(rpc_error(call), grpc.StatusCode.PERMISSION_DENIED, 403)
            assert (
                "allowed only from loopback on a server listening on loopback"
                in (body["error"]["message"])
            ), name
        assert embed(channel).model == "fake"


def test_model_control_of_a_caller_elsewhere_is_refused_without_keys() -> None:
    control = ModelControl(KeyStore([]), KeyStore([]), local_only=True, proxy_secret="s3cret")
    control.check(None, (), "ipv4:127.0.0.1:5000")
    control.check(None, (), "ipv6:[::1]:5000")
    through_envoy = (("x-embedd-client-address", "127.0.0.1"), ("x-embedd-proxy-secret", "s3cret"))
    control.check(None, through_envoy, "ipv4:127.0.0.1:1")  # a local REST caller
    for metadata, peer in [
        ((), "ipv4:10.0.0.7:5000"),
        # A REST caller elsewhere, as our Envoy (it holds the secret) reports it:
        (
            (("x-embedd-client-address", "10.0.0.7"), ("x-embedd-proxy-secret", "s3cret")),
            "ipv4:127.0.0.1:1",
        ),
        # A caller elsewhere claiming to be local, without the secret (or with a wrong one):
        ((("x-embedd-client-address", "127.0.0.1"),), "ipv4:10.0.0.7:5000"),
        (
            (("x-embedd-client-address", "127.0.0.1"), ("x-embedd-proxy-secret", "x")),
            "ipv4:10.0.0.7:5000",
        ),
        ((("x-forwarded-for", "127.0.0.1"),), "ipv4:10.0.0.7:5000"),
    ]:
        with pytest.raises(PermissionDenied):
            control.check(None, metadata, peer)
