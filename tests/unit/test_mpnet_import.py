"""``embedd import`` of MPNet into our ``mpnet`` architecture, and the graph's bucket table.

On a writable copy of ``../shared/models/tiny-mpnet``: the GGUF keys and tensors (BERT-style
names, the shared relative attention bias, the whole position table), the ``MPNetForMaskedLM``
layout (``mpnet.`` prefix, an MLM head to drop), and every refusal naming the tensor or key at
fault. Vectors against sentence-transformers: tests/integration/test_family_mpnet.py.
"""

from __future__ import annotations

import json
import math
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines.onnx_graph import BertConfig
from embedd_server.engines.onnx_mpnet import mpnet_weights, relative_position_buckets
from embedd_server.errors import ModelImportError
from embedd_server.model import mpnet_layout as layout

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "models" / "tiny-mpnet"
D, FF, HEADS, LAYERS, VOCAB, POSITIONS = 64, 128, 4, 2, 4000, 66


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A writable copy of the shared tiny MPNet."""
    assert SHARED.is_dir(), f"{SHARED} is missing: the tests read ../shared beside the repo"
    copy = Path(
        shutil.copytree(SHARED, tmp_path / "tiny-mpnet", ignore=shutil.ignore_patterns("reference"))
    )
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return copy


def _import(src: Path, out: Path, out_type: str = "f32") -> Path:
    return import_model(src, out, out_type=out_type, report=lambda note: None)


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def test_keys_describe_the_architecture_and_the_vocabulary(tiny: Path, tmp_path: Path) -> None:
    fields = _fields(_import(tiny, tmp_path))
    assert fields["general.architecture"] == "mpnet"
    expected = {
        "mpnet.block_count": LAYERS,
        "mpnet.context_length": POSITIONS - 2,  # positions start at padding_idx + 1 = 2
        "mpnet.embedding_length": D,
        "mpnet.feed_forward_length": FF,
        "mpnet.attention.head_count": HEADS,
        "mpnet.attention.causal": False,
        "mpnet.attention.relative_buckets_count": 32,
        "mpnet.attention.relative_max_distance": 128,
        "mpnet.padding_idx": 1,
        "mpnet.pooling_type": 1,  # mean
        "tokenizer.ggml.model": "bert",  # WordPiece, in llama.cpp's form
        "tokenizer.ggml.bos_token_id": 0,  # <s>
        "tokenizer.ggml.eos_token_id": 2,  # </s>
        "tokenizer.ggml.seperator_token_id": 2,
        "tokenizer.ggml.padding_token_id": 1,  # <pad>
        "sentence_transformers.max_seq_length": 64,
        "sentence_transformers.normalize": True,
    }
    assert {key: fields[key] for key in expected} == expected
    assert fields["mpnet.attention.layer_norm_epsilon"] == pytest.approx(1e-12)
    assert len(fields["tokenizer.ggml.tokens"]) == VOCAB
    assert fields["tokenizer.huggingface.json"] == (tiny / "tokenizer.json").read_text()


@pytest.mark.parametrize("out_type", ["f32", "f16"])
def test_tensor_names_shapes_and_types(tiny: Path, tmp_path: Path, out_type: str) -> None:
    tensors = _tensors(_import(tiny, tmp_path, out_type))
    expected = {
        "token_embd.weight": (VOCAB, D),
        "position_embd.weight": (POSITIONS, D),  # the whole table: indexed by HF position ids
        "token_embd_norm.weight": (D,),
        "token_embd_norm.bias": (D,),
        "attn_rel_b.weight": (32, HEADS),
    }
    for i in range(LAYERS):
        for gg, shape in {
            "attn_q": (D, D),
            "attn_k": (D, D),
            "attn_v": (D, D),
            "attn_output": (D, D),
            "attn_output_norm": (D,),
            "ffn_up": (FF, D),
            "ffn_down": (D, FF),
            "layer_output_norm": (D,),
        }.items():
            expected[f"blk.{i}.{gg}.weight"] = shape
            expected[f"blk.{i}.{gg}.bias"] = (shape[0],)
    assert {
        n: tuple(int(x) for x in reversed(t.shape.tolist())) for n, t in tensors.items()
    } == expected
    f32 = gguf.GGMLQuantizationType.F32
    big = gguf.GGMLQuantizationType.F32 if out_type == "f32" else gguf.GGMLQuantizationType.F16
    assert tensors["token_embd.weight"].tensor_type == big
    assert tensors["blk.0.attn_q.weight"].tensor_type == big
    # Tables read by index stay exact in every type.
    assert tensors["attn_rel_b.weight"].tensor_type == f32
    assert tensors["position_embd.weight"].tensor_type == f32


def test_masked_lm_layout_imports_the_same_encoder(tiny: Path, tmp_path: Path) -> None:
    """all-mpnet-base-v2's config names ``MPNetForMaskedLM``; such weights may carry the
    ``mpnet.`` prefix and an MLM head, which an embedding model doesn't use."""
    plain = _tensors(_import(tiny, tmp_path / "plain"))
    weights = load_file(str(tiny / "model.safetensors"))
    prefixed = {f"mpnet.{name}": value for name, value in weights.items()}
    prefixed["lm_head.dense.weight"] = np.zeros((D, D), np.float32)
    prefixed["lm_head.bias"] = np.zeros(VOCAB, np.float32)
    save_file(prefixed, str(tiny / "model.safetensors"))
    config = json.loads((tiny / "config.json").read_text())
    config["architectures"] = ["MPNetForMaskedLM"]
    (tiny / "config.json").write_text(json.dumps(config))
    masked = _tensors(_import(tiny, tmp_path / "masked"))
    assert masked.keys() == plain.keys()
    for name, tensor in plain.items():
        np.testing.assert_array_equal(masked[name].data, tensor.data, err_msg=name)


