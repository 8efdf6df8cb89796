"""Sequence classifiers, imported and run by the engines, against transformers' own outputs.

``../shared/models/tiny-roberta-classifier`` (``RobertaForSequenceClassification``, 3 labels,
``<s>`` -> dense -> tanh -> out_proj) is imported f32 and f16 and loaded through the
production loader (:func:`embedd_server.engines.choice.load_runtime`), in the worker's thread
and in worker processes; its 96 reference texts are tokenized with its own tokenizer.json
(truncated at the stored maximum, as transformers' pipeline does) and classified in packs,
as the server's workers run them. The engine's rows are the raw logits; the probabilities
(:func:`embedd_server.core.classes.class_probabilities`, a softmax for this single-label
model) are held to ``reference/probabilities.npy`` and the top label to the reference's.
Pairs (the tokenizer's pair template) and a ``DistilBertForSequenceClassification``
(pre_classifier -> ReLU -> classifier, built from tiny-distilbert with a random head) are
held to the independent NumPy encoder (tests/reference_encoder.py). No server is involved.

Bars, measured (2026-12-07, onnxruntime 1.32, llama-cpp-python 0.3.36; printed by the tests):
- ONNX Runtime, f32: probabilities within 1e-4 of the reference (worst 1.5e-6; logits 4.2e-6).
- f16 files: rounding the weights to f16 moves the probabilities by up to 1.5e-3 whatever
  computes them (the NumPy encoder in float64 on the f16-rounded weights gives the same
  1.5e-3), so no engine can hold an f16 classifier to 1e-4 of the reference. What holds
  ONNX Runtime to 1e-4 on an f16 file is the float64 computation on that file's own weights
  (:func:`_file_reference`); to the stored reference the bar is 2e-3, top label equal.
- llama.cpp (the RoBERTa head: its rank pooling computes tanh) computes GELU by the tanh
  approximation looked up in an f16 table: probabilities within 2e-3 (worst 8.9e-4, f32) /
  5e-3 (worst 2.4e-3, f16), top labels equal. That misses the bar, so engine=auto serves
  f32/f16 classifiers on ONNX Runtime. llama.cpp cannot run DistilBERT's ReLU head at all:
  refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

from embedd_server.compute.engine import Runtime
from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.core.classes import class_probabilities
from embedd_server.engines.choice import engine_for, load_runtime
from embedd_server.engines.llama import LlamaRuntime
from embedd_server.engines.onnx_graph import load_bert_gguf
from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import ModelInfo, read_model_info
from tests.reference_encoder import EncoderReference
from tests.unit.test_import_bertlike import make_distilbert_classifier

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
CLASSIFIER = "tiny-roberta-classifier"
OUT_TYPES = ("f32", "f16")
PROBABILITY_BAR = 1e-4  # the bar: against the reference (f32) or the file (f16)
# engine -> out_type -> probability bar against the stored reference (module docstring).
BARS = {
    "onnxruntime": {"f32": PROBABILITY_BAR, "f16": 2e-3},
    "llama.cpp": {"f32": 2e-3, "f16": 5e-3},
}

Floats = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests read ../shared beside the repo"
    out = tmp_path_factory.mktemp("classifiers")
    return {
        out_type: import_model(
            MODELS / CLASSIFIER, out, out_type=out_type, report=lambda note: None
        )
        for out_type in OUT_TYPES
    }


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A DistilBERT classifier directory and its f32, f16 and q8_0 imports."""
    root = tmp_path_factory.mktemp("distilbert")
    src = make_distilbert_classifier(root / "tiny-distilbert-classifier")
    return src, {
        out_type: import_model(src, root / "models", out_type=out_type, report=lambda n: None)
        for out_type in (*OUT_TYPES, "q8_0")
    }


def _texts(src: Path) -> list[str]:
    items = json.loads((src / "reference" / "texts.json").read_text(encoding="utf-8"))
    return [str(item["text"]) for item in items]


def _tokenizer(src: Path, info: ModelInfo) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(info.max_input_tokens)
    return tokenizer


def _packs(lengths: list[int], budget: int, max_sequences: int) -> Iterator[list[int]]:
    """Indices of consecutive inputs, packed as the scheduler packs them."""
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


def _logits(runtime: Runtime, info: ModelInfo, sequences: list[list[int]]) -> Floats:
    """Every input's raw logits, in packs of the server's default size (all token type 0)."""
    engine = runtime.new_engine()
    settings = EngineSettings()
    lengths = [len(ids) for ids in sequences]
    rows: list[Floats] = []
    try:
        assert engine.dimensions == runtime.dimensions == info.labels
        budget = max(settings.batch_tokens, info.max_input_tokens)
        for pack in _packs(lengths, budget, settings.batch_sequences):
            logits = engine.embed(
                Pack.of([sequences[i] for i in pack], None, [lengths[i] for i in pack])
            )
            assert logits.dtype == np.float32 and logits.shape == (len(pack), info.labels)
            rows.append(logits.astype(np.float64))
    finally:
        engine.close()
    return np.concatenate(rows)


