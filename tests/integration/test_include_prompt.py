"""``include_prompt: false``: the prompt is attended to but left out of the mean, as
sentence-transformers pools, on both engines, over gRPC and OpenAI's REST route.

No shared model pools without its prompt, so two of them are copied with ``include_prompt``
set to false in their Pooling config (BERT mean, cased, no Normalize, inputs truncated at
32 tokens; XLM-RoBERTa mean with e5 prompts and Normalize). The expected vectors come from
:mod:`tests.reference_encoder`, an independent float64 NumPy encoder, which is first held to
the stored sentence-transformers reference (no prompt; and for XLM-R with its prompt pooled).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.convert.hf_to_gguf import import_model
from tests.conftest import SHARED
from tests.envoy_proc import EnvoyProcess, http
from tests.reference_encoder import EncoderReference, mean_from
from tests.servers import ServerProcess, server_behind_envoy

pytestmark = pytest.mark.real_model

MODELS = SHARED / "models"
# model -> (max_seq_length, normalizes, the prompt used: a name of its prompts, or literal text)
FAMILIES: dict[str, tuple[int, bool, str]] = {
    "tiny-bert-mean-raw": (32, False, "Represent this sentence for searching passages: "),
    "tiny-xlmr": (64, True, "query"),
}
MIN_COSINE = {"f32": 0.99999, "f16": 0.9999}
ENGINES = ("llama.cpp", "auto")

Vectors = npt.NDArray[np.float64]


def _cosines(a: Vectors, b: Vectors) -> Vectors:
    out: Vectors = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return out


def _texts(model: str) -> list[str]:
    items = json.loads((MODELS / model / "reference" / "texts.json").read_text(encoding="utf-8"))
    return [item["text"] for item in items]


def _prompt_text(model: str) -> str:
    prompt = FAMILIES[model][2]
    config = json.loads(
        (MODELS / model / "config_sentence_transformers.json").read_text(encoding="utf-8")
    )
    return str(config["prompts"].get(prompt, prompt))


@cache
def _expected(model: str, prompt: str, include_prompt: bool) -> Vectors:
    """What sentence-transformers 6.2 gives: prompt + text tokenized (truncated), the prompt's
    length = its own ids less the closing special token, masked out of the mean if not
    ``include_prompt``; then Normalize where the model has it."""
    max_tokens, normalizes, _ = FAMILIES[model]
    encoder = EncoderReference.load(MODELS / model)
    tokenizer = Tokenizer.from_file(str(MODELS / model / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_tokens)
    start = 0
    if prompt and not include_prompt:
        encoding = tokenizer.encode(prompt)
        start = len(encoding.ids) - encoding.special_tokens_mask[-1]
    vectors = np.array(
        [
            mean_from(encoder.hidden_states(tokenizer.encode(prompt + text).ids), start)
            for text in _texts(model)
        ]
    )
    if normalizes:
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


@pytest.mark.parametrize("model", list(FAMILIES))
def test_the_numpy_encoder_is_sentence_transformers(model: str) -> None:
    """The reference itself: equal to the stored vectors, with no prompt and (XLM-R) with a
    prompt that is pooled; and leaving the prompt out changes the vectors a lot."""
    stored = np.load(MODELS / model / "reference" / "embeddings.npy").astype(np.float64)
    assert _cosines(_expected(model, "", include_prompt=False), stored).min() >= 0.999999
    prompt = _prompt_text(model)
    if model == "tiny-xlmr":
        pooled = np.load(MODELS / model / "reference" / "embeddings_query.npy")
        assert _cosines(_expected(model, prompt, include_prompt=True), pooled).min() >= 0.999999
    apart = _cosines(
        _expected(model, prompt, include_prompt=True),
        _expected(model, prompt, include_prompt=False),
    )
    # Well below the parity bar: serving that pooled the prompt would fail the tests below.
    assert np.median(apart) < 0.9999 and apart.min() < 0.999


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests read ../shared beside the repo"
    sources = tmp_path_factory.mktemp("no-prompt-sources")
    out = tmp_path_factory.mktemp("no-prompt-models")
    for model in FAMILIES:
        copy = sources / model
        shutil.copytree(MODELS / model, copy, ignore=shutil.ignore_patterns("reference"))
        pooling_file = copy / "1_Pooling" / "config.json"
        pooling = json.loads(pooling_file.read_text(encoding="utf-8"))
        pooling["include_prompt"] = False
        pooling_file.write_text(json.dumps(pooling), encoding="utf-8")
        for out_type in MIN_COSINE:
            import_model(copy, out, out_type=out_type, name=f"{model}-{out_type}")
    return out


@dataclass
class Served:
    engine: str
    server: ServerProcess
    envoy: EnvoyProcess


@pytest.fixture(scope="module", params=ENGINES)
def served(
    request: pytest.FixtureRequest, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    engine = str(request.param)
    args = ["--engine", engine, "--default-model", "tiny-xlmr-f32", "--keep-alive", "-1"]
    with server_behind_envoy(models_dir, args, tmp_path_factory.mktemp("envoy")) as stack:
        yield Served(engine, *stack)


def _prompt_fields(model: str) -> dict[str, str]:
    prompt = FAMILIES[model][2]
    return {"prompt_name": prompt} if prompt == "query" else {"prompt": prompt}


def _grpc(served: Served, model: str, texts: list[str], fields: dict[str, str]) -> Vectors:
    with grpc.insecure_channel(served.server.target) as channel:
        stub: Any = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        request = pb.EmbedRequest(model=model, texts=texts)
        for field, value in fields.items():
            setattr(request, field, value)
        reply = stub.Embed(request, timeout=300)
    return np.array([list(e.values) for e in reply.embeddings], np.float64)


@pytest.mark.parametrize("out_type", list(MIN_COSINE))
@pytest.mark.parametrize("model", list(FAMILIES))
def test_the_prompt_is_left_out_of_the_mean_over_grpc(
    served: Served, model: str, out_type: str
) -> None:
    expected = _expected(model, _prompt_text(model), include_prompt=False)
    vectors = _grpc(served, f"{model}-{out_type}", _texts(model), _prompt_fields(model))
    if not FAMILIES[model][1]:  # raw vectors: the service normalizes unless told not to
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    cosines = _cosines(vectors, expected)
    print(f"MIN {served.engine} {out_type} {model}: {cosines.min():.7f}")
    assert cosines.min() >= MIN_COSINE[out_type], _texts(model)[int(np.argmin(cosines))]


def test_without_a_prompt_every_token_is_pooled(served: Served) -> None:
    stored = np.load(MODELS / "tiny-xlmr" / "reference" / "embeddings.npy").astype(np.float64)
    vectors = _grpc(served, "tiny-xlmr-f32", _texts("tiny-xlmr"), {})
    assert _cosines(vectors, stored).min() >= MIN_COSINE["f32"]


def test_openai_route_leaves_the_prompt_out_too(served: Served) -> None:
    texts = _texts("tiny-xlmr")[:32]
    reply = http(
        served.envoy.base_url + "/v1/embeddings",
        "POST",
        body={"model": "tiny-xlmr-f32", "input": texts, "input_type": "search_query"},
        timeout=120,
    )
    assert reply.status == 200, reply.body
    vectors = np.array([d["embedding"] for d in reply.json()["data"]], np.float64)
    expected = _expected("tiny-xlmr", "query: ", include_prompt=False)[:32]
    assert _cosines(vectors, expected).min() >= MIN_COSINE["f32"]
