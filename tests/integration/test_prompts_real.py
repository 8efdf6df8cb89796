"""Every embedding family, with every prompt, on every route, against sentence-transformers'
own vectors, through a real server.

The small models of ../shared/models (BERT CLS with a bge-style query prompt, BERT mean raw
with empty prompts, XLM-RoBERTa with e5-style prompts, Qwen3 with an instruction prompt, MPNet,
ModernBERT with nomic-style prompts, Gemma3 with EmbeddingGemma's prompts and Dense modules,
DistilBERT with raw vectors, RoBERTa, Mistral with e5-mistral's instruction) are imported f32
and f16 into one models directory; one `embedd serve` per engine setting (llama.cpp for every
family it computes exactly; auto: its choice, ONNX Runtime for the encoders) serves them,
with Envoy in front. Every reference text, with no prompt and with each of the model's prompts, is
embedded over native gRPC (prompt_name), OpenAI's /v1/embeddings (the official client's
extra_body) and Ollama's /api/embed (options): cosine >= 0.9999 (f32 >= 0.99999) against
reference/embeddings[_<prompt>].npy, and usage equal to the token count of prompt + text,
truncated at the model's max_seq_length, as sentence-transformers counts it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import openai
import pytest
from tokenizers import Tokenizer

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.convert.hf_to_gguf import import_model
from tests.conftest import SHARED
from tests.envoy_proc import EnvoyProcess, http
from tests.servers import ServerProcess, server_behind_envoy

pytestmark = [pytest.mark.real_model, pytest.mark.slow]  # ~7 min: every family, prompt, route

MODELS = SHARED / "models"
# Each model and its max_seq_length, as sentence-transformers reads it (test_families.py).
FAMILIES = {
    "tiny-bert-cls": 64,
    "tiny-bert-mean-raw": 32,
    "tiny-xlmr": 64,
    "tiny-qwen3": 128,
    "tiny-mpnet": 64,
    "tiny-modernbert": 128,
    "tiny-gemma3-embed": 128,
    "tiny-distilbert": 48,
    "tiny-roberta": 64,
    "tiny-mistral": 128,
}
MIN_COSINE = {"f32": 0.99999, "f16": 0.9999}
ENGINES = ("llama.cpp", "auto")
# llama.cpp has no MPNet (engine=llama.cpp refuses it: tests/integration/test_family_mpnet.py).
NOT_ON_LLAMA_CPP = frozenset({"tiny-mpnet"})
ROUTES = ("grpc", "openai", "ollama")
NO_PROMPT = ""  # the case "no prompt_name": the model's default (none for these models)

Vectors = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Case:
    model: str  # the directory under ../shared/models
    prompt_name: str  # NO_PROMPT: none given
    prompt: str
    texts: list[str]
    reference: Vectors
    tokens: list[int]  # of prompt + text, truncated at max_seq_length
    untruncated: list[int]
    max_tokens: int


def _config(model: str) -> dict[str, Any]:
    path = MODELS / model / "config_sentence_transformers.json"
    return dict(json.loads(path.read_text(encoding="utf-8")))


@cache
def _case(model: str, prompt_name: str) -> Case:
    src = MODELS / model
    items = json.loads((src / "reference" / "texts.json").read_text(encoding="utf-8"))
    texts = [item["text"] for item in items]
    prompt = _config(model)["prompts"][prompt_name] if prompt_name else ""
    reference_file = f"embeddings_{prompt_name}.npy" if prompt else "embeddings.npy"
    reference = np.load(src / "reference" / reference_file).astype(np.float64)
    max_tokens = FAMILIES[model]
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    untruncated = [len(e.ids) for e in tokenizer.encode_batch([prompt + t for t in texts])]
    tokenizer.enable_truncation(max_tokens)
    tokens = [len(e.ids) for e in tokenizer.encode_batch([prompt + t for t in texts])]
    if not prompt:
        assert tokens == [item["tokens"] for item in items]
    return Case(model, prompt_name, prompt, texts, reference, tokens, untruncated, max_tokens)


def _cases() -> list[tuple[str, str, str]]:
    """(engine, model, prompt name) for every engine setting that serves the model exactly."""
    if not MODELS.is_dir():
        return []
    return [
        (engine, model, name)
        for engine in ENGINES
        for model in FAMILIES
        if engine != "llama.cpp" or model not in NOT_ON_LLAMA_CPP
        for name in (NO_PROMPT, *_config(model)["prompts"])
    ]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests read ../shared beside the repo"
    out = tmp_path_factory.mktemp("prompt-models")
    for model in FAMILIES:
        for out_type in MIN_COSINE:
            import_model(MODELS / model, out, out_type=out_type, name=f"{model}-{out_type}")
    return out


@dataclass
class Served:
    engine: str
    server: ServerProcess
    envoy: EnvoyProcess
    client: openai.OpenAI


@pytest.fixture(scope="module")
def servers(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Served]]:
    """The server (with Envoy) of an engine setting, started on first use, kept for the
    module: ``servers("auto")``."""
    with contextlib.ExitStack() as stack:
        started: dict[str, Served] = {}

        def serve(engine: str) -> Served:
            if engine not in started:
                args = ["--engine", engine, "--default-model", "tiny-bert-cls-f32"]
                server, envoy = stack.enter_context(
                    server_behind_envoy(
                        models_dir, [*args, "--keep-alive", "-1"], tmp_path_factory.mktemp("envoy")
                    )
                )
                client = stack.enter_context(
                    openai.OpenAI(
                        base_url=envoy.base_url + "/v1",
                        api_key="unused",
                        max_retries=0,
                        timeout=300,
                    )
                )
                started[engine] = Served(engine, server, envoy, client)
            return started[engine]

        yield serve


@pytest.fixture(scope="module", params=ENGINES)
def served(request: pytest.FixtureRequest, servers: Callable[[str], Served]) -> Served:
    """Each engine setting's server in turn, for the tests that run on both."""
    return servers(str(request.param))


