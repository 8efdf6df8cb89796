"""`embedd import` of DistilBERT, RoBERTa and CamemBERT (and their sequence classifiers) into
llama.cpp's ``bert`` layout, as llama.cpp's converter writes ``DistilBertModel`` and
``RobertaModel``: keys, tensor names and values, the family stored in the file, the tokenizer
llama.cpp rebuilds, and the refusals. The shared small models of ../shared/models are the
sources (copied and changed in tmp_path for the variants); their vectors and class
probabilities are held to the reference in tests/integration (test_families.py,
test_classifiers.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from embedd_server.convert.hf_to_gguf import import_model
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import read_model_info

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
Tensors = dict[str, np.ndarray[Any, Any]]


def _copy(model: str, destination: Path) -> Path:
    return Path(
        shutil.copytree(MODELS / model, destination, ignore=shutil.ignore_patterns("reference"))
    )


def _config(src: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((src / "config.json").read_text(encoding="utf-8"))
    return config


def _write_config(src: Path, config: dict[str, Any]) -> None:
    (src / "config.json").write_text(json.dumps(config), encoding="utf-8")


def _fields(path: Path) -> dict[str, Any]:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def _gguf_tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _values(tensor: gguf.ReaderTensor) -> np.ndarray[Any, Any]:
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    return np.asarray(tensor.data, dtype=np.float32).reshape(shape)


def _quiet(note: str) -> None:
    del note


# --- DistilBERT -------------------------------------------------------------------------------

DISTILBERT_LAYER = {
    "attention.q_lin": "attn_q",
    "attention.k_lin": "attn_k",
    "attention.v_lin": "attn_v",
    "attention.out_lin": "attn_output",
    "sa_layer_norm": "attn_output_norm",
    "ffn.lin1": "ffn_up",
    "ffn.lin2": "ffn_down",
    "output_layer_norm": "layer_output_norm",
}


def test_distilbert_is_written_in_llama_cpp_bert_layout(tmp_path: Path) -> None:
    src = MODELS / "tiny-distilbert"
    out = import_model(src, tmp_path, out_type="f32", report=_quiet)
    f = _fields(out)
    config = _config(src)
    expected = {
        "general.architecture": "bert",
        "embedd.family": "distilbert",
        "bert.block_count": config["n_layers"],
        "bert.embedding_length": config["dim"],
        "bert.feed_forward_length": config["hidden_dim"],
        "bert.attention.head_count": config["n_heads"],
        "bert.context_length": config["max_position_embeddings"],
        "bert.attention.causal": False,
        "bert.pooling_type": int(gguf.PoolingType.MEAN),
        "tokenizer.ggml.model": "bert",
        "tokenizer.ggml.token_type_count": 1,  # llama.cpp needs one; the model adds none
        "sentence_transformers.max_seq_length": 48,
        "sentence_transformers.normalize": False,
    }
    assert {key: f.get(key) for key in expected} == expected
    assert f["bert.attention.layer_norm_epsilon"] == pytest.approx(1e-12)
    assert "embedd.task" not in f and "embedd.head_activation" not in f
    tensors = _gguf_tensors(out)
    assert "token_types.weight" not in tensors  # optional in llama.cpp's BERT graph
    hf = load_file(str(src / "model.safetensors"))
    gg = {
        "token_embd.weight": "embeddings.word_embeddings.weight",
        "position_embd.weight": "embeddings.position_embeddings.weight",
        "token_embd_norm.weight": "embeddings.LayerNorm.weight",
        "token_embd_norm.bias": "embeddings.LayerNorm.bias",
    }
    for i in range(config["n_layers"]):
        for module, name in DISTILBERT_LAYER.items():
            for part in ("weight", "bias"):
                gg[f"blk.{i}.{name}.{part}"] = f"transformer.layer.{i}.{module}.{part}"
    assert set(tensors) == set(gg)
    for name, hf_name in gg.items():
        np.testing.assert_array_equal(_values(tensors[name]), hf[hf_name], err_msg=name)
    info = read_model_info(out)
    assert (info.family, info.pooling, info.normalizes, info.max_input_tokens) == (
        "distilbert",
        "mean",
        False,
        48,
    )
    assert info.task == "embed"


def _with_prefix(src: Path, prefix: str, extra: dict[str, tuple[int, ...]]) -> Tensors:
    """``src``'s weights under ``prefix``, plus random tensors of ``extra`` (a head)."""
    rng = np.random.default_rng(7)
    tensors = {prefix + k: v for k, v in load_file(str(src / "model.safetensors")).items()}
    for name, shape in extra.items():
        tensors[name] = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    save_file(tensors, str(src / "model.safetensors"))
    return tensors


