"""Importing Mistral decoders (``MistralModel`` / ``MistralForCausalLM``: e5-mistral,
SFR-Embedding) from tiny random models built in tmp_path, with Mistral's own kind of
tokenizer (SentencePiece BPE with byte fallback: ``<unk> <s> </s> <0x00>..<0xFF>`` then the
pieces): the GGUF keys and tensors llama.cpp's converter writes for the ``llama``
architecture (q/k permuted for its RoPE), llama.cpp loading the file and tokenizing like
Hugging Face, the family in the catalogue, and the sliding window's refusal. Vectors against
sentence-transformers (a byte-level BPE Mistral): tests/integration/test_families.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import read_model_info
from tests.unit.test_hf_to_gguf import CORPUS

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, MAX_POS, LAYERS = 4, 2, 16, 64, 96, 512, 2
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _sentencepiece_bpe() -> Tokenizer:
    """A tokenizer.json as transformers converts Mistral's tokenizer.model: Prepend + Replace
    normalizer, BPE with byte fallback, `<s> A </s>` (e5-mistral appends the EOS)."""
    normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.normalizer = normalizer
    trained.train_from_iterator(
        CORPUS * 3,
        trainers.BpeTrainer(vocab_size=200, special_tokens=SPECIALS, show_progress=False),
    )
    learned = json.loads(trained.to_str())["model"]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])]
    vocab = {t: i for i, t in enumerate([*SPECIALS, *BYTES, *pieces[len(SPECIALS) :]])}
    merges: list[tuple[str, str]] = []
    for merge in learned["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    return tok


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _tensors(n_vocab: int, prefix: str = "") -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(3)

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    t = {"embed_tokens.weight": w(n_vocab, HIDDEN), "norm.weight": 1 + w(HIDDEN)}
    for i in range(LAYERS):
        b = f"layers.{i}."
        t |= {
            b + "input_layernorm.weight": 1 + w(HIDDEN),
            b + "self_attn.q_proj.weight": w(q, HIDDEN),
            b + "self_attn.k_proj.weight": w(kv, HIDDEN),
            b + "self_attn.v_proj.weight": w(kv, HIDDEN),
            b + "self_attn.o_proj.weight": w(HIDDEN, q),
            b + "post_attention_layernorm.weight": 1 + w(HIDDEN),
            b + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            b + "mlp.up_proj.weight": w(FFN, HIDDEN),
            b + "mlp.down_proj.weight": w(HIDDEN, FFN),
        }
    return {prefix + k: v for k, v in t.items()}


def make_tiny_mistral(
    root: Path, *, causal_lm: bool = False, sliding_window: int | None = 4096
) -> Path:
    """A tiny random e5-mistral-like model (classic layout, last-token pooling, normalized)."""
    root.mkdir(parents=True, exist_ok=True)
    tok = _sentencepiece_bpe()
    n_vocab = tok.get_vocab_size()
    _write_json(
        root / "config.json",
        {
            "architectures": ["MistralForCausalLM" if causal_lm else "MistralModel"],
            "model_type": "mistral",
            "hidden_act": "silu",
            "hidden_size": HIDDEN,
            "head_dim": HEAD_DIM,
            "intermediate_size": FFN,
            "max_position_embeddings": MAX_POS,
            "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS,
            "num_key_value_heads": KV_HEADS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "sliding_window": sliding_window,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "vocab_size": n_vocab,
        },
    )
    tensors = _tensors(n_vocab, "model." if causal_lm else "")
    if causal_lm:
        tensors["lm_head.weight"] = np.zeros((n_vocab, HIDDEN), dtype=np.float32)
    save_file(tensors, str(root / "model.safetensors"))
    tok.save(str(root / "tokenizer.json"))
    _write_json(
        root / "tokenizer_config.json",
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096},
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
        {"word_embedding_dimension": HIDDEN, "pooling_mode_lasttoken": True},
    )
    _write_json(root / "sentence_bert_config.json", {"max_seq_length": 256})
    _write_json(
        root / "config_sentence_transformers.json",
        {"prompts": {"query": "Instruct: find\nQuery: ", "document": ""}},
    )
    return root


@pytest.fixture
def tiny_mistral(tmp_path: Path) -> Path:
    return make_tiny_mistral(tmp_path / "tiny-mistral")


def _fields(path: Path) -> dict[str, Any]:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def _gguf_tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_keys_and_vocabulary_follow_llama_cpp(tiny_mistral: Path, tmp_path: Path) -> None:
    out = import_model(tiny_mistral, tmp_path / "models")
    f = _fields(out)
    n_vocab = _sentencepiece_bpe().get_vocab_size()
    expected = {
        "general.architecture": "llama",
        "embedd.family": "mistral",
        "llama.block_count": LAYERS,
        "llama.context_length": MAX_POS,
        "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": FFN,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.attention.key_length": HEAD_DIM,
        "llama.attention.value_length": HEAD_DIM,
        "llama.rope.dimension_count": HEAD_DIM,
        "llama.vocab_size": n_vocab,
        "llama.pooling_type": int(gguf.PoolingType.LAST),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
        "sentence_transformers.max_seq_length": 256,
        "sentence_transformers.normalize": True,
    }
    assert {k: f.get(k) for k in expected} == expected
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    types = f["tokenizer.ggml.token_type"]
    assert types[:3] == [int(gguf.TokenType.UNKNOWN), 3, 3]
    assert set(types[3:259]) == {int(gguf.TokenType.BYTE)}
    scores = f["tokenizer.ggml.scores"]
    assert len(scores) == n_vocab and min(scores) < 0  # merged pieces rank by merge order
    info = read_model_info(out)
    assert (info.family, info.architecture, info.pooling) == ("mistral", "llama", "last")
    assert info.prompts["query"] == "Instruct: find\nQuery: "


def _llama_permute(weights: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """llama.cpp's converter's LlamaModel.permute, as written there."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def test_causal_lm_drops_its_head_and_permutes_q_and_k(tmp_path: Path) -> None:
    src = make_tiny_mistral(tmp_path / "causal", causal_lm=True)
    out = import_model(src, tmp_path / "models", out_type="f32")
    tensors = _gguf_tensors(out)
    assert "output.weight" not in tensors
    hf = _tensors(_sentencepiece_bpe().get_vocab_size())

    def stored(name: str, rows: int, cols: int) -> np.ndarray[Any, Any]:
        return np.asarray(tensors[name].data).reshape(rows, cols)

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    np.testing.assert_array_equal(
        stored("blk.1.attn_q.weight", q, HIDDEN),
        _llama_permute(hf["layers.1.self_attn.q_proj.weight"], HEADS),
    )
    np.testing.assert_array_equal(
        stored("blk.1.attn_k.weight", kv, HIDDEN),
        _llama_permute(hf["layers.1.self_attn.k_proj.weight"], KV_HEADS),
    )
    assert not np.array_equal(
        stored("blk.1.attn_k.weight", kv, HIDDEN), hf["layers.1.self_attn.k_proj.weight"]
    )
    np.testing.assert_array_equal(  # v is not rotated: as it is
        stored("blk.0.attn_v.weight", kv, HIDDEN), hf["layers.0.self_attn.v_proj.weight"]
    )


