"""Gemma3 as an encoder (EmbeddingGemma) and sentence-transformers Dense modules, on both
engines, against sentence-transformers.

- ``tiny-gemma3-embed`` (../shared/models): imported f32 and f16, embedded by llama.cpp (in
  packs, as the server's workers do) and by ONNX Runtime, with no prompt and with each of its
  prompts (``query``, ``document``, ``Clustering``): token counts equal to the reference's,
  cosine >= 0.99999 (f32) / 0.9999 (f16) on every text. Its two Dense projections are
  llama.cpp's ``dense_2`` / ``dense_3``.
- A BERT with a Dense module (bias, tanh) after mean pooling, and the same Gemma3 with a Dense
  stack llama.cpp doesn't apply itself (bias, tanh, then identity to another width): both
  carried under embedd's keys and applied by each engine. No stored reference has them, so the
  expected vectors are computed here in float64 NumPy: BERT's by tests.reference_encoder
  (held first to the stored reference), Gemma3's from its pooled vectors on the graph held to
  the stored reference above, through the Dense modules.

Texts per second of both engines are printed (``-s``) on the same packs, for
docs/design.md.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from embedd_server.compute.engine import Engine
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines.choice import engine_for, load_runtime
from embedd_server.engines.llama import LlamaEngine, LlamaModelWeights
from embedd_server.engines.onnx import OnnxEngine
from embedd_server.engines.onnx_gemma3 import Gemma3Source
from embedd_server.engines.onnx_models import load_gguf
from embedd_server.model.catalog import ModelInfo, read_model_info
from embedd_server.model.dense import DENSE_COUNT_KEY
from tests.conftest import SHARED
from tests.reference_encoder import EncoderReference, mean_from

MODELS = SHARED / "models"
GEMMA = MODELS / "tiny-gemma3-embed"
MIN_COSINE = {"f32": 0.99999, "f16": 0.9999}
PACK_TOKENS = 128  # the server's default pack size
ENGINES = ("llama.cpp", "onnxruntime")

Vectors = npt.NDArray[np.float64]


def _texts(src: Path) -> list[dict[str, object]]:
    items: list[dict[str, object]] = json.loads(
        (src / "reference" / "texts.json").read_text(encoding="utf-8")
    )
    return items


def _sequences(info: ModelInfo, texts: list[str]) -> list[list[int]]:
    """Token ids as sentence-transformers makes them: the GGUF's own tokenizer.json,
    truncated at max_seq_length inside the template."""
    assert info.hf_tokenizer_json is not None
    tokenizer = Tokenizer.from_str(info.hf_tokenizer_json)
    tokenizer.no_padding()
    tokenizer.enable_truncation(info.max_input_tokens)
    return [encoding.ids for encoding in tokenizer.encode_batch(texts)]


def _packs(sequences: list[list[int]], budget: int) -> Iterator[list[list[int]]]:
    pack: list[list[int]] = []
    for ids in sequences:
        if pack and sum(map(len, pack)) + len(ids) > budget:
            yield pack
            pack = []
        pack.append(ids)
    if pack:
        yield pack


class Engines:
    """Both engines on one GGUF file, as the server's loaders set them up."""

    def __init__(self, path: Path) -> None:
        self.info = read_model_info(path)
        self.budget = max(PACK_TOKENS, self.info.max_input_tokens)
        self.weights = LlamaModelWeights(path)
        self.engines: dict[str, Engine] = {
            "llama.cpp": LlamaEngine(
                self.weights,
                max_tokens=self.budget,
                max_sequences=64,
                n_threads=1,
                exact_attention=self.info.quantization == "f32",
            ),
            "onnxruntime": OnnxEngine(load_gguf(path).build(), max_batch_tokens=self.budget),
        }

    def embed(self, engine: str, sequences: list[list[int]]) -> tuple[Vectors, float]:
        """Vectors (normalized where the model normalizes) and texts per second."""
        start = time.perf_counter()
        rows = [self.engines[engine].embed(Pack.of(p)) for p in _packs(sequences, self.budget)]
        rate = len(sequences) / (time.perf_counter() - start)
        vectors = np.concatenate(rows).astype(np.float64)
        if self.info.normalizes:
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors, rate

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.weights.close()


