"""Unit tests of the HF -> GGUF importer on tiny random models built in tmp_path.

A BERT (classic sentence-transformers layout), an XLM-RoBERTa (the layout
sentence-transformers >= 5 writes) and a Qwen3 (byte-level BPE with Qwen's pre-tokenizer):
the GGUF keys and tensors llama.cpp's converter writes for each, llama.cpp loading the file and
tokenizing like Hugging Face, the sentence-transformers settings, and every refusal naming
the file or key at fault. Vectors against sentence-transformers: tests/integration/test_families.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from embedd_server.convert.hf_to_gguf import SUPPORTED_TYPES, default_name, import_model
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import read_model_info

HIDDEN, HEADS, LAYERS, FFN, MAX_POS, TYPES = 48, 4, 2, 64, 64, 2
SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the",
    "a",
    "man",
    "woman",
    "is",
    "are",
    "play",
    "plays",
    "cat",
    "dog",
    "runs",
    "run",
    "on",
    "in",
    "of",
    "and",
    "to",
    "guitar",
    "eat",
    "food",
    "car",
    "road",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "house",
    "tree",
    "sky",
]
PIECES = ["##s", "##ing", "##ed", "##er", "##ly", ".", ",", "!", "?"]
VOCAB = SPECIALS + WORDS + PIECES
CLS, SEP, UNK, PAD, MASK = (VOCAB.index(t) for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]", "[MASK]"))


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
    )
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    return tok


def _hf_tensors(prefix: str = "") -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(0)

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": w(len(VOCAB), HIDDEN),
        "embeddings.token_type_embeddings.weight": w(TYPES, HIDDEN),
        "embeddings.position_embeddings.weight": w(MAX_POS, HIDDEN),
        "embeddings.LayerNorm.weight": 1 + w(HIDDEN),
        "embeddings.LayerNorm.bias": w(HIDDEN),
        "pooler.dense.weight": w(HIDDEN, HIDDEN),
        "pooler.dense.bias": w(HIDDEN),
    }
    shapes = {
        "attention.self.query": (HIDDEN, HIDDEN),
        "attention.self.key": (HIDDEN, HIDDEN),
        "attention.self.value": (HIDDEN, HIDDEN),
        "attention.output.dense": (HIDDEN, HIDDEN),
        "attention.output.LayerNorm": None,
        "intermediate.dense": (FFN, HIDDEN),
        "output.dense": (HIDDEN, FFN),
        "output.LayerNorm": None,
    }
    for i in range(LAYERS):
        for name, shape in shapes.items():
            base = f"encoder.layer.{i}.{name}"
            t[f"{base}.weight"] = w(*shape) if shape else 1 + w(HIDDEN)
            t[f"{base}.bias"] = w(shape[0] if shape else HIDDEN)
    return {prefix + k: v for k, v in t.items()}


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def make_tiny_bert(root: Path, *, prefix: str = "") -> Path:
    """Write a tiny random sentence-transformers BERT directory and return it."""
    root.mkdir(parents=True, exist_ok=True)
    _write_json(
        root / "config.json",
        {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "hidden_act": "gelu",
            "hidden_size": HIDDEN,
            "intermediate_size": FFN,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": MAX_POS,
            "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS,
            "pad_token_id": 0,
            "position_embedding_type": "absolute",
            "type_vocab_size": TYPES,
            "vocab_size": len(VOCAB),
        },
    )
    save_file(_hf_tensors(prefix), str(root / "model.safetensors"))
    _tokenizer().save(str(root / "tokenizer.json"))
    _write_json(
        root / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
    )
    _write_json(
        root / "1_Pooling" / "config.json",
        {"word_embedding_dimension": HIDDEN, "pooling_mode_mean_tokens": True},
    )
    _write_json(root / "sentence_bert_config.json", {"max_seq_length": 32, "do_lower_case": False})
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return make_tiny_bert(tmp_path / "Tiny_BERT")


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_writes_llama_cpp_bert_keys(tiny: Path, tmp_path: Path) -> None:
    out = import_model(tiny, tmp_path / "models")
    assert out == tmp_path / "models" / "tiny_bert.gguf"
    f = _fields(out)
    assert f["general.architecture"] == "bert"
    assert f["general.name"] == "tiny_bert"
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    expected = {
        "bert.block_count": LAYERS,
        "bert.context_length": MAX_POS,
        "bert.embedding_length": HIDDEN,
        "bert.feed_forward_length": FFN,
        "bert.attention.head_count": HEADS,
        "bert.attention.causal": False,
        "bert.pooling_type": int(gguf.PoolingType.MEAN),
        "tokenizer.ggml.model": "bert",
        "tokenizer.ggml.pre": "jina-v2-en",
        "tokenizer.ggml.token_type_count": TYPES,
        "tokenizer.ggml.bos_token_id": CLS,
        "tokenizer.ggml.eos_token_id": SEP,
        "tokenizer.ggml.unknown_token_id": UNK,
        "tokenizer.ggml.seperator_token_id": SEP,
        "tokenizer.ggml.padding_token_id": PAD,
        "tokenizer.ggml.mask_token_id": MASK,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
        "tokenizer.ggml.normalizer.lowercase": True,
        "sentence_transformers.max_seq_length": 32,
        "sentence_transformers.normalize": True,
    }
    assert {k: f[k] for k in expected} == expected
    assert f["bert.attention.layer_norm_epsilon"] == pytest.approx(1e-12)
    assert f["tokenizer.huggingface.json"] == (tiny / "tokenizer.json").read_text("utf-8")


def test_vocabulary_is_in_phantom_space_form(tiny: Path, tmp_path: Path) -> None:
    f = _fields(import_model(tiny, tmp_path))
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(VOCAB)
    by_hf = dict(zip(VOCAB, zip(tokens, types, strict=True), strict=True))
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    assert by_hf["[CLS]"] == ("[CLS]", control)
    assert by_hf["[PAD]"] == ("[PAD]", control)
    assert by_hf["play"] == ("\u2581play", normal)
    assert by_hf["##ing"] == ("ing", normal)
    # like llama.cpp's converter: only added special tokens are CONTROL
    assert by_hf["[unused0]"] == ("\u2581[unused0]", normal)


@pytest.mark.parametrize("out_type", SUPPORTED_TYPES)
def test_tensor_names_shapes_and_types(tiny: Path, tmp_path: Path, out_type: str) -> None:
    out = import_model(tiny, tmp_path, out_type=out_type)
    assert out.name == ("tiny_bert.gguf" if out_type == "f16" else f"tiny_bert-{out_type}.gguf")
    tensors = _tensors(out)
    block = "attn_q attn_k attn_v attn_output attn_output_norm ffn_up ffn_down layer_output_norm"
    names = {"token_embd.weight", "token_types.weight", "position_embd.weight"}
    names |= {f"token_embd_norm.{p}" for p in ("weight", "bias")}
    names |= {
        f"blk.{i}.{t}.{p}" for i in range(LAYERS) for t in block.split() for p in ("weight", "bias")
    }
    assert set(tensors) == names
    main = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[out_type]
    # q8_0 needs rows that are a multiple of 32; HIDDEN=48 rows fall back to f16 as in llama.cpp
    narrow = "F16" if out_type == "q8_0" else main
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == main  # rows of FFN=64
    assert tensors["blk.1.ffn_up.weight"].tensor_type.name == narrow  # rows of HIDDEN=48
    assert tensors["token_embd.weight"].tensor_type.name == narrow
    for name in ("token_types.weight", "position_embd.weight", "blk.1.attn_q.bias"):
        assert tensors[name].tensor_type.name == "F32"
    assert tensors["token_embd_norm.weight"].tensor_type.name == "F32"
    assert list(tensors["token_embd.weight"].shape) == [HIDDEN, len(VOCAB)]
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [HIDDEN, FFN]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [FFN, HIDDEN]


def test_f32_values_round_trip_with_bert_prefix(tmp_path: Path) -> None:
    src = make_tiny_bert(tmp_path / "prefixed", prefix="bert.")
    tensors = _tensors(import_model(src, tmp_path / "out", out_type="f32"))
    hf = _hf_tensors()
    np.testing.assert_array_equal(
        np.asarray(tensors["blk.1.attn_k.weight"].data).reshape(HIDDEN, HIDDEN),
        hf["encoder.layer.1.attention.self.key.weight"],
    )
    np.testing.assert_array_equal(
        np.asarray(tensors["token_embd_norm.bias"].data), hf["embeddings.LayerNorm.bias"]
    )


def test_sharded_safetensors_with_index(tiny: Path, tmp_path: Path) -> None:
    tensors = _hf_tensors()
    (tiny / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(tiny / shard))
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    _write_json(tiny / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    assert len(_tensors(import_model(tiny, tmp_path / "out"))) == 5 + 16 * LAYERS


def test_progress_is_reported_per_tensor(tiny: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    import_model(tiny, tmp_path, progress=lambda done, total: calls.append((done, total)))
    total = 5 + 16 * LAYERS
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_refuses_to_overwrite_unless_asked(tiny: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    out = import_model(tiny, models_dir, name="mine")
    with pytest.raises(ModelImportError, match="--overwrite"):
        import_model(tiny, models_dir, name="mine")
    out.write_bytes(b"stale")
    assert import_model(tiny, models_dir, name="mine.gguf", overwrite=True) == out
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in models_dir.iterdir()) == ["mine.gguf"]


def test_default_names(tmp_path: Path) -> None:
    assert default_name(tmp_path / "All-MiniLM-L6-v2") == "all-minilm-l6-v2"
    assert default_name(tmp_path / "All-MiniLM-L6-v2", "q8_0") == "all-minilm-l6-v2-q8_0"
    assert default_name(tmp_path / "All-MiniLM-L6-v2", "f32") == "all-minilm-l6-v2-f32"
    # A reranker's, classifier's or sparse encoder's usual type is f32: no suffix for it.
    assert default_name(tmp_path / "Reranker", "f32", usual="f32") == "reranker"
    assert default_name(tmp_path / "Reranker", "f16", usual="f32") == "reranker-f16"
    generic = tmp_path / "pkg" / "model"
    generic.mkdir(parents=True)
    assert default_name(generic) == "pkg"
    (generic / "README.md").write_text("---\ntags: [x]\n---\n\n# all-MiniLM-L6-v2\ntext\n")
    assert default_name(generic) == "all-minilm-l6-v2"
    snapshot = tmp_path / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots" / "abc123"
    assert default_name(snapshot) == "all-minilm-l6-v2"


def test_llama_cpp_loads_the_file_and_tokenizes_like_hugging_face(
    tiny: Path, tmp_path: Path
) -> None:
    from llama_cpp import Llama

    out = import_model(tiny, tmp_path, out_type="f32")
    llm = Llama(str(out), embedding=True, verbose=False, n_ctx=MAX_POS)
    try:
        text = "The man plays guitar, playing on the road!"
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)
        assert ids == _tokenizer().encode(text).ids
        vector = llm.embed(text)
        assert isinstance(vector, list)
        assert len(vector) == HIDDEN
        assert np.isfinite(np.asarray(vector, dtype=np.float64)).all()
    finally:
        llm.close()


Breaker = Callable[[Path], None]


def _drop_tensor(src: Path) -> None:
    tensors = _hf_tensors()
    del tensors["encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(src / "model.safetensors"))


def _only_pytorch_bin(src: Path) -> None:
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not really")


def _albert(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="albert", architectures=["AlbertModel"])
    _write_json(src / "config.json", config)


def _bigger_vocab(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["vocab_size"] = len(VOCAB) + 1
    _write_json(src / "config.json", config)


def _max_pooling(src: Path) -> None:
    _write_json(src / "1_Pooling" / "config.json", {"pooling_mode_max_tokens": True})


BREAKERS: dict[str, tuple[Breaker, str]] = {
    "no config": (lambda s: (s / "config.json").unlink(), "config.json"),
    "no weights": (lambda s: (s / "model.safetensors").unlink(), "model.safetensors"),
    "pytorch only": (_only_pytorch_bin, "pytorch_model.bin; safetensors"),
    "no tokenizer": (lambda s: (s / "tokenizer.json").unlink(), "tokenizer.json"),
    "no pooling": (lambda s: (s / "1_Pooling" / "config.json").unlink(), "1_Pooling"),
    "max pooling": (_max_pooling, "1_Pooling/config.json: unsupported pooling mode"),
    "not bert": (_albert, "config.json describes a albert model"),
    "missing tensor": (_drop_tensor, "encoder.layer.1.output.dense.weight"),
    "wrong shape": (_bigger_vocab, "'embeddings.word_embeddings.weight'"),
}


@pytest.mark.parametrize("case", BREAKERS)
def test_errors_name_the_file_or_tensor(tiny: Path, tmp_path: Path, case: str) -> None:
    breaker, expected = BREAKERS[case]
    breaker(tiny)
    models_dir = tmp_path / "models"
    with pytest.raises(ModelImportError) as info:
        import_model(tiny, models_dir)
    assert expected in info.value.message
    assert not models_dir.exists() or not any(models_dir.iterdir())


def test_unsupported_type_is_rejected(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match=r"'q4_0'.*f32, f16, q8_0") as info:
        import_model(tiny, tmp_path, out_type="q4_0")
    assert info.value.param == "type"


def test_bad_name_is_rejected(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="invalid model name"):
        import_model(tiny, tmp_path, name="../evil")


# --- sentence-transformers settings (on the tiny BERT) ---------------------------------------


def _imported(src: Path, tmp_path: Path, **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    out = import_model(src, tmp_path / "out", overwrite=True, report=notes.append, **kwargs)
    return _fields(out), notes


def _pooling_config(src: Path, config: dict[str, Any]) -> None:
    _write_json(src / "1_Pooling" / "config.json", {"word_embedding_dimension": HIDDEN, **config})


def test_classic_layout_settings_are_stored(tiny: Path, tmp_path: Path) -> None:
    _pooling_config(tiny, {"pooling_mode_cls_token": True, "include_prompt": False})
    _write_json(tiny / "sentence_bert_config.json", {"max_seq_length": 20, "do_lower_case": True})
    prompts = {"query": "Represent this sentence: ", "document": ""}
    _write_json(
        tiny / "config_sentence_transformers.json",
        {"prompts": prompts, "default_prompt_name": "query", "similarity_fn_name": "cosine"},
    )
    f, notes = _imported(tiny, tmp_path)
    assert f["bert.pooling_type"] == int(gguf.PoolingType.CLS)
    assert f["sentence_transformers.max_seq_length"] == 20
    assert f["sentence_transformers.do_lower_case"] is True
    assert f["sentence_transformers.include_prompt"] is False
    assert json.loads(f["sentence_transformers.prompts"]) == prompts
    assert f["sentence_transformers.default_prompt_name"] == "query"
    assert notes == []


def test_new_layout_settings_are_read(tiny: Path, tmp_path: Path) -> None:
    modules = json.loads((tiny / "modules.json").read_text())
    modules[0]["type"] = "sentence_transformers.base.modules.transformer.Transformer"
    modules[1]["type"] = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
    del modules[2]  # no Normalize: raw vectors
    _write_json(tiny / "modules.json", modules)
    _write_json(tiny / "sentence_bert_config.json", {"transformer_task": "feature-extraction"})
    _write_json(tiny / "tokenizer_config.json", {"model_max_length": 40})
    (tiny / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": HIDDEN, "pooling_mode": "lasttoken"})
    )
    f, notes = _imported(tiny, tmp_path)
    assert f["bert.pooling_type"] == int(gguf.PoolingType.LAST)
    assert f["sentence_transformers.normalize"] is False
    # sentence-transformers: min(max_position_embeddings, model_max_length)
    assert f["sentence_transformers.max_seq_length"] == 40
    assert f["sentence_transformers.include_prompt"] is True
    assert json.loads(f["sentence_transformers.prompts"]) == {}
    assert "sentence_transformers.default_prompt_name" not in f
    assert notes == []


def test_max_length_is_capped_by_the_positions_and_said(tiny: Path, tmp_path: Path) -> None:
    _write_json(tiny / "sentence_bert_config.json", {"max_seq_length": 512})
    f, notes = _imported(tiny, tmp_path)
    assert f["sentence_transformers.max_seq_length"] == MAX_POS
    assert len(notes) == 1
    assert f"truncated at {MAX_POS} tokens" in notes[0]


def test_plain_transformers_directory_gets_the_family_default(tiny: Path, tmp_path: Path) -> None:
    for name in ("modules.json", "sentence_bert_config.json"):
        (tiny / name).unlink()
    f, notes = _imported(tiny, tmp_path)
    assert f["bert.pooling_type"] == int(gguf.PoolingType.MEAN)
    assert f["sentence_transformers.normalize"] is False
    assert f["sentence_transformers.max_seq_length"] == MAX_POS
    assert len(notes) == 1
    assert "no modules.json" in notes[0]
    assert "mean pooling, not normalized" in notes[0]


def test_transformer_in_a_module_folder(tiny: Path, tmp_path: Path) -> None:
    inner = tiny / "0_Transformer"
    inner.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json"):
        (tiny / name).rename(inner / name)
    modules = json.loads((tiny / "modules.json").read_text())
    modules[0]["path"] = "0_Transformer"
    _write_json(tiny / "modules.json", modules)
    f, _ = _imported(tiny, tmp_path)
    assert f["sentence_transformers.max_seq_length"] == 32


def test_prompts_given_at_import_are_added(tiny: Path, tmp_path: Path) -> None:
    _write_json(tiny / "config_sentence_transformers.json", {"prompts": {"query": "q: "}})
    f, _ = _imported(tiny, tmp_path, prompts={"passage": "p: "})
    assert json.loads(f["sentence_transformers.prompts"]) == {"query": "q: ", "passage": "p: "}


def test_catalog_reads_the_settings(tiny: Path, tmp_path: Path) -> None:
    _pooling_config(tiny, {"pooling_mode_mean_tokens": True, "include_prompt": False})
    _write_json(
        tiny / "config_sentence_transformers.json",
        {"prompts": {"query": "q: ", "document": ""}, "default_prompt_name": "document"},
    )
    info = read_model_info(import_model(tiny, tmp_path))
    assert (info.family, info.architecture, info.pooling) == ("bert", "bert", "mean")
    assert info.prompts == {"query": "q: ", "document": ""}
    assert info.default_prompt_name == "document"
    assert info.include_prompt is False
    assert info.do_lower_case is False
    assert info.normalizes is True
    assert info.max_input_tokens == 32


def _modules_with_dense(src: Path) -> None:
    modules = json.loads((src / "modules.json").read_text())
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    _write_json(src / "modules.json", [*modules[:2], dense])


def _two_poolings(src: Path) -> None:
    _pooling_config(src, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})


def _weighted_mean(src: Path) -> None:
    _pooling_config(src, {"pooling_mode": "weightedmean"})


def _unknown_default_prompt(src: Path) -> None:
    _write_json(
        src / "config_sentence_transformers.json",
        {"prompts": {"query": "q: "}, "default_prompt_name": "passage"},
    )


def _sparse_encoder(src: Path) -> None:
    _write_json(src / "config_sentence_transformers.json", {"model_type": "SparseEncoder"})


def _cross_encoder(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["AlbertForSequenceClassification"]
    _write_json(src / "config.json", config)


def _pooling_dimension(src: Path) -> None:
    _pooling_config(src, {"pooling_mode_mean_tokens": True, "word_embedding_dimension": 7})


def _bad_max_length(src: Path) -> None:
    _write_json(src / "sentence_bert_config.json", {"max_seq_length": "long"})


SETTINGS_BREAKERS: dict[str, tuple[Breaker, str]] = {
    "dense module without its files": (_modules_with_dense, "2_Dense/config.json is missing"),
    "two poolings": (_two_poolings, "1_Pooling/config.json: unsupported pooling mode (cls + mean)"),
    "weighted mean": (_weighted_mean, "unsupported pooling mode (weightedmean)"),
    "unknown default prompt": (_unknown_default_prompt, "default_prompt_name 'passage'"),
    "sparse encoder": (_sparse_encoder, "config_sentence_transformers.json: model_type"),
    "cross-encoder": (
        _cross_encoder,
        "AlbertForSequenceClassification, a cross-encoder (reranker) or sequence classifier "
        "of a family embedd does not import; embedd imports the rerankers and classifiers "
        "BertForSequenceClassification, XLMRobertaForSequenceClassification, "
        "DistilBertForSequenceClassification, RobertaForSequenceClassification",
    ),
    "pooling dimension": (_pooling_dimension, "embedding dimension 7 differs"),
    "bad max length": (_bad_max_length, "sentence_bert_config.json: max_seq_length"),
}


@pytest.mark.parametrize("case", SETTINGS_BREAKERS)
def test_refused_settings_name_the_file_and_key(tiny: Path, tmp_path: Path, case: str) -> None:
    breaker, expected = SETTINGS_BREAKERS[case]
    breaker(tiny)
    with pytest.raises(ModelImportError) as info:
        import_model(tiny, tmp_path / "models")
    assert expected in info.value.message


# --- XLM-RoBERTa ---------------------------------------------------------------------------

XLMR_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
XLMR_PIECES = [f"\u2581{w}" for w in WORDS] + list("abcdefghijklmnopqrstuvwxyz.,!?") + ["\u2581"]
XLMR_VOCAB = XLMR_SPECIALS + XLMR_PIECES
XLMR_PAD = 1


def _xlmr_tokenizer() -> Tokenizer:
    pieces = [(t, 0.0) for t in XLMR_SPECIALS]
    pieces += [(t, -2.0 - 0.1 * i) for i, t in enumerate(XLMR_PIECES)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.add_special_tokens(XLMR_SPECIALS)
    return tok


def make_tiny_xlmr(root: Path) -> Path:
    """A tiny random XLM-RoBERTa in the layout sentence-transformers >= 5 writes."""
    bert = make_tiny_bert(root, prefix="roberta.")
    tensors = _hf_tensors("roberta.")
    rng = np.random.default_rng(1)
    tensors["roberta.embeddings.word_embeddings.weight"] = rng.standard_normal(
        (len(XLMR_VOCAB), HIDDEN)
    ).astype(np.float32)
    tensors["roberta.embeddings.token_type_embeddings.weight"] = rng.standard_normal(
        (1, HIDDEN)
    ).astype(np.float32)
    tensors["roberta.embeddings.position_embeddings.weight"] = rng.standard_normal(
        (MAX_POS + XLMR_PAD + 1, HIDDEN)
    ).astype(np.float32)
    save_file(tensors, str(bert / "model.safetensors"))
    config = json.loads((bert / "config.json").read_text())
    config.update(
        architectures=["XLMRobertaModel"],
        model_type="xlm-roberta",
        max_position_embeddings=MAX_POS + XLMR_PAD + 1,
        pad_token_id=XLMR_PAD,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
        vocab_size=len(XLMR_VOCAB),
    )
    _write_json(bert / "config.json", config)
    _xlmr_tokenizer().save(str(bert / "tokenizer.json"))
    _write_json(
        bert / "tokenizer_config.json",
        {
            "bos_token": "<s>",
            "cls_token": "<s>",
            "eos_token": "</s>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
            "mask_token": "<mask>",
            "model_max_length": 40,
        },
    )
    _write_json(
        bert / "modules.json",
        [
            {
                "idx": 0,
                "name": "0",
                "path": "",
                "type": "sentence_transformers.base.modules.transformer.Transformer",
            },
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.base.modules.normalize.Normalize",
            },
        ],
    )
    _write_json(
        bert / "1_Pooling" / "config.json",
        {"embedding_dimension": HIDDEN, "pooling_mode": "mean", "include_prompt": True},
    )
    _write_json(bert / "sentence_bert_config.json", {"transformer_task": "feature-extraction"})
    _write_json(
        bert / "config_sentence_transformers.json",
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None},
    )
    return bert


@pytest.fixture
def tiny_xlmr(tmp_path: Path) -> Path:
    return make_tiny_xlmr(tmp_path / "tiny-xlmr")


def test_xlmr_keys_follow_llama_cpp(tiny_xlmr: Path, tmp_path: Path) -> None:
    out = import_model(tiny_xlmr, tmp_path / "models", out_type="f32")
    f = _fields(out)
    expected = {
        "general.architecture": "bert",
        "bert.context_length": MAX_POS,  # the position table less padding_idx + 1 rows
        "bert.attention.causal": False,
        "bert.pooling_type": int(gguf.PoolingType.MEAN),
        "tokenizer.ggml.model": "t5",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.token_type_count": 1,
        "tokenizer.ggml.add_space_prefix": True,
        "tokenizer.ggml.remove_extra_whitespaces": True,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.seperator_token_id": 2,
        "tokenizer.ggml.padding_token_id": 1,
        "tokenizer.ggml.mask_token_id": 4,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
        "sentence_transformers.max_seq_length": 40,  # tokenizer_config's model_max_length
        "sentence_transformers.normalize": True,
    }
    assert {k: f.get(k) for k in expected} == expected
    assert f["tokenizer.ggml.tokens"] == XLMR_VOCAB
    types = f["tokenizer.ggml.token_type"]
    assert types[:6] == [3, 3, 3, 2, 3, 1]  # CONTROL x3, UNKNOWN, CONTROL, NORMAL
    assert f["tokenizer.ggml.scores"][5] == pytest.approx(-2.0)
    assert json.loads(f["sentence_transformers.prompts"]) == {
        "query": "query: ",
        "passage": "passage: ",
    }
    tensors = _tensors(out)
    positions = np.asarray(tensors["position_embd.weight"].data).reshape(MAX_POS, HIDDEN)
    hf = _hf_tensors()  # unchanged by make_tiny_xlmr except the three embeddings
    assert positions.shape == (MAX_POS, HIDDEN)
    assert list(tensors["token_types.weight"].shape) == [HIDDEN, 1]
    source = _safetensors(tiny_xlmr)["roberta.embeddings.position_embeddings.weight"]
    assert source.shape == (MAX_POS + XLMR_PAD + 1, HIDDEN)
    np.testing.assert_array_equal(positions, source[XLMR_PAD + 1 :])
    np.testing.assert_array_equal(
        np.asarray(tensors["blk.0.attn_q.weight"].data).reshape(HIDDEN, HIDDEN),
        hf["encoder.layer.0.attention.self.query.weight"],
    )
    info = read_model_info(out)
    assert (info.family, info.max_input_tokens, info.context_length) == ("xlm-roberta", 40, MAX_POS)


def _safetensors(src: Path) -> dict[str, np.ndarray[Any, Any]]:
    from safetensors.numpy import load_file

    return load_file(str(src / "model.safetensors"))


def test_llama_cpp_loads_xlmr_and_tokenizes_like_hugging_face(
    tiny_xlmr: Path, tmp_path: Path
) -> None:
    from llama_cpp import Llama

    out = import_model(tiny_xlmr, tmp_path, out_type="f16")
    llm = Llama(str(out), embedding=True, verbose=False, n_ctx=MAX_POS)
    try:
        for text in ("The man plays guitar, on the road!", "a  small   dog runs"):
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            assert ids == _xlmr_tokenizer().encode(text).ids, text
        vector = np.asarray(llm.embed("the red car"), dtype=np.float64)
        assert vector.shape == (HIDDEN,)
        assert np.isfinite(vector).all()
    finally:
        llm.close()


# --- Qwen3 ---------------------------------------------------------------------------------

QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
Q_HEADS, Q_KV_HEADS, Q_HEAD_DIM, Q_HIDDEN, Q_FFN, Q_MAX_POS = 4, 2, 32, 64, 96, 256
CORPUS = [
    "The man plays guitar on the road.",
    "A woman is eating food in the small house!",
    "Cats and dogs run under the big green tree; it's 12:30 now.",
    "Stock markets fell 3.5% today, didn't they?",
] * 8


def _qwen_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>",
        pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", 0)],
    )
    return tok


def _qwen_tensors(n_vocab: int, prefix: str = "") -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(2)

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    q, kv = Q_HEADS * Q_HEAD_DIM, Q_KV_HEADS * Q_HEAD_DIM
    t = {"embed_tokens.weight": w(n_vocab, Q_HIDDEN), "norm.weight": 1 + w(Q_HIDDEN)}
    for i in range(LAYERS):
        b = f"layers.{i}."
        t |= {
            b + "input_layernorm.weight": 1 + w(Q_HIDDEN),
            b + "self_attn.q_proj.weight": w(q, Q_HIDDEN),
            b + "self_attn.k_proj.weight": w(kv, Q_HIDDEN),
            b + "self_attn.v_proj.weight": w(kv, Q_HIDDEN),
            b + "self_attn.o_proj.weight": w(Q_HIDDEN, q),
            b + "self_attn.q_norm.weight": 1 + w(Q_HEAD_DIM),
            b + "self_attn.k_norm.weight": 1 + w(Q_HEAD_DIM),
            b + "post_attention_layernorm.weight": 1 + w(Q_HIDDEN),
            b + "mlp.gate_proj.weight": w(Q_FFN, Q_HIDDEN),
            b + "mlp.up_proj.weight": w(Q_FFN, Q_HIDDEN),
            b + "mlp.down_proj.weight": w(Q_HIDDEN, Q_FFN),
        }
    return {prefix + k: v for k, v in t.items()}


def make_tiny_qwen3(root: Path, *, causal_lm: bool = False) -> Path:
    """A tiny random Qwen3 embedding model (classic layout, last-token pooling)."""
    root.mkdir(parents=True, exist_ok=True)
    tok = _qwen_tokenizer()
    n_vocab = tok.get_vocab_size() + 3  # padded, as Qwen's configs are
    _write_json(
        root / "config.json",
        {
            "architectures": ["Qwen3ForCausalLM" if causal_lm else "Qwen3Model"],
            "model_type": "qwen3",
            "hidden_act": "silu",
            "hidden_size": Q_HIDDEN,
            "head_dim": Q_HEAD_DIM,
            "intermediate_size": Q_FFN,
            "max_position_embeddings": Q_MAX_POS,
            "num_attention_heads": Q_HEADS,
            "num_hidden_layers": LAYERS,
            "num_key_value_heads": Q_KV_HEADS,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
            "attention_bias": False,
            "use_sliding_window": False,
            "layer_types": ["full_attention"] * LAYERS,
            "tie_word_embeddings": False,
            "eos_token_id": 0,
            "vocab_size": n_vocab,
        },
    )
    tensors = _qwen_tensors(n_vocab, "model." if causal_lm else "")
    if causal_lm:
        tensors["lm_head.weight"] = np.zeros((n_vocab, Q_HIDDEN), dtype=np.float32)
    save_file(tensors, str(root / "model.safetensors"))
    tok.save(str(root / "tokenizer.json"))
    _write_json(
        root / "tokenizer_config.json",
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 131072},
    )
    _write_json(
        root / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
    )
    _write_json(
        root / "1_Pooling" / "config.json",
        {"word_embedding_dimension": Q_HIDDEN, "pooling_mode_lasttoken": True},
    )
    _write_json(root / "sentence_bert_config.json", {"max_seq_length": 128})
    _write_json(
        root / "config_sentence_transformers.json",
        {"prompts": {"query": "Instruct: find\nQuery: ", "document": ""}},
    )
    return root


@pytest.fixture
def tiny_qwen3(tmp_path: Path) -> Path:
    return make_tiny_qwen3(tmp_path / "tiny-qwen3")


def test_qwen3_keys_and_tensors_follow_llama_cpp(tiny_qwen3: Path, tmp_path: Path) -> None:
    out = import_model(tiny_qwen3, tmp_path / "models")
    f = _fields(out)
    n_vocab = _qwen_tokenizer().get_vocab_size() + 3
    expected = {
        "general.architecture": "qwen3",
        "qwen3.block_count": LAYERS,
        "qwen3.context_length": Q_MAX_POS,
        "qwen3.embedding_length": Q_HIDDEN,
        "qwen3.feed_forward_length": Q_FFN,
        "qwen3.attention.head_count": Q_HEADS,
        "qwen3.attention.head_count_kv": Q_KV_HEADS,
        "qwen3.attention.key_length": Q_HEAD_DIM,
        "qwen3.attention.value_length": Q_HEAD_DIM,
        "qwen3.pooling_type": int(gguf.PoolingType.LAST),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": True,
        "sentence_transformers.max_seq_length": 128,
        "sentence_transformers.normalize": True,
    }
    assert {k: f.get(k) for k in expected} == expected
    assert f["qwen3.rope.freq_base"] == pytest.approx(1e6)
    assert f["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert len(f["tokenizer.ggml.tokens"]) == n_vocab
    assert f["tokenizer.ggml.tokens"][-1] == f"[PAD{n_vocab - 1}]"
    assert f["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert f["tokenizer.ggml.merges"][0].count(" ") == 1
    tensors = _tensors(out)
    block = (
        "attn_norm attn_q attn_k attn_v attn_output attn_q_norm attn_k_norm ffn_norm ffn_gate "
        "ffn_up ffn_down"
    )
    names = {"token_embd.weight", "output_norm.weight"}
    names |= {f"blk.{i}.{t}.weight" for i in range(LAYERS) for t in block.split()}
    assert set(tensors) == names  # no output.weight: llama.cpp ties it to token_embd
    assert list(tensors["blk.0.attn_k.weight"].shape) == [Q_HIDDEN, Q_KV_HEADS * Q_HEAD_DIM]
    assert list(tensors["blk.0.attn_output.weight"].shape) == [Q_HEADS * Q_HEAD_DIM, Q_HIDDEN]
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type.name == "F32"
    info = read_model_info(out)
    assert (info.family, info.pooling, info.max_input_tokens) == ("qwen3", "last", 128)
    assert info.prompts["query"] == "Instruct: find\nQuery: "


def test_qwen3_for_causal_lm_drops_its_head(tmp_path: Path) -> None:
    src = make_tiny_qwen3(tmp_path / "causal", causal_lm=True)
    out = import_model(src, tmp_path / "models", out_type="f32")
    tensors = _tensors(out)
    assert "output.weight" not in tensors
    np.testing.assert_array_equal(
        np.asarray(tensors["blk.1.ffn_down.weight"].data).reshape(Q_HIDDEN, Q_FFN),
        _qwen_tensors(_qwen_tokenizer().get_vocab_size() + 3)["layers.1.mlp.down_proj.weight"],
    )


def test_llama_cpp_loads_qwen3_and_tokenizes_like_hugging_face(
    tiny_qwen3: Path, tmp_path: Path
) -> None:
    from llama_cpp import Llama

    out = import_model(tiny_qwen3, tmp_path, out_type="f32")
    llm = Llama(str(out), embedding=True, verbose=False, n_ctx=128)
    try:
        texts = [*CORPUS[:4], "Don't  split\n\nthese 1234 ok?", "naïve café"]
        for text in texts:
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            expected = _qwen_tokenizer().encode(text).ids
            assert expected[-1] == 0  # the template appends <|endoftext|>
            assert ids == expected, text
        vector = np.asarray(llm.embed("the red car"), dtype=np.float64)
        assert vector.shape == (Q_HIDDEN,)
        assert np.isfinite(vector).all()
    finally:
        llm.close()


def test_plain_qwen3_directory_pools_the_last_token_normalized(
    tiny_qwen3: Path, tmp_path: Path
) -> None:
    (tiny_qwen3 / "modules.json").unlink()
    f, notes = _imported(tiny_qwen3, tmp_path)
    assert f["qwen3.pooling_type"] == int(gguf.PoolingType.LAST)
    assert f["sentence_transformers.normalize"] is True
    assert f["sentence_transformers.max_seq_length"] == 128  # sentence_bert_config.json
    assert len(notes) == 1
    assert "lasttoken pooling, normalized (Qwen3-Embedding" in notes[0]


def _config_update(**changes: Any) -> Breaker:
    def breaker(src: Path) -> None:
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        _write_json(src / "config.json", config)

    return breaker


def _wordpiece_tokenizer(src: Path) -> None:
    _tokenizer().save(str(src / "tokenizer.json"))


FAMILY_BREAKERS: dict[str, tuple[str, Breaker, str]] = {
    "xlmr wordpiece": ("xlmr", _wordpiece_tokenizer, "must be Unigram, this one is WordPiece"),
    "xlmr no positions": (
        "xlmr",
        _config_update(max_position_embeddings=2),
        "leaves no positions after padding_idx + 1",
    ),
    "qwen3 yarn": (
        "qwen3",
        _config_update(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
        "RoPE type 'yarn' is not supported",
    ),
    "qwen3 sliding window": (
        "qwen3",
        _config_update(use_sliding_window=True),
        "sliding-window attention is not supported",
    ),
    "qwen3 gelu": ("qwen3", _config_update(hidden_act="gelu"), "hidden_act 'gelu'"),
    "qwen3 heads": (
        "qwen3",
        _config_update(num_key_value_heads=3),
        "num_attention_heads must be a multiple of num_key_value_heads",
    ),
    "qwen3 kv shape": (
        "qwen3",
        _config_update(head_dim=16),
        "'layers.0.self_attn.q_proj.weight'",
    ),
    "unknown family": (
        "qwen3",
        _config_update(model_type="gpt2", architectures=["GPT2Model"]),
        "describes a gpt2 model (GPT2Model); embedd imports BertModel (bert), "
        "XLMRobertaModel (xlm-roberta), Qwen3Model (qwen3)",
    ),
}


@pytest.mark.parametrize("case", FAMILY_BREAKERS)
def test_family_refusals_name_the_file_or_key(
    tiny_xlmr: Path, tiny_qwen3: Path, tmp_path: Path, case: str
) -> None:
    family, breaker, expected = FAMILY_BREAKERS[case]
    src = tiny_xlmr if family == "xlmr" else tiny_qwen3
    breaker(src)
    with pytest.raises(ModelImportError) as info:
        import_model(src, tmp_path / "models")
    assert expected in info.value.message


# --- cross-encoders (rerankers) ----------------------------------------------------------------


def _as_reranker(
    src: Path, architecture: str, prefix: str, head: dict[str, tuple[int, ...]], labels: int = 1
) -> Path:
    """``src`` (an encoder directory) turned into a transformers cross-encoder directory:
    the classifier's tensors added, no sentence-transformers files, a huge model_max_length
    (as transformers writes for a tokenizer without one)."""
    rng = np.random.default_rng(2)
    tensors = _safetensors(src)
    tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{prefix}pooler.")}
    for name, shape in head.items():
        tensors[name] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config.update(
        architectures=[architecture],
        id2label={str(i): f"LABEL_{i}" for i in range(labels)},
        label2id={f"LABEL_{i}": i for i in range(labels)},
    )
    _write_json(src / "config.json", config)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        (src / name).unlink(missing_ok=True)
    tokenizer_config = src / "tokenizer_config.json"
    extra = json.loads(tokenizer_config.read_text()) if tokenizer_config.is_file() else {}
    _write_json(tokenizer_config, {**extra, "model_max_length": 10**30})
    return src


def make_tiny_bert_reranker(root: Path, labels: int = 1) -> Path:
    """A tiny random ``BertForSequenceClassification`` (pooler + classifier)."""
    return _as_reranker(
        make_tiny_bert(root, prefix="bert."),
        "BertForSequenceClassification",
        "bert.",
        {
            "bert.pooler.dense.weight": (HIDDEN, HIDDEN),
            "bert.pooler.dense.bias": (HIDDEN,),
            "classifier.weight": (labels, HIDDEN),
            "classifier.bias": (labels,),
        },
        labels,
    )


def make_tiny_xlmr_reranker(root: Path) -> Path:
    """A tiny random ``XLMRobertaForSequenceClassification`` (classifier.dense + out_proj)."""
    return _as_reranker(
        make_tiny_xlmr(root),
        "XLMRobertaForSequenceClassification",
        "roberta.",
        {
            "classifier.dense.weight": (HIDDEN, HIDDEN),
            "classifier.dense.bias": (HIDDEN,),
            "classifier.out_proj.weight": (1, HIDDEN),
            "classifier.out_proj.bias": (1,),
        },
    )


def _values(tensor: gguf.ReaderTensor) -> np.ndarray[Any, Any]:
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return np.asarray(tensor.data, dtype=np.float32).reshape(shape)


RERANKER_HEADS = {
    "bert": {
        "cls.weight": "bert.pooler.dense.weight",
        "cls.bias": "bert.pooler.dense.bias",
        "cls.output.weight": "classifier.weight",
        "cls.output.bias": "classifier.bias",
    },
    "xlmr": {
        "cls.weight": "classifier.dense.weight",
        "cls.bias": "classifier.dense.bias",
        "cls.output.weight": "classifier.out_proj.weight",
        "cls.output.bias": "classifier.out_proj.bias",
    },
}


@pytest.mark.parametrize("out_type", SUPPORTED_TYPES)
@pytest.mark.parametrize("family", list(RERANKER_HEADS))
def test_reranker_is_written_as_llama_cpp_loads_one(
    tmp_path: Path, family: str, out_type: str
) -> None:
    make = make_tiny_bert_reranker if family == "bert" else make_tiny_xlmr_reranker
    src = make(tmp_path / f"tiny-{family}-reranker")
    notes: list[str] = []
    out = import_model(src, tmp_path / "models", out_type=out_type, report=notes.append)
    f = _fields(out)
    assert f["general.architecture"] == "bert"
    assert f["bert.pooling_type"] == int(gguf.PoolingType.RANK) == 4
    assert f["bert.classifier.output_labels"] == ["LABEL_0"]
    assert f["tokenizer.huggingface.json"] == (src / "tokenizer.json").read_text()
    assert f["tokenizer.ggml.token_type_count"] == (TYPES if family == "bert" else 1)
    # CrossEncoder truncates at model_max_length, here capped by the positions there are.
    assert f["sentence_transformers.max_seq_length"] == MAX_POS
    assert f["bert.context_length"] == MAX_POS
    assert f["sentence_transformers.normalize"] is False
    assert json.loads(f["sentence_transformers.prompts"]) == {}
    assert "sentence_transformers.default_prompt_name" not in f
    tensors = _tensors(out)
    hf = _safetensors(src)
    for gg, name in RERANKER_HEADS[family].items():
        # The head stays f32 in every file type: it is tiny, and it sets every score.
        assert tensors[gg].tensor_type == gguf.GGMLQuantizationType.F32, gg
        np.testing.assert_array_equal(_values(tensors[gg]), hf[name])
    assert tensors["cls.output.weight"].shape.tolist() == [HIDDEN, 1]  # GGUF: fastest first
    if family == "xlmr":  # the position table starts at padding_idx + 1, as for the encoder
        positions = _values(tensors["position_embd.weight"])
        np.testing.assert_array_equal(
            positions, hf["roberta.embeddings.position_embeddings.weight"][XLMR_PAD + 1 :]
        )
    assert "pooler.dense.weight" not in tensors
    assert "cross-encoder (reranker)" in notes[0]
    assert "one label (LABEL_0): a pair's relevance is sigmoid(logit)" in notes[0]
    assert not any("modules.json" in note for note in notes)  # no pooling default applied
    info = read_model_info(out)
    assert (info.task, info.labels, info.pooling, info.max_input_tokens) == (
        "rerank",
        1,
        "rank",
        MAX_POS,
    )
    assert info.normalizes is False
    assert info.prompts == {}


def test_more_labels_make_a_classifier_that_keeps_them_all(tmp_path: Path) -> None:
    """More than one label: a sequence classifier (task classify, as TEI decides), in the
    reranker's layout, with its problem_type (transformers' default: single-label)."""
    src = make_tiny_bert_reranker(tmp_path / "nli", labels=3)
    config = json.loads((src / "config.json").read_text())
    config["id2label"] = {"2": "neutral", "0": "contradiction", "1": "entailment"}
    _write_json(src / "config.json", config)
    notes: list[str] = []
    out = import_model(src, tmp_path / "models", report=notes.append)
    f = _fields(out)
    assert f["bert.classifier.output_labels"] == ["contradiction", "entailment", "neutral"]
    assert f["bert.pooling_type"] == int(gguf.PoolingType.RANK)
    assert f["embedd.task"] == "classify"
    assert f["embedd.problem_type"] == "single_label_classification"
    assert f["embedd.head_activation"] == "tanh"
    assert f["embedd.family"] == "bert"
    assert _tensors(out)["cls.output.weight"].shape.tolist() == [HIDDEN, 3]
    info = read_model_info(out)
    assert (info.task, info.labels, info.label_names, info.problem_type) == (
        "classify",
        3,
        ("contradiction", "entailment", "neutral"),
        "single_label_classification",
    )
    assert "a sequence classifier of the bert family with 3 labels" in notes[0]
    assert "(contradiction, entailment, neutral)" in notes[0]
    assert "scored by a softmax over its labels" in notes[0]


def test_a_multi_label_classifier_says_so(tmp_path: Path) -> None:
    src = make_tiny_bert_reranker(tmp_path / "tags", labels=2)
    config = json.loads((src / "config.json").read_text())
    config["problem_type"] = "multi_label_classification"
    _write_json(src / "config.json", config)
    notes: list[str] = []
    info = read_model_info(import_model(src, tmp_path / "models", report=notes.append))
    assert (info.task, info.problem_type) == ("classify", "multi_label_classification")
    assert "scored by a sigmoid per label" in notes[0]


def test_an_unknown_problem_type_is_refused(tmp_path: Path) -> None:
    src = make_tiny_bert_reranker(tmp_path / "odd", labels=2)
    config = json.loads((src / "config.json").read_text())
    config["problem_type"] = "ranking"
    _write_json(src / "config.json", config)
    with pytest.raises(ModelImportError, match=r"problem_type 'ranking' is not one of"):
        import_model(src, tmp_path / "models")


def test_llama_cpp_reads_the_reranker_head(tmp_path: Path) -> None:
    import llama_cpp

    from embedd_server.engines.llama import LlamaModelWeights

    out = import_model(make_tiny_xlmr_reranker(tmp_path / "x"), tmp_path / "models")
    weights = LlamaModelWeights(out)
    try:
        assert weights.rank
        assert llama_cpp.llama_model_n_cls_out(weights.model.model) == 1
        assert weights.dimensions == 1  # a reranker's rows are its logits
    finally:
        weights.close()


def _wrong_label_count(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["id2label"] = {"0": "LABEL_0", "1": "LABEL_1"}
    _write_json(src / "config.json", config)


def _gappy_labels(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["id2label"] = {"0": "LABEL_0", "2": "LABEL_2"}
    _write_json(src / "config.json", config)


def _no_classifier(src: Path) -> None:
    tensors = _safetensors(src)
    del tensors["classifier.weight"]
    save_file(tensors, str(src / "model.safetensors"))


def _albert_reranker(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="albert", architectures=["AlbertForSequenceClassification"])
    _write_json(src / "config.json", config)


RERANKER_BREAKERS: dict[str, tuple[Breaker, str]] = {
    "labels differ from the weights": (
        _wrong_label_count,
        "tensor 'classifier.weight' in",
    ),
    "labels not numbered": (_gappy_labels, "id2label must number its labels 0 to 1"),
    "no classifier": (_no_classifier, "tensor 'classifier.weight' is missing"),
    "other reranker family": (
        _albert_reranker,
        "AlbertForSequenceClassification, a cross-encoder (reranker) or sequence classifier "
        "of a family embedd does not import",
    ),
}


@pytest.mark.parametrize("case", RERANKER_BREAKERS)
def test_reranker_refusals_name_the_file_or_tensor(tmp_path: Path, case: str) -> None:
    breaker, expected = RERANKER_BREAKERS[case]
    src = make_tiny_bert_reranker(tmp_path / "r")
    breaker(src)
    with pytest.raises(ModelImportError) as info:
        import_model(src, tmp_path / "models")
    assert expected in info.value.message


def test_reranker_takes_no_prompts(tmp_path: Path) -> None:
    src = make_tiny_bert_reranker(tmp_path / "r")
    with pytest.raises(ModelImportError, match=r"cross-encoder .* without --prompt") as info:
        import_model(src, tmp_path / "models", prompts={"query": "q: "})
    assert info.value.param == "prompt"
