"""Unit tests of the importer for Gemma3 encoders (``gemma-embedding``) and
sentence-transformers Dense modules: the keys and tensors llama.cpp's converter writes,
llama.cpp loading the file and tokenizing like Hugging Face, the Dense stack's keys, and each
refusal naming what is supported. Vectors: tests/integration/test_gemma3_dense.py.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.engines.llama import LlamaModelWeights
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import read_model_info
from embedd_server.model.dense import (
    DENSE_COUNT_KEY,
    DenseLayer,
    apply_dense,
    dense_key,
    dense_metadata,
    read_dense,
)
from tests.conftest import SHARED
from tests.unit.test_hf_to_gguf import HIDDEN, make_tiny_bert

GEMMA = SHARED / "models" / "tiny-gemma3-embed"
TANH = "torch.nn.modules.activation.Tanh"


@pytest.fixture
def gemma(tmp_path: Path) -> Path:
    """A copy of tiny-gemma3-embed to change."""
    return Path(shutil.copytree(GEMMA, tmp_path / "tiny-gemma3-embed"))


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text("utf-8")))), encoding="utf-8")


def _config(src: Path, **changes: Any) -> None:
    def update(config: dict[str, Any]) -> dict[str, Any]:
        config.update(changes)
        return {k: v for k, v in config.items() if v is not _DROP}

    _edit_json(src / "config.json", update)


_DROP = object()


def test_gemma3_keys_follow_llama_cpp(tmp_path: Path) -> None:
    out = import_model(GEMMA, tmp_path, out_type="f32")
    f = _fields(out)
    arch = "gemma-embedding"
    expected = {
        "general.architecture": arch,
        f"{arch}.block_count": 3,
        f"{arch}.context_length": 512,
        f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 128,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 1,
        f"{arch}.attention.key_length": 16,
        f"{arch}.attention.value_length": 16,
        f"{arch}.attention.sliding_window": 16,  # config.json's value: llama.cpp halves it
        f"{arch}.attention.sliding_window_pattern": [True, True, False],  # layer_types
        f"{arch}.rope.freq_base": 1_000_000.0,
        f"{arch}.rope.freq_base_swa": 10_000.0,
        f"{arch}.pooling_type": int(gguf.PoolingType.MEAN),
        f"{arch}.dense_2_feat_in": 64,
        f"{arch}.dense_2_feat_out": 256,
        f"{arch}.dense_3_feat_in": 256,
        f"{arch}.dense_3_feat_out": 64,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
        "sentence_transformers.normalize": True,
        "sentence_transformers.max_seq_length": 128,
    }
    assert {key: f.get(key) for key in expected} == expected
    assert f[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert DENSE_COUNT_KEY not in f  # llama.cpp applies the pair itself
    types = f["tokenizer.ggml.token_type"]
    tokens = f["tokenizer.ggml.tokens"]
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert types[tokens.index("<bos>")] == gguf.TokenType.CONTROL
    assert types[tokens.index("<unk>")] == gguf.TokenType.UNKNOWN
    info = read_model_info(out)
    assert (info.dimensions, info.pooling, info.normalizes) == (64, "mean", True)
    assert set(info.prompts) == {"query", "document", "Clustering"}


@pytest.mark.parametrize("out_type", ["f32", "f16"])
def test_gemma3_tensors_hold_one_plus_the_norms(tmp_path: Path, out_type: str) -> None:
    out = import_model(GEMMA, tmp_path, out_type=out_type)
    tensors = _tensors(out)
    hf = load_file(str(GEMMA / "model.safetensors"))
    for gg, name in (
        ("blk.0.attn_norm.weight", "layers.0.input_layernorm.weight"),
        ("blk.1.post_attention_norm.weight", "layers.1.post_attention_layernorm.weight"),
        ("blk.2.ffn_norm.weight", "layers.2.pre_feedforward_layernorm.weight"),
        ("blk.2.post_ffw_norm.weight", "layers.2.post_feedforward_layernorm.weight"),
        ("blk.0.attn_q_norm.weight", "layers.0.self_attn.q_norm.weight"),
        ("blk.0.attn_k_norm.weight", "layers.0.self_attn.k_norm.weight"),
        ("output_norm.weight", "norm.weight"),
    ):
        assert tensors[gg].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(tensors[gg].data, hf[name] + np.float32(1.0))
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}
    assert tensors["blk.0.ffn_gate.weight"].tensor_type == qtype[out_type]
    for name, module in (("dense_2.weight", "2_Dense"), ("dense_3.weight", "3_Dense")):
        # The projections stay f32 in every file type; stored [out, in] as nn.Linear is.
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32
        linear = load_file(str(GEMMA / module / "model.safetensors"))["linear.weight"]
        np.testing.assert_array_equal(np.asarray(tensors[name].data).reshape(linear.shape), linear)
    assert "lm_head.weight" not in tensors


def test_llama_cpp_loads_gemma3_and_tokenizes_like_hugging_face(tmp_path: Path) -> None:
    out = import_model(GEMMA, tmp_path, out_type="f16")
    tokenizer = Tokenizer.from_file(str(GEMMA / "tokenizer.json"))
    texts = [item["text"] for item in json.loads((GEMMA / "reference/texts.json").read_text())]
    prompts = json.loads((GEMMA / "config_sentence_transformers.json").read_text())["prompts"]
    weights = LlamaModelWeights(out)
    try:
        assert weights.dimensions == 64
        for prompt in ["", *prompts.values()]:
            for text in texts:
                assert (
                    weights.tokenize((prompt + text).encode())
                    == tokenizer.encode(prompt + text).ids
                ), prompt + text
    finally:
        weights.close()


def test_gemma3_without_layer_types_slides_as_transformers_does(
    gemma: Path, tmp_path: Path
) -> None:
    """No layer_types: every sliding_window_pattern-th layer is global (transformers)."""
    _config(gemma, layer_types=_DROP, sliding_window_pattern=2)
    f = _fields(import_model(gemma, tmp_path))
    assert f["gemma-embedding.attention.sliding_window_pattern"] == [True, False, True]


def test_gemma3_transformers_4_rope_keys(gemma: Path, tmp_path: Path) -> None:
    """EmbeddingGemma as transformers 4.56 saved it: rope_theta and rope_local_base_freq."""
    _config(gemma, rope_parameters=_DROP, rope_theta=500_000.0, rope_local_base_freq=5_000.0)
    f = _fields(import_model(gemma, tmp_path))
    assert f["gemma-embedding.rope.freq_base"] == 500_000.0
    assert f["gemma-embedding.rope.freq_base_swa"] == 5_000.0


def test_query_pre_attn_scalar_is_folded_into_the_query_norm(gemma: Path, tmp_path: Path) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim); a model that scales by
    1/sqrt(query_pre_attn_scalar) gets its query norm multiplied by the ratio."""
    _config(gemma, query_pre_attn_scalar=64)
    tensors = _tensors(import_model(gemma, tmp_path, out_type="f32"))
    hf = load_file(str(GEMMA / "model.safetensors"))
    factor = np.float32(math.sqrt(16 / 64))
    q_norm = (hf["layers.1.self_attn.q_norm.weight"] + np.float32(1.0)) * factor
    np.testing.assert_array_equal(tensors["blk.1.attn_q_norm.weight"].data, q_norm)
    k_norm = hf["layers.1.self_attn.k_norm.weight"] + np.float32(1.0)
    np.testing.assert_array_equal(tensors["blk.1.attn_k_norm.weight"].data, k_norm)