def _cosines(a: Vectors, b: Vectors) -> Vectors:
    out: Vectors = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return out


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Engines]]:
    assert GEMMA.is_dir(), f"{GEMMA} is missing: the tests read ../shared beside the repo"
    out = tmp_path_factory.mktemp("gemma3")
    loaded = {t: Engines(import_model(GEMMA, out, out_type=t)) for t in MIN_COSINE}
    yield loaded
    for engines in loaded.values():
        engines.close()


def _prompts() -> dict[str, str]:
    config = json.loads((GEMMA / "config_sentence_transformers.json").read_text("utf-8"))
    prompts: dict[str, str] = config["prompts"]
    return prompts


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("prompt", ["", *sorted(_prompts())])
@pytest.mark.parametrize("out_type", list(MIN_COSINE))
def test_gemma3_matches_sentence_transformers(
    gemma: dict[str, Engines], out_type: str, prompt: str, engine: str
) -> None:
    engines = gemma[out_type]
    info = engines.info
    assert (info.architecture, info.family, info.pooling) == ("gemma-embedding", "gemma3", "mean")
    assert (info.dimensions, info.normalizes, info.max_input_tokens) == (64, True, 128)
    assert info.prompts == _prompts()
    items = _texts(GEMMA)
    texts = [str(item["text"]) for item in items]
    plain = _sequences(info, texts)
    assert [len(ids) for ids in plain] == [item["tokens"] for item in items]
    name = f"embeddings_{prompt}.npy" if prompt else "embeddings.npy"
    reference = np.load(GEMMA / "reference" / name).astype(np.float64)
    sequences = _sequences(info, [info.prompts.get(prompt, "") + text for text in texts])
    vectors, rate = engines.embed(engine, sequences)
    cosines = _cosines(vectors, reference)
    worst = int(np.argmin(cosines))
    print(
        f"gemma3 {out_type} {engine} prompt={prompt or '-'}: min cosine {cosines[worst]:.8f}, "
        f"{rate:.0f} texts/s"
    )
    assert cosines[worst] >= MIN_COSINE[out_type], texts[worst]


def test_gemma3_window_is_what_the_reference_needs(gemma: dict[str, Engines]) -> None:
    """The reference texts are longer than the window, so the symmetric window is exercised:
    without it (every layer global) the vectors move far from the reference."""
    engines = gemma["f32"]
    texts = [str(item["text"]) for item in _texts(GEMMA)]
    sequences = _sequences(engines.info, texts)
    window = 16  # config.json's sliding_window
    assert max(map(len, sequences)) > window // 2 + 1
    source = load_gguf(engines.info.path)
    assert isinstance(source, Gemma3Source)
    unwindowed = replace(source.config, sliding=(False,) * source.config.num_layers)
    model = replace(source, config=unwindowed).build()
    vectors = OnnxEngine(model).embed(Pack.of(sequences)).astype(np.float64)
    reference = np.load(GEMMA / "reference" / "embeddings.npy").astype(np.float64)
    assert _cosines(vectors, reference).min() < 0.99


# --- Dense modules llama.cpp does not apply itself --------------------------------------------


