"""An independent float64 NumPy reference of transformers' BERT-style encoders: BERT,
XLM-RoBERTa, RoBERTa / CamemBERT and DistilBERT.

For behaviour that ``../shared/models`` has no stored reference of (e.g. sentence-transformers'
``include_prompt: false``, a cross-encoder's pair with token type 1), tests compute what
sentence-transformers would: this module runs those encoders (and the heads of their
``*ForSequenceClassification``) from a model directory's safetensors in float64, with
nothing of embedd's engines, graph builder or converter. It is first checked against the
stored reference (``test_include_prompt.py``), so agreement with it means agreement with
sentence-transformers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load_file

Array = npt.NDArray[np.float64]
_erf = np.vectorize(math.erf, otypes=[np.float64])


@dataclass(frozen=True)
class EncoderReference:
    """A BERT-family encoder from a HF directory: BERT; XLM-RoBERTa, RoBERTa and CamemBERT
    (positions from ``padding_idx + 1``); DistilBERT (its tensors renamed to BERT's, no token
    type table, LayerNorm epsilon 1e-12)."""

    weights: dict[str, Array]
    config: dict[str, Any]

    @classmethod
    def load(cls, directory: Path) -> EncoderReference:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        raw = load_file(str(directory / "model.safetensors"))
        weights = {
            name.removeprefix("bert.")
            .removeprefix("roberta.")
            .removeprefix("distilbert."): value.astype(np.float64)
            for name, value in raw.items()
        }
        if config.get("model_type") == "distilbert":
            return cls(_distilbert_as_bert(weights), _distilbert_config(config))
        return cls(weights, config)

    def _linear(self, x: Array, prefix: str) -> Array:
        out: Array = x @ self.weights[f"{prefix}.weight"].T + self.weights[f"{prefix}.bias"]
        return out

    def _layer_norm(self, x: Array, prefix: str) -> Array:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        eps = float(self.config.get("layer_norm_eps", 1e-12))
        normed = (x - mean) / np.sqrt(var + eps)
        out: Array = normed * self.weights[f"{prefix}.weight"] + self.weights[f"{prefix}.bias"]
        return out

    def hidden_states(self, ids: list[int], token_types: list[int] | None = None) -> Array:
        """The last hidden state ``[len(ids), hidden]`` of one unpadded sequence."""
        w = self.weights
        positions = np.arange(len(ids))
        if self.config.get("model_type") in ("xlm-roberta", "roberta", "camembert"):
            positions = positions + int(self.config["pad_token_id"]) + 1
        types = np.zeros(len(ids), dtype=np.int64) if token_types is None else token_types
        x = w["embeddings.word_embeddings.weight"][ids]
        if "embeddings.token_type_embeddings.weight" in w:  # DistilBERT has none
            x = x + w["embeddings.token_type_embeddings.weight"][types]
        x = x + w["embeddings.position_embeddings.weight"][positions]
        x = self._layer_norm(x, "embeddings.LayerNorm")
        heads = int(self.config["num_attention_heads"])
        size = x.shape[1] // heads
        for i in range(int(self.config["num_hidden_layers"])):
            p = f"encoder.layer.{i}"

            def split(t: Array) -> Array:
                return t.reshape(len(ids), heads, size).transpose(1, 0, 2)

            q = split(self._linear(x, f"{p}.attention.self.query"))
            k = split(self._linear(x, f"{p}.attention.self.key"))
            v = split(self._linear(x, f"{p}.attention.self.value"))
            scores = q @ k.transpose(0, 2, 1) / math.sqrt(size)
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs = scores / scores.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(1, 0, 2).reshape(len(ids), heads * size)
            attended = self._linear(context, f"{p}.attention.output.dense")
            x = self._layer_norm(attended + x, f"{p}.attention.output.LayerNorm")
            up = self._linear(x, f"{p}.intermediate.dense")
            gelu = up * 0.5 * (1.0 + _erf(up / math.sqrt(2.0)))
            down = self._linear(gelu, f"{p}.output.dense")
            x = self._layer_norm(down + x, f"{p}.output.LayerNorm")
        return x

    def logits(self, ids: list[int], token_types: list[int] | None = None) -> Array:
        """A cross-encoder's raw logits ``[labels]`` for one pair's tokens: the first token's
        state through ``BertForSequenceClassification``'s pooler (dense, tanh) and classifier,
        or ``XLMRobertaForSequenceClassification``'s head (dense, tanh, out_proj), or
        ``DistilBertForSequenceClassification``'s (pre_classifier, ReLU, classifier)."""
        first = self.hidden_states(ids, token_types)[0]
        if "pre_classifier.weight" in self.weights:
            hidden = np.maximum(self._linear(first, "pre_classifier"), 0.0)
            return self._linear(hidden, "classifier")
        if "classifier.out_proj.weight" in self.weights:
            dense, out = "classifier.dense", "classifier.out_proj"
        else:
            dense, out = "pooler.dense", "classifier"
        return self._linear(np.tanh(self._linear(first, dense)), out)

    def mlm_logits(self, ids: list[int]) -> Array:
        """``BertForMaskedLM``'s logits ``[len(ids), vocab]``: dense, erf GELU, LayerNorm,
        then the decoder (the word embeddings when it is tied, BERT's default)."""
        p = "cls.predictions"
        h = self._linear(self.hidden_states(ids), f"{p}.transform.dense")
        h = self._layer_norm(h * 0.5 * (1.0 + _erf(h / math.sqrt(2.0))), f"{p}.transform.LayerNorm")
        decoder = self.weights.get(
            f"{p}.decoder.weight", self.weights["embeddings.word_embeddings.weight"]
        )
        # Older checkpoints name the decoder's bias cls.predictions.bias.
        bias = self.weights.get(f"{p}.decoder.bias")
        bias = self.weights[f"{p}.bias"] if bias is None else bias
        out: Array = h @ decoder.T + bias
        return out

    def splade(self, ids: list[int], strategy: str = "max", activation: str = "relu") -> Array:
        """SpladePooling of one sequence: log1p(relu(logits)) (log1p again for log1p_relu),
        max or sum over its tokens, ``[vocab]``."""
        weights = np.log1p(np.maximum(self.mlm_logits(ids), 0.0))
        if activation == "log1p_relu":
            weights = np.log1p(weights)
        out: Array = weights.max(axis=0) if strategy == "max" else weights.sum(axis=0)
        return out


_DISTILBERT_MODULES = {  # transformer.layer.N.<DistilBERT module> -> encoder.layer.N.<BERT's>
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


def _distilbert_as_bert(weights: dict[str, Array]) -> dict[str, Array]:
    renamed: dict[str, Array] = {}
    for name, value in weights.items():
        bert_name = name
        if name.startswith("transformer.layer."):
            layer, rest = name.removeprefix("transformer.layer.").split(".", 1)
            module, part = rest.rsplit(".", 1)
            bert_name = f"encoder.layer.{layer}.{_DISTILBERT_MODULES[module]}.{part}"
        renamed[bert_name] = value
    return renamed


def _distilbert_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        **config,
        "num_attention_heads": config["n_heads"],
        "num_hidden_layers": config["n_layers"],
        "layer_norm_eps": 1e-12,  # fixed in transformers' DistilBERT
    }


def mean_from(hidden: Array, start: int) -> Array:
    """sentence-transformers' mean pooling with the first ``start`` tokens masked."""
    kept = hidden[start:]
    out: Array = kept.sum(axis=0) / max(len(kept), 1e-9)
    return out
