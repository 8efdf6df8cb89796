"""Convert a local Hugging Face / sentence-transformers BERT model directory to GGUF.

Uses only numpy, safetensors, tokenizers and the ``gguf`` package: no torch, no network.
The file matches what llama.cpp's own ``convert_hf_to_gguf.py`` writes for ``BertModel``
(same keys, tensor names, tensor types and "phantom space" vocabulary), so llama.cpp loads
it and produces the same vectors. On top of that it stores the whole ``tokenizer.json``
under ``tokenizer.huggingface.json`` and two keys the server reads:
``sentence_transformers.max_seq_length`` and ``sentence_transformers.normalize``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from embedd_server.core.catalog import MAX_SEQ_LENGTH_KEY, NORMALIZE_KEY
from embedd_server.core.errors import ModelImportError

SUPPORTED_TYPES = ("f32", "f16", "q8_0")


Array = npt.NDArray[Any]
Progress = Callable[[int, int], None]
QType = gguf.GGMLQuantizationType

_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_QTYPES = {"f32": QType.F32, "f16": QType.F16, "q8_0": QType.Q8_0}
# llama.cpp's converter keeps these 2-D tensors in f32 whatever the output type.
_ALWAYS_F32 = frozenset({"token_types.weight", "position_embd.weight"})
_POOLING_MODES = {
    "mean": gguf.PoolingType.MEAN,
    "cls": gguf.PoolingType.CLS,
    "lasttoken": gguf.PoolingType.LAST,
}
_BERT_ARCHITECTURES = frozenset({"BertModel", "BertForMaskedLM", "BertForPreTraining"})
_GELU = frozenset({"gelu", "gelu_new", "gelu_python", "gelu_pytorch_tanh"})
_EMBEDDINGS = {
    "embeddings.word_embeddings": "token_embd",
    "embeddings.token_type_embeddings": "token_types",
    "embeddings.position_embeddings": "position_embd",
    "embeddings.LayerNorm": "token_embd_norm",
}
_BLOCK = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_UNUSED_PREFIXES = ("pooler.", "cls.", "classifier.", "embeddings.position_ids")
_GENERIC_DIR_NAMES = frozenset({"model", "models", "hf", "huggingface", "weights", "snapshot"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class _BertConfig:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_ctx: int
    n_vocab: int
    n_token_types: int
    eps: float


def import_model(
    src: Path,
    models_dir: Path,
    *,
    out_type: str = "f16",
    name: str | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the BERT model directory ``src`` into ``models_dir/<name>.gguf``; return that path.

    ``out_type`` is one of :data:`SUPPORTED_TYPES`: 2-D weights take it, norms and biases
    stay f32 (as llama.cpp does). ``name`` defaults to :func:`default_name`. The file is
    written to a temporary file in ``models_dir`` and renamed into place, so a half-written
    model never appears. An existing target is replaced only when ``overwrite`` is true.
    ``progress(done, total)`` is called after each tensor. Every failure the user can fix
    raises :class:`ModelImportError` naming the file or tensor at fault.
    """
    if out_type not in SUPPORTED_TYPES:
        raise ModelImportError(
            f"unsupported output type {out_type!r}; use one of {', '.join(SUPPORTED_TYPES)}",
            param="type",
        )
    src = Path(src)
    if not src.is_dir():
        raise ModelImportError(f"{src} is not a directory; pass a Hugging Face model directory")
    target = Path(models_dir) / f"{_check_name(name) if name else default_name(src, out_type)}.gguf"
    if target.exists() and not overwrite:
        raise ModelImportError(
            f"{target} already exists; pass --overwrite to replace it or --name to choose another"
        )
    config = _read_config(src)
    writer = gguf.GGUFWriter(None, "bert")
    writer.add_name(target.stem)
    _add_hparams(writer, src, config, out_type)
    _add_tokenizer(writer, src, config.n_vocab)
    _add_tensors(writer, src, config, out_type, progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, lambda tmp: _write_file(writer, tmp))
    return target


def default_name(src: Path, out_type: str = "f16") -> str:
    """The default model name for ``src``: its directory name, lower-cased, plus a type suffix.

    f16 gets no suffix (``all-minilm-l6-v2``); other types get ``-q8_0`` / ``-f32``. For a
    Hugging Face cache snapshot the repository name is used; for a generic directory name
    such as ``model`` the model card's ``# title`` (or else the parent directory's name).
    """
    src = Path(src).resolve()
    if src.parent.name == "snapshots" and src.parent.parent.name.startswith("models--"):
        base = src.parent.parent.name.split("--")[-1]
    elif src.name.lower() in _GENERIC_DIR_NAMES:
        base = _readme_title(src / "README.md") or src.parent.name
    else:
        base = src.name
    stem = re.sub(r"[^a-z0-9._-]+", "-", base.lower()).strip("-.") or "model"
    return stem if out_type == "f16" else f"{stem}-{out_type}"


