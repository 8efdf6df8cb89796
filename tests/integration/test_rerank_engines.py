"""The shared cross-encoders, imported and scored by every engine that can serve them.

``../shared/models/tiny-bert-reranker`` (``BertForSequenceClassification``) and
``tiny-xlmr-reranker`` (``XLMRobertaForSequenceClassification``) are imported f32 and f16 and
loaded through the production loader (:func:`embedd_server.engines.choice.load_runtime`), in
the worker's thread and in worker processes; their 128 query/document pairs (tokenized with
the model's own tokenizer.json pair template) are scored in packs, as the server's workers
score them, and the raw logits are held to ``reference/logits.npy`` and each query's ranking
of its 8 documents to the reference's. No server is involved.

What the stored BERT reference is: its logits are those of every token having token type 0
(the independent NumPy encoder agrees to 1e-6 that way, and is off by more than 0.1 with the
pair template's type 1 on the document): its tokenizer_config names transformers' generic
TokenizersBackend, which returns no token_type_ids (checked with transformers 5.24). The
importer records that (``pair_token_types``), so these pairs are all type 0; a copy naming
BertTokenizer (ms-marco-MiniLM's) gets the document as type 1, held to the NumPy encoder.

Bars, measured (2026-11-29, onnxruntime 1.32, llama-cpp-python 0.3.36):
- ONNX Runtime, f32: logits within 1e-4 (worst 7.4e-6).
- f16 files: the weights' own rounding moves the logits by up to 7.3e-3 whatever computes them
  (ONNX Runtime computes in f32 from the f16 weights), so the bar is the score's,
  sigmoid(logit), within 1e-3 (worst 8.3e-4), and logits within 1e-2.
- llama.cpp (pairs of type 0 only): its BERT graph's GELU is the tanh approximation, looked
  up in an f16 table on the CPU, which moves the logits by up to 4.8e-3 (f32) / 1.05e-2
  (f16): logits within 1e-2 / 2e-2, scores within 2e-3 (worst 6.0e-4 / 1.29e-3), rankings
  equal. That misses the issue's bar, so engine=auto never gives llama.cpp an f32/f16
  reranker; it serves quantized ones (no engine is exact there) and engine=llama.cpp.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

from embedd_server.compute.engine import Runtime
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines.choice import engine_for, load_runtime
from embedd_server.engines.llama import LlamaRuntime
from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import ModelInfo, read_model_info
from tests.reference_encoder import EncoderReference

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
RERANKERS = ("tiny-bert-reranker", "tiny-xlmr-reranker")
OUT_TYPES = ("f32", "f16")
DOCUMENTS_PER_QUERY = 8

# engine -> out_type -> (logit bar, score bar); see the module docstring for the measurements.
BARS = {
    "onnxruntime": {"f32": (1e-4, 1e-4), "f16": (1e-2, 1e-3)},
    "llama.cpp": {"f32": (1e-2, 2e-3), "f16": (2e-2, 2e-3)},
}
# Which engines can serve each shared cross-encoder: both give every token type 0 (their
# tokenizers return no token_type_ids), which llama.cpp can do too.
ENGINES = {
    "tiny-bert-reranker": ("onnxruntime", "llama.cpp"),
    "tiny-xlmr-reranker": ("onnxruntime", "llama.cpp"),
}

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Pairs:
    """A reranker's reference pairs, tokenized as the model's tokenizer.json says."""

    sequences: list[list[int]]
    type_starts: list[int]  # first token of type 1 (the document), or the length
    logits: Floats  # reference/logits.npy
    scores: Floats  # reference/scores.npy


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests read ../shared beside the repo"
    out = tmp_path_factory.mktemp("rerankers")
    return {
        (model, out_type): import_model(
            MODELS / model, out, out_type=out_type, report=lambda note: None
        )
        for model in RERANKERS
        for out_type in OUT_TYPES
    }


def typed_bert_copy(destination: Path) -> Path:
    """tiny-bert-reranker with ms-marco-MiniLM's tokenizer class (BertTokenizer), whose pairs
    give the document token type 1."""
    import shutil

    shutil.copytree(
        MODELS / "tiny-bert-reranker", destination, ignore=shutil.ignore_patterns("reference")
    )
    config_path = destination / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "BertTokenizer"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    return destination


@pytest.fixture(scope="module")
def typed_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = typed_bert_copy(tmp_path_factory.mktemp("typed") / "tiny-bert-reranker-typed")
    return import_model(source, source.parent / "models", report=lambda note: None)


def _pairs(model: str) -> Pairs:
    src = MODELS / model
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    items = json.loads((src / "reference" / "pairs.json").read_text(encoding="utf-8"))
    encodings = [tokenizer.encode(item["query"], item["document"]) for item in items]
    starts = [e.type_ids.index(1) if 1 in e.type_ids else len(e.ids) for e in encodings]
    return Pairs(
        sequences=[e.ids for e in encodings],
        type_starts=starts,
        logits=np.load(src / "reference" / "logits.npy").astype(np.float64).reshape(-1),
        scores=np.load(src / "reference" / "scores.npy").astype(np.float64).reshape(-1),
    )


def _packs(lengths: list[int], budget: int, max_sequences: int) -> Iterator[list[int]]:
    """Indices of consecutive pairs, packed as the scheduler packs them."""
    pack: list[int] = []
    tokens = 0
    for index, length in enumerate(lengths):
        if pack and (tokens + length > budget or len(pack) == max_sequences):
            yield pack
            pack, tokens = [], 0
        pack.append(index)
        tokens += length
    if pack:
        yield pack


def _settings(engine: str, processes: bool) -> EngineSettings:
    return EngineSettings(engine=engine, worker_processes=processes, onnx_threads=1)


def _score(runtime: Runtime, info: ModelInfo, pairs: Pairs, *, types: bool) -> Floats:
    """Every pair's logits, in packs of the server's default size; ``types``: the document
    gets token type 1 (else every token is type 0)."""
    engine = runtime.new_engine()
    settings = EngineSettings()
    budget = max(settings.batch_tokens, info.max_input_tokens)
    lengths = [len(ids) for ids in pairs.sequences]
    rows: list[Floats] = []
    try:
        assert engine.dimensions == runtime.dimensions == info.labels == 1
        for pack in _packs(lengths, budget, settings.batch_sequences):
            starts = [pairs.type_starts[i] if types else lengths[i] for i in pack]
            logits = engine.embed(Pack.of([pairs.sequences[i] for i in pack], None, starts))
            assert logits.dtype == np.float32 and logits.shape == (len(pack), 1)
            rows.append(logits.astype(np.float64))
    finally:
        engine.close()
    return np.concatenate(rows)[:, 0]


def _sigmoid(x: Floats) -> Floats:
    out: Floats = 1.0 / (1.0 + np.exp(-x))
    return out


def _rankings(logits: Floats) -> npt.NDArray[np.intp]:
    return np.argsort(-logits.reshape(-1, DOCUMENTS_PER_QUERY), axis=1, kind="stable")


CASES = [
    (model, out_type, engine, processes)
    for model in RERANKERS
    for out_type in OUT_TYPES
    for engine in ENGINES[model]
    for processes in (False, True)
]


@pytest.mark.parametrize(("model", "out_type", "engine", "processes"), CASES)
def test_logits_match_the_reference(
    imported: dict[tuple[str, str], Path],
    model: str,
    out_type: str,
    engine: str,
    processes: bool,
) -> None:
    info = read_model_info(imported[model, out_type])
    assert (info.task, info.labels, info.pooling) == ("rerank", 1, "rank")
    pairs = _pairs(model)
    assert len(pairs.sequences) == 128 == pairs.logits.shape[0]
    runtime = load_runtime(info, _settings(engine, processes), LoadOptions())
    try:
        assert runtime.engine_name == engine
        # The stored reference gives every token type 0 (test_the_bert_reference_...).
        logits = _score(runtime, info, pairs, types=False)
    finally:
        runtime.close()
    logit_bar, score_bar = BARS[engine][out_type]
    logit_error = np.abs(logits - pairs.logits)
    score_error = np.abs(_sigmoid(logits) - pairs.scores)
    print(
        f"{model} {out_type} {engine} processes={processes}: max logit error "
        f"{logit_error.max():.2e}, max score error {score_error.max():.2e}"
    )
    assert logit_error.max() <= logit_bar, int(np.argmax(logit_error))
    assert score_error.max() <= score_bar, int(np.argmax(score_error))
    np.testing.assert_array_equal(_rankings(logits), _rankings(pairs.logits))


def test_the_bert_reference_gives_every_token_type_0() -> None:
    """What ``tiny-bert-reranker``'s stored logits are: the NumPy encoder agrees with them when
    every token has type 0, not with the pair template's type 1 on the document."""
    pairs = _pairs("tiny-bert-reranker")
    reference = EncoderReference.load(MODELS / "tiny-bert-reranker")
    first = range(0, 128, 16)
    zeros = np.array([reference.logits(pairs.sequences[i])[0] for i in first])
    typed = np.array(
        [
            reference.logits(pairs.sequences[i], _type_ids(pairs, i))[0]  # document: type 1
            for i in first
        ]
    )
    np.testing.assert_allclose(zeros, pairs.logits[list(first)], atol=1e-5)
    assert np.abs(typed - pairs.logits[list(first)]).max() > 0.1


