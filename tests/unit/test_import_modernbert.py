"""``embedd import`` of ModernBERT: the GGUF keys and tensors llama.cpp's ``modern-bert`` reads,
from every form of config.json the family's checkpoints use, and each refusal naming what is
supported. Copies of ../shared/models/tiny-modernbert(-reranker) with config.json edited.
Vectors and scores: tests/integration/test_modernbert.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFReader
from safetensors.numpy import load_file, save_file

from embedd_server.convert.family_table import SUPPORTED, SUPPORTED_RERANKERS
from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines.onnx_modernbert import read_modernbert_gguf
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import read_model_info
from tests.conftest import SHARED

MODELS = SHARED / "models"
Edit = Callable[[dict[str, Any]], None]


def _copy(tmp_path: Path, model: str, edit: Edit | None = None) -> Path:
    destination = tmp_path / model
    shutil.copytree(MODELS / model, destination, ignore=shutil.ignore_patterns("reference"))
    if edit is not None:
        path = destination / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        edit(config)
        path.write_text(json.dumps(config), encoding="utf-8")
    return destination


def _import(src: Path, out_type: str = "f32") -> Path:
    return import_model(src, src.parent / "out", out_type=out_type, report=lambda note: None)


def _fields(path: Path) -> dict[str, Any]:
    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}


def _tensors(path: Path) -> dict[str, tuple[int, ...]]:
    reader = GGUFReader(str(path))
    return {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}


def test_the_keys_and_tensors_llama_cpp_reads(tmp_path: Path) -> None:
    path = _import(_copy(tmp_path, "tiny-modernbert"))
    fields = _fields(path)
    assert fields["general.architecture"] == "modern-bert"
    expected = {
        "modern-bert.block_count": 3,
        "modern-bert.context_length": 256,
        "modern-bert.embedding_length": 64,
        "modern-bert.feed_forward_length": 192,
        "modern-bert.attention.head_count": 4,
        "modern-bert.attention.causal": False,
        "modern-bert.attention.sliding_window": 16,
        "modern-bert.attention.sliding_window_pattern": [False, True, True],
        "modern-bert.rope.freq_base": 160000.0,
        "modern-bert.rope.freq_base_swa": 10000.0,
        "modern-bert.hidden_activation": "gelu",
        "modern-bert.pooling_type": 1,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "modern-bert",
        "tokenizer.ggml.bos_token_id": 2,  # [CLS]
        "tokenizer.ggml.eos_token_id": 3,  # [SEP]
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["modern-bert.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    tensors = _tensors(path)
    assert "blk.0.attn_norm.weight" not in tensors  # layer 0's norm is transformers' Identity
    assert tensors["blk.1.attn_norm.weight"] == (64,)
    assert tensors["blk.0.attn_qkv.weight"] == (192, 64)
    assert tensors["blk.2.ffn_up.weight"] == (384, 64)  # the activated half, then the gate
    assert tensors["blk.2.ffn_down.weight"] == (64, 192)
    assert {"token_embd.weight", "token_embd_norm.weight", "output_norm.weight"} <= set(tensors)
    assert not any(name.endswith(".bias") for name in tensors)
    assert len(tensors) == 3 + 3 * 6 - 1


def test_mlp_wi_is_written_as_transformers_holds_it(tmp_path: Path) -> None:
    src = _copy(tmp_path, "tiny-modernbert")
    path = _import(src)
    weights = load_file(str(src / "model.safetensors"))
    reader = GGUFReader(str(path))
    up = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    np.testing.assert_array_equal(
        np.asarray(up.data).reshape(384, 64), weights["layers.1.mlp.Wi.weight"]
    )


def _four_x(config: dict[str, Any]) -> None:
    del config["layer_types"], config["rope_parameters"]
    config.update(global_attn_every_n_layers=2, global_rope_theta=80000.0, local_rope_theta=None)


def test_a_transformers_4_config_names_its_pattern_and_thetas(tmp_path: Path) -> None:
    fields = _fields(_import(_copy(tmp_path, "tiny-modernbert", _four_x)))
    assert fields["modern-bert.attention.sliding_window_pattern"] == [False, True, False]
    # A null local theta: 4.x's local layers then rotate with the global one.
    assert fields["modern-bert.rope.freq_base"] == fields["modern-bert.rope.freq_base_swa"]
    assert fields["modern-bert.rope.freq_base"] == 80000.0


def test_no_sliding_layer_writes_no_window(tmp_path: Path) -> None:
    def global_only(config: dict[str, Any]) -> None:
        config["layer_types"] = ["full_attention"] * 3

    fields = _fields(_import(_copy(tmp_path, "tiny-modernbert", global_only)))
    assert "modern-bert.attention.sliding_window" not in fields
    assert "modern-bert.attention.sliding_window_pattern" not in fields


def test_a_masked_lm_checkpoint_imports_its_encoder(tmp_path: Path) -> None:
    """answerdotai/ModernBERT-base's layout: ``model.``-prefixed, with the MLM head."""

    def masked_lm(config: dict[str, Any]) -> None:
        config["architectures"] = ["ModernBertForMaskedLM"]

    src = _copy(tmp_path, "tiny-modernbert", masked_lm)
    weights = {f"model.{k}": v for k, v in load_file(str(src / "model.safetensors")).items()}
    weights["head.dense.weight"] = np.zeros((64, 64), np.float32)
    weights["head.norm.weight"] = np.ones(64, np.float32)
    weights["decoder.bias"] = np.zeros(3500, np.float32)
    save_file(weights, str(src / "model.safetensors"))
    tensors = _tensors(_import(src))
    assert not any(name.startswith("cls") for name in tensors)
    assert len(tensors) == 3 + 3 * 6 - 1