def _readme_title(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
        if match := re.fullmatch(r"#\s+([A-Za-z0-9][A-Za-z0-9._-]*)\s*", line):
            return match.group(1)
    return None


def _check_name(name: str) -> str:
    name = name.removesuffix(".gguf")
    if not _NAME_RE.fullmatch(name):
        raise ModelImportError(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-'", param="name"
        )
    return name


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ModelImportError(f"{path} is missing; {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelImportError(f"{path} cannot be read as JSON: {exc}") from exc


def _int(config: dict[str, Any], key: str, path: Path, default: int | None = None) -> int:
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelImportError(f"{path} has no valid integer {key!r}; is it a BERT config?")
    return value


def _read_config(src: Path) -> _BertConfig:
    path = src / "config.json"
    cfg = _read_json(path, "a Hugging Face model directory needs its config.json")
    if not isinstance(cfg, dict):
        raise ModelImportError(f"{path} is not a JSON object; is it a model config?")
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "bert" and not any(a in _BERT_ARCHITECTURES for a in archs):
        raise ModelImportError(
            f"{path} describes a {model_type or archs} model; only BERT encoders "
            "(model_type 'bert', e.g. all-MiniLM-L6-v2, bge-small-en-v1.5) can be imported"
        )
    if cfg.get("hidden_act", "gelu") not in _GELU:
        raise ModelImportError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise ModelImportError(f"{path}: only absolute position embeddings are supported")
    eps = cfg.get("layer_norm_eps", 1e-12)
    if not isinstance(eps, int | float):
        raise ModelImportError(f"{path}: layer_norm_eps must be a number")
    return _BertConfig(
        n_layer=_int(cfg, "num_hidden_layers", path),
        n_embd=_int(cfg, "hidden_size", path),
        n_ff=_int(cfg, "intermediate_size", path),
        n_head=_int(cfg, "num_attention_heads", path),
        n_ctx=_int(cfg, "max_position_embeddings", path),
        n_vocab=_int(cfg, "vocab_size", path),
        n_token_types=_int(cfg, "type_vocab_size", path, default=1),
        eps=float(eps),
    )


def _pooling_type(src: Path) -> gguf.PoolingType:
    pooling_dir = "1_Pooling"
    modules = src / "modules.json"
    if modules.is_file():
        for module in _read_json(modules, ""):
            if str(module.get("type", "")).endswith("Pooling"):
                pooling_dir = str(module.get("path", pooling_dir))
                break
    path = src / pooling_dir / "config.json"
    pooling = _read_json(path, "a sentence-transformers model needs it to know how to pool")
    for mode, flag in (("mean", "mean_tokens"), ("cls", "cls_token"), ("lasttoken", "lasttoken")):
        if pooling.get(f"pooling_mode_{flag}"):
            return _POOLING_MODES[mode]
    if (mode := pooling.get("pooling_mode")) in _POOLING_MODES:
        return _POOLING_MODES[mode]
    raise ModelImportError(f"{path}: unsupported pooling mode; llama.cpp supports mean, cls, last")


def _normalize(src: Path) -> bool:
    modules = src / "modules.json"
    if not modules.is_file():
        return False
    return any(
        m.get("type") == "sentence_transformers.models.Normalize" for m in _read_json(modules, "")
    )


def _max_seq_length(src: Path, n_ctx: int) -> int:
    path = src / "sentence_bert_config.json"
    if not path.is_file():
        return n_ctx
    value = _read_json(path, "").get("max_seq_length")
    return min(value, n_ctx) if isinstance(value, int) and value > 0 else n_ctx


def _load_tensors(src: Path) -> dict[str, Array]:
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index, "").get("weight_map") or {}
        files = [src / f for f in sorted(set(weight_map.values()))]
    elif (src / "pytorch_model.bin").is_file():
        raise ModelImportError(
            f"{src} has only pytorch_model.bin; safetensors weights are required. Convert them "
            "first, e.g. transformers' save_pretrained(..., safe_serialization=True)"
        )
    else:
        raise ModelImportError(f"{single} is missing; the model weights must be in safetensors")
    tensors: dict[str, Array] = {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except Exception as exc:
            raise ModelImportError(f"{file} cannot be read as safetensors: {exc}") from exc
        tensors.update((_hf_name(k), v) for k, v in loaded.items())
    return tensors


def _hf_name(name: str) -> str:
    name = name.removeprefix("bert.")
    if name.endswith(".gamma"):
        return name.removesuffix(".gamma") + ".weight"
    if name.endswith(".beta"):
        return name.removesuffix(".beta") + ".bias"
    return name


def _tensor_names(config: _BertConfig) -> list[tuple[str, str]]:
    """(HF name, GGUF name) of every tensor llama.cpp needs, in writing order."""
    names = [(f"{hf}.weight", f"{gg}.weight") for hf, gg in _EMBEDDINGS.items()]
    names.append(("embeddings.LayerNorm.bias", "token_embd_norm.bias"))
    for i in range(config.n_layer):
        for hf, gg in _BLOCK.items():
            for part in ("weight", "bias"):
                names.append((f"encoder.layer.{i}.{hf}.{part}", f"blk.{i}.{gg}.{part}"))
    return names


def _expected_shape(gguf_name: str, config: _BertConfig) -> tuple[int, ...]:
    """The HF (row-major) shape llama.cpp expects for a tensor, from config.json."""
    d, ff = config.n_embd, config.n_ff
    fixed = {
        "token_embd.weight": (config.n_vocab, d),
        "token_types.weight": (config.n_token_types, d),
        "position_embd.weight": (config.n_ctx, d),
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    kind, part = gguf_name.split(".")[-2:]
    if part == "bias" or kind.endswith("_norm"):
        return (ff,) if kind == "ffn_up" else (d,)
    return {"ffn_up": (ff, d), "ffn_down": (d, ff)}.get(kind, (d, d))


def _check_tensors(
    tensors: dict[str, Array], names: list[tuple[str, str]], src: Path, config: _BertConfig
) -> None:
    for hf, _ in names:
        if hf not in tensors:
            raise ModelImportError(
                f"tensor {hf!r} is missing from the weights in {src}; the files are incomplete "
                "or the model is not a plain BERT encoder"
            )
    for hf, gg in names:
        if tuple(tensors[hf].shape) != (want := _expected_shape(gg, config)):
            raise ModelImportError(
                f"tensor {hf!r} in {src} has shape {tuple(tensors[hf].shape)}, but config.json "
                f"implies {want}; the weights do not match the config"
            )
    known = {hf for hf, _ in names}
    extra = sorted(n for n in tensors if n not in known and not n.startswith(_UNUSED_PREFIXES))
    if extra:
        raise ModelImportError(
            f"unexpected tensors in {src} ({', '.join(extra[:3])}); "
            "only plain BERT encoders can be imported"
        )


def _encode(gguf_name: str, data: Array, out_type: str) -> tuple[Array, QType]:
    """The tensor's GGUF type and data, following llama.cpp's converter."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or gguf_name in _ALWAYS_F32:
        return data, QType.F32
    qtype = _QTYPES[out_type]
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:  # rows not a multiple of the block size
        return gguf.quants.quantize(data, QType.F16), QType.F16


def _converted(
    tensors: dict[str, Array],
    names: list[tuple[str, str]],
    out_type: str,
    progress: Progress | None,
) -> Iterator[tuple[str, Array, QType]]:
    for done, (hf, gg) in enumerate(names, start=1):
        data, qtype = _encode(gg, tensors[hf], out_type)
        yield gg, data, qtype
        if progress is not None:
            progress(done, len(names))


def _template_specials(post: Any) -> tuple[str | None, str | None]:
    """First and last special token of a BERT post-processor (TemplateProcessing et al.)."""
    if not isinstance(post, dict):
        return None, None
    if post.get("type") == "Sequence":
        for sub in post.get("processors", []):
            found = _template_specials(sub)
            if found != (None, None):
                return found
        return None, None
    if post.get("type") in ("BertProcessing", "RobertaProcessing"):
        return post["cls"][0], post["sep"][0]
    single = post.get("single") or [{}]
    first = single[0].get("SpecialToken", {}).get("id")
    last = single[-1].get("SpecialToken", {}).get("id")
    return first, last


def _token_content(tc: dict[str, Any], key: str) -> str | None:
    value = tc.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_ids(src: Path, tok_json: dict[str, Any], tok: Tokenizer) -> dict[str, int]:
    tc_path = src / "tokenizer_config.json"
    tc: dict[str, Any] = _read_json(tc_path, "") if tc_path.is_file() else {}
    first, last = _template_specials(tok_json.get("post_processor"))
    contents = {
        "cls": _token_content(tc, "cls_token") or first or "[CLS]",
        "sep": _token_content(tc, "sep_token") or last or "[SEP]",
        "unk": _token_content(tc, "unk_token") or tok_json["model"].get("unk_token") or "[UNK]",
        "pad": _token_content(tc, "pad_token") or "[PAD]",
        "mask": _token_content(tc, "mask_token") or "[MASK]",
    }
    ids: dict[str, int] = {}
    for kind, content in contents.items():
        token_id = tok.token_to_id(content)
        if token_id is None and kind in ("cls", "sep", "unk"):
            raise ModelImportError(f"{src / 'tokenizer.json'} has no {kind} token {content!r}")
        if token_id is not None:
            ids[kind] = token_id
    return ids


def _vocab(tok: Tokenizer, n_vocab: int, path: Path) -> tuple[list[str], list[int]]:
    """Tokens in llama.cpp's phantom-space form, and their types (as the converter does)."""
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= n_vocab:
        raise ModelImportError(f"{path} has token ids beyond config.json's vocab_size {n_vocab}")
    added = tok.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            token, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            special = added[i].special
            kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        else:
            kind = gguf.TokenType.NORMAL
        if kind != gguf.TokenType.CONTROL:
            token = token[2:] if token.startswith("##") else "\u2581" + token
        tokens.append(token)
        types.append(int(kind))
    return tokens, types


def _add_tokenizer(writer: gguf.GGUFWriter, src: Path, n_vocab: int) -> None:
    path = src / "tokenizer.json"
    tok_json = _read_json(path, "the model's Hugging Face tokenizer is needed")
    if tok_json.get("model", {}).get("type") != "WordPiece":
        raise ModelImportError(f"{path}: only WordPiece (BERT) tokenizers are supported")
    text = path.read_text(encoding="utf-8")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:
        raise ModelImportError(f"{path} cannot be loaded by tokenizers: {exc}") from exc
    tokens, types = _vocab(tok, n_vocab, path)
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("jina-v2-en")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    ids = _special_ids(src, tok_json, tok)
    writer.add_bos_token_id(ids["cls"])
    writer.add_eos_token_id(ids["sep"])
    writer.add_unk_token_id(ids["unk"])
    writer.add_sep_token_id(ids["sep"])
    if "pad" in ids:
        writer.add_pad_token_id(ids["pad"])
    if "mask" in ids:
        writer.add_mask_token_id(ids["mask"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(True)
    _add_normalizer(writer, tok_json.get("normalizer"))
    writer.add_string(gguf.Keys.Tokenizer.HF_JSON, text)


def _add_normalizer(writer: gguf.GGUFWriter, normalizer: Any) -> None:
    """BertNormalizer flags, under the keys llama.cpp reads (as newer converters write them)."""
    if not isinstance(normalizer, dict):
        return
    if normalizer.get("type") == "Sequence":
        for sub in normalizer.get("normalizers", []):
            _add_normalizer(writer, sub)
    elif normalizer.get("type") == "BertNormalizer":
        for flag in ("lowercase", "strip_accents"):
            if isinstance(value := normalizer.get(flag), bool):
                writer.add_bool(f"tokenizer.ggml.normalizer.{flag}", value)


def _add_hparams(writer: gguf.GGUFWriter, src: Path, config: _BertConfig, out_type: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(_FILE_TYPES[out_type])
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_ctx)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_ff)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.eps)
    writer.add_causal_attention(False)
    writer.add_pooling_type(_pooling_type(src))
    writer.add_token_type_count(config.n_token_types)
    writer.add_uint32(MAX_SEQ_LENGTH_KEY, _max_seq_length(src, config.n_ctx))
    writer.add_bool(NORMALIZE_KEY, _normalize(src))


def _add_tensors(
    writer: gguf.GGUFWriter,
    src: Path,
    config: _BertConfig,
    out_type: str,
    progress: Progress | None,
) -> None:
    tensors = _load_tensors(src)
    names = _tensor_names(config)
    _check_tensors(tensors, names, src, config)
    for gg, data, qtype in _converted(tensors, names, out_type, progress):
        writer.add_tensor(gg, data, raw_dtype=qtype)


def _write_file(writer: gguf.GGUFWriter, path: Path) -> None:
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Run ``write`` on a temporary file next to ``target``, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