GEMMA_BREAKERS: dict[str, tuple[dict[str, Any], str]] = {
    "decoder": (
        {"use_bidirectional_attention": False},
        "embedd imports Gemma3 as an encoder (EmbeddingGemma: use_bidirectional_attention true)",
    ),
    "exact gelu": ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported"),
    "rope scaling": (
        {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0}}},
        "RoPE type 'linear' for full_attention layers is not supported",
    ),
    "layer type": (
        {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
        "layer type 'chunked_attention' is not supported",
    ),
    "no window": ({"sliding_window": None}, "no valid integer 'sliding_window'"),
    "softcapping": ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0"),
}


@pytest.mark.parametrize("case", GEMMA_BREAKERS)
def test_refused_gemma3_configs_say_what_is_supported(
    gemma: Path, tmp_path: Path, case: str
) -> None:
    changes, expected = GEMMA_BREAKERS[case]
    _config(gemma, **changes)
    with pytest.raises(ModelImportError) as info:
        import_model(gemma, tmp_path)
    assert expected in info.value.message
    assert str(gemma / "config.json") in info.value.message


# --- Dense modules ----------------------------------------------------------------------------


def _dense_dir(src: Path, path: str, config: dict[str, Any], tensors: dict[str, Any]) -> None:
    (src / path).mkdir(exist_ok=True)
    (src / path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    save_file(tensors, str(src / path / "model.safetensors"))


def _modules(src: Path, kinds: list[tuple[str, str]]) -> None:
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (kind, path) in enumerate(kinds)
    ]
    (src / "modules.json").write_text(json.dumps(modules), encoding="utf-8")


