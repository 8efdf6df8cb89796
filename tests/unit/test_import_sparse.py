"""Importing SPLADE sparse encoders (``BertForMaskedLM`` + ``SpladePooling``, as
sentence-transformers' ``SparseEncoder`` saves them) from tiny random models built in tmp_path:
the GGUF keys and tensors (the MLM head under embedd's names, a tied decoder stored once), the
catalogue's view (task sparse, the vocabulary as dimensions), ONNX Runtime's rows against the
NumPy reference (tied and untied decoders), and each refusal naming the file at fault. Against
SparseEncoder.encode itself: tests/integration/test_sparse_engines.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from embedd_server.compute.pack import Pack
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines.onnx import OnnxEngine
from embedd_server.engines.onnx_models import load_gguf
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import SPARSE, read_model_info
from tests.reference_encoder import EncoderReference
from tests.unit.test_hf_to_gguf import HIDDEN, VOCAB, _tokenizer, make_tiny_bert

MLM_TYPE = "sentence_transformers.sparse_encoder.modules.mlm_transformer.MLMTransformer"
SPLADE_TYPE = "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def make_tiny_splade(root: Path, *, tied: bool = True, old_bias_name: bool = False) -> Path:
    """A tiny random SPLADE directory: the tiny BERT as BertForMaskedLM (``bert.`` prefix)
    with an MLM head, MLMTransformer + SpladePooling (max, relu)."""
    make_tiny_bert(root, prefix="bert.")
    config = json.loads((root / "config.json").read_text())
    config |= {"architectures": ["BertForMaskedLM"], "tie_word_embeddings": tied}
    _write_json(root / "config.json", config)
    rng = np.random.default_rng(5)
    loaded = load_file(str(root / "model.safetensors"))
    tensors = {k: v for k, v in loaded.items() if not k.startswith("bert.pooler.")}
    p = "cls.predictions"
    tensors |= {
        f"{p}.transform.dense.weight": (rng.standard_normal((HIDDEN, HIDDEN)) * 0.2).astype("f4"),
        f"{p}.transform.dense.bias": (rng.standard_normal(HIDDEN) * 0.1).astype("f4"),
        f"{p}.transform.LayerNorm.weight": (1 + rng.standard_normal(HIDDEN) * 0.1).astype("f4"),
        f"{p}.transform.LayerNorm.bias": (rng.standard_normal(HIDDEN) * 0.1).astype("f4"),
    }
    bias = (rng.standard_normal(len(VOCAB)) * 0.5 - 0.3).astype("f4")
    tensors[f"{p}.bias" if old_bias_name else f"{p}.decoder.bias"] = bias
    if not tied:
        decoder = rng.standard_normal((len(VOCAB), HIDDEN)) * 0.3
        tensors[f"{p}.decoder.weight"] = decoder.astype("f4")
    save_file(tensors, str(root / "model.safetensors"))
    _write_json(
        root / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": MLM_TYPE},
            {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": SPLADE_TYPE},
        ],
    )
    _write_json(
        root / "1_SpladePooling" / "config.json",
        {"pooling_strategy": "max", "activation_function": "relu", "embedding_dimension": None},
    )
    _write_json(
        root / "config_sentence_transformers.json",
        {"model_type": "SparseEncoder", "prompts": {"query": "", "document": ""}},
    )
    return root


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_tied_splade_keys_and_tensors(tmp_path: Path) -> None:
    out = import_model(make_tiny_splade(tmp_path / "tiny-splade"), tmp_path / "models")
    f = _fields(out)
    expected = {
        "general.architecture": "bert",
        "bert.pooling_type": int(gguf.PoolingType.NONE),
        "embedd.task": SPARSE,
        "embedd.family": "bert",
        "embedd.splade.pooling_strategy": "max",
        "embedd.splade.activation": "relu",
        "sentence_transformers.normalize": False,
        "sentence_transformers.max_seq_length": 32,
    }
    assert {k: f.get(k) for k in expected} == expected
    tensors = _tensors(out)
    head = {n for n in tensors if n.startswith("mlm.")}
    # Tied to the word embeddings: the decoder's weight is token_embd, stored once.
    assert head == {"mlm.dense.weight", "mlm.dense.bias", "mlm.norm.weight", "mlm.norm.bias"} | {
        "mlm.output.bias"
    }
    assert tensors["mlm.dense.weight"].tensor_type.name == "F32"  # small: kept f32
    info = read_model_info(out)
    assert (info.task, info.dimensions, info.vocab_size) == (SPARSE, len(VOCAB), len(VOCAB))
    assert (info.pooling, info.normalizes, info.family) == ("none", False, "bert")
    assert info.prompts == {"query": "", "document": ""}


@pytest.mark.parametrize(("tied", "old_bias_name"), [(True, True), (False, False)])
def test_onnx_rows_equal_the_numpy_reference(
    tmp_path: Path, tied: bool, old_bias_name: bool
) -> None:
    src = make_tiny_splade(tmp_path / "tiny-splade", tied=tied, old_bias_name=old_bias_name)
    out = import_model(src, tmp_path / "models", out_type="f32")
    assert ("mlm.output.weight" in _tensors(out)) is not tied
    engine = OnnxEngine(load_gguf(out).build())
    assert engine.dimensions == len(VOCAB)
    tokenizer = _tokenizer()
    texts = ["the man plays guitar", "a red car on the road!", "dog"]
    sequences = [tokenizer.encode(t).ids for t in texts]
    rows = engine.embed(Pack.of(sequences)).astype(np.float64)  # padded together
    reference = EncoderReference.load(src)
    expected = np.stack([reference.splade(ids) for ids in sequences])
    np.testing.assert_allclose(rows, expected, atol=2e-5)
    assert 0 < np.count_nonzero(expected) < expected.size  # sparse, and not empty
    np.testing.assert_array_equal(rows > 0, expected > 0)


def _modules(src: Path, types: list[str]) -> None:
    paths = ["", "1_SpladePooling", "2_Normalize"]
    _write_json(
        src / "modules.json",
        [{"idx": i, "name": str(i), "path": paths[i], "type": t} for i, t in enumerate(types)],
    )


def _with_normalize(src: Path) -> None:
    _modules(src, [MLM_TYPE, SPLADE_TYPE, "sentence_transformers.models.Normalize"])


def _mean_pooling_strategy(src: Path) -> None:
    _write_json(src / "1_SpladePooling" / "config.json", {"pooling_strategy": "mean"})


def _max_active_dims(src: Path) -> None:
    _write_json(
        src / "config_sentence_transformers.json",
        {"model_type": "SparseEncoder", "max_active_dims": 64},
    )


def _distilbert(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config |= {"architectures": ["DistilBertForMaskedLM"], "model_type": "distilbert"}
    _write_json(src / "config.json", config)


def _untied_decoder_but_tied_config(src: Path) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    tensors["cls.predictions.decoder.weight"] = np.ones((len(VOCAB), HIDDEN), dtype="f4")
    save_file(tensors, str(src / "model.safetensors"))


def _dense_model_type(src: Path) -> None:
    _write_json(src / "config_sentence_transformers.json", {"model_type": "SentenceTransformer"})


REFUSALS = {
    "normalize after": (_with_normalize, "modules.json lists the modules"),
    "pooling strategy": (_mean_pooling_strategy, "1_SpladePooling/config.json: pooling_strategy"),
    "max_active_dims": (_max_active_dims, "max_active_dims keeps only the largest"),
    "not bert": (_distilbert, "embedd imports SPLADE models whose masked language model is BERT"),
    "tied but differs": (_untied_decoder_but_tied_config, "differs from the word embeddings"),
    "dense model type": (_dense_model_type, "model_type 'SentenceTransformer'"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_file_and_what_is_supported(tmp_path: Path, case: str) -> None:
    src = make_tiny_splade(tmp_path / "tiny-splade")
    breaker, expected = REFUSALS[case]
    breaker(src)
    with pytest.raises(ModelImportError) as refused:
        import_model(src, tmp_path / "models")
    assert expected in refused.value.message


def test_f16_import_says_the_support_may_differ(tmp_path: Path) -> None:
    notes: list[str] = []
    path = import_model(
        make_tiny_splade(tmp_path / "s"), tmp_path / "m", out_type="f16", report=notes.append
    )
    assert any("import it with --type f32 for exactly" in note for note in notes)
    notes.clear()
    path.unlink()
    default = import_model(make_tiny_splade(tmp_path / "s"), tmp_path / "m", report=notes.append)
    assert read_model_info(default).quantization == "f32"  # a sparse encoder's default type
    assert not any("--type f32" in note for note in notes)


def test_q8_0_is_refused_as_no_engine_serves_it(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError) as refused:
        import_model(make_tiny_splade(tmp_path / "s"), tmp_path / "m", out_type="q8_0")
    assert "ONNX Runtime serves from f32 or f16 weights only, not q8_0" in refused.value.message
