"""Convert a local Hugging Face / sentence-transformers model directory to GGUF.

Uses only numpy, safetensors, tokenizers and the ``gguf`` package: no torch, no network.
Each family (:mod:`embedd_server.convert.families`: BERT, XLM-RoBERTa, Qwen3;
:mod:`~embedd_server.convert.mistral`; SPLADE, :mod:`~embedd_server.convert.splade`; Gemma3
encoders, :mod:`~embedd_server.convert.gemma3`) is written as
llama.cpp's own ``convert_hf_to_gguf.py`` writes it (same keys, tensor names, tensor types and
vocabulary form), so llama.cpp loads it and computes the same vectors. On top of that the
file carries the whole ``tokenizer.json`` (``tokenizer.huggingface.json``) and what
sentence-transformers reads from the directory (:mod:`embedd_server.convert.st_settings`),
under ``sentence_transformers.*``: max_seq_length, normalize, do_lower_case, include_prompt,
prompts (a JSON object, name to text) and default_prompt_name. The pooling goes into llama.cpp's
own ``<arch>.pooling_type``.

sentence-transformers ``Dense`` modules after the pooling (:mod:`embedd_server.convert.dense`)
go in as the architecture's own tensors where llama.cpp applies them itself (EmbeddingGemma's
``dense_2`` / ``dense_3``), else under embedd's ``embedd.dense.*`` keys
(:mod:`embedd_server.model.dense`), which both engines apply.

A model with a classifier head (``BertForSequenceClassification``, ``XLMRobertaFor...``,
``RobertaFor...``, ``CamembertFor...``, ``DistilBertForSequenceClassification``) is written as
llama.cpp loads a reranker: pooling type ``rank`` (4), its label names in
``bert.classifier.output_labels``, its head in ``cls.*`` / ``cls.output.*``
(:mod:`embedd_server.convert.families`), the activation between them in
``embedd.head_activation``, no Normalize and no prompts. One label is a cross-encoder
(reranker); more labels a sequence classifier, which the file says with ``embedd.task``
``classify`` and ``embedd.problem_type`` (how its logits become probabilities). Every file
names its family under ``embedd.family`` (llama.cpp's ``bert`` holds several).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import gguf
import numpy as np

from embedd_server.compute.engine import FloatMatrix
from embedd_server.convert.calibration import calibration_vectors
from embedd_server.convert.dense import read_dense_modules
from embedd_server.convert.families import Family, NativeDense
from embedd_server.convert.family_table import select_family
from embedd_server.convert.files import Array, load_safetensors
from embedd_server.convert.prompts import curated_prompts, original_names
from embedd_server.convert.splade import read_splade_modules, splade_family
from embedd_server.convert.st_settings import (
    RANK,
    SPLADE,
    Modules,
    Settings,
    read_cross_encoder_settings,
    read_modules,
    read_settings,
    read_sparse_settings,
)
from embedd_server.core.quantization import (
    CALIBRATION_SET_KEY,
    CALIBRATION_SET_SHA256,
    CALIBRATION_VECTORS_KEY,
)
from embedd_server.errors import EmbeddError, ModelImportError
from embedd_server.model.catalog import (
    CLASSIFY,
    DEFAULT_PROMPT_NAME_KEY,
    DO_LOWER_CASE_KEY,
    EMBED,
    FAMILY_KEY,
    HEAD_ACTIVATION_KEY,
    HF_TOKENIZER_KEY,
    INCLUDE_PROMPT_KEY,
    MAX_SEQ_LENGTH_KEY,
    NORMALIZE_KEY,
    PAIR_TOKEN_TYPES_KEY,
    PROBLEM_TYPE_KEY,
    PROMPTS_KEY,
    RERANK,
    SPARSE,
    TASK_KEY,
)
from embedd_server.model.dense import DenseLayer, dense_metadata

SUPPORTED_TYPES = ("f32", "f16", "q8_0")

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
Report = Callable[[str], None]
QType = gguf.GGMLQuantizationType

_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_QTYPES = {"f32": QType.F32, "f16": QType.F16, "q8_0": QType.Q8_0}
_POOLING_TYPES = {
    "mean": gguf.PoolingType.MEAN,
    "cls": gguf.PoolingType.CLS,
    "lasttoken": gguf.PoolingType.LAST,
    "rank": gguf.PoolingType.RANK,
    # llama.cpp has no SPLADE pooling: its own pooling is none (ONNX Runtime serves these).
    SPLADE: gguf.PoolingType.NONE,
}
# What a model with a classifier head is called, by its task.
_HEAD_KINDS = {RERANK: "cross-encoder (reranker)", CLASSIFY: "sequence classifier"}
_GENERIC_DIR_NAMES = frozenset({"model", "models", "hf", "huggingface", "weights", "snapshot"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def import_model(
    src: Path,
    models_dir: Path,
    *,
    out_type: str | None = None,
    name: str | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    prompts: Mapping[str, str] | None = None,
    report: Report | None = None,
) -> Path:
    """Convert the model directory ``src`` into ``models_dir/<name>.gguf``; return that path.

    ``out_type`` is one of :data:`SUPPORTED_TYPES`: 2-D weights take it, norms and biases
    stay f32 (as llama.cpp does); None picks :func:`default_type` for the model's task.
    ``name`` defaults to :func:`default_name`. ``prompts``
    add to (or replace) the directory's own prompts, or where it has none, those of the
    curated table (:mod:`embedd_server.convert.prompts`) for the model's original name. The
    file is written to a temporary file in ``models_dir`` and renamed into place, so a
    half-written model never appears. An
    existing target is replaced only when ``overwrite`` is true. ``progress(done, total)`` is
    called after each tensor; ``report(text)`` (default: a warning log line) with each
    default the importer applied, e.g. the family's pooling for a directory without
    modules.json. Every failure the user can fix raises :class:`ModelImportError` naming the
    file, key or tensor at fault and what is supported.
    """
    if out_type is not None and out_type not in SUPPORTED_TYPES:
        raise ModelImportError(
            f"unsupported output type {out_type!r}; use one of {', '.join(SUPPORTED_TYPES)}",
            param="type",
        )
    src = Path(src)
    if not src.is_dir():
        raise ModelImportError(f"{src} is not a directory; pass a Hugging Face model directory")
    name = _check_name(name) if name else None
    splade = read_splade_modules(src)
    modules = None if splade else read_modules(src)
    model_dir = modules.transformer_dir if modules else src
    if splade:
        model_dir = splade.transformer_dir
    family = splade_family(splade) if splade else select_family(model_dir)
    settings, stored_prompts, prompt_notes = _read_settings(
        src, model_dir, modules, family, prompts or {}, sparse=splade is not None
    )
    usual = default_type(SPARSE if splade else family.task)
    out_type = out_type or usual
    if splade:
        prompt_notes.extend(_sparse_type_notes(src, out_type))
    target = Path(models_dir) / f"{name or default_name(src, out_type, usual)}.gguf"
    if target.exists() and not overwrite:
        raise ModelImportError(
            f"{target} already exists; pass --overwrite to replace it or --name to choose another"
        )
    family.check_max_seq_length(settings.max_seq_length)
    tokenizer = family.load_tokenizer(model_dir)
    tensors, dense, native_dense = _weights(family, model_dir, modules)
    converted = list(_converted(family, tensors, out_type, progress))
    vocab_notes: list[str] = []

    def new_writer(calibration: FloatMatrix | None) -> gguf.GGUFWriter:
        writer = gguf.GGUFWriter(None, family.arch)
        writer.add_name(target.stem)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(_FILE_TYPES[out_type])
        family.add_hparams(writer)
        writer.add_pooling_type(_POOLING_TYPES[settings.pooling])
        _add_family_and_task(writer, family)
        vocab_notes[:] = family.add_vocab(writer, tokenizer, model_dir)
        writer.add_string(HF_TOKENIZER_KEY, tokenizer.text)
        _add_settings(writer, settings, stored_prompts)
        _add_dense(writer, dense, native_dense)
        if calibration is not None:
            writer.add_string(CALIBRATION_SET_KEY, CALIBRATION_SET_SHA256)
            writer.add_array(CALIBRATION_VECTORS_KEY, calibration.reshape(-1).tolist())
        for gg, data, qtype in converted:
            writer.add_tensor(gg, data, raw_dtype=qtype)
        return writer

    calibration: FloatMatrix | None = None
    calibration_notes: list[str] = []
    # A cross-encoder gives scores and a sparse encoder sparse weights: no vectors to quantize.
    if not family.reranker and splade is None:
        calibration, calibration_notes = _calibrate(target.stem, lambda path: new_writer(None))
    target.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(target, lambda tmp: _write_file(new_writer(calibration), tmp))
    for note in [*settings.notes, *vocab_notes, *prompt_notes, *calibration_notes]:
        (report or log.warning)(note)
    return target


def _add_family_and_task(writer: gguf.GGUFWriter, family: Family) -> None:
    """The family's name; a model with a classifier head: its labels (llama.cpp's n_cls_out
    is this array's length, 1 without it) and head activation; a classifier: its task and
    problem_type."""
    writer.add_string(FAMILY_KEY, family.name)
    if family.labels:
        writer.add_classifier_output_labels(list(family.labels))
        writer.add_string(HEAD_ACTIVATION_KEY, family.head_activation)
    if family.task == CLASSIFY:
        writer.add_string(TASK_KEY, CLASSIFY)
        writer.add_string(PROBLEM_TYPE_KEY, family.problem_type)


def _read_settings(
    src: Path,
    model_dir: Path,
    modules: Modules | None,
    family: Family,
    prompts: Mapping[str, str],
    *,
    sparse: bool,
) -> tuple[Settings, dict[str, str], list[str]]:
    """What sentence-transformers reads from ``src`` for this family's model (a sparse
    encoder, a cross-encoder or a bi-encoder), the prompts to store and notes about them."""
    if sparse:
        settings = read_sparse_settings(
            src,
            model_dir,
            max_position_embeddings=family.max_position_embeddings,
            usable_positions=family.usable_positions,
        )
        return settings, *_prompts(src, model_dir, settings, prompts)
    if family.reranker:
        if prompts:
            raise ModelImportError(
                f"{src} is a {_HEAD_KINDS[family.task]}: it scores texts and pairs as they "
                "are, without prompts; import it without --prompt",
                param="prompt",
            )
        settings = read_cross_encoder_settings(
            model_dir,
            family=family.name,
            labels=family.labels,
            problem_type=family.problem_type if family.task == CLASSIFY else None,
            max_position_embeddings=family.max_position_embeddings,
            usable_positions=family.usable_positions,
            token_types=getattr(family, "n_token_types", 1),
        )
        return settings, {}, []
    settings = read_settings(
        src,
        modules,
        family=family.name,
        default=family.default,
        hidden_size=family.n_embd,
        max_position_embeddings=family.max_position_embeddings,
        usable_positions=family.usable_positions,
    )
    return settings, *_prompts(src, model_dir, settings, prompts)


def _calibrate(
    name: str, draft: Callable[[Path], gguf.GGUFWriter]
) -> tuple[FloatMatrix | None, list[str]]:
    """The model's calibration vectors for int8/uint8 (core.quantization), computed on a draft
    of the file written to a temporary directory. A model the engines cannot run yet is still
    imported, without them (the server then says why when it loads it)."""
    with tempfile.TemporaryDirectory(prefix="embedd-import-") as scratch:
        path = Path(scratch) / f"{name}.gguf"
        _write_file(draft(path), path)
        try:
            return calibration_vectors(path), []
        except EmbeddError as exc:
            return None, [f"{name}: no int8 calibration stored ({exc.message})"]


def _prompts(
    src: Path, model_dir: Path, settings: Settings, given: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """The prompts to store: the directory's own, else the curated table's for the model's
    original name; the ones ``given`` replace or add to either. Notes say what was applied."""
    notes: list[str] = []
    prompts = dict(settings.prompts)
    if not prompts and (found := curated_prompts(original_names(src, model_dir))):
        name, row = found
        prompts = dict(row.prompts)
        notes.append(
            f"{src.name}: no prompts in config_sentence_transformers.json; applied the "
            f"prompts documented for {name} ({row.source}): {_show(prompts)}; "
            "replace them with --prompt NAME=TEXT"
        )
    if given:
        prompts.update(given)
        notes.append(f"prompts given on the command line: {_show(dict(given))}")
    return prompts, notes


def _show(prompts: Mapping[str, str]) -> str:
    return ", ".join(f"{name}={text!r}" for name, text in prompts.items())


def _add_settings(writer: gguf.GGUFWriter, settings: Settings, prompts: Mapping[str, str]) -> None:
    """What sentence-transformers reads from the directory (and the prompts), for the server."""
    writer.add_uint32(MAX_SEQ_LENGTH_KEY, settings.max_seq_length)
    writer.add_bool(NORMALIZE_KEY, settings.normalize)
    writer.add_bool(DO_LOWER_CASE_KEY, settings.do_lower_case)
    writer.add_bool(INCLUDE_PROMPT_KEY, settings.include_prompt)
    writer.add_string(PROMPTS_KEY, json.dumps(prompts, ensure_ascii=False))
    if settings.default_prompt_name is not None:
        writer.add_string(DEFAULT_PROMPT_NAME_KEY, settings.default_prompt_name)
    if settings.pooling == RANK:
        writer.add_bool(PAIR_TOKEN_TYPES_KEY, settings.pair_token_types)


def _weights(
    family: Family, model_dir: Path, modules: Modules | None
) -> tuple[list[tuple[str, Array]], tuple[DenseLayer, ...], NativeDense | None]:
    """The tensors to write, the Dense modules after pooling, and those modules in the
    architecture's own layout where llama.cpp applies them itself (their tensors are then
    among the first)."""
    tensors = family.tensors(load_safetensors(model_dir), model_dir)
    dense = read_dense_modules(modules.dense_dirs, family.n_embd) if modules else ()
    native = family.native_dense(dense) if dense else None
    if native is not None:
        tensors += native.tensors
    return tensors, dense, native


def _add_dense(
    writer: gguf.GGUFWriter, dense: tuple[DenseLayer, ...], native: NativeDense | None
) -> None:
    """The Dense modules' keys: the architecture's own (llama.cpp applies its tensors), else
    embedd's, which carry the weights too (model/dense.py)."""
    if native is not None:
        for key, number in native.keys.items():
            writer.add_uint32(key, number)
        return
    for key, value in dense_metadata(dense).items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, value)