def _type_ids(pairs: Pairs, index: int) -> list[int]:
    length, start = len(pairs.sequences[index]), pairs.type_starts[index]
    return [0] * start + [1] * (length - start)


@pytest.mark.parametrize("processes", [False, True])
def test_onnx_gives_the_document_token_type_1(
    imported: dict[tuple[str, str], Path], processes: bool
) -> None:
    """A BERT cross-encoder's document as type 1 (what a tokenizer returning token_type_ids
    gives transformers, e.g. ms-marco-MiniLM's BertTokenizer): ONNX Runtime's logits are
    those of the independent NumPy encoder, within 1e-4 (f32)."""
    info = read_model_info(imported["tiny-bert-reranker", "f32"])
    pairs = _pairs("tiny-bert-reranker")
    assert all(
        start < len(ids) for start, ids in zip(pairs.type_starts, pairs.sequences, strict=True)
    )
    runtime = load_runtime(info, _settings("onnxruntime", processes), LoadOptions())
    try:
        logits = _score(runtime, info, pairs, types=True)
    finally:
        runtime.close()
    reference = EncoderReference.load(MODELS / "tiny-bert-reranker")
    expected = np.array(
        [reference.logits(ids, _type_ids(pairs, i))[0] for i, ids in enumerate(pairs.sequences)]
    )
    print(f"document as type 1: max logit error {np.abs(logits - expected).max():.2e}")
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert np.abs(logits - pairs.logits).max() > 0.1  # the types really reached the graph