Breaker = Callable[[Path], None]


def _weights(change: Callable[[dict[str, Any]], None]) -> Breaker:
    def apply(src: Path) -> None:
        weights = dict(load_file(str(src / "model.safetensors")))
        change(weights)
        save_file(weights, str(src / "model.safetensors"))

    return apply


def _config(**changes: Any) -> Breaker:
    def apply(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))

    return apply


def _drop(name: str) -> Breaker:
    return _weights(lambda w: w.pop(name))


def _transpose(name: str) -> Breaker:
    return _weights(lambda w: w.update({name: np.ascontiguousarray(w[name].T)}))


def _add(name: str) -> Breaker:
    return _weights(lambda w: w.update({name: np.zeros(4, np.float32)}))


REFUSALS: dict[str, tuple[Breaker, str]] = {
    "missing tensor": (
        _drop("encoder.layer.1.attention.attn.q.weight"),
        "tensor 'encoder.layer.1.attention.attn.q.weight' is missing",
    ),
    "missing bias table": (
        _drop("encoder.relative_attention_bias.weight"),
        "tensor 'encoder.relative_attention_bias.weight' is missing",
    ),
    "wrong shape": (
        _transpose("encoder.relative_attention_bias.weight"),
        "tensor 'encoder.relative_attention_bias.weight'",
    ),
    "wrong ffn shape": (
        _transpose("encoder.layer.0.intermediate.dense.weight"),
        "has shape (64, 128), but config.json implies (128, 64)",
    ),
    "unknown tensor": (_add("encoder.layer.0.attention.attn.rel.weight"), "unexpected tensors"),
    "activation": (_config(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    "too few buckets": (
        _config(relative_attention_num_buckets=16),
        "relative_attention_num_buckets 16 is fewer than the 32 buckets",
    ),
    "no positions": (_config(max_position_embeddings=2), "leaves no positions"),
    "heads": (_config(num_attention_heads=5), "not a multiple of num_attention_heads 5"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_tensor_or_key(tiny: Path, tmp_path: Path, case: str) -> None:
    breaker, message = REFUSALS[case]
    breaker(tiny)
    with pytest.raises(ModelImportError) as refused:
        _import(tiny, tmp_path / "out")
    assert message in refused.value.message
    assert not list((tmp_path / "out").glob("*.gguf")) if (tmp_path / "out").exists() else True


def test_a_sequence_classifier_is_refused_with_what_is_imported(tiny: Path, tmp_path: Path) -> None:
    _config(architectures=["MPNetForSequenceClassification"])(tiny)
    with pytest.raises(ModelImportError) as refused:
        _import(tiny, tmp_path)
    assert "MPNetForSequenceClassification, a cross-encoder" in refused.value.message
    assert "MPNetModel (mpnet)" in refused.value.message


# --- the graph's side ----------------------------------------------------------------------------


def _exact_bucket(relative: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """transformers' ``relative_position_bucket`` of one relative position, in float64."""
    n = -relative
    half = num_buckets // 2
    bucket = half if n < 0 else 0
    n = abs(n)
    exact = half // 2
    if n < exact:
        return bucket + n
    scaled = math.log(n / exact) / math.log(max_distance / exact) * (half - exact)
    return bucket + min(exact + int(scaled), half - 1)


def test_relative_buckets_follow_transformers() -> None:
    table = relative_position_buckets(600)
    assert table.shape == (600, 600)
    # row = query, column = key; the bucket of key - query
    assert [int(table[0, j]) for j in (0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 599)] == [
        0,
        17,
        23,
        24,
        25,
        26,
        27,
        28,
        29,
        30,
        31,
        31,
        31,
    ]
    assert [int(table[599, 599 - n]) for n in (0, 1, 7, 8, 16, 32, 64, 128, 599)] == [
        0,
        1,
        7,
        8,
        10,
        12,
        14,
        15,
        15,
    ]
    # float32 as torch computes it, and float64, agree at every distance (no boundary falls
    # within float32's rounding of a logarithm)
    exact = np.array([_exact_bucket(r) for r in range(-599, 600)])  # index: relative + 599
    offsets = np.arange(600)
    assert np.array_equal(table, exact[offsets[None, :] - offsets[:, None] + 599])


def test_graph_weights_are_checked() -> None:
    config = BertConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1)
    tensors: dict[str, Any] = {
        "token_embd.weight": np.zeros((10, 8)),
        "position_embd.weight": np.zeros((12, 8)),
        "token_embd_norm.weight": np.zeros(8),
        "token_embd_norm.bias": np.zeros(8),
        f"{layout.RELATIVE_BIAS_TENSOR}.weight": np.zeros((32, 2)),
    }
    for gg, shape in {
        "attn_q": (8, 8),
        "attn_k": (8, 8),
        "attn_v": (8, 8),
        "attn_output": (8, 8),
        "attn_output_norm": (8,),
        "ffn_up": (16, 8),
        "ffn_down": (8, 16),
        "layer_output_norm": (8,),
    }.items():
        tensors[f"blk.0.{gg}.weight"] = np.zeros(shape)
        tensors[f"blk.0.{gg}.bias"] = np.zeros(shape[0])
    assert len(mpnet_weights(tensors, config)) == len(tensors)
    with pytest.raises(
        ValueError, match=r"'encoder\.layer\.0\.attention\.self\.key\.weight' is missing"
    ):
        mpnet_weights({k: v for k, v in tensors.items() if k != "blk.0.attn_k.weight"}, config)
    with pytest.raises(ValueError, match="has shape"):
        mpnet_weights({**tensors, "blk.0.attn_v.weight": np.zeros((8, 4))}, config)
    with pytest.raises(ValueError, match="16 rows for 32 buckets"):
        mpnet_weights({**tensors, "attn_rel_b.weight": np.zeros((16, 2))}, config)
