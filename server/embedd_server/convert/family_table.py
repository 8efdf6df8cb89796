"""Which family reads a model directory: config.json's ``architectures`` (or ``model_type``)
to the :class:`Family` that converts it. A new family is a module of this package with its
``Family`` subclass, listed here (docs/extending.md)."""

from __future__ import annotations

from pathlib import Path

from embedd_server.convert.bertlike import (
    Camembert,
    CamembertClassifier,
    DistilBert,
    DistilBertClassifier,
    Roberta,
    RobertaClassifier,
)
from embedd_server.convert.families import (
    Bert,
    BertReranker,
    Family,
    Qwen3,
    XlmRoberta,
    XlmRobertaReranker,
)
from embedd_server.convert.files import read_object
from embedd_server.convert.gemma3 import Gemma3Embedding
from embedd_server.convert.mistral import Mistral
from embedd_server.convert.modernbert import ModernBert, ModernBertClassifier
from embedd_server.convert.mpnet import MPNet
from embedd_server.errors import ModelImportError

# config.json's architectures -> the family that imports it.
_BY_ARCHITECTURE: dict[str, type[Family]] = {
    "BertModel": Bert,
    "BertForMaskedLM": Bert,
    "BertForPreTraining": Bert,
    "XLMRobertaModel": XlmRoberta,
    "XLMRobertaForMaskedLM": XlmRoberta,
    "Qwen3Model": Qwen3,
    "Qwen3ForCausalLM": Qwen3,
    "DistilBertModel": DistilBert,
    "DistilBertForMaskedLM": DistilBert,
    "RobertaModel": Roberta,
    "RobertaForMaskedLM": Roberta,
    "CamembertModel": Camembert,
    "CamembertForMaskedLM": Camembert,
    "MistralModel": Mistral,
    "MistralForCausalLM": Mistral,
    "ModernBertModel": ModernBert,
    "ModernBertForMaskedLM": ModernBert,
    "Gemma3TextModel": Gemma3Embedding,
    "MPNetModel": MPNet,
    "MPNetForMaskedLM": MPNet,
    "BertForSequenceClassification": BertReranker,
    "XLMRobertaForSequenceClassification": XlmRobertaReranker,
    "DistilBertForSequenceClassification": DistilBertClassifier,
    "RobertaForSequenceClassification": RobertaClassifier,
    "CamembertForSequenceClassification": CamembertClassifier,
    "ModernBertForSequenceClassification": ModernBertClassifier,
}
# config.json's model_type, for a directory whose architectures name none of the above.
_BY_MODEL_TYPE: dict[str, type[Family]] = {
    "bert": Bert,
    "xlm-roberta": XlmRoberta,
    "distilbert": DistilBert,
    "roberta": Roberta,
    "camembert": Camembert,
    "qwen3": Qwen3,
    "mistral": Mistral,
    "modernbert": ModernBert,
    "gemma3_text": Gemma3Embedding,
    "mpnet": MPNet,
}


# What an error names: each family's base architecture (the first listed), then the heads.
_HEAD = "ForSequenceClassification"
SUPPORTED = ", ".join(
    f"{arch} ({family.name})"
    for arch, family in _BY_ARCHITECTURE.items()
    if arch.endswith("Model") and not arch.endswith(_HEAD)
)
SUPPORTED_RERANKERS = ", ".join(arch for arch in _BY_ARCHITECTURE if arch.endswith(_HEAD))


def select_family(model_dir: Path) -> Family:
    """The family of the model in ``model_dir``, from its config.json."""
    path = model_dir / "config.json"
    config = read_object(path, "a Hugging Face model directory needs its config.json")
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise ModelImportError(f"{path}: architectures must be a list")
    for arch in archs:
        if str(arch).endswith("ForSequenceClassification") and arch not in _BY_ARCHITECTURE:
            raise ModelImportError(
                f"{path} describes {arch}, a cross-encoder (reranker) or sequence classifier "
                f"of a family embedd does not import; embedd imports the rerankers and "
                f"classifiers {SUPPORTED_RERANKERS} and the embedding models {SUPPORTED}"
            )
    family = next((_BY_ARCHITECTURE[a] for a in archs if a in _BY_ARCHITECTURE), None)
    family = family or _BY_MODEL_TYPE.get(str(model_type))
    if family is None:
        described = ", ".join(map(str, archs)) or "no architectures"
        raise ModelImportError(
            f"{path} describes a {model_type} model ({described}); embedd imports {SUPPORTED}"
        )
    return family(path, config)