def _settings(engine: str, processes: bool) -> EngineSettings:
    return EngineSettings(engine=engine, worker_processes=processes, onnx_threads=1)


def _classify(info: ModelInfo, engine: str, sequences: list[list[int]], processes: bool) -> Floats:
    runtime = load_runtime(info, _settings(engine, processes), LoadOptions())
    try:
        assert runtime.engine_name == engine
        return _logits(runtime, info, sequences)
    finally:
        runtime.close()


CASES = [
    (out_type, engine, processes)
    for out_type in OUT_TYPES
    for engine in ("onnxruntime", "llama.cpp")
    for processes in (False, True)
]


@pytest.mark.parametrize(("out_type", "engine", "processes"), CASES)
def test_probabilities_match_the_reference(
    imported: dict[str, Path], out_type: str, engine: str, processes: bool
) -> None:
    src = MODELS / CLASSIFIER
    info = read_model_info(imported[out_type])
    labels = json.loads((src / "reference" / "labels.json").read_text(encoding="utf-8"))
    assert (info.task, info.family, info.pooling, info.problem_type) == (
        "classify",
        "roberta",
        "rank",
        "single_label_classification",
    )
    assert info.label_names == tuple(labels[str(i)] for i in range(len(labels)))
    tokenizer = _tokenizer(src, info)
    sequences = [e.ids for e in tokenizer.encode_batch(_texts(src))]
    reference_logits = np.load(src / "reference" / "logits.npy").astype(np.float64)
    reference = np.load(src / "reference" / "probabilities.npy").astype(np.float64)
    assert reference.shape == (len(sequences), info.labels)

    logits = _classify(info, engine, sequences, processes)
    probabilities = class_probabilities(logits, info.problem_type)
    error = np.abs(probabilities - reference)
    logit_error = np.abs(logits - reference_logits)
    print(
        f"{CLASSIFIER} {out_type} {engine} processes={processes}: max probability error "
        f"{error.max():.2e}, max logit error {logit_error.max():.2e}"
    )
    assert error.max() <= BARS[engine][out_type], int(np.argmax(error.max(axis=1)))
    np.testing.assert_array_equal(probabilities.argmax(axis=1), reference.argmax(axis=1))
    if engine == "onnxruntime" and out_type == "f16":  # exact for the file's own weights
        exact = _file_reference(info.path)
        wanted = class_probabilities(np.array([exact.logits(ids) for ids in sequences]), "")
        file_error = np.abs(probabilities - wanted).max()
        print(f"  against the f16 file's own weights: max probability error {file_error:.2e}")
        assert file_error <= PROBABILITY_BAR


def _file_reference(path: Path) -> EncoderReference:
    """The NumPy encoder on a GGUF file's own weights (f16 ones read exactly), as ONNX
    Runtime's reader names them: what an exact engine computes from that file."""
    source = load_bert_gguf(path)
    weights = {name: value.astype(np.float64) for name, value in source.weights.items()}
    if source.head_activation == "relu":  # the NumPy encoder knows the head by DistilBERT's names
        for ours, theirs in (
            ("classifier.dense", "pre_classifier"),
            ("classifier.out_proj", "classifier"),
        ):
            for part in ("weight", "bias"):
                weights[f"{theirs}.{part}"] = weights.pop(f"{ours}.{part}")
    config = {
        "model_type": "bert",  # the file's position table already starts at padding_idx + 1
        "num_attention_heads": source.config.num_attention_heads,
        "num_hidden_layers": source.config.num_hidden_layers,
        "layer_norm_eps": source.config.layer_norm_eps,
    }
    return EncoderReference(weights, config)


@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_pairs_follow_the_pair_template(imported: dict[str, Path], out_type: str) -> None:
    """A pair ``<s> A </s></s> B </s>`` (all token type 0, as RoBERTa's tokenizer gives it):
    ONNX Runtime's logits are the NumPy encoder's."""
    src = MODELS / CLASSIFIER
    info = read_model_info(imported[out_type])
    texts = _texts(src)
    tokenizer = _tokenizer(src, info)
    pairs = [tokenizer.encode(texts[i], texts[i + 1]) for i in range(0, 32, 2)]
    assert all(set(e.type_ids) == {0} for e in pairs)
    sequences = [e.ids for e in pairs]
    logits = _classify(info, "onnxruntime", sequences, processes=False)
    # f32: transformers' computation; f16: the same on the file's rounded weights.
    reference = EncoderReference.load(src) if out_type == "f32" else _file_reference(info.path)
    expected = np.array([reference.logits(ids) for ids in sequences])
    print(f"pairs {out_type}: max logit error {np.abs(logits - expected).max():.2e}")
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    error = np.abs(class_probabilities(logits, "") - class_probabilities(expected, ""))
    assert error.max() <= PROBABILITY_BAR


