"""What a sentence-transformers directory says about pooling, length and prompts.

Read as sentence-transformers reads it, in both layouts seen on the Hub:

- classic (2.x-3.x): ``modules.json`` with ``sentence_transformers.models.*`` module types,
  ``max_seq_length`` and ``do_lower_case`` in ``sentence_bert_config.json``, one
  ``pooling_mode_*`` flag set in ``1_Pooling/config.json``;
- sentence-transformers >= 5: module types such as
  ``sentence_transformers.sentence_transformer.modules.pooling.Pooling``, ``"pooling_mode":
  "mean"``, and no ``max_seq_length`` anywhere: it is then ``min(max_position_embeddings,
  tokenizer_config.json's model_max_length)``, as sentence-transformers computes it.

A plain transformers directory (no ``modules.json``) gets its family's default, which the
importer states.

A cross-encoder (reranker) is a plain transformers directory by nature: sentence-transformers'
``CrossEncoder`` loads it with ``AutoModelForSequenceClassification`` and truncates each pair
(longest first) at the tokenizer's ``model_max_length``; it has no pooling, Normalize or
prompts (:func:`read_cross_encoder_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedd_server.convert.files import optional_object, read_json, read_object
from embedd_server.core.classes import REGRESSION
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import MULTI_LABEL

# Pooling modes as sentence-transformers names them; llama.cpp pools the first three.
SUPPORTED_POOLINGS = ("mean", "cls", "lasttoken")
RANK = "rank"  # a cross-encoder's "pooling": its classifier head on the first token
SPLADE = "splade"  # a sparse encoder's "pooling": SpladePooling over its MLM logits
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE_KINDS = ("Transformer", "Pooling", "Dense", "Normalize")


@dataclass(frozen=True)
class FamilyDefault:
    """What a family's plain transformers directory (no modules.json) is imported with."""

    pooling: str
    normalize: bool
    why: str  # where the default comes from, told to the user


@dataclass(frozen=True)
class Settings:
    """The sentence-transformers settings of a model directory."""

    pooling: str  # one of SUPPORTED_POOLINGS, or RANK for a cross-encoder
    normalize: bool
    max_seq_length: int
    do_lower_case: bool = False
    include_prompt: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    notes: tuple[str, ...] = ()  # defaults the importer applied, to tell the user
    # A cross-encoder's pairs: whether its tokenizer hands the model token_type_ids (the
    # document then has token type 1), as transformers' tokenizer for the directory does.
    pair_token_types: bool = False


@dataclass(frozen=True)
class Modules:
    """The module list of ``modules.json``: where the Transformer, Pooling and any Dense
    modules (in order) live."""

    transformer_dir: Path
    pooling_dir: Path | None
    normalize: bool
    dense_dirs: tuple[Path, ...] = ()


def read_modules(src: Path) -> Modules | None:
    """``src/modules.json`` (None when absent): Transformer, then Pooling, then any number of
    Dense modules, then optionally Normalize."""
    path = src / "modules.json"
    if not path.is_file():
        return None
    modules = read_json(path, "")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ModelImportError(f"{path} is not a list of modules")
    kinds: list[str] = []
    dirs: list[Path] = []
    for module in modules:
        type_name = str(module.get("type", ""))
        kind = type_name.rsplit(".", 1)[-1]
        if kind not in _MODULE_KINDS:
            raise ModelImportError(
                f"{path}: module {module.get('path', '')!r} has type {type_name!r}; embedd "
                "imports a Transformer followed by a Pooling, any Dense modules and optionally "
                "a Normalize module (no LayerNorm or other modules)"
            )
        kinds.append(kind)
        dirs.append(src / str(module.get("path", "")))
    dense = 2
    while dense < len(kinds) and kinds[dense] == "Dense":
        dense += 1
    normalize = kinds[dense:] == ["Normalize"]
    if kinds[:2] != ["Transformer", "Pooling"] or not (normalize or dense == len(kinds)):
        raise ModelImportError(
            f"{path} lists the modules {kinds}; embedd imports Transformer, Pooling, any "
            "Dense modules and optionally Normalize, in that order"
        )
    return Modules(
        transformer_dir=dirs[0],
        pooling_dir=dirs[1],
        normalize=normalize,
        dense_dirs=tuple(dirs[2:dense]),
    )