def _bert_with_dense(root: Path, *, out: int = 24, bias: bool = True, **config: Any) -> Path:
    src = make_tiny_bert(root / "tiny-dense")
    rng = np.random.default_rng(3)
    tensors = {"linear.weight": rng.normal(size=(out, HIDDEN)).astype(np.float32)}
    if bias:
        tensors["linear.bias"] = rng.normal(size=out).astype(np.float32)
    dense = {"in_features": HIDDEN, "out_features": out, "bias": bias, **config}
    _dense_dir(src, "2_Dense", dense, tensors)
    _modules(
        src,
        [("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense"), ("Normalize", "3")],
    )
    return src


def test_a_dense_module_is_stored_under_embedds_keys(tmp_path: Path) -> None:
    src = _bert_with_dense(tmp_path, activation_function=TANH)
    out = import_model(src, tmp_path / "models", out_type="f16")
    f = _fields(out)
    assert f[DENSE_COUNT_KEY] == 1
    assert (f[dense_key(0, "in_features")], f[dense_key(0, "out_features")]) == (HIDDEN, 24)
    assert f[dense_key(0, "activation")] == "tanh"
    (layer,) = read_dense(f)
    saved = load_file(str(src / "2_Dense" / "model.safetensors"))
    np.testing.assert_array_equal(layer.weight, saved["linear.weight"])  # f32 in an f16 file
    assert layer.bias is not None
    np.testing.assert_array_equal(layer.bias, saved["linear.bias"])
    assert not any(t.startswith(("dense", "embedd")) for t in _tensors(out))  # no tensors
    info = read_model_info(out)
    assert (info.dimensions, info.normalizes) == (24, True)
    weights = LlamaModelWeights(out, vocab_only=True)  # llama.cpp loads the file as it is
    try:
        assert weights.dimensions == 24
    finally:
        weights.close()


def test_dense_default_activation_is_tanh_and_bias_may_be_absent(tmp_path: Path) -> None:
    """sentence-transformers' Dense defaults to Tanh when the config names none."""
    src = _bert_with_dense(tmp_path, bias=False)
    f = _fields(import_model(src, tmp_path / "models"))
    assert f[dense_key(0, "activation")] == "tanh"
    assert dense_key(0, "bias") not in f


def test_a_stack_of_dense_modules_chains(tmp_path: Path) -> None:
    src = _bert_with_dense(tmp_path, activation_function="torch.nn.Identity")
    weight = np.ones((8, 24), np.float32)
    second = {"in_features": 24, "out_features": 8, "bias": False, "activation_function": TANH}
    _dense_dir(src, "3_Dense", second, {"linear.weight": weight})
    _modules(
        src,
        [("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense"), ("Dense", "3_Dense")],
    )
    out = import_model(src, tmp_path / "models")
    layers = read_dense(_fields(out))
    assert [(lay.in_features, lay.out_features, lay.activation) for lay in layers] == [
        (HIDDEN, 24, "identity"),
        (24, 8, "tanh"),
    ]
    info = read_model_info(out)
    assert (info.dimensions, info.normalizes) == (8, False)


def _dense_config(change: dict[str, Any]) -> Callable[[Path], None]:
    def breaker(src: Path) -> None:
        _edit_json(src / "2_Dense" / "config.json", lambda config: {**config, **change})

    return breaker


def _wrong_width(src: Path) -> None:
    """A module that takes 49 features after a 48-wide pooling (weights and config agree)."""
    _dense_config({"in_features": HIDDEN + 1, "bias": False})(src)
    weight = np.zeros((24, HIDDEN + 1), np.float32)
    save_file({"linear.weight": weight}, str(src / "2_Dense" / "model.safetensors"))


def _only_bin(src: Path) -> None:
    (src / "2_Dense" / "model.safetensors").unlink()
    (src / "2_Dense" / "pytorch_model.bin").write_bytes(b"not really")


def _dense_after_normalize(src: Path) -> None:
    _modules(
        src,
        [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "3"), ("Dense", "2_Dense")],
    )


def _dense_before_pooling(src: Path) -> None:
    _modules(src, [("Transformer", ""), ("Dense", "2_Dense"), ("Pooling", "1_Pooling")])