TOKEN_TYPE_REFUSAL = "llama.cpp gives every token type 0, so its scores would be wrong"


def test_pairs_have_token_types_as_the_tokenizer_gives_them(
    imported: dict[tuple[str, str], Path], typed_bert: Path
) -> None:
    assert read_model_info(typed_bert).pair_token_types  # BertTokenizer: token_type_ids
    for key, path in imported.items():  # TokenizersBackend (and XLM-R's): none
        assert not read_model_info(path).pair_token_types, key


@pytest.mark.parametrize("processes", [False, True])
def test_llama_cpp_refuses_a_bert_reranker_whose_documents_have_type_1(
    typed_bert: Path, processes: bool
) -> None:
    info = read_model_info(typed_bert)
    settings = _settings("llama.cpp", processes)
    with pytest.raises(ModelLoadError) as forced:
        engine_for(info, settings, LoadOptions())
    assert TOKEN_TYPE_REFUSAL in forced.value.message
    assert "Use engine=auto or engine=onnxruntime" in forced.value.message
    with pytest.raises(ModelLoadError) as direct:  # the runtime itself refuses too
        LlamaRuntime(
            info.path,
            max_tokens=256,
            max_sequences=8,
            n_threads=1,
            n_gpu_layers=0,
            processes=processes,
        )
    assert TOKEN_TYPE_REFUSAL in direct.value.message
    assert engine_for(info, _settings("auto", processes), LoadOptions()) == "onnxruntime"