def test_the_numpy_encoder_agrees_with_the_stored_reference() -> None:
    """What makes the NumPy encoder a reference for pairs and DistilBERT's head: it gives the
    stored logits of the RoBERTa classifier's texts."""
    src = MODELS / CLASSIFIER
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    reference = EncoderReference.load(src)
    texts = _texts(src)[:24]
    logits = np.array([reference.logits(tokenizer.encode(text).ids) for text in texts])
    stored = np.load(src / "reference" / "logits.npy").astype(np.float64)[: len(texts)]
    np.testing.assert_allclose(logits, stored, atol=1e-5)


@pytest.mark.parametrize("processes", [False, True])
@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_distilbert_relu_head_on_onnx(
    distilbert: tuple[Path, dict[str, Path]], out_type: str, processes: bool
) -> None:
    src, files = distilbert
    info = read_model_info(files[out_type])
    assert (info.family, info.task, info.labels, info.head_activation) == (
        "distilbert",
        "classify",
        3,
        "relu",
    )
    tokenizer = _tokenizer(src, info)
    texts = _texts(MODELS / CLASSIFIER)
    sequences = [e.ids for e in tokenizer.encode_batch(texts)]
    logits = _classify(info, "onnxruntime", sequences, processes)
    reference = EncoderReference.load(src) if out_type == "f32" else _file_reference(info.path)
    expected = np.array([reference.logits(ids) for ids in sequences])
    probabilities = class_probabilities(logits, info.problem_type)
    wanted = class_probabilities(expected, info.problem_type)
    error = np.abs(probabilities - wanted)
    print(
        f"distilbert classifier {out_type} processes={processes}: max probability error "
        f"{error.max():.2e}, max logit error {np.abs(logits - expected).max():.2e}"
    )
    assert error.max() <= PROBABILITY_BAR
    np.testing.assert_array_equal(probabilities.argmax(axis=1), wanted.argmax(axis=1))
    # A tanh head (what llama.cpp would compute) gives other logits: the ReLU reached the graph.
    first = np.array([reference.hidden_states(ids)[0] for ids in sequences[:8]])
    dense = reference._linear(first, "pre_classifier")
    tanh_logits = reference._linear(np.tanh(dense), "classifier")
    assert np.abs(logits[:8] - tanh_logits).max() > 0.05


RELU_REFUSAL = "its classifier head applies relu between its two layers"


@pytest.mark.parametrize("processes", [False, True])
def test_llama_cpp_refuses_the_relu_head(
    distilbert: tuple[Path, dict[str, Path]], processes: bool
) -> None:
    info = read_model_info(distilbert[1]["f32"])
    with pytest.raises(ModelLoadError) as forced:
        engine_for(info, _settings("llama.cpp", processes), LoadOptions())
    assert RELU_REFUSAL in forced.value.message
    assert "llama.cpp's rank pooling applies tanh" in forced.value.message
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
    assert RELU_REFUSAL in direct.value.message
    assert engine_for(info, _settings("auto", processes), LoadOptions()) == "onnxruntime"


def test_a_quantized_relu_classifier_is_refused_by_both_engines(
    distilbert: tuple[Path, dict[str, Path]],
) -> None:
    info = read_model_info(distilbert[1]["q8_0"])
    with pytest.raises(ModelLoadError) as refused:
        load_runtime(info, EngineSettings(), LoadOptions())
    message = refused.value.message
    assert message.startswith(f"No engine can serve {info.name}: llama.cpp because")
    assert RELU_REFUSAL in message
    assert "ONNX Runtime because of its q8_0 weights" in message


def test_auto_serves_classifiers_on_onnx_and_a_quantized_roberta_on_llama_cpp(
    imported: dict[str, Path], tmp_path: Path
) -> None:
    auto = EngineSettings()
    for out_type, path in imported.items():
        assert engine_for(read_model_info(path), auto, LoadOptions()) == "onnxruntime", out_type
    quantized = import_model(
        MODELS / CLASSIFIER, tmp_path, out_type="q8_0", report=lambda note: None
    )
    assert engine_for(read_model_info(quantized), auto, LoadOptions()) == "llama.cpp"