def test_the_reranker_keys(tmp_path: Path) -> None:
    path = _import(_copy(tmp_path, "tiny-modernbert-reranker"))
    fields = _fields(path)
    assert fields["modern-bert.pooling_type"] == 4  # rank
    assert fields["modern-bert.classifier.pooling_type"] == 2  # cls
    assert fields["modern-bert.classifier.output_labels"] == ["LABEL_0"]
    assert "embedd.task" not in fields  # one label: a reranker
    tensors = _tensors(path)
    assert tensors["cls.weight"] == (64, 64)
    assert tensors["cls.norm.weight"] == (64,)
    assert (tensors["cls.output.weight"], tensors["cls.output.bias"]) == ((1, 64), (1,))
    info = read_model_info(path)
    assert (info.task, info.labels, info.family) == ("rerank", 1, "modern-bert")


def test_a_classifier_with_labels_and_the_mean(tmp_path: Path) -> None:
    def three_labels(config: dict[str, Any]) -> None:
        config.update(
            classifier_pooling="mean",
            id2label={"0": "sad", "1": "calm", "2": "glad"},
            problem_type="multi_label_classification",
        )

    src = _copy(tmp_path, "tiny-modernbert-reranker", three_labels)
    weights = load_file(str(src / "model.safetensors"))
    weights["classifier.weight"] = np.ones((3, 64), np.float32)
    weights["classifier.bias"] = np.zeros(3, np.float32)
    save_file(weights, str(src / "model.safetensors"))
    path = _import(src, "f16")
    fields = _fields(path)
    assert fields["modern-bert.classifier.pooling_type"] == 1  # mean
    assert fields["embedd.task"] == "classify"
    assert fields["embedd.problem_type"] == "multi_label_classification"
    info = read_model_info(path)
    assert (info.task, info.label_names, info.labels) == ("classify", ("sad", "calm", "glad"), 3)
    source = read_modernbert_gguf(GGUFReader(str(path)), path)
    assert (source.pooling, source.config.classifier_pooling, source.dimensions) == (
        "rank",
        "mean",
        3,
    )


def test_the_family_is_listed_in_errors() -> None:
    assert "ModernBertModel (modern-bert)" in SUPPORTED
    assert "ModernBertForSequenceClassification" in SUPPORTED_RERANKERS


def _set(**values: Any) -> Edit:
    def edit(config: dict[str, Any]) -> None:
        config.update(values)

    return edit


def _rope_type(config: dict[str, Any]) -> None:
    config["rope_parameters"]["full_attention"]["rope_type"] = "yarn"


REFUSALS: dict[str, tuple[str, Edit, str]] = {
    "attention bias": ("tiny-modernbert", _set(attention_bias=True), "without biases"),
    "mlp bias": ("tiny-modernbert", _set(mlp_bias=True), "without biases"),
    "norm bias": ("tiny-modernbert", _set(norm_bias=True), "without biases"),
    "activation": (
        "tiny-modernbert",
        _set(hidden_activation="relu"),
        "hidden_activation gelu / gelu_pytorch_tanh / gelu_new / silu",
    ),
    "rope type": ("tiny-modernbert", _rope_type, "only default RoPE"),
    "rope scaling": (
        "tiny-modernbert",
        _set(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "only default RoPE",
    ),
    "layer types": (
        "tiny-modernbert",
        _set(layer_types=["full_attention", "sliding_attention"]),
        "layer_types must list 3 layers",
    ),
    "all sliding": (
        "tiny-modernbert",
        _set(layer_types=["sliding_attention"] * 3),
        "at least one global layer",
    ),
    "window": ("tiny-modernbert", _set(local_attention=0), "'local_attention'"),
    "classifier bias": ("tiny-modernbert-reranker", _set(classifier_bias=True), "dense bias"),
    "classifier activation": (
        "tiny-modernbert-reranker",
        _set(classifier_activation="tanh"),
        "classifier_activation gelu / gelu_pytorch_tanh / gelu_new",
    ),
    "classifier pooling": (
        "tiny-modernbert-reranker",
        _set(classifier_pooling="max"),
        "classifier_pooling cls / mean",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_is_not_supported_is_refused_with_what_is(tmp_path: Path, case: str) -> None:
    model, edit, message = REFUSALS[case]
    src = _copy(tmp_path, model, edit)
    with pytest.raises(ModelImportError) as refused:
        _import(src)
    assert message in refused.value.message
    assert "config.json" in refused.value.message


class _Field:
    def __init__(self, value: Any) -> None:
        self.value = value

    def contents(self) -> Any:
        return self.value


class _Reader:
    def __init__(self, **fields: Any) -> None:
        self.fields = {f"modern-bert.{k.replace('__', '.')}": _Field(v) for k, v in fields.items()}


def test_a_file_from_llama_cpps_converter_reads_as_llama_cpp_reads_it() -> None:
    """No per-layer array: every layer but each n-th slides (n = 3 without the key)."""
    from embedd_server.engines.onnx_modernbert import _sliding_pattern

    key = "attention__sliding_window_pattern"
    assert _sliding_pattern(_Reader(), 7) == (False, True, True, False, True, True, False)
    assert _sliding_pattern(_Reader(**{key: 2}), 4) == (False, True, False, True)
    assert _sliding_pattern(_Reader(**{key: [True, False]}), 2) == (True, False)