def test_a_quantized_typed_bert_reranker_is_refused_by_both_engines(tmp_path: Path) -> None:
    source = typed_bert_copy(tmp_path / "tiny-bert-reranker-typed")
    path = import_model(source, tmp_path / "models", out_type="q8_0", report=lambda note: None)
    info = read_model_info(path)
    with pytest.raises(ModelLoadError) as refused:
        load_runtime(info, EngineSettings(), LoadOptions())
    message = refused.value.message
    assert message.startswith(
        "No engine can serve tiny-bert-reranker-typed-q8_0: llama.cpp because"
    )
    assert TOKEN_TYPE_REFUSAL in message
    assert "ONNX Runtime because of its q8_0 weights" in message
    assert "Re-import the model with --type f16 or --type f32" in message


def test_auto_serves_rerankers_on_onnx_and_a_quantized_xlmr_on_llama_cpp(
    imported: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    auto = EngineSettings()
    for key, path in imported.items():
        assert engine_for(read_model_info(path), auto, LoadOptions()) == "onnxruntime", key
    quantized = import_model(
        MODELS / "tiny-xlmr-reranker", tmp_path, out_type="q8_0", report=lambda note: None
    )
    assert engine_for(read_model_info(quantized), auto, LoadOptions()) == "llama.cpp"


def _time(imported: dict[tuple[str, str], Path], rounds: int) -> None:
    """Pairs/s of the XLM-R reranker in-process, one thread, each engine, same packs."""
    pairs = _pairs("tiny-xlmr-reranker")
    for out_type in OUT_TYPES:
        info = read_model_info(imported["tiny-xlmr-reranker", out_type])
        for engine_name in ("onnxruntime", "llama.cpp"):
            runtime = load_runtime(info, _settings(engine_name, False), LoadOptions())
            engine = runtime.new_engine()
            lengths = [len(ids) for ids in pairs.sequences]
            budget = max(EngineSettings().batch_tokens, info.max_input_tokens)
            packs = [
                Pack.of([pairs.sequences[i] for i in pack], None, [lengths[i] for i in pack])
                for pack in _packs(lengths, budget, EngineSettings().batch_sequences)
            ]
            for pack in packs:  # warm-up
                engine.embed(pack)
            began = time.perf_counter()
            for _ in range(rounds):
                for pack in packs:
                    engine.embed(pack)
            rate = rounds * len(pairs.sequences) / (time.perf_counter() - began)
            print(f"tiny-xlmr-reranker {out_type} {engine_name}: {rate:,.0f} pairs/s")
            engine.close()
            runtime.close()


if __name__ == "__main__":
    # python -m tests.integration.test_rerank_engines [ROUNDS]: the in-process timing of
    # docs/design.md ("Engines").
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        models = {
            (model, out_type): import_model(
                MODELS / model, Path(tmp), out_type=out_type, report=lambda note: None
            )
            for model in ("tiny-xlmr-reranker",)
            for out_type in OUT_TYPES
        }
        _time(models, int(sys.argv[1]) if len(sys.argv) > 1 else 20)
