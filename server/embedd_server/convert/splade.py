"""SPLADE sparse encoders, as sentence-transformers' ``SparseEncoder`` saves them: a BERT
masked language model (``BertForMaskedLM``; module ``MLMTransformer``, or ``Transformer`` with
``transformer_task: fill-mask``) followed by ``SpladePooling``.

The file is llama.cpp's ``bert`` layout (the encoder, as :class:`~.families.Bert` writes it)
plus the MLM head under names of ours, which llama.cpp doesn't load:

- ``mlm.dense`` and ``mlm.norm``: ``cls.predictions.transform`` (dense -> GELU -> LayerNorm);
- ``mlm.output.weight``: ``cls.predictions.decoder.weight``, only when it is not tied to the
  word embeddings (``tie_word_embeddings``, BERT's default): a tied decoder is ``token_embd``;
- ``mlm.output.bias``: the decoder's bias (``cls.predictions.bias``).

``embedd.task`` is ``sparse``, and SpladePooling's ``pooling_strategy`` (max or sum) and
``activation_function`` (relu or log1p_relu) are stored under
:data:`~embedd_server.model.sparse.SPLADE_POOLING_KEY` / ``SPLADE_ACTIVATION_KEY``. llama.cpp's
pooling type is ``none``: it has no SPLADE pooling, so ONNX Runtime serves these models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from embedd_server.convert.families import Bert, Plan, _gamma_beta
from embedd_server.convert.files import Array, read_json, read_object
from embedd_server.errors import ModelImportError
from embedd_server.model.catalog import SPARSE, TASK_KEY
from embedd_server.model.sparse import (
    MLM_HEAD_TENSORS,
    SPLADE_ACTIVATION_KEY,
    SPLADE_ACTIVATIONS,
    SPLADE_POOLING_KEY,
    SPLADE_POOLINGS,
)

_TRANSFORMER_KINDS = ("MLMTransformer", "Transformer")
_MASKED_LMS = ("BertForMaskedLM", "BertForPreTraining")


@dataclass(frozen=True)
class SpladeModules:
    """A SparseEncoder's modules.json: where its MLM transformer is, and its SpladePooling."""

    transformer_dir: Path
    pooling_strategy: str  # max or sum
    activation: str  # relu or log1p_relu


def read_splade_modules(src: Path) -> SpladeModules | None:
    """``src/modules.json`` of a SPLADE model; None when it lists no ``SpladePooling``."""
    path = src / "modules.json"
    if not path.is_file():
        return None
    modules = read_json(path, "")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        return None  # read_modules says what is wrong with it
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if "SpladePooling" not in kinds:
        return None
    if len(kinds) != 2 or kinds[0] not in _TRANSFORMER_KINDS or kinds[1] != "SpladePooling":
        raise ModelImportError(
            f"{path} lists the modules {kinds}; embedd imports a SPLADE model as an "
            "MLMTransformer (or fill-mask Transformer) followed by SpladePooling, nothing else"
        )
    transformer_dir = src / str(modules[0].get("path", ""))
    pooling_path = src / str(modules[1].get("path", "")) / "config.json"
    pooling = read_object(pooling_path, "a SPLADE model needs its SpladePooling settings")
    strategy = pooling.get("pooling_strategy", "max")
    activation = pooling.get("activation_function", "relu")
    if strategy not in SPLADE_POOLINGS or activation not in SPLADE_ACTIVATIONS:
        raise ModelImportError(
            f"{pooling_path}: pooling_strategy {strategy!r} with activation_function "
            f"{activation!r}; SpladePooling has pooling_strategy {' or '.join(SPLADE_POOLINGS)} "
            f"and activation_function {' or '.join(SPLADE_ACTIVATIONS)}"
        )
    return SpladeModules(transformer_dir, str(strategy), str(activation))


class Splade(Bert):
    """``BertForMaskedLM`` under SpladePooling: the BERT encoder and its MLM head."""

    name = "bert"
    # The transform's dense layer is hidden x hidden: kept in f32 in every file type, as a
    # cross-encoder's head is; the decoder (vocabulary x hidden) takes the file's type.
    always_f32 = frozenset({*Bert.always_f32, "mlm.dense.weight"})

    def __init__(self, config_path: Path, config: dict[str, Any], modules: SpladeModules) -> None:
        super().__init__(config_path, config)
        archs = config.get("architectures") or []
        if config.get("model_type") != "bert" or not any(a in _MASKED_LMS for a in archs):
            described = ", ".join(map(str, archs)) or config.get("model_type")
            raise ModelImportError(
                f"{config_path} describes {described}; embedd imports SPLADE models whose "
                f"masked language model is BERT ({', '.join(_MASKED_LMS)})"
            )
        if (act := config.get("hidden_act", "gelu")) not in ("gelu", "gelu_python"):
            raise ModelImportError(
                f"{config_path}: hidden_act {act!r}; a SPLADE model is served by ONNX Runtime, "
                "which computes exact (erf) GELU only"
            )
        self.tied = bool(config.get("tie_word_embeddings", True))
        self.modules = modules

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        super().add_hparams(writer)
        writer.add_string(TASK_KEY, SPARSE)
        writer.add_string(SPLADE_POOLING_KEY, self.modules.pooling_strategy)
        writer.add_string(SPLADE_ACTIVATION_KEY, self.modules.activation)

    def tensors(self, loaded: dict[str, Array], src: Path) -> list[tuple[str, Array]]:
        head = {_gamma_beta(k): v for k, v in loaded.items() if k.startswith("cls.")}
        encoder = super().tensors({k: v for k, v in loaded.items() if k not in head}, src)
        return encoder + self._head(head, dict(encoder)["token_embd.weight"], src)

    def _head(
        self, head: dict[str, Array], token_embd: Array, src: Path
    ) -> list[tuple[str, Array]]:
        """The MLM head's tensors under our names; the decoder's weight only when untied."""
        d, v = self.n_embd, self.n_vocab
        # Older checkpoints save the decoder's bias as cls.predictions.bias (the same tensor).
        if "cls.predictions.decoder.bias" not in head and "cls.predictions.bias" in head:
            head["cls.predictions.decoder.bias"] = head["cls.predictions.bias"]
        head.pop("cls.predictions.bias", None)
        shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
            "mlm.dense": ((d, d), (d,)),
            "mlm.norm": ((d,), (d,)),
            "mlm.output": ((v, d), (v,)),
        }
        plan: Plan = []
        for hf, ours in MLM_HEAD_TENSORS.items():
            weight_shape, bias_shape = shapes[ours]
            if ours != "mlm.output" or not self.tied:
                plan.append((f"{hf}.weight", f"{ours}.weight", weight_shape))
            plan.append((f"{hf}.bias", f"{ours}.bias", bias_shape))
        decoder = head.get("cls.predictions.decoder.weight")
        if self.tied:
            if decoder is not None and not np.array_equal(decoder, token_embd):
                raise ModelImportError(
                    f"{src}: cls.predictions.decoder.weight differs from the word embeddings, "
                    "but config.json ties them (tie_word_embeddings); the weights do not match "
                    "the config"
                )
            head.pop("cls.predictions.decoder.weight", None)
        # cls.seq_relationship: BertForPreTraining's next-sentence head, unused by SPLADE.
        picked = self._pick(head, plan, ("cls.seq_relationship.",), src)
        return list(picked.items())


def splade_family(modules: SpladeModules) -> Splade:
    """The family of the SPLADE model whose MLM transformer is in ``modules``."""
    path = modules.transformer_dir / "config.json"
    config = read_object(path, "a Hugging Face model directory needs its config.json")
    return Splade(path, config, modules)
