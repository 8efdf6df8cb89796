"""Each family, imported and run on llama.cpp (and on ONNX Runtime where it serves the family),
against sentence-transformers' own vectors.

For the small models of ../shared/models (BERT with CLS pooling, BERT with mean pooling and
raw vectors, XLM-RoBERTa in the sentence-transformers >= 5 layout, Qwen3 with last-token
pooling, DistilBERT with raw mean vectors, RoBERTa with byte-level BPE, Mistral with
last-token pooling and its e5-mistral query instruction; CamemBERT as tiny-xlmr relabelled,
its layout and vocabulary being XLM-R's), imported f32 and f16: the
reference texts are tokenized with the model's own
tokenizer.json, truncated at its max_seq_length the way sentence-transformers does (inside the
template, so [SEP] / </s> / <|endoftext|> stay), and must give the reference's token counts;
llama.cpp embeds them in packs, as the server's workers do, with the pooling the GGUF names;
vectors are normalized where the model normalizes. Bar: cosine >= 0.9999 (f32 >= 0.99999)
on every text. No server is involved.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

from embedd_server.compute.engine import Engine
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines.choice import engine_for, load_runtime
from embedd_server.engines.llama import LlamaEngine, LlamaModelWeights
from embedd_server.model.catalog import ModelInfo, read_model_info

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
MIN_COSINE = {"f32": 0.99999, "f16": 0.9999}
PACK_TOKENS = 128  # the server's default pack size

# What each directory says, as sentence-transformers reads it (see ../shared/models/README.md).
EXPECTED: dict[str, dict[str, Any]] = {
    "tiny-bert-cls": {"family": "bert", "pooling": "cls", "normalizes": True, "max": 64},
    "tiny-bert-mean-raw": {"family": "bert", "pooling": "mean", "normalizes": False, "max": 32},
    "tiny-xlmr": {"family": "xlm-roberta", "pooling": "mean", "normalizes": True, "max": 64},
    "tiny-qwen3": {"family": "qwen3", "pooling": "last", "normalizes": True, "max": 128},
    "tiny-distilbert": {"family": "distilbert", "pooling": "mean", "normalizes": False, "max": 48},
    "tiny-roberta": {"family": "roberta", "pooling": "mean", "normalizes": True, "max": 64},
    # Mistral is llama.cpp's `llama` architecture; the family is the importer's statement.
    "tiny-mistral": {
        "family": "mistral",
        "pooling": "last",
        "normalizes": True,
        "max": 128,
        "prompts": ("query",),
    },
}
# The models in llama.cpp's `bert` layout: ONNX Runtime serves them too (engine=auto's pick).
DECODERS = ("tiny-qwen3", "tiny-mistral")  # llama.cpp only
ONNX_MODELS = [m for m in EXPECTED if m not in DECODERS]

Vectors = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests read ../shared beside the repo"
    out = tmp_path_factory.mktemp("families")
    return {
        (model, out_type): import_model(MODELS / model, out, out_type=out_type)
        for model in EXPECTED
        for out_type in MIN_COSINE
    }


def _tokenizer(src: Path, info: ModelInfo) -> Tokenizer:
    text = (src / "tokenizer.json").read_text(encoding="utf-8")
    assert info.hf_tokenizer_json == text  # the whole tokenizer.json travels in the GGUF
    tokenizer = Tokenizer.from_str(text)
    tokenizer.no_padding()
    # sentence-transformers: tokenizer(..., truncation=True, max_length=max_seq_length)
    tokenizer.enable_truncation(info.max_input_tokens)
    return tokenizer


def _packs(sequences: list[list[int]], budget: int) -> Iterator[list[list[int]]]:
    pack: list[list[int]] = []
    for ids in sequences:
        if pack and sum(map(len, pack)) + len(ids) > budget:
            yield pack
            pack = []
        pack.append(ids)
    if pack:
        yield pack


def _llama_engine(path: Path, info: ModelInfo) -> tuple[Engine, Callable[[], None]]:
    weights = LlamaModelWeights(path)
    engine = LlamaEngine(
        weights,
        max_tokens=max(PACK_TOKENS, info.max_input_tokens),
        max_sequences=64,
        n_threads=1,
        exact_attention=info.quantization == "f32",  # as the server's loader sets it
    )

    def close() -> None:
        engine.close()
        weights.close()

    return engine, close


def _onnx_engine(info: ModelInfo) -> tuple[Engine, Callable[[], None]]:
    """ONNX Runtime's engine as the production loader builds it, in this thread."""
    settings = EngineSettings(engine="onnxruntime", worker_processes=False, onnx_threads=1)
    runtime = load_runtime(info, settings, LoadOptions())
    assert runtime.engine_name == "onnxruntime"
    engine = runtime.new_engine()

    def close() -> None:
        engine.close()
        runtime.close()

    return engine, close