def read_settings(
    src: Path,
    modules: Modules | None,
    *,
    family: str,
    default: FamilyDefault,
    hidden_size: int,
    max_position_embeddings: int,
    usable_positions: int,
) -> Settings:
    """The settings sentence-transformers would load ``src`` with.

    ``max_position_embeddings`` is config.json's value (sentence-transformers' fallback for
    the maximum length); ``usable_positions`` the positions the model can really take
    (XLM-RoBERTa's table starts at padding_idx + 1), which caps the length.
    """
    notes: list[str] = []
    model_dir = modules.transformer_dir if modules else src
    st_config = optional_object(model_dir / "sentence_bert_config.json")
    max_seq_length = _max_seq_length(
        model_dir, st_config, max_position_embeddings, usable_positions, notes
    )
    do_lower_case = _bool(st_config, "do_lower_case", model_dir / "sentence_bert_config.json")
    if modules is None:
        notes.append(
            f"{src} has no modules.json, so it is not a sentence-transformers model; "
            f"importing it with the {family} family's default: {default.pooling} pooling, "
            f"{'normalized' if default.normalize else 'not normalized'} ({default.why})"
        )
        return Settings(
            pooling=default.pooling,
            normalize=default.normalize,
            max_seq_length=max_seq_length,
            do_lower_case=do_lower_case,
            notes=tuple(notes),
        )
    assert modules.pooling_dir is not None
    pooling, include_prompt = _read_pooling(modules.pooling_dir, hidden_size)
    prompts, default_prompt_name = _read_prompts(src / "config_sentence_transformers.json")
    return Settings(
        pooling=pooling,
        normalize=modules.normalize,
        max_seq_length=max_seq_length,
        do_lower_case=do_lower_case,
        include_prompt=include_prompt,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        notes=tuple(notes),
    )


def read_cross_encoder_settings(
    src: Path,
    *,
    family: str,
    labels: tuple[str, ...],
    max_position_embeddings: int,
    usable_positions: int,
    token_types: int = 1,
    problem_type: str | None = None,
) -> Settings:
    """The settings sentence-transformers' ``CrossEncoder`` (or transformers' classification
    pipeline, for a ``problem_type``: a sequence classifier) would load ``src`` with.

    The maximum length is ``min(tokenizer_config.json's model_max_length, the positions the
    model has)``: CrossEncoder truncates at the tokenizer's maximum, and a pair longer than
    the position table could not be run at all. Its notes say the model is a reranker (or a
    classifier), its labels and what its scores are.
    """
    notes: list[str] = []
    max_seq_length = _max_seq_length(src, {}, max_position_embeddings, usable_positions, notes)
    pair_token_types = _pair_token_types(src, family, token_types)
    if problem_type is not None:
        first = _classifier_note(src, family, labels, problem_type, max_seq_length)
    else:
        first = _cross_encoder_note(src, family, labels, max_seq_length, pair_token_types)
    notes.insert(0, first)
    activation = optional_object(src / "config.json").get("sentence_transformers")
    if isinstance(activation, dict) and "activation_fn" in activation:
        name = str(activation["activation_fn"]).rsplit(".", 1)[-1]
        if name != "Sigmoid" and len(labels) == 1:
            notes.append(
                f"{src / 'config.json'}: its CrossEncoder activation is {name}, not Sigmoid; "
                "compare raw scores (the logits) with what it returns"
            )
    return Settings(
        pooling=RANK,
        normalize=False,
        max_seq_length=max_seq_length,
        notes=tuple(notes),
        pair_token_types=pair_token_types,
    )