def _stub(channel: grpc.Channel) -> Any:
    return pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]


def _embed(served: Served, route: str, model: str, case: Case) -> tuple[Vectors, int, list[int]]:
    """(vectors, usage, indices of the texts sent) over one route."""
    texts = case.texts
    indices = list(range(len(texts)))
    if route == "grpc":
        with grpc.insecure_channel(served.server.target) as channel:
            reply = _stub(channel).Embed(
                pb.EmbedRequest(model=model, texts=texts, prompt_name=case.prompt_name),
                timeout=300,
            )
        vectors = [list(e.values) for e in reply.embeddings]
        return np.array(vectors, np.float64), reply.usage.prompt_tokens, indices
    if route == "openai":
        # OpenAI refuses over-long inputs (context_length_exceeded) instead of truncating.
        indices = [i for i, n in enumerate(case.untruncated) if n <= case.max_tokens]
        extra = {"prompt_name": case.prompt_name} if case.prompt_name else None
        response = served.client.embeddings.create(
            model=model, input=[texts[i] for i in indices], extra_body=extra
        )
        vectors = [d.embedding for d in response.data]
        return np.array(vectors, np.float64), response.usage.prompt_tokens, indices
    body: dict[str, Any] = {"model": model, "input": texts}
    if case.prompt_name:
        body["options"] = {"prompt_name": case.prompt_name}
    reply = http(served.envoy.base_url + "/api/embed", "POST", body=body, timeout=300)
    assert reply.status == 200, reply.body
    answer = reply.json()
    return np.array(answer["embeddings"], np.float64), answer["prompt_eval_count"], indices


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("out_type", list(MIN_COSINE))
@pytest.mark.parametrize("served_case", _cases(), ids="-".join)
def test_every_text_with_every_prompt(
    servers: Callable[[str], Served], served_case: tuple[str, str, str], out_type: str, route: str
) -> None:
    engine, model, prompt_name = served_case
    served = servers(engine)
    case = _case(model, prompt_name)
    vectors, usage, indices = _embed(served, route, f"{model}-{out_type}", case)
    reference = case.reference[indices]
    assert vectors.shape == reference.shape
    assert usage == sum(case.tokens[i] for i in indices)
    cosines = np.sum(vectors * reference, axis=1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    )
    index = int(np.argmin(cosines))
    print(
        f"MIN {served.engine} {route} {out_type} {model} [{prompt_name or '-'}]: "
        f"{cosines[index]:.7f}"
    )
    assert cosines[index] >= MIN_COSINE[out_type], case.texts[indices[index]]