def _embed(
    path: Path, info: ModelInfo, sequences: list[list[int]], engine_name: str = "llama.cpp"
) -> Vectors:
    if engine_name == "llama.cpp":
        engine, close = _llama_engine(path, info)
    else:
        engine, close = _onnx_engine(info)
    budget = max(PACK_TOKENS, info.max_input_tokens)
    try:
        vectors = np.concatenate(
            [engine.embed(Pack.of(pack)) for pack in _packs(sequences, budget)]
        ).astype(np.float64)
    finally:
        close()
    if info.normalizes:
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


@pytest.mark.parametrize("out_type", list(MIN_COSINE))
@pytest.mark.parametrize("model", list(EXPECTED))
def test_vectors_match_sentence_transformers(
    imported: dict[tuple[str, str], Path], model: str, out_type: str
) -> None:
    _check_vectors(MODELS / model, imported[model, out_type], EXPECTED[model], "llama.cpp")


@pytest.mark.parametrize("out_type", list(MIN_COSINE))
@pytest.mark.parametrize("model", ONNX_MODELS)
def test_onnx_vectors_match_sentence_transformers(
    imported: dict[tuple[str, str], Path], model: str, out_type: str
) -> None:
    _check_vectors(MODELS / model, imported[model, out_type], EXPECTED[model], "onnxruntime")


@pytest.mark.parametrize("engine_name", ["llama.cpp", "onnxruntime"])
@pytest.mark.parametrize("out_type", list(MIN_COSINE))
def test_camembert_is_served_as_its_layout_says(
    tmp_path: Path, out_type: str, engine_name: str
) -> None:
    """tiny-xlmr relabelled CamemBERT (``CamembertModel``, model_type camembert): the same
    layout and SentencePiece vocabulary, so tiny-xlmr's reference vectors, and its own family."""
    src = Path(shutil.copytree(MODELS / "tiny-xlmr", tmp_path / "tiny-camembert"))
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.update(architectures=["CamembertModel"], model_type="camembert")
    (src / "config.json").write_text(json.dumps(config), encoding="utf-8")
    path = import_model(src, tmp_path / "models", out_type=out_type, report=lambda note: None)
    expected = {**EXPECTED["tiny-xlmr"], "family": "camembert"}
    _check_vectors(src, path, expected, engine_name)


def _check_vectors(src: Path, path: Path, expected: dict[str, Any], engine_name: str) -> None:
    info = read_model_info(path)
    assert (info.family, info.pooling, info.normalizes, info.max_input_tokens) == (
        expected["family"],
        expected["pooling"],
        expected["normalizes"],
        expected["max"],
    )
    texts = json.loads((src / "reference" / "texts.json").read_text(encoding="utf-8"))
    reference = np.load(src / "reference" / "embeddings.npy").astype(np.float64)
    assert len(texts) == reference.shape[0]

    tokenizer = _tokenizer(src, info)
    inputs = [item["text"].lower() if info.do_lower_case else item["text"] for item in texts]
    sequences = [encoding.ids for encoding in tokenizer.encode_batch(inputs)]
    assert [len(ids) for ids in sequences] == [item["tokens"] for item in texts]
    _assert_close(
        src.name,
        path=path,
        info=info,
        sequences=sequences,
        reference=reference,
        texts=texts,
        engine_name=engine_name,
    )


def _assert_close(
    label: str,
    *,
    path: Path,
    info: ModelInfo,
    sequences: list[list[int]],
    reference: Vectors,
    texts: list[dict[str, Any]],
    engine_name: str = "llama.cpp",
) -> None:
    vectors = _embed(path, info, sequences, engine_name)
    if not info.normalizes:  # raw vectors: their length must match too
        np.testing.assert_allclose(
            np.linalg.norm(vectors, axis=1), np.linalg.norm(reference, axis=1), rtol=1e-3
        )
    cosines = np.sum(vectors * reference, axis=1) / (
        np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1)
    )
    worst = int(np.argmin(cosines))
    print(
        f"{label} {info.quantization} {engine_name}: min cosine {cosines[worst]:.7f}, "
        f"mean {np.mean(cosines):.7f}"
    )
    assert cosines[worst] >= MIN_COSINE[info.quantization], texts[worst]["text"]