def _cross_encoder_note(
    src: Path, family: str, labels: tuple[str, ...], max_seq_length: int, pair_token_types: bool
) -> str:
    """What a cross-encoder's import gives: its labels, scores, truncation and token types."""
    shown = ", ".join(labels)
    if len(labels) == 1:
        scores = (
            f"one label ({shown}): a pair's relevance is sigmoid(logit), as "
            "CrossEncoder.predict returns it"
        )
    else:
        # CrossEncoder.predict applies no activation to a multi-label model's logits.
        scores = (
            f"{len(labels)} labels ({shown}): each pair gets one logit per label, as "
            "CrossEncoder.predict returns them (no sigmoid)"
        )
    types = (
        "the document gets token type 1 (the tokenizer gives token_type_ids)"
        if pair_token_types
        else "every token has token type 0 (the tokenizer gives no token_type_ids)"
    )
    return (
        f"{src.name}: a cross-encoder (reranker) of the {family} family, imported with rank "
        f"pooling; {scores}; pairs are truncated longest-first at {max_seq_length} tokens; "
        f"{types}"
    )


def _classifier_note(
    src: Path, family: str, labels: tuple[str, ...], problem_type: str, max_seq_length: int
) -> str:
    """What a sequence classifier's import gives: its labels and how they are scored."""
    scored = {
        MULTI_LABEL: "a sigmoid per label (multi_label_classification)",
        REGRESSION: "its raw logits (regression)",
    }.get(problem_type, "a softmax over its labels")
    return (
        f"{src.name}: a sequence classifier of the {family} family with {len(labels)} labels "
        f"({', '.join(labels)}), imported with rank pooling (its head); a text or a pair gets "
        f"one logit per label, scored by {scored}; inputs are truncated at {max_seq_length} "
        "tokens"
    )


def read_sparse_settings(
    src: Path,
    transformer_dir: Path,
    *,
    max_position_embeddings: int,
    usable_positions: int,
) -> Settings:
    """The settings sentence-transformers' ``SparseEncoder`` would load ``src`` with: the
    maximum length as for a bi-encoder, its prompts; no Normalize (SPLADE weights are used
    as they are, scored by dot product)."""
    notes: list[str] = []
    st_config = optional_object(transformer_dir / "sentence_bert_config.json")
    max_seq_length = _max_seq_length(
        transformer_dir, st_config, max_position_embeddings, usable_positions, notes
    )
    path = transformer_dir / "sentence_bert_config.json"
    do_lower_case = _bool(st_config, "do_lower_case", path)
    config_path = src / "config_sentence_transformers.json"
    prompts, default_prompt_name = _read_prompts(config_path, model_type="SparseEncoder")
    if optional_object(config_path).get("max_active_dims") is not None:
        raise ModelImportError(
            f"{config_path}: max_active_dims keeps only the largest weights of each vector; "
            "embedd returns every non-zero weight. Remove max_active_dims to import the model"
        )
    return Settings(
        pooling=SPLADE,
        normalize=False,
        max_seq_length=max_seq_length,
        do_lower_case=do_lower_case,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        notes=tuple(notes),
    )


# transformers' tokenizer classes that hand the model token_type_ids (their
# model_input_names); the generic TokenizersBackend / PreTrainedTokenizerFast and
# XLM-RoBERTa's do not.
_TOKEN_TYPE_CLASSES = frozenset({"BertTokenizer", "BertTokenizerFast"})