def test_llama_cpp_loads_it_and_tokenizes_like_hugging_face(
    tiny_mistral: Path, tmp_path: Path
) -> None:
    from llama_cpp import Llama

    out = import_model(tiny_mistral, tmp_path, out_type="f32")
    llm = Llama(str(out), embedding=True, verbose=False, n_ctx=256)
    tok = _sentencepiece_bpe()
    try:
        texts = [*CORPUS[:4], "Don't  split\n\nthese 1234 ok?", "naïve café 😀", " lead"]
        for text in texts:
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            expected = tok.encode(text).ids
            assert expected[0] == 1 and expected[-1] == 2  # <s> ... </s>
            assert ids == expected, text
        assert any(3 <= i < 259 for i in tok.encode("😀").ids)  # byte fallback was exercised
        vector = np.asarray(llm.embed("the red car"), dtype=np.float64)
        assert vector.shape == (HIDDEN,) and np.isfinite(vector).all()
    finally:
        llm.close()


def test_a_window_shorter_than_the_maximum_length_is_refused(tmp_path: Path) -> None:
    src = make_tiny_mistral(tmp_path / "windowed", sliding_window=128)
    with pytest.raises(ModelImportError) as refused:
        import_model(src, tmp_path / "models")
    message = refused.value.message
    assert "sliding_window 128 is shorter than the maximum input length 256" in message
    assert "Set max_seq_length to at most 128 in sentence_bert_config.json" in message
    _write_json(src / "sentence_bert_config.json", {"max_seq_length": 128})
    info = read_model_info(import_model(src, tmp_path / "models"))
    assert info.max_input_tokens == 128


def test_no_window_and_a_plain_directory(tmp_path: Path) -> None:
    src = make_tiny_mistral(tmp_path / "plain", sliding_window=None)
    for name in ("modules.json", "sentence_bert_config.json"):
        (src / name).unlink()
    notes: list[str] = []
    info = read_model_info(import_model(src, tmp_path / "models", report=notes.append))
    assert (info.pooling, info.normalizes, info.max_input_tokens) == ("last", True, MAX_POS)
    assert any("lasttoken pooling, normalized (e5-mistral" in note for note in notes)
