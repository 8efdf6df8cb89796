"""Unit tests of the HF -> GGUF importer on a tiny random BERT built in tmp_path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from embedd_server.convert.hf_to_gguf import SUPPORTED_TYPES, default_name, import_model
from embedd_server.core.errors import ModelImportError

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


def _roberta(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="roberta", architectures=["RobertaModel"])
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
    "not bert": (_roberta, "config.json describes a roberta model"),
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
