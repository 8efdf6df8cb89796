"""ModernBERT (``ModernBertModel``: modernbert-embed, gte-modernbert) and its cross-encoder
(``ModernBertForSequenceClassification``: gte-reranker-modernbert), as llama.cpp's
``modern-bert`` architecture.

The layout is llama.cpp's converter's (``ModernBertModel`` in its ``conversion/bert.py``):
``token_embd`` + ``token_embd_norm`` (LayerNorm without bias), per layer ``attn_norm`` (none on
layer 0: transformers' Identity), the fused ``attn_qkv`` (Q, K, V rows in that order),
``attn_output``, ``ffn_norm``, ``ffn_up`` (``mlp.Wi``: the activated half first, then the
gate, as ``ggml_geglu`` and transformers' ``chunk(2)`` both take it), ``ffn_down``, and the
final ``output_norm``. No biases anywhere (llama.cpp's graph has none).

Hyperparameters, all from config.json: RoPE with one theta for global layers
(``rope.freq_base``) and one for sliding-window layers (``rope.freq_base_swa``), from
transformers 5's ``rope_parameters`` or the older ``global_rope_theta`` / ``local_rope_theta``;
which layers slide (``layer_types``, or every layer but each ``global_attn_every_n_layers``-th)
as llama.cpp's per-layer ``attention.sliding_window_pattern`` array; the window
``local_attention`` as ``attention.sliding_window`` (both transformers and llama.cpp let a
token attend to keys within ``local_attention // 2`` positions on each side); the FFN
activation ``hidden_activation`` as ``hidden_activation``.

The cross-encoder's head: the pooled state (``classifier_pooling``: the first token or the
mean, llama.cpp's ``classifier.pooling_type``) -> ``head.dense`` (``cls``) -> activation ->
``head.norm`` (``cls.norm``) -> ``classifier`` (``cls.output``, with its bias): raw logits.
One label is a reranker (pooling ``rank``); N labels a classifier (``embedd.task`` =
``classify``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from embedd_server.convert.families import Family, Plan, Shape, _label_names, _strip
from embedd_server.convert.files import Array, config_float, config_int
from embedd_server.convert.st_settings import FamilyDefault
from embedd_server.convert.vocab import (
    HfTokenizer,
    add_bpe_vocab,
    bpe_pre_tokenizer,
    template_specials,
)
from embedd_server.errors import ModelImportError

ARCH = "modern-bert"
# GGUF keys llama.cpp's modern-bert reads (gguf's Keys, spelled out: older gguf packages lack
# some of the writer's helpers).
SLIDING_WINDOW_KEY = f"{ARCH}.attention.sliding_window"
SLIDING_PATTERN_KEY = f"{ARCH}.attention.sliding_window_pattern"
ROPE_BASE_KEY = f"{ARCH}.rope.freq_base"
ROPE_BASE_SWA_KEY = f"{ARCH}.rope.freq_base_swa"
HIDDEN_ACT_KEY = f"{ARCH}.hidden_activation"
CLASSIFIER_POOLING_KEY = f"{ARCH}.classifier.pooling_type"
# Not a llama.cpp key: the head's activation, which llama.cpp's rank pooling takes to be GELU.
CLASSIFIER_ACT_KEY = "embedd.classifier_activation"

FULL, SLIDING = "full_attention", "sliding_attention"
# The FFN activations of ModernBERT checkpoints (GeGLU with exact or tanh GELU; SwiGLU in some
# derivatives), and the classifier head's (GELU in every ModernBERT cross-encoder seen).
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "silu")
HEAD_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new")
CLASSIFIER_POOLINGS = {"cls": gguf.PoolingType.CLS, "mean": gguf.PoolingType.MEAN}
# transformers' ModernBertConfig defaults (5.x and 4.x alike).
DEFAULT_THETAS = {FULL: 160_000.0, SLIDING: 10_000.0}
DEFAULT_GLOBAL_EVERY = 3
DEFAULT_WINDOW = 128

_BLOCK = {  # layers.N.<module> -> blk.N.<name>
    "attn_norm": "attn_norm",
    "attn.Wqkv": "attn_qkv",
    "attn.Wo": "attn_output",
    "mlp_norm": "ffn_norm",
    "mlp.Wi": "ffn_up",
    "mlp.Wo": "ffn_down",
}
_HEAD = {  # ModernBertForSequenceClassification's head -> llama.cpp's rank pooling tensors
    "head.dense.weight": "cls.weight",
    "head.norm.weight": "cls.norm.weight",
    "classifier.weight": "cls.output.weight",
    "classifier.bias": "cls.output.bias",
}


class ModernBert(Family):
    """``ModernBertModel`` (and ``ModernBertForMaskedLM``'s encoder): an embedding model."""

    name = ARCH
    arch = ARCH
    tokenizer_kind = "BPE"
    default = FamilyDefault(
        pooling="mean",
        normalize=False,
        why="what sentence-transformers does with a plain transformers model",
    )
    # Weights of ModernBertForMaskedLM's language-model head, unused by an encoder.
    unused: tuple[str, ...] = ("head.", "decoder.")

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        path = config_path
        if self.n_embd % self.n_head:
            raise ModelImportError(
                f"{path}: hidden_size {self.n_embd} is not a multiple of num_attention_heads "
                f"{self.n_head}"
            )
        for key in ("attention_bias", "mlp_bias", "norm_bias"):
            if config.get(key, False) is not False:
                raise ModelImportError(
                    f"{path}: {key} {config[key]!r} is not supported; embedd imports ModernBERT "
                    "without biases (as answerdotai/ModernBERT and its embedding models are), "
                    "which is the layout llama.cpp's modern-bert runs"
                )
        self.activation = _choice(config, "hidden_activation", "gelu", ACTIVATIONS, path)
        self.eps = config_float(config, "norm_eps", path, 1e-5)
        self.window = config_int(config, "local_attention", path, DEFAULT_WINDOW, minimum=2)
        self.sliding = _sliding_layers(config, self.n_layer, path)
        self.global_theta, self.local_theta = _rope_thetas(config, path)

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        writer.add_block_count(self.n_layer)
        writer.add_context_length(self.max_position_embeddings)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_layer_norm_eps(self.eps)
        writer.add_causal_attention(False)
        writer.add_vocab_size(self.n_vocab)
        writer.add_string(HIDDEN_ACT_KEY, self.activation)
        writer.add_float32(ROPE_BASE_KEY, self.global_theta)
        writer.add_float32(ROPE_BASE_SWA_KEY, self.local_theta)
        writer.add_string(f"{ARCH}.rope.scaling.type", gguf.RopeScalingType.NONE.value)
        # The window only where a layer slides: llama.cpp's modern-bert then reads the pattern.
        if any(self.sliding):
            writer.add_uint32(SLIDING_WINDOW_KEY, self.window)
            writer.add_array(SLIDING_PATTERN_KEY, list(self.sliding))

    def add_vocab(self, writer: gguf.GGUFWriter, tk: HfTokenizer, model_dir: Path) -> list[str]:
        notes: list[str] = []
        pre = bpe_pre_tokenizer(tk)
        if pre is None:
            notes.append(
                f"{tk.path}: llama.cpp knows no pre-tokenizer like this one; its own tokenizer "
                "(used only for GGUF files without tokenizer.json) may split text differently"
            )
        # llama.cpp's converter names ModernBERT's GPT-2 pre-tokenizer "modern-bert".
        add_bpe_vocab(writer, tk, model_dir, self.n_vocab, "modern-bert" if pre else "default")
        first, last = template_specials(tk.json.get("post_processor"))
        if first is None or last is None:
            notes.append(
                f"{tk.path}: its template does not put a special token around each text "
                f"(first {first}, last {last}); ModernBERT's is [CLS] A [SEP]"
            )
        return notes

    def plan(self) -> Plan:
        """(Hugging Face name, GGUF name, shape) of every encoder tensor, in writing order."""
        d, ff = self.n_embd, self.n_ff
        shapes: dict[str, Shape] = {
            "attn_norm": (d,),
            "attn_qkv": (3 * d, d),
            "attn_output": (d, d),
            "ffn_norm": (d,),
            "ffn_up": (2 * ff, d),
            "ffn_down": (d, ff),
        }
        plan: Plan = [
            ("embeddings.tok_embeddings.weight", "token_embd.weight", (self.n_vocab, d)),
            ("embeddings.norm.weight", "token_embd_norm.weight", (d,)),
        ]
        for i in range(self.n_layer):
            for hf, gg in _BLOCK.items():
                if i == 0 and gg == "attn_norm":
                    continue  # transformers' layer 0 has no attention norm (Identity)
                plan.append((f"layers.{i}.{hf}.weight", f"blk.{i}.{gg}.weight", shapes[gg]))
        plan.append(("final_norm.weight", "output_norm.weight", (d,)))
        return plan

    def tensors(self, loaded: dict[str, Array], src: Path) -> list[tuple[str, Array]]:
        loaded = _strip(loaded, ("model.",))
        return list(self._pick(loaded, self.plan(), self.unused, src).items())


class ModernBertClassifier(ModernBert):
    """``ModernBertForSequenceClassification``: a cross-encoder (one label) or a sequence
    classifier (N labels)."""

    unused = ()
    always_f32 = frozenset({"cls.weight", "cls.output.weight"})  # a tiny head: kept exact

    def __init__(self, config_path: Path, config: dict[str, Any]) -> None:
        super().__init__(config_path, config)
        path = config_path
        self.labels = _label_names(config, path)
        pooling = _choice(config, "classifier_pooling", "cls", tuple(CLASSIFIER_POOLINGS), path)
        self.classifier_pooling = CLASSIFIER_POOLINGS[pooling]
        self.head_activation = _choice(
            config, "classifier_activation", "gelu", HEAD_ACTIVATIONS, path
        )
        if config.get("classifier_bias", False) is not False:
            raise ModelImportError(
                f"{path}: classifier_bias {config['classifier_bias']!r} is not supported; "
                "embedd imports ModernBERT's head without a dense bias (as transformers' "
                "default and llama.cpp's modern-bert have it)"
            )
        problem = config.get("problem_type")
        self.problem_type = str(problem) if problem else ""

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        super().add_hparams(writer)
        # llama.cpp takes a file without this key to pool the mean before its head.
        writer.add_uint32(CLASSIFIER_POOLING_KEY, int(self.classifier_pooling))
        # (N labels: the task and problem_type are written for every family by the importer.)
        writer.add_string(CLASSIFIER_ACT_KEY, self.head_activation)

    def tensors(self, loaded: dict[str, Array], src: Path) -> list[tuple[str, Array]]:
        d, n = self.n_embd, len(self.labels)
        shapes: dict[str, Shape] = {
            "cls.weight": (d, d),
            "cls.norm.weight": (d,),
            "cls.output.weight": (n, d),
            "cls.output.bias": (n,),
        }
        plan = self.plan() + [(hf, gg, shapes[gg]) for hf, gg in _HEAD.items()]
        loaded = _strip(loaded, ("model.",))
        return list(self._pick(loaded, plan, self.unused, src).items())


def _choice(
    config: dict[str, Any], key: str, default: str, supported: tuple[str, ...], path: Path
) -> str:
    value = config.get(key, default)
    if value not in supported:
        raise ModelImportError(
            f"{path}: {key} {value!r} is not supported; ModernBERT is imported with "
            f"{key} {' / '.join(supported)}"
        )
    return str(value)


def _sliding_layers(config: dict[str, Any], n_layer: int, path: Path) -> tuple[bool, ...]:
    """Per layer, whether it attends in a sliding window: ``layer_types`` (transformers 5),
    else every layer but each ``global_attn_every_n_layers``-th from layer 0 (4.x configs)."""
    types = config.get("layer_types")
    if types is None:
        every = config_int(
            config, "global_attn_every_n_layers", path, DEFAULT_GLOBAL_EVERY, minimum=1
        )
        return tuple(i % every != 0 for i in range(n_layer))
    if not isinstance(types, list) or len(types) != n_layer or not set(types) <= {FULL, SLIDING}:
        raise ModelImportError(
            f"{path}: layer_types must list {n_layer} layers, each {FULL!r} or {SLIDING!r} "
            f"(got {types!r})"
        )
    sliding = tuple(t == SLIDING for t in types)
    if all(sliding):
        # llama.cpp 0.3.36 aborts the process (GGML_ASSERT in its attention input) on a
        # modern-bert whose every layer slides; transformers' own patterns never do that.
        raise ModelImportError(
            f"{path}: layer_types has no {FULL!r} layer; embedd imports ModernBERT with at "
            "least one global layer (as transformers' ModernBERT pattern has layer 0)"
        )
    return sliding


def _rope_thetas(config: dict[str, Any], path: Path) -> tuple[float, float]:
    """(global theta, local theta): transformers 5's ``rope_parameters`` per layer type, else
    4.x's ``global_rope_theta`` / ``local_rope_theta`` (a null local theta: the global one, as
    4.x computes it). Only default (unscaled) RoPE is supported."""
    if config.get("rope_scaling") is not None:
        raise ModelImportError(
            f"{path}: rope_scaling {config['rope_scaling']!r} is not supported (only default "
            "RoPE, as ModernBERT checkpoints use)"
        )
    params = config.get("rope_parameters")
    if params is None:
        full = config_float(config, "global_rope_theta", path, DEFAULT_THETAS[FULL])
        local = config.get("local_rope_theta", DEFAULT_THETAS[SLIDING])
        if local is None:
            return full, full
        return full, config_float({"local_rope_theta": local}, "local_rope_theta", path, 0.0)
    if not isinstance(params, dict):
        raise ModelImportError(f"{path}: rope_parameters must be an object")
    thetas: list[float] = []
    for layer_type in (FULL, SLIDING):
        rope = params.get(layer_type) or {}
        if not isinstance(rope, dict):
            raise ModelImportError(f"{path}: rope_parameters.{layer_type} must be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ModelImportError(
                f"{path}: rope_parameters.{layer_type}.rope_type {rope_type!r} is not "
                "supported (only default RoPE)"
            )
        where = f"rope_parameters.{layer_type}.rope_theta"
        theta = rope.get("rope_theta", DEFAULT_THETAS[layer_type])
        thetas.append(config_float({where: theta}, where, path, 0.0))
    return thetas[0], thetas[1]