def _add_dense(src: Path, index: int, weight: Vectors, bias: Vectors | None, act: str) -> str:
    """Writes a sentence-transformers Dense module directory; returns its modules.json path."""
    path = f"{index}_Dense"
    config = {
        "in_features": weight.shape[1],
        "out_features": weight.shape[0],
        "bias": bias is not None,
        "activation_function": act,
    }
    (src / path).mkdir()
    (src / path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tensors = {"linear.weight": weight.astype(np.float32)}
    if bias is not None:
        tensors["linear.bias"] = bias.astype(np.float32)
    save_file(tensors, str(src / path / "model.safetensors"))
    return path


def _with_modules(src: Path, dense: list[str], normalize: bool) -> None:
    modules = json.loads((src / "modules.json").read_text(encoding="utf-8"))[:2]
    for path in dense:
        kind = "sentence_transformers.models.Dense"
        modules.append({"idx": len(modules), "name": path, "path": path, "type": kind})
    if normalize:
        kind = "sentence_transformers.models.Normalize"
        modules.append({"idx": len(modules), "name": "n", "path": "n_Normalize", "type": kind})
    (src / "modules.json").write_text(json.dumps(modules), encoding="utf-8")


TANH = "torch.nn.modules.activation.Tanh"
IDENTITY = "torch.nn.modules.linear.Identity"


def _dense_reference(pooled: Vectors, layers: list[tuple[Vectors, Vectors | None, str]]) -> Vectors:
    x = pooled
    for weight, bias, act in layers:
        x = x @ weight.T + (0.0 if bias is None else bias)
        x = np.tanh(x) if act == TANH else x
    return x


def _random_dense(
    rng: np.random.Generator, shape: tuple[int, int], bias: bool
) -> tuple[Vectors, Vectors | None]:
    weight = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), size=shape)
    return weight.astype(np.float32).astype(np.float64), (
        rng.normal(0.0, 0.1, size=shape[0]).astype(np.float32).astype(np.float64) if bias else None
    )


@dataclass(frozen=True)
class BertDense:
    """tiny-bert-mean-raw with a Dense module, and what sentence-transformers would give."""

    src: Path
    sequences: list[list[int]]
    expected: Vectors  # float64, raw (the model doesn't normalize)


@pytest.fixture(scope="module")
def bert_dense(tmp_path_factory: pytest.TempPathFactory) -> BertDense:
    """tiny-bert-mean-raw (raw vectors, inputs truncated at 32) with Dense 64 -> 48, bias,
    tanh; the expected vectors from the float64 NumPy encoder, held first to the stored
    reference."""
    base = MODELS / "tiny-bert-mean-raw"
    src = tmp_path_factory.mktemp("bert-dense") / "bert-dense"
    shutil.copytree(base, src)
    weight, bias = _random_dense(np.random.default_rng(1), (48, 64), bias=True)
    _with_modules(src, [_add_dense(src, 2, weight, bias, TANH)], normalize=False)
    items = _texts(base)
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(32)  # its sentence_bert_config.json's max_seq_length
    sequences = [e.ids for e in tokenizer.encode_batch([str(item["text"]) for item in items])]
    assert [len(ids) for ids in sequences] == [item["tokens"] for item in items]
    encoder = EncoderReference.load(base)
    pooled = np.stack([mean_from(encoder.hidden_states(ids), 0) for ids in sequences])
    stored = np.load(base / "reference" / "embeddings.npy").astype(np.float64)
    assert _cosines(pooled, stored).min() >= 0.999999  # the NumPy encoder is the reference
    return BertDense(src, sequences, _dense_reference(pooled, [(weight, bias, TANH)]))


def _check_raw(vectors: Vectors, expected: Vectors, bar: float, what: str) -> None:
    cosines = _cosines(vectors, expected)
    print(f"{what}: min cosine {cosines.min():.8f}")
    assert cosines.min() >= bar
    lengths = np.linalg.norm(vectors, axis=1)  # raw vectors: their lengths must match too
    np.testing.assert_allclose(lengths, np.linalg.norm(expected, axis=1), rtol=1e-3)


@pytest.mark.slow  # imports and runs a BERT with Dense modules on both engines (7-10 s here)
@pytest.mark.parametrize("out_type", list(MIN_COSINE))
def test_bert_with_a_dense_module(bert_dense: BertDense, tmp_path: Path, out_type: str) -> None:
    """Both engines give the reference's vectors, the Dense module applied after pooling."""
    engines = Engines(import_model(bert_dense.src, tmp_path, out_type=out_type))
    try:
        info = engines.info
        assert (info.architecture, info.dimensions, info.normalizes) == ("bert", 48, False)
        assert _sequences(info, []) == []
        for engine in ENGINES:
            vectors, _ = engines.embed(engine, bert_dense.sequences)
            what = f"bert+dense {out_type} {engine}"
            _check_raw(vectors, bert_dense.expected, MIN_COSINE[out_type], what)
    finally:
        engines.close()