def test_distilbert_for_masked_lm_drops_its_head(tmp_path: Path) -> None:
    plain = import_model(MODELS / "tiny-distilbert", tmp_path / "a", out_type="f32", report=_quiet)
    src = _copy("tiny-distilbert", tmp_path / "mlm")
    d, vocab = 64, _config(src)["vocab_size"]
    _with_prefix(
        src,
        "distilbert.",
        {
            "vocab_transform.weight": (d, d),
            "vocab_transform.bias": (d,),
            "vocab_layer_norm.weight": (d,),
            "vocab_layer_norm.bias": (d,),
            "vocab_projector.bias": (vocab,),
        },
    )
    _write_config(src, {**_config(src), "architectures": ["DistilBertForMaskedLM"]})
    out = import_model(src, tmp_path / "b", out_type="f32", report=_quiet)
    ours, theirs = _gguf_tensors(out), _gguf_tensors(plain)
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        np.testing.assert_array_equal(_values(tensor), _values(theirs[name]), err_msg=name)


def make_distilbert_classifier(destination: Path, labels: int = 3) -> Path:
    """tiny-distilbert as a ``DistilBertForSequenceClassification`` (random head, ``labels``
    labels), laid out as transformers saves it: no sentence-transformers files."""
    src = _copy("tiny-distilbert", destination)
    d = _config(src)["dim"]
    _with_prefix(
        src,
        "distilbert.",
        {
            "pre_classifier.weight": (d, d),
            "pre_classifier.bias": (d,),
            "classifier.weight": (labels, d),
            "classifier.bias": (labels,),
        },
    )
    names = ["sadness", "joy", "love", "anger", "fear", "surprise"][:labels]
    _write_config(
        src,
        {
            **_config(src),
            "architectures": ["DistilBertForSequenceClassification"],
            "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)},
        },
    )
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        (src / name).unlink()
    shutil.rmtree(src / "1_Pooling")
    return src


def test_distilbert_classifier_is_imported_with_its_relu_head(tmp_path: Path) -> None:
    src = make_distilbert_classifier(tmp_path / "emotion")
    notes: list[str] = []
    out = import_model(src, tmp_path / "models", out_type="f16", report=notes.append)
    f = _fields(out)
    assert f["bert.pooling_type"] == int(gguf.PoolingType.RANK)
    assert f["bert.classifier.output_labels"] == ["sadness", "joy", "love"]
    assert (f["embedd.task"], f["embedd.problem_type"], f["embedd.head_activation"]) == (
        "classify",
        "single_label_classification",
        "relu",
    )
    tensors = _gguf_tensors(out)
    hf = load_file(str(src / "model.safetensors"))
    for gg, name in {
        "cls.weight": "pre_classifier.weight",
        "cls.bias": "pre_classifier.bias",
        "cls.output.weight": "classifier.weight",
        "cls.output.bias": "classifier.bias",
    }.items():
        assert tensors[gg].tensor_type == gguf.GGMLQuantizationType.F32, gg  # the head stays f32
        np.testing.assert_array_equal(_values(tensors[gg]), hf[name])
    info = read_model_info(out)
    assert (info.family, info.task, info.labels, info.head_activation) == (
        "distilbert",
        "classify",
        3,
        "relu",
    )
    assert info.label_names == ("sadness", "joy", "love")
    assert info.max_input_tokens == 48  # tokenizer_config's model_max_length
    assert "a sequence classifier of the distilbert family with 3 labels" in notes[0]


def test_a_one_label_distilbert_is_a_reranker(tmp_path: Path) -> None:
    src = make_distilbert_classifier(tmp_path / "msmarco", labels=1)
    info = read_model_info(import_model(src, tmp_path / "models", report=_quiet))
    assert (info.task, info.labels, info.problem_type, info.head_activation) == (
        "rerank",
        1,
        "",
        "relu",
    )


