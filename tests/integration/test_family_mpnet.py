"""MPNet (all-mpnet-base-v2's family), imported and served by ONNX Runtime, against
sentence-transformers' own vectors.

``../shared/models/tiny-mpnet`` (``MPNetModel``, WordPiece with ``<s> A </s>``, mean pooling,
Normalize, max_seq_length 64) is imported f32 and f16 into our ``mpnet`` architecture; the
reference texts are tokenized with its tokenizer.json, truncated at max_seq_length as
sentence-transformers does, must give the reference's token counts, and are embedded by the
ONNX graph in the packs the server makes (one thread). Bar: cosine >= 0.99999 (f32) / 0.9999
(f16) on every text. What the stored reference cannot show (a literal ``<pad>`` inside a text,
which transformers leaves out of the position count; pooling without a prompt) is checked
against a float64 NumPy MPNet written from transformers' code, itself first checked against
the reference. Then which engine serves the model: ONNX Runtime, and llama.cpp refuses it by
name; and the served vectors, over gRPC and over REST through Envoy, to the same bars.

``python -m tests.integration.test_family_mpnet [ROUNDS]`` prints the ONNX graph's texts/s.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.core.quantization import CALIBRATION_VECTORS_KEY
from embedd_server.engines.choice import engine_for, load_runtime
from embedd_server.engines.onnx import OnnxEngine, OnnxRuntime
from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import ModelInfo, read_model_info
from tests.envoy_proc import EnvoyProcess, http
from tests.servers import ServerProcess, server_behind_envoy

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
SRC = MODELS / "tiny-mpnet"
MIN_COSINE = {"f32": 0.99999, "f16": 0.9999}
PACK_TOKENS = EngineSettings().onnx_batch_tokens  # the server's ONNX pack size
LLAMA_REFUSAL = "llama.cpp has no MPNet architecture; engine=auto or onnxruntime serve it"

Vectors = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert SRC.is_dir(), f"{SRC} is missing: the tests read ../shared beside the repo"
    out = tmp_path_factory.mktemp("mpnet")
    return {out_type: import_model(SRC, out, out_type=out_type) for out_type in MIN_COSINE}


def _texts() -> list[dict[str, Any]]:
    texts: list[dict[str, Any]] = json.loads(
        (SRC / "reference" / "texts.json").read_text(encoding="utf-8")
    )
    return texts


def _tokenizer(info: ModelInfo, truncate: bool = True) -> Tokenizer:
    text = (SRC / "tokenizer.json").read_text(encoding="utf-8")
    assert info.hf_tokenizer_json == text  # the whole tokenizer.json travels in the GGUF
    tokenizer = Tokenizer.from_str(text)
    tokenizer.no_padding()
    if truncate:  # sentence-transformers: tokenizer(..., truncation=True, max_length=...)
        tokenizer.enable_truncation(info.max_input_tokens)
    return tokenizer


def _packs(sequences: list[list[int]], budget: int) -> Iterator[list[list[int]]]:
    """Consecutive texts up to ``budget`` tokens a pack, as the server's scheduler fills them."""
    pack: list[list[int]] = []
    for ids in sequences:
        if pack and sum(map(len, pack)) + len(ids) > budget:
            yield pack
            pack = []
        pack.append(ids)
    if pack:
        yield pack


def _engine(path: Path) -> OnnxEngine:
    runtime = OnnxRuntime(path, threads=1, max_batch_tokens=PACK_TOKENS)
    engine = runtime.new_engine()
    assert isinstance(engine, OnnxEngine)
    return engine


def _embed(engine: OnnxEngine, sequences: list[list[int]]) -> Vectors:
    budget = max(PACK_TOKENS, *map(len, sequences))
    packs = [engine.embed(Pack.of(pack)) for pack in _packs(sequences, budget)]
    return np.concatenate(packs).astype(np.float64)


def _cosines(vectors: Vectors, reference: Vectors) -> Vectors:
    dots = np.sum(vectors * reference, axis=1)
    cosines: Vectors = dots / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    return cosines