@pytest.mark.slow  # worker processes started per engine (10-15 s here)
@pytest.mark.parametrize("engine", ENGINES)
def test_dense_modules_in_worker_processes(
    bert_dense: BertDense, tmp_path: Path, engine: str
) -> None:
    """The server's loader, each engine in a worker process of its own: the Dense module is
    applied there (llama.cpp's in NumPy after its pooling), and the widths agree."""
    info = read_model_info(import_model(bert_dense.src, tmp_path, out_type="f32"))
    settings = EngineSettings(engine=engine, worker_processes=True, onnx_threads=1)
    runtime = load_runtime(info, settings, LoadOptions())
    try:
        assert runtime.dimensions == 48
        worker = runtime.new_engine()
        try:
            packs = _packs(bert_dense.sequences, PACK_TOKENS)  # what the server sends
            vectors = np.concatenate([worker.embed(Pack.of(p)) for p in packs]).astype(np.float64)
        finally:
            worker.close()
    finally:
        runtime.close()
    _check_raw(vectors, bert_dense.expected, MIN_COSINE["f32"], f"bert+dense {engine} process")


def test_auto_picks_onnx_runtime_for_gemma3(gemma: dict[str, Engines]) -> None:
    """ONNX Runtime is exact and measured faster (docs/design.md, "Families")."""
    for engines in gemma.values():
        assert engine_for(engines.info, EngineSettings(), LoadOptions()) == "onnxruntime"


@pytest.mark.slow  # ~15 s here
def test_gemma3_with_dense_modules_llama_cpp_does_not_apply(
    tmp_path: Path, gemma: dict[str, Engines]
) -> None:
    """tiny-gemma3-embed with Dense 64 -> 32 (bias, tanh) then 32 -> 24 (identity): not
    llama.cpp's pair, so carried under embedd's keys; both engines apply them."""
    src = tmp_path / "gemma-dense"
    shutil.copytree(GEMMA, src, ignore=shutil.ignore_patterns("2_Dense", "3_Dense", "reference"))
    rng = np.random.default_rng(2)
    first, first_bias = _random_dense(rng, (32, 64), bias=True)
    second, _ = _random_dense(rng, (24, 32), bias=False)
    paths = [
        _add_dense(src, 2, first, first_bias, TANH),
        _add_dense(src, 3, second, None, IDENTITY),
    ]
    _with_modules(src, paths, normalize=True)
    path = import_model(src, tmp_path / "models", out_type="f32")
    engines = Engines(path)
    try:
        assert engines.info.dimensions == 24
        from gguf import GGUFReader

        reader = GGUFReader(path)
        assert reader.fields[DENSE_COUNT_KEY].contents() == 2
        assert not {"dense_2.weight", "dense_3.weight"} & {t.name for t in reader.tensors}
        texts = [str(item["text"]) for item in _texts(GEMMA)]
        sequences = _sequences(engines.info, texts)
        # The pooled vectors of the encoder, from the f32 graph the stored reference holds.
        source = load_gguf(gemma["f32"].info.path)
        assert isinstance(source, Gemma3Source)
        plain = replace(source, dense=()).build()
        pooled = OnnxEngine(plain).embed(Pack.of(sequences)).astype(np.float64)
        expected = _dense_reference(pooled, [(first, first_bias, TANH), (second, None, IDENTITY)])
        for engine in ENGINES:
            vectors, _ = engines.embed(engine, sequences)
            cosines = _cosines(vectors, expected)
            print(f"gemma3+dense f32 {engine}: min cosine {cosines.min():.8f}")
            assert cosines.min() >= MIN_COSINE["f32"]
    finally:
        engines.close()
