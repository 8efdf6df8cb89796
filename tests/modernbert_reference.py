"""An independent NumPy ModernBERT (float64), from a Hugging Face directory, for the tests.

It follows transformers 5's eager ``ModernBertModel`` and
``ModernBertForSequenceClassification`` line by line, reading config.json the way
``ModernBertConfig`` does (``layer_types`` or ``global_attn_every_n_layers``;
``rope_parameters`` or ``global_rope_theta`` / ``local_rope_theta``), one unpadded sequence
at a time. Checked against the stored sentence-transformers vectors and logits of
../shared/models/tiny-modernbert(-reranker) (tests/integration/test_modernbert.py), it is
the reference for the variants of those models that the tests make (other windows, layer
patterns, thetas, activations, classifier poolings, label counts).
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

Floats = npt.NDArray[np.float64]
_erf = np.vectorize(math.erf, otypes=[np.float64])


def activation(name: str, x: Floats) -> Floats:
    """transformers' ACT2FN[name] in float64."""
    if name == "gelu":
        out: Floats = 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    elif name in ("gelu_pytorch_tanh", "gelu_new"):
        out = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    elif name == "silu":
        out = x / (1.0 + np.exp(-x))
    else:
        raise ValueError(f"activation {name!r}")
    return out


def _layer_norm(x: Floats, weight: Floats, eps: float) -> Floats:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    out: Floats = (x - mean) / np.sqrt(var + eps) * weight
    return out


def _rotate_half(x: Floats) -> Floats:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@dataclass
class ModernBertReference:
    """A ModernBERT encoder (and classifier head, when the directory has one)."""

    config: dict[str, Any]
    weights: dict[str, Floats]

    @classmethod
    def load(cls, model_dir: Path) -> ModernBertReference:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        raw = load_file(str(model_dir / "model.safetensors"))
        weights = {k.removeprefix("model."): v.astype(np.float64) for k, v in raw.items()}
        return cls(config, weights)

    @property
    def sliding(self) -> list[bool]:
        n = int(self.config["num_hidden_layers"])
        types = self.config.get("layer_types")
        if types is None:
            every = int(self.config.get("global_attn_every_n_layers", 3))
            return [bool(i % every) for i in range(n)]
        return [t == "sliding_attention" for t in types]

    def theta(self, sliding: bool) -> float:
        params = self.config.get("rope_parameters")
        if params is not None:
            key = "sliding_attention" if sliding else "full_attention"
            return float(params[key]["rope_theta"])
        if sliding and self.config.get("local_rope_theta") is not None:
            return float(self.config["local_rope_theta"])
        return float(self.config.get("global_rope_theta", 160000.0))

    def hidden(self, ids: list[int]) -> Floats:
        """The last hidden state ``[seq, hidden]`` of one sequence."""
        c, w = self.config, self.weights
        eps = float(c.get("norm_eps", 1e-5))
        heads = int(c["num_attention_heads"])
        d = int(c["hidden_size"]) // heads
        n = len(ids)
        x = _layer_norm(
            w["embeddings.tok_embeddings.weight"][ids], w["embeddings.norm.weight"], eps
        )
        positions = np.arange(n, dtype=np.float64)
        distance = np.abs(positions[:, None] - positions[None, :])
        half_window = int(c.get("local_attention", 128)) // 2
        for i, sliding in enumerate(self.sliding):
            p = f"layers.{i}."
            h = x if i == 0 else _layer_norm(x, w[p + "attn_norm.weight"], eps)
            qkv = (h @ w[p + "attn.Wqkv.weight"].T).reshape(n, 3, heads, d).transpose(1, 2, 0, 3)
            inv_freq = 1.0 / self.theta(sliding) ** (np.arange(0, d, 2) / d)
            freqs = positions[:, None] * inv_freq[None, :]
            emb = np.concatenate([freqs, freqs], axis=-1)
            cos, sin = np.cos(emb), np.sin(emb)
            q = qkv[0] * cos + _rotate_half(qkv[0]) * sin
            k = qkv[1] * cos + _rotate_half(qkv[1]) * sin
            scores = q @ k.transpose(0, 2, 1) * d**-0.5
            if sliding:
                scores = np.where(distance <= half_window, scores, -np.inf)
            probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
            probs /= probs.sum(axis=-1, keepdims=True)
            context = (probs @ qkv[2]).transpose(1, 0, 2).reshape(n, heads * d)
            x = x + context @ w[p + "attn.Wo.weight"].T
            up = _layer_norm(x, w[p + "mlp_norm.weight"], eps) @ w[p + "mlp.Wi.weight"].T
            first, gate = np.split(up, 2, axis=-1)
            act = activation(str(c.get("hidden_activation", "gelu")), first)
            x = x + (act * gate) @ w[p + "mlp.Wo.weight"].T
        return _layer_norm(x, w["final_norm.weight"], eps)

    def embed(self, ids: list[int], pooling: str = "mean") -> Floats:
        """The pooled (not normalized) vector: the mean or the first token."""
        hidden = self.hidden(ids)
        out: Floats = hidden.mean(axis=0) if pooling == "mean" else hidden[0]
        return out

    def logits(self, ids: list[int]) -> Floats:
        """ModernBertForSequenceClassification's raw logits of one sequence."""
        c, w = self.config, self.weights
        pooled = self.embed(ids, str(c.get("classifier_pooling", "cls")))
        dense = activation(
            str(c.get("classifier_activation", "gelu")), w["head.dense.weight"] @ pooled
        )
        normed = _layer_norm(dense, w["head.norm.weight"], float(c.get("norm_eps", 1e-5)))
        out: Floats = w["classifier.weight"] @ normed + w["classifier.bias"]
        return out