@pytest.mark.parametrize("out_type", list(MIN_COSINE))
def test_vectors_match_sentence_transformers(imported: dict[str, Path], out_type: str) -> None:
    info = read_model_info(imported[out_type])
    assert (info.architecture, info.family, info.pooling, info.normalizes) == (
        "mpnet",
        "mpnet",
        "mean",
        True,
    )
    assert (info.max_input_tokens, info.context_length, info.quantization) == (64, 64, out_type)
    texts = _texts()
    reference = np.load(SRC / "reference" / "embeddings.npy").astype(np.float64)
    assert len(texts) == reference.shape[0] == 275
    sequences = [e.ids for e in _tokenizer(info).encode_batch([t["text"] for t in texts])]
    assert [len(ids) for ids in sequences] == [t["tokens"] for t in texts]
    cosines = _cosines(_embed(_engine(info.path), sequences), reference)
    worst = int(np.argmin(cosines))
    print(f"tiny-mpnet {out_type}: min cosine 1 - {1 - cosines[worst]:.1e}")
    assert cosines[worst] >= MIN_COSINE[out_type], texts[worst]["text"]


def test_long_texts_are_cut_at_max_seq_length_inside_the_template(
    imported: dict[str, Path],
) -> None:
    """Some reference texts are longer than 64 tokens: they are cut to 64 keeping ``</s>``,
    as sentence-transformers cuts them (the counts above are the cut ones)."""
    info = read_model_info(imported["f32"])
    texts = [t["text"] for t in _texts()]
    whole = _tokenizer(info, truncate=False).encode_batch(texts)
    cut = _tokenizer(info).encode_batch(texts)
    long = [i for i, e in enumerate(whole) if len(e.ids) > info.max_input_tokens]
    assert long, "the reference has no text longer than max_seq_length"
    eos = cut[0].ids[-1]
    for i in long:
        assert len(cut[i].ids) == info.max_input_tokens
        assert cut[i].ids[-1] == eos and cut[i].ids[:-1] == whole[i].ids[: len(cut[i].ids) - 1]


# --- an independent float64 MPNet, from transformers' modeling_mpnet ---------------------------