def _pair_token_types(src: Path, family: str, token_types: int) -> bool:
    """Whether transformers' tokenizer for ``src`` gives the model token_type_ids, so that a
    pair's document has token type 1: ``tokenizer_config.json``'s ``model_input_names`` when
    it has them, else its ``tokenizer_class`` (measured with transformers 5.24: BertTokenizer
    gives them, TokenizersBackend does not), else the family's own class (BERT's gives them)."""
    if token_types < 2:
        return False
    config = optional_object(src / "tokenizer_config.json")
    names = config.get("model_input_names")
    if isinstance(names, list):
        return "token_type_ids" in names
    tokenizer_class = config.get("tokenizer_class")
    if isinstance(tokenizer_class, str):
        return tokenizer_class in _TOKEN_TYPE_CLASSES
    return family == "bert"


def _bool(config: dict[str, Any], key: str, path: Path, default: bool = False) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ModelImportError(f"{path}: {key!r} must be true or false (got {value!r})")
    return value


def _max_seq_length(
    model_dir: Path,
    st_config: dict[str, Any],
    max_position_embeddings: int,
    usable_positions: int,
    notes: list[str],
) -> int:
    path = model_dir / "sentence_bert_config.json"
    value = st_config.get("max_seq_length")
    if value is None:
        # sentence-transformers: min(max_position_embeddings, tokenizer.model_max_length)
        tc_path = model_dir / "tokenizer_config.json"
        model_max = optional_object(tc_path).get("model_max_length")
        value = max_position_embeddings
        if isinstance(model_max, int | float) and not isinstance(model_max, bool):
            value = min(value, int(model_max))
    elif not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelImportError(f"{path}: max_seq_length must be a positive integer (got {value!r})")
    if value > usable_positions:
        notes.append(
            f"maximum length {value} is more than the model's {usable_positions} positions; "
            f"inputs are truncated at {usable_positions} tokens"
        )
        value = usable_positions
    return int(value)


def _read_pooling(pooling_dir: Path, hidden_size: int) -> tuple[str, bool]:
    """(pooling mode, include_prompt) of a Pooling module's config.json."""
    path = pooling_dir / "config.json"
    config = read_object(path, "a sentence-transformers model needs it to know how to pool")
    modes = [mode for flag, mode in _POOLING_FLAGS.items() if config.get(flag)]
    named = config.get("pooling_mode")
    if isinstance(named, str):
        modes.append(named)
    elif isinstance(named, list):
        modes.extend(str(mode) for mode in named)
    elif named is not None:
        raise ModelImportError(f"{path}: pooling_mode must be a string (got {named!r})")
    modes = list(dict.fromkeys(modes))
    supported = ", ".join(SUPPORTED_POOLINGS)
    if len(modes) != 1 or modes[0] not in SUPPORTED_POOLINGS:
        what = " + ".join(modes) if modes else "no mode"
        raise ModelImportError(
            f"{path}: unsupported pooling mode ({what}); llama.cpp pools one of {supported}"
        )
    dimension = config.get("word_embedding_dimension", config.get("embedding_dimension"))
    if dimension is not None and dimension != hidden_size:
        raise ModelImportError(
            f"{path}: embedding dimension {dimension} differs from config.json's hidden_size "
            f"{hidden_size}"
        )
    return modes[0], _bool(config, "include_prompt", path, default=True)


def _read_prompts(
    path: Path, model_type: str = "SentenceTransformer"
) -> tuple[dict[str, str], str | None]:
    """Prompts and default prompt name of a ``model_type`` model's configuration (a
    SparseEncoder's modules.json lists SpladePooling, a SentenceTransformer's Pooling)."""
    config = optional_object(path)
    found = config.get("model_type", model_type)
    if found != model_type:
        raise ModelImportError(
            f"{path}: model_type {found!r}; embedd imports SentenceTransformer (bi-encoder) "
            "models with a Pooling module and SparseEncoder (SPLADE) models with a "
            "SpladePooling module"
        )
    prompts = config.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise ModelImportError(f"{path}: prompts must map prompt names to texts")
    default = config.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ModelImportError(
            f"{path}: default_prompt_name {default!r} is not one of the prompts "
            f"({', '.join(prompts) or 'none'})"
        )
    return dict(prompts), default