def test_auto_serves_the_bert_layout_on_onnx(
    imported: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    """engine=auto: ONNX Runtime for every f32/f16 file in the `bert` layout (faster at the
    same vectors: docs/design.md, "Families"); llama.cpp for Qwen3 and quantized files."""
    auto = EngineSettings()
    for (model, _), path in imported.items():
        expected = "llama.cpp" if model in DECODERS else "onnxruntime"
        assert engine_for(read_model_info(path), auto, LoadOptions()) == expected, model
    for model in ("tiny-distilbert", "tiny-roberta"):
        q8 = import_model(MODELS / model, tmp_path, out_type="q8_0", report=lambda note: None)
        assert engine_for(read_model_info(q8), auto, LoadOptions()) == "llama.cpp", model


PROMPTED = [(model, name) for model, row in EXPECTED.items() for name in row.get("prompts", ())]


@pytest.mark.parametrize("out_type", list(MIN_COSINE))
@pytest.mark.parametrize(("model", "prompt_name"), PROMPTED)
def test_prompted_vectors_match_sentence_transformers(
    imported: dict[tuple[str, str], Path], model: str, prompt_name: str, out_type: str
) -> None:
    """encode(texts, prompt_name=...): the stored prompt's text before each text, its tokens
    pooled too (include_prompt), against reference/embeddings_<prompt>.npy."""
    src = MODELS / model
    path = imported[model, out_type]
    info = read_model_info(path)
    assert info.include_prompt
    prompt = info.prompts[prompt_name]
    assert prompt, f"{model}'s {prompt_name} prompt is empty: nothing to test"
    texts = json.loads((src / "reference" / "texts.json").read_text(encoding="utf-8"))
    reference = np.load(src / "reference" / f"embeddings_{prompt_name}.npy").astype(np.float64)
    tokenizer = _tokenizer(src, info)
    sequences = [e.ids for e in tokenizer.encode_batch([prompt + t["text"] for t in texts])]
    plain = [len(e.ids) for e in tokenizer.encode_batch([t["text"] for t in texts])]
    assert sum(map(len, sequences)) > sum(plain)  # the prompt's tokens are there
    _assert_close(
        f"{model} {prompt_name}",
        path=path,
        info=info,
        sequences=sequences,
        reference=reference,
        texts=texts,
    )


@pytest.mark.parametrize("model", list(EXPECTED))
def test_prompts_and_their_pooling_are_stored(
    imported: dict[tuple[str, str], Path], model: str
) -> None:
    src = MODELS / model
    config = json.loads((src / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    for out_type in MIN_COSINE:
        info = read_model_info(imported[model, out_type])
        assert info.prompts == config["prompts"]
        assert info.default_prompt_name == config["default_prompt_name"]
        assert info.include_prompt is pooling.get("include_prompt", True)
        assert info.do_lower_case is False


def _time(models: dict[tuple[str, str], Path], rounds: int) -> None:
    """Texts/s of each model in-process, one thread, on each engine, in the same packs."""
    for (model, out_type), path in models.items():
        info = read_model_info(path)
        texts = json.loads((MODELS / model / "reference" / "texts.json").read_text("utf-8"))
        tokenizer = _tokenizer(MODELS / model, info)
        sequences = [e.ids for e in tokenizer.encode_batch([t["text"] for t in texts])]
        packs = [Pack.of(p) for p in _packs(sequences, max(PACK_TOKENS, info.max_input_tokens))]
        for engine_name in ("onnxruntime", "llama.cpp"):
            engine, close = (
                _llama_engine(path, info) if engine_name == "llama.cpp" else _onnx_engine(info)
            )
            try:
                for pack in packs:  # warm-up
                    engine.embed(pack)
                began = time.perf_counter()
                for _ in range(rounds):
                    for pack in packs:
                        engine.embed(pack)
                rate = rounds * len(sequences) / (time.perf_counter() - began)
            finally:
                close()
            print(f"{model} {out_type} {engine_name}: {rate:,.0f} texts/s")


if __name__ == "__main__":
    # python -m tests.integration.test_families [ROUNDS] [MODEL ...]: the in-process timing of
    # docs/design.md ("Families"), default the DistilBERT and RoBERTa models.
    import tempfile

    names = sys.argv[2:] or ["tiny-distilbert", "tiny-roberta"]
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            (name, out_type): import_model(
                MODELS / name, Path(tmp), out_type=out_type, report=lambda note: None
            )
            for name in names
            for out_type in MIN_COSINE
        }
        _time(files, int(sys.argv[1]) if len(sys.argv) > 1 else 20)