def _distilbert_relu(src: Path) -> None:
    _write_config(src, {**_config(src), "activation": "relu"})


def _distilbert_with_xlmr_tokenizer(src: Path) -> None:
    shutil.copy(MODELS / "tiny-xlmr" / "tokenizer.json", src / "tokenizer.json")


def _roberta_with_extra_tensor(src: Path) -> None:
    tensors = load_file(str(src / "model.safetensors"))
    tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros(4, np.float32)
    save_file(tensors, str(src / "model.safetensors"))


def _roberta_missing_offset(src: Path) -> None:
    _write_config(src, {**_config(src), "max_position_embeddings": 2})


def _roberta_classifier_problem(src: Path) -> None:
    _write_config(src, {**_config(src), "problem_type": "ranking"})


REFUSALS = {
    "distilbert activation": (
        "tiny-distilbert",
        _distilbert_relu,
        "config.json: activation 'relu' is not supported (gelu)",
    ),
    "distilbert tokenizer": (
        "tiny-distilbert",
        _distilbert_with_xlmr_tokenizer,
        "a distilbert model's tokenizer must be WordPiece, this one is Unigram",
    ),
    "roberta extra tensor": (
        "tiny-roberta",
        _roberta_with_extra_tensor,
        "unexpected tensors in",
    ),
    "roberta positions": (
        "tiny-roberta",
        _roberta_missing_offset,
        "max_position_embeddings 2 leaves no positions after padding_idx + 1 = 2",
    ),
    "classifier problem type": (
        "tiny-roberta-classifier",
        _roberta_classifier_problem,
        "problem_type 'ranking' is not one of single_label_classification, "
        "multi_label_classification, regression",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_name_the_file_and_what_is_supported(tmp_path: Path, case: str) -> None:
    model, breaker, expected = REFUSALS[case]
    src = _copy(model, tmp_path / model)
    breaker(src)
    with pytest.raises(ModelImportError) as refused:
        import_model(src, tmp_path / "models")
    assert expected in refused.value.message


# --- RoBERTa and CamemBERT --------------------------------------------------------------------


def test_roberta_is_written_as_llama_cpp_writes_roberta_model(tmp_path: Path) -> None:
    src = MODELS / "tiny-roberta"
    out = import_model(src, tmp_path, out_type="f32", report=_quiet)
    f = _fields(out)
    config = _config(src)
    offset = config["pad_token_id"] + 1
    expected = {
        "general.architecture": "bert",
        "embedd.family": "roberta",
        "bert.context_length": config["max_position_embeddings"] - offset,
        "bert.pooling_type": int(gguf.PoolingType.MEAN),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.token_type_count": 1,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": True,
        "sentence_transformers.max_seq_length": 64,
        "sentence_transformers.normalize": True,
    }
    assert {key: f.get(key) for key in expected} == expected
    tensors = _gguf_tensors(out)
    hf = load_file(str(src / "model.safetensors"))
    positions = hf["embeddings.position_embeddings.weight"]
    np.testing.assert_array_equal(_values(tensors["position_embd.weight"]), positions[offset:])
    np.testing.assert_array_equal(
        _values(tensors["token_types.weight"]), hf["embeddings.token_type_embeddings.weight"]
    )
    info = read_model_info(out)
    assert (info.family, info.pooling, info.normalizes, info.max_input_tokens) == (
        "roberta",
        "mean",
        True,
        64,
    )


def test_roberta_for_masked_lm_drops_its_head(tmp_path: Path) -> None:
    plain = import_model(MODELS / "tiny-roberta", tmp_path / "a", out_type="f32", report=_quiet)
    src = _copy("tiny-roberta", tmp_path / "mlm")
    d, vocab = 64, _config(src)["vocab_size"]
    _with_prefix(
        src,
        "roberta.",
        {
            "lm_head.dense.weight": (d, d),
            "lm_head.dense.bias": (d,),
            "lm_head.layer_norm.weight": (d,),
            "lm_head.layer_norm.bias": (d,),
            "lm_head.bias": (vocab,),
        },
    )
    _write_config(src, {**_config(src), "architectures": ["RobertaForMaskedLM"]})
    out = import_model(src, tmp_path / "b", out_type="f32", report=_quiet)
    ours, theirs = _gguf_tensors(out), _gguf_tensors(plain)
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        np.testing.assert_array_equal(_values(tensor), _values(theirs[name]), err_msg=name)


def make_camembert(destination: Path) -> Path:
    """tiny-xlmr relabelled ``CamembertModel``: CamemBERT is RoBERTa's layout with a
    SentencePiece (Unigram) tokenizer, so its vectors are tiny-xlmr's reference."""
    src = _copy("tiny-xlmr", destination)
    _write_config(
        src, {**_config(src), "architectures": ["CamembertModel"], "model_type": "camembert"}
    )
    return src


def test_camembert_keeps_its_family_and_sentencepiece_vocabulary(tmp_path: Path) -> None:
    src = make_camembert(tmp_path / "tiny-camembert")
    out = import_model(src, tmp_path / "models", out_type="f32", report=_quiet)
    f = _fields(out)
    assert (f["embedd.family"], f["tokenizer.ggml.model"], f["bert.context_length"]) == (
        "camembert",
        "t5",
        64,
    )
    info = read_model_info(out)
    assert info.family == "camembert"  # the tokenizer alone would say xlm-roberta
    xlmr = import_model(MODELS / "tiny-xlmr", tmp_path / "xlmr", out_type="f32", report=_quiet)
    ours, theirs = _gguf_tensors(out), _gguf_tensors(xlmr)
    for name, tensor in ours.items():
        np.testing.assert_array_equal(_values(tensor), _values(theirs[name]), err_msg=name)


def test_model_type_alone_selects_the_family(tmp_path: Path) -> None:
    src = _copy("tiny-roberta", tmp_path / "roberta")
    _write_config(src, {**_config(src), "architectures": []})
    assert read_model_info(import_model(src, tmp_path / "a", report=_quiet)).family == "roberta"
    src = _copy("tiny-distilbert", tmp_path / "distil")
    _write_config(src, {**_config(src), "architectures": None})
    assert read_model_info(import_model(src, tmp_path / "b", report=_quiet)).family == "distilbert"


def test_roberta_classifier_is_a_classifier_with_its_labels(tmp_path: Path) -> None:
    src = MODELS / "tiny-roberta-classifier"
    notes: list[str] = []
    out = import_model(src, tmp_path, out_type="f32", report=notes.append)
    f = _fields(out)
    assert f["bert.classifier.output_labels"] == ["negative", "neutral", "positive"]
    assert (f["embedd.task"], f["embedd.problem_type"], f["embedd.head_activation"]) == (
        "classify",
        "single_label_classification",
        "tanh",
    )
    assert "tokenizer.ggml.model" in f and f["tokenizer.ggml.model"] == "gpt2"
    hf = load_file(str(src / "model.safetensors"))
    tensors = _gguf_tensors(out)
    np.testing.assert_array_equal(_values(tensors["cls.weight"]), hf["classifier.dense.weight"])
    np.testing.assert_array_equal(
        _values(tensors["cls.output.weight"]), hf["classifier.out_proj.weight"]
    )
    info = read_model_info(out)
    assert (info.family, info.task, info.pooling, info.labels, info.dimensions) == (
        "roberta",
        "classify",
        "rank",
        3,
        3,
    )
    assert info.label_names == ("negative", "neutral", "positive")
    assert info.problem_type == "single_label_classification"
    assert info.max_input_tokens == 128  # 130 positions less padding_idx + 1
    assert info.pair_token_types is False  # one token type
    assert "a sequence classifier of the roberta family with 3 labels" in notes[0]


def test_classifier_takes_no_prompts(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match=r"sequence classifier: .* without --prompt"):
        import_model(MODELS / "tiny-roberta-classifier", tmp_path, prompts={"q": "query: "})


def test_llama_cpp_loads_roberta_and_tokenizes_like_hugging_face(tmp_path: Path) -> None:
    from llama_cpp import Llama

    src = MODELS / "tiny-roberta"
    out = import_model(src, tmp_path, out_type="f16", report=_quiet)
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    texts = json.loads((src / "reference" / "texts.json").read_text(encoding="utf-8"))
    llm = Llama(str(out), embedding=True, verbose=False, n_ctx=64)
    try:
        for item in texts:
            text = item["text"]
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            assert ids == tokenizer.encode(text).ids, text
    finally:
        llm.close()