def _sparse_type_notes(src: Path, out_type: str) -> list[str]:
    """A sparse encoder's weight type: refused where ONNX Runtime can't serve it, a note where
    f16 rounding moves its smallest weights across zero."""
    if out_type not in ("f32", "f16"):
        raise ModelImportError(
            f"{src} is a sparse (SPLADE) encoder, which ONNX Runtime serves from f32 or f16 "
            f"weights only, not {out_type}; import it with --type f32 (SparseEncoder's exact "
            "non-zero entries) or --type f16",
            param="type",
        )
    if out_type == "f16":
        return [
            f"{src.name}: a sparse encoder in {out_type}: the weights' rounding moves its "
            "weights by up to ~1e-3, so a few that small become 0 or not (measured on a tiny "
            "SPLADE: 0.1% of the non-zeros); import it with --type f32 for exactly "
            "SparseEncoder's non-zero entries"
        ]
    return []


def default_type(task: str) -> str:
    """The weight type a model is imported with when none is asked for: f16 for an embedding
    model (its vectors stay at cosine >= 0.9999 to the reference, half the size of f32), f32
    for a model whose outputs are scores, class probabilities or a sparse vector's non-zero
    entries: the rounding of its weights to f16 alone moved the shared models' probabilities
    by 1.5e-3, a ModernBERT reranker's scores by 4.8e-3 and 42 of a SPLADE model's 49,686
    non-zero entries (docs/design.md, "Families"), past the bars those outputs are held to."""
    return "f16" if task == EMBED else "f32"


def default_name(src: Path, out_type: str = "f16", usual: str = "f16") -> str:
    """The default model name for ``src``: its directory name, lower-cased, plus a type suffix.

    The model's usual type (:func:`default_type`: f16 for an embedding model) gets no suffix
    (``all-minilm-l6-v2``); other types get ``-q8_0`` / ``-f32`` / ``-f16``. For a
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
    return stem if out_type == usual else f"{stem}-{out_type}"


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


def _encode(family: Family, gguf_name: str, data: Array, out_type: str) -> tuple[Array, QType]:
    """The tensor's GGUF type and data, following llama.cpp's converter."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or gguf_name in family.always_f32:
        return data, QType.F32
    qtype = _QTYPES[out_type]
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:  # rows not a multiple of the block size
        return gguf.quants.quantize(data, QType.F16), QType.F16


def _converted(
    family: Family,
    tensors: list[tuple[str, Array]],
    out_type: str,
    progress: Progress | None,
) -> Iterator[tuple[str, Array, QType]]:
    for done, (gg, data) in enumerate(tensors, start=1):
        encoded, qtype = _encode(family, gg, data, out_type)
        yield gg, encoded, qtype
        if progress is not None:
            progress(done, len(tensors))


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