def _layer_norm_module(src: Path) -> None:
    _modules(src, [("Transformer", ""), ("Pooling", "1_Pooling"), ("LayerNorm", "2_Dense")])


DENSE_BREAKERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "width": (_wrong_width, "2_Dense/config.json: in_features 49, but the vector before"),
    "activation": (
        _dense_config({"activation_function": "torch.nn.modules.activation.GELU"}),
        "activation_function 'torch.nn.modules.activation.GELU' is not supported; embedd "
        "applies torch.nn.modules.linear.Identity",
    ),
    "custom activation": (
        _dense_config({"activation_function": "my_package.Swish"}),
        "activation_function 'my_package.Swish' is not supported",
    ),
    "residual": (_dense_config({"use_residual": True}), "use_residual is not supported"),
    "token embeddings": (
        _dense_config({"module_input_name": "token_embeddings"}),
        "module_input_name 'token_embeddings'; embedd applies Dense modules to the pooled",
    ),
    "bias flag": (_dense_config({"bias": False}), "unexpected tensors linear.bias"),
    "shape": (_dense_config({"out_features": 23}), "implies (23, 48)"),
    "pytorch bin": (_only_bin, "2_Dense has only pytorch_model.bin; a Dense module's weights"),
    "after normalize": (_dense_after_normalize, "any Dense modules and optionally Normalize"),
    "before pooling": (_dense_before_pooling, "any Dense modules and optionally Normalize"),
    "layer norm": (_layer_norm_module, "has type 'sentence_transformers.models.LayerNorm'"),
}


@pytest.mark.parametrize("case", DENSE_BREAKERS)
def test_refused_dense_modules_name_the_file(tmp_path: Path, case: str) -> None:
    breaker, expected = DENSE_BREAKERS[case]
    src = _bert_with_dense(tmp_path, activation_function=TANH)
    breaker(src)
    with pytest.raises(ModelImportError) as info:
        import_model(src, tmp_path / "models")
    assert expected in info.value.message


def test_gemma3_with_another_dense_stack_uses_embedds_keys(gemma: Path, tmp_path: Path) -> None:
    """A bias breaks llama.cpp's pair (dense_2 has none in gemma-embedding): embedd's keys."""
    rng = np.random.default_rng(4)
    tensors = load_file(str(gemma / "2_Dense" / "model.safetensors"))
    tensors["linear.bias"] = rng.normal(size=256).astype(np.float32)
    save_file(tensors, str(gemma / "2_Dense" / "model.safetensors"))
    _edit_json(gemma / "2_Dense" / "config.json", lambda config: {**config, "bias": True})
    out = import_model(gemma, tmp_path)
    f = _fields(out)
    assert f[DENSE_COUNT_KEY] == 2
    assert "gemma-embedding.dense_2_feat_in" not in f
    assert not {"dense_2.weight", "dense_3.weight"} & set(_tensors(out))


# --- model/dense.py ----------------------------------------------------------------------------


def test_apply_dense_computes_activation_of_the_affine_map() -> None:
    rng = np.random.default_rng(5)
    first = DenseLayer(rng.normal(size=(3, 4)).astype(np.float32), np.ones(3, np.float32), "tanh")
    second = DenseLayer(rng.normal(size=(2, 3)).astype(np.float32), None, "sigmoid")
    third = DenseLayer(np.eye(2, dtype=np.float32) * -1, None, "relu")
    x = rng.normal(size=(5, 4)).astype(np.float32)
    h = np.tanh(x.astype(np.float64) @ first.weight.T + 1.0)
    h = 1.0 / (1.0 + np.exp(-(h @ second.weight.T)))
    expected = np.maximum(-h, 0.0)
    out = apply_dense(x, [first, second, third])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)


def test_dense_metadata_round_trips() -> None:
    layer = DenseLayer(np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float32), "tanh")
    (back,) = read_dense(dense_metadata([layer]))
    np.testing.assert_array_equal(back.weight, layer.weight)
    assert back.bias is not None
    np.testing.assert_array_equal(back.bias, layer.bias)
    assert back.activation == "tanh"
    with pytest.raises(ValueError, match="activation 'gelu' is not supported"):
        DenseLayer(layer.weight, None, "gelu")
    fields = dense_metadata([layer])
    fields[dense_key(0, "out_features")] = 3
    with pytest.raises(ValueError, match="holds 6 values, expected 9"):
        read_dense(fields)