def test_openai_input_type_maps_onto_the_models_prompts(served: Served) -> None:
    case = _case("tiny-xlmr", "passage")
    texts = case.texts[:8]
    by_type = served.client.embeddings.create(
        model="tiny-xlmr-f32",
        input=texts,
        encoding_format="float",
        extra_body={"input_type": "search_document"},
    )
    vectors = np.array([d.embedding for d in by_type.data], np.float64)
    reference = case.reference[:8]
    cosines = np.sum(vectors * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert np.min(cosines) >= MIN_COSINE["f32"]
    assert by_type.usage.prompt_tokens == sum(case.tokens[:8])
    literal = served.client.embeddings.create(
        model="tiny-xlmr-f32",
        input=texts,
        encoding_format="float",
        extra_body={"prompt": "passage: "},
    )
    np.testing.assert_allclose(np.array([d.embedding for d in literal.data]), vectors, atol=1e-6)


def test_unknown_prompt_name_is_a_400_listing_the_prompts(served: Served) -> None:
    reply = http(
        served.envoy.base_url + "/v1/embeddings",
        "POST",
        body={"model": "tiny-xlmr-f16", "input": "hi", "prompt_name": "nope"},
    )
    assert reply.status == 400, reply.body
    message = reply.json()["error"]["message"]
    assert "'nope'" in message and "'query'" in message and "'passage'" in message
    ollama = http(
        served.envoy.base_url + "/api/embed",
        "POST",
        body={"model": "tiny-xlmr-f16", "input": "hi", "options": {"prompt_name": "nope"}},
    )
    assert ollama.status == 400 and "'passage'" in ollama.json()["error"]
    with (
        grpc.insecure_channel(served.server.target) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        _stub(channel).Embed(
            pb.EmbedRequest(model="tiny-xlmr-f16", texts=["hi"], prompt_name="nope"),
            timeout=60,
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_models_show_family_pooling_prompts_and_tokenizer(served: Served) -> None:
    listing = http(served.envoy.base_url + "/v1/models", "GET").json()
    models = {m["id"]: m for m in listing["data"]}
    xlmr = models["tiny-xlmr-f16"]
    assert (xlmr["family"], xlmr["pooling"], xlmr["normalizes"], xlmr["tokenizer"]) == (
        "xlm-roberta",
        "mean",
        True,
        "exact",
    )
    assert xlmr["prompts"] == _config("tiny-xlmr")["prompts"]
    qwen = models["tiny-qwen3-f32"]
    assert (qwen["family"], qwen["pooling"]) == ("qwen3", "last")
    raw = models["tiny-bert-mean-raw-f32"]
    assert (raw["family"], raw["pooling"], raw["normalizes"]) == ("bert", "mean", False)
    families = {model: models[f"{model}-f16"]["family"] for model in FAMILIES}
    assert families == {
        "tiny-bert-cls": "bert",
        "tiny-bert-mean-raw": "bert",
        "tiny-xlmr": "xlm-roberta",
        "tiny-qwen3": "qwen3",
        "tiny-mpnet": "mpnet",
        "tiny-modernbert": "modern-bert",
        "tiny-gemma3-embed": "gemma3",
        "tiny-distilbert": "distilbert",
        "tiny-roberta": "roberta",
        "tiny-mistral": "mistral",
    }
    assert {m["task"] for m in models.values()} == {"embed"}
    # Gemma3's Dense modules end in 64 dimensions (its hidden size 64 -> 256 -> 64).
    assert models["tiny-gemma3-embed-f32"]["dimensions"] == 64


def test_loaded_models_say_which_engine_serves_them(served: Served) -> None:
    """/v1/models names the engine of each loaded model: auto's choice, or llama.cpp."""
    for model in ("tiny-modernbert-f16", "tiny-mistral-f16", "tiny-roberta-f16"):
        http(
            served.envoy.base_url + "/v1/models/load",
            "POST",
            body={"model": model, "keep_alive": -1},
        )
    models = {m["id"]: m for m in http(served.envoy.base_url + "/v1/models").json()["data"]}
    onnx_or_llama = "onnxruntime" if served.engine == "auto" else "llama.cpp"
    assert models["tiny-modernbert-f16"]["engine"] == onnx_or_llama
    assert models["tiny-roberta-f16"]["engine"] == onnx_or_llama
    assert models["tiny-mistral-f16"]["engine"] == "llama.cpp"