def _bucket(relative: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """``MPNetEncoder.relative_position_bucket`` of one relative position, in float64."""
    n = -relative
    half = num_buckets // 2
    bucket = half if n < 0 else 0
    n = abs(n)
    max_exact = half // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    )
    return bucket + min(large, half - 1)


class MPNetReference:
    """``MPNetModel``'s last hidden state of one unpadded sequence, in float64."""

    def __init__(self, directory: Path) -> None:
        self.config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        raw = load_file(str(directory / "model.safetensors"))
        self.w = {k.removeprefix("mpnet."): v.astype(np.float64) for k, v in raw.items()}

    def _linear(self, x: Vectors, prefix: str) -> Vectors:
        out: Vectors = x @ self.w[f"{prefix}.weight"].T + self.w[f"{prefix}.bias"]
        return out

    def _norm(self, x: Vectors, prefix: str) -> Vectors:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        normed = (x - mean) / np.sqrt(var + float(self.config["layer_norm_eps"]))
        out: Vectors = normed * self.w[f"{prefix}.weight"] + self.w[f"{prefix}.bias"]
        return out

    def hidden_states(self, ids: list[int]) -> Vectors:
        w, length = self.w, len(ids)
        counted = (np.asarray(ids) != 1).astype(np.int64)  # padding_idx = 1
        positions = np.cumsum(counted) * counted + 1
        x = w["embeddings.word_embeddings.weight"][ids]
        x = self._norm(
            x + w["embeddings.position_embeddings.weight"][positions], "embeddings.LayerNorm"
        )
        buckets = [[_bucket(j - i) for j in range(length)] for i in range(length)]
        bias = w["encoder.relative_attention_bias.weight"][buckets].transpose(2, 0, 1)
        heads = int(self.config["num_attention_heads"])
        size = x.shape[1] // heads
        for i in range(int(self.config["num_hidden_layers"])):
            p = f"encoder.layer.{i}"

            def split(t: Vectors) -> Vectors:
                return t.reshape(length, heads, size).transpose(1, 0, 2)

            q, k, v = (split(self._linear(x, f"{p}.attention.attn.{n}")) for n in "qkv")
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(size) + bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(length, heads * size)
            x = self._norm(
                self._linear(context, f"{p}.attention.attn.o") + x, f"{p}.attention.LayerNorm"
            )
            up = self._linear(x, f"{p}.intermediate.dense")
            gelu = up * 0.5 * (1.0 + np.vectorize(math.erf)(up / math.sqrt(2.0)))
            x = self._norm(self._linear(gelu, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        return x


@pytest.fixture(scope="module")
def numpy_mpnet() -> MPNetReference:
    return MPNetReference(SRC)


def test_the_numpy_reference_agrees_with_sentence_transformers(
    imported: dict[str, Path], numpy_mpnet: MPNetReference
) -> None:
    info = read_model_info(imported["f32"])
    texts = _texts()
    reference = np.load(SRC / "reference" / "embeddings.npy").astype(np.float64)
    picked = sorted(range(len(texts)), key=lambda i: -texts[i]["tokens"])[:8]  # the longest
    encodings = _tokenizer(info).encode_batch([texts[i]["text"] for i in picked])
    means = np.stack([numpy_mpnet.hidden_states(e.ids).mean(axis=0) for e in encodings])
    assert _cosines(means, reference[picked]).min() >= 0.9999999


def test_a_padding_token_inside_a_text_is_not_counted_as_a_position(
    imported: dict[str, Path], numpy_mpnet: MPNetReference
) -> None:
    """transformers numbers only the tokens that are not ``<pad>`` (id 1): a literal ``<pad>``
    in a text sits at padding_idx, and the tokens after it keep counting from the one before."""
    info = read_model_info(imported["f32"])
    ids = _tokenizer(info).encode("a man <pad> plays the guitar <pad> in the sky").ids
    assert 1 in ids[1:-1]
    expected = numpy_mpnet.hidden_states(ids).mean(axis=0, keepdims=True)
    engine = _engine(imported["f32"])
    alone = engine.embed(Pack.of([ids])).astype(np.float64)
    padded = engine.embed(Pack.of([ids, ids[:3], ids + ids[1:-1]])).astype(np.float64)[:1]
    assert _cosines(alone, expected)[0] >= 0.9999999
    assert _cosines(padded, expected)[0] >= 0.9999999


def _longer_copy(root: Path, positions: int) -> Path:
    """tiny-mpnet with a position table of ``positions`` rows (seeded random rows added), so
    that inputs reach the distances the reference's 64 tokens don't (the buckets' logarithmic
    range up to 128 and beyond)."""
    copy = root / f"tiny-mpnet-{positions}"
    copy.mkdir()
    (copy / "tokenizer.json").write_bytes((SRC / "tokenizer.json").read_bytes())
    weights = dict(load_file(str(SRC / "model.safetensors")))
    table = weights["embeddings.position_embeddings.weight"]
    extra = np.random.default_rng(20).normal(0, 0.02, (positions - len(table), table.shape[1]))
    weights["embeddings.position_embeddings.weight"] = np.concatenate(
        [table, extra.astype(np.float32)]
    )
    save_file(weights, str(copy / "model.safetensors"))
    for name, key, value in (
        ("config.json", "max_position_embeddings", positions),
        ("tokenizer_config.json", "model_max_length", positions - 2),
    ):
        config = json.loads((SRC / name).read_text(encoding="utf-8"))
        config[key] = value
        (copy / name).write_text(json.dumps(config), encoding="utf-8")
    return copy


def test_long_inputs_match_the_numpy_reference(tmp_path: Path) -> None:
    src = _longer_copy(tmp_path, 302)
    path = import_model(src, tmp_path / "out", out_type="f32", report=lambda note: None)
    info = read_model_info(path)
    assert info.max_input_tokens == 300
    text = " ".join(t["text"] for t in _texts()[:40])
    tokenizer = Tokenizer.from_str((src / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer.enable_truncation(300)
    ids = tokenizer.encode(text).ids
    assert len(ids) == 300
    reference = MPNetReference(src)
    expected = np.stack([reference.hidden_states(s).mean(axis=0) for s in (ids, ids[:150])])
    got = _engine(path).embed(Pack.of([ids, ids[:150]])).astype(np.float64)  # one padded batch
    assert _cosines(got, expected).min() >= 0.9999999


def test_pooling_can_leave_out_a_prompt(
    imported: dict[str, Path], numpy_mpnet: MPNetReference
) -> None:
    """``include_prompt: false``: the graph takes a pooling mask, and the mean skips the
    prompt's tokens while attention still sees them."""
    info = read_model_info(imported["f32"])
    ids = _tokenizer(info).encode("query: a woman plays the guitar").ids
    runtime = OnnxRuntime(
        imported["f32"], threads=1, max_batch_tokens=PACK_TOKENS, pool_from_starts=True
    )
    engine = runtime.new_engine()
    got = engine.embed(Pack.of([ids, ids], pooling_starts=[3, 0])).astype(np.float64)
    hidden = numpy_mpnet.hidden_states(ids)
    expected = np.stack([hidden[3:].mean(axis=0), hidden.mean(axis=0)])
    assert _cosines(got, expected).min() >= 0.9999999


# --- which engine serves it ----------------------------------------------------------------------


def test_auto_serves_mpnet_on_onnx_runtime_and_llama_cpp_refuses_it_by_name(
    imported: dict[str, Path],
) -> None:
    for path in imported.values():
        info = read_model_info(path)
        assert engine_for(info, EngineSettings(), LoadOptions()) == "onnxruntime"
        # llama.cpp serves GPUs, but has no MPNet: ONNX Runtime serves it on the CPU.
        gpu = EngineSettings(n_gpu_layers=-1)
        assert engine_for(info, gpu, LoadOptions()) == "onnxruntime"
        assert (
            engine_for(info, EngineSettings(engine="onnxruntime"), LoadOptions()) == "onnxruntime"
        )
        with pytest.raises(ModelLoadError) as forced:
            engine_for(info, EngineSettings(engine="llama.cpp"), LoadOptions())
        assert (
            forced.value.message == f"engine=llama.cpp cannot serve {info.name}: {LLAMA_REFUSAL}."
        )
        with pytest.raises(ModelLoadError) as pooled:
            engine_for(info, EngineSettings(), LoadOptions(pooling="cls"))
        assert pooled.value.message.startswith(f"No engine can serve {info.name}: {LLAMA_REFUSAL}")
        assert "pooling 'cls'" in pooled.value.message


@pytest.mark.parametrize("processes", [False, True])
def test_the_served_runtime_tokenizes_with_the_files_tokenizer(
    imported: dict[str, Path], processes: bool
) -> None:
    """llama.cpp cannot load an ``mpnet`` file, not even its vocabulary: the runtime reads
    the tokenizer.json the file carries; its workers (threads or processes) embed as above."""
    info = read_model_info(imported["f16"])
    settings = EngineSettings(worker_processes=processes, onnx_threads=1)
    runtime = load_runtime(info, settings, LoadOptions())
    engine = runtime.new_engine()
    try:
        assert runtime.engine_name == "onnxruntime"
        assert runtime.vocab_size == 4000
        ids = _tokenizer(info).encode("A man plays").ids
        assert runtime.tokenize(b"A man plays") == ids
        assert runtime.token_text(0) == "<s>"
        expected = _engine(info.path).embed(Pack.of([ids])).astype(np.float64)
        got = engine.embed(Pack.of([ids])).astype(np.float64)
        assert _cosines(got, expected)[0] >= 0.9999999
    finally:
        engine.close()
        runtime.close()


def test_import_stores_calibration_computed_by_onnx_runtime(imported: dict[str, Path]) -> None:
    import gguf

    for path in imported.values():
        assert CALIBRATION_VECTORS_KEY in gguf.GGUFReader(str(path)).fields


def test_a_quantized_mpnet_is_served_by_onnx_runtime_dequantized(
    imported: dict[str, Path], tmp_path: Path
) -> None:
    path = import_model(SRC, tmp_path, out_type="q8_0", report=lambda note: None)
    info = read_model_info(path)
    assert engine_for(info, EngineSettings(), LoadOptions()) == "onnxruntime"
    texts = _texts()[:32]
    sequences = [e.ids for e in _tokenizer(info).encode_batch([t["text"] for t in texts])]
    reference = np.load(SRC / "reference" / "embeddings.npy").astype(np.float64)[:32]
    assert _cosines(_embed(_engine(path), sequences), reference).min() >= 0.999


# --- served: gRPC, and REST through Envoy -------------------------------------------------------


@dataclass
class Served:
    server: ServerProcess
    envoy: EnvoyProcess


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``embedd serve`` (engine auto, worker processes) on the f32 and f16 imports."""
    models = tmp_path_factory.mktemp("served-mpnet")
    for out_type in MIN_COSINE:
        import_model(SRC, models, out_type=out_type, name=f"mpnet-{out_type}")
    args = ["--default-model", "mpnet-f16", "--keep-alive", "-1"]
    with server_behind_envoy(models, args, tmp_path_factory.mktemp("envoy")) as (server, envoy):
        yield Served(server, envoy)


def _check_served(vectors: Vectors, tokens: int, out_type: str, route: str) -> None:
    texts = _texts()
    reference = np.load(SRC / "reference" / "embeddings.npy").astype(np.float64)
    assert tokens == sum(t["tokens"] for t in texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)  # Normalize
    cosines = _cosines(vectors, reference)
    print(f"served {route} tiny-mpnet {out_type}: min cosine 1 - {1 - cosines.min():.1e}")
    assert cosines.min() >= MIN_COSINE[out_type], texts[int(cosines.argmin())]["text"]


@pytest.mark.slow  # the `served` server and Envoy take ~20 s to start here
@pytest.mark.parametrize("out_type", list(MIN_COSINE))
def test_served_over_grpc(served: Served, out_type: str) -> None:
    texts = [t["text"] for t in _texts()]
    with grpc.insecure_channel(served.server.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)  # type: ignore[no-untyped-call, unused-ignore]
        reply = stub.Embed(pb.EmbedRequest(model=f"mpnet-{out_type}", texts=texts), timeout=120)
    vectors = np.array([list(e.values) for e in reply.embeddings], dtype=np.float64)
    _check_served(vectors, reply.usage.prompt_tokens, out_type, "gRPC")


@pytest.mark.slow  # shares the `served` fixture with the gRPC test
@pytest.mark.parametrize("out_type", list(MIN_COSINE))
def test_served_over_rest(served: Served, out_type: str) -> None:
    body = {
        "model": f"mpnet-{out_type}",
        "input": [t["text"] for t in _texts()],
        "encoding_format": "float",
        "truncate": True,  # OpenAI's route refuses an over-long input unless asked to cut it
    }
    reply = http(served.envoy.base_url + "/v1/embeddings", "POST", body=body, timeout=300)
    assert reply.status == 200, reply.body
    answer = reply.json()
    vectors = np.array([d["embedding"] for d in answer["data"]], dtype=np.float64)
    _check_served(vectors, answer["usage"]["prompt_tokens"], out_type, "REST")
    models = {m["id"]: m for m in http(served.envoy.base_url + "/v1/models").json()["data"]}
    shown = models[f"mpnet-{out_type}"]
    assert (shown["family"], shown["engine"], shown["task"]) == ("mpnet", "onnxruntime", "embed")


# --- speed ---------------------------------------------------------------------------------------


def _time(rounds: int) -> None:
    """Texts/s of the ONNX graph in-process, one thread, the server's packs, f32 and f16."""
    import tempfile

    texts = [t["text"] for t in _texts()]
    with tempfile.TemporaryDirectory() as out:
        for out_type in MIN_COSINE:
            path = import_model(SRC, Path(out), out_type=out_type, report=lambda note: None)
            info = read_model_info(path)
            sequences = [e.ids for e in _tokenizer(info).encode_batch(texts)]
            engine = _engine(path)
            _embed(engine, sequences)  # warm-up
            start = time.perf_counter()
            for _ in range(rounds):
                _embed(engine, sequences)
            elapsed = time.perf_counter() - start
            print(
                f"tiny-mpnet {out_type} onnxruntime: {rounds * len(texts) / elapsed:,.0f} texts/s"
            )


if __name__ == "__main__":
    _time(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
