"""The shared SPLADE model, imported and run by the engine that serves it, against
``SparseEncoder.encode``.

``../shared/models/tiny-splade`` (``BertForMaskedLM`` + ``SpladePooling`` max / relu, as
sentence-transformers' ``SparseEncoder`` saves it) is imported f32 and f16 and loaded through
the production loader (:func:`embedd_server.engines.choice.load_runtime`), in the worker's thread
and in worker processes; its reference texts (tokenized with the model's own tokenizer.json,
truncated at its max_seq_length) are embedded in packs, as the server's workers embed them,
and each row, made sparse by :func:`embedd_server.model.sparse.sparse_rows`, is held to
``reference/sparse.npz`` (CSR: indices, values, offsets, vocab_size): cosine >= 0.9999 and,
from an f32 file, the same non-zero support (an entry that is exactly 0 in the reference is 0
here and vice versa). An f16 file's rounding moves the MLM logits by up to ~1e-3, which flips
weights that small across zero: measured, 42 of the reference's 49686 non-zero entries (40 of
275 texts), each below 6.7e-4; the test holds f16 to that (flips only below 1e-3, at most
0.1% of the support).
llama.cpp has no SPLADE pooling: it refuses the model by name. No server is involved.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from tokenizers import Tokenizer

from embedd_server.compute.pack import Pack
from embedd_server.compute.settings import EngineSettings, LoadOptions
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines.choice import engine_for, load_runtime
from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import SPARSE, ModelInfo, read_model_info
from embedd_server.model.sparse import sparse_rows
from tests.reference_encoder import EncoderReference

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
MODEL = "tiny-splade"
OUT_TYPES = ("f32", "f16")
MIN_COSINE = 0.9999
F16_FLIP_BELOW = 1e-3  # an f16 file's support may differ only on weights this small

Floats = npt.NDArray[np.float64]


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    assert MODELS.is_dir(), f"{MODELS} is missing: the tests read ../shared beside the repo"
    out = tmp_path_factory.mktemp("sparse")
    return {
        out_type: import_model(MODELS / MODEL, out, out_type=out_type, report=lambda note: None)
        for out_type in OUT_TYPES
    }


def _reference() -> tuple[list[dict[str, object]], Floats]:
    """The reference texts and their SparseEncoder.encode rows, dense ``[texts, vocab]``."""
    src = MODELS / MODEL / "reference"
    texts = json.loads((src / "texts.json").read_text(encoding="utf-8"))
    csr = np.load(src / "sparse.npz")
    offsets, indices, values = csr["offsets"], csr["indices"], csr["values"]
    dense = np.zeros((len(offsets) - 1, int(csr["vocab_size"])), dtype=np.float64)
    for row in range(len(offsets) - 1):
        span = slice(offsets[row], offsets[row + 1])
        dense[row, indices[span]] = values[span]
    assert dense.shape[0] == len(texts)
    return texts, dense


def _sequences(info: ModelInfo) -> list[list[int]]:
    assert info.hf_tokenizer_json is not None
    tokenizer = Tokenizer.from_str(info.hf_tokenizer_json)
    tokenizer.no_padding()
    tokenizer.enable_truncation(info.max_input_tokens)
    texts, _ = _reference()
    return [e.ids for e in tokenizer.encode_batch([str(t["text"]) for t in texts])]


def _packs(lengths: list[int], budget: int, max_sequences: int) -> Iterator[list[int]]:
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


def _settings(engine: str, processes: bool = False) -> EngineSettings:
    return EngineSettings(engine=engine, worker_processes=processes, onnx_threads=1)


def test_the_import_describes_a_sparse_encoder(imported: dict[str, Path]) -> None:
    for out_type, path in imported.items():
        info = read_model_info(path)
        assert (info.task, info.family, info.architecture) == (SPARSE, "bert", "bert")
        assert (info.dimensions, info.vocab_size, info.max_input_tokens) == (2500, 2500, 64)
        assert info.normalizes is False and info.quantization == out_type
        assert info.prompts == {"document": "", "query": ""}


@pytest.mark.parametrize("processes", [False, True])
@pytest.mark.parametrize("out_type", OUT_TYPES)
def test_sparse_vectors_match_sparse_encoder(
    imported: dict[str, Path], out_type: str, processes: bool
) -> None:
    info = read_model_info(imported[out_type])
    texts, reference = _reference()
    sequences = _sequences(info)
    assert [len(ids) for ids in sequences] == [t["tokens"] for t in texts]
    settings = _settings("auto", processes)
    runtime = load_runtime(info, settings, LoadOptions())
    try:
        assert runtime.engine_name == "onnxruntime"
        engine = runtime.new_engine()
        try:
            assert engine.dimensions == runtime.dimensions == 2500
            rows = [
                engine.embed(Pack.of([sequences[i] for i in pack]))
                for pack in _packs(
                    [len(s) for s in sequences], EngineSettings().onnx_batch_tokens, 32
                )
            ]
        finally:
            engine.close()
    finally:
        runtime.close()
    dense = np.concatenate(rows).astype(np.float64)
    ours = sparse_rows(dense)
    cosines = np.sum(dense * reference, axis=1) / (
        np.linalg.norm(dense, axis=1) * np.linalg.norm(reference, axis=1)
    )
    disagreements = [
        np.setxor1d(indices, np.nonzero(expected)[0]).size
        for (indices, _), expected in zip(ours, reference, strict=True)
    ]
    print(
        f"{MODEL} {out_type} processes={processes}: min cosine {cosines.min():.7f}, "
        f"support: {sum(disagreements)} entries differ over "
        f"{int(np.count_nonzero(reference))} non-zeros, max value error "
        f"{np.abs(dense - reference).max():.2e}"
    )
    assert cosines.min() >= MIN_COSINE, texts[int(np.argmin(cosines))]["text"]
    if out_type == "f32":
        assert sum(disagreements) == 0, [i for i, n in enumerate(disagreements) if n]
    else:
        # f16 weights move every logit by up to ~1e-3, so a weight that small can cross 0
        # (relu): measured 42 of 49686 entries, each below 6.7e-4 (4.6e-4 once f16 rounding
        # of the decoder alone is undone: the encoder's rounding does the rest). No f16
        # computation can hold that support; f32 does, exactly.
        flipped = (dense > 0) != (reference > 0)
        assert np.maximum(dense, reference)[flipped].max(initial=0.0) < F16_FLIP_BELOW
        assert flipped.sum() <= 1e-3 * np.count_nonzero(reference)


def test_llama_cpp_refuses_it_by_name(imported: dict[str, Path]) -> None:
    info = read_model_info(imported["f16"])
    assert engine_for(info, _settings("auto"), LoadOptions()) == "onnxruntime"
    assert engine_for(info, _settings("onnxruntime"), LoadOptions()) == "onnxruntime"
    with pytest.raises(ModelLoadError) as refused:
        engine_for(info, _settings("llama.cpp"), LoadOptions())
    assert "SPLADE sparse encoder" in refused.value.message
    assert "engine=onnxruntime" in refused.value.message


def test_the_numpy_reference_agrees_with_sparse_encoder() -> None:
    """The float64 NumPy encoder (tests/reference_encoder.py) gives SparseEncoder's rows, so
    it can stand for it where the shared model has no stored reference (sum, log1p_relu)."""
    texts, reference = _reference()
    tokenizer = Tokenizer.from_file(str(MODELS / MODEL / "tokenizer.json"))
    tokenizer.enable_truncation(64)
    encoder = EncoderReference.load(MODELS / MODEL)
    for row in range(0, len(texts), 25):
        ids = tokenizer.encode(str(texts[row]["text"])).ids
        np.testing.assert_allclose(encoder.splade(ids), reference[row], atol=2e-5)


@pytest.mark.parametrize(("strategy", "activation"), [("sum", "relu"), ("max", "log1p_relu")])
def test_other_splade_poolings(tmp_path: Path, strategy: str, activation: str) -> None:
    """SpladePooling's other settings (the first SPLADE's sum; OpenSearch's log1p_relu), on a
    copy of the shared model, against the NumPy reference: cosine >= 0.99999 (f32), the same
    support."""
    src = tmp_path / f"tiny-splade-{strategy}-{activation}"
    shutil.copytree(MODELS / MODEL, src, ignore=shutil.ignore_patterns("reference"))
    (src / "1_SpladePooling" / "config.json").write_text(
        json.dumps({"pooling_strategy": strategy, "activation_function": activation})
    )
    info = read_model_info(import_model(src, tmp_path / "models", out_type="f32"))
    sequences = _sequences(info)[::10]
    runtime = load_runtime(info, _settings("auto"), LoadOptions())
    try:
        engine = runtime.new_engine()
        dense = engine.embed(Pack.of(sequences)).astype(np.float64)
        engine.close()
    finally:
        runtime.close()
    encoder = EncoderReference.load(src)
    expected = np.stack([encoder.splade(ids, strategy, activation) for ids in sequences])
    cosines = np.sum(dense * expected, axis=1) / (
        np.linalg.norm(dense, axis=1) * np.linalg.norm(expected, axis=1)
    )
    print(f"{strategy}/{activation}: min cosine {cosines.min():.8f}")
    assert cosines.min() >= 0.99999
    np.testing.assert_array_equal(dense > 0, expected > 0)
