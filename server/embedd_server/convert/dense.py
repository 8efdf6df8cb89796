"""sentence-transformers ``Dense`` modules, read from their directories as sentence-transformers
loads them (``config.json``: in_features, out_features, bias, activation_function;
``model.safetensors``: ``linear.weight`` and ``linear.bias``).

The stack goes into the GGUF under embedd's keys (:mod:`embedd_server.model.dense`), unless the
family carries it the way llama.cpp applies it itself (``gemma-embedding``'s ``dense_2`` /
``dense_3``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedd_server.convert.files import read_object
from embedd_server.errors import ModelImportError
from embedd_server.model.dense import ACTIVATIONS, DenseLayer

# sentence-transformers saves the activation as the module's full class name; Dense's
# default (a config without the key) is Tanh.
_ACTIVATION_NAMES = {
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
    "torch.nn.modules.activation.ReLU": "relu",
}
_DEFAULT_ACTIVATION = "torch.nn.modules.activation.Tanh"
_INPUT = "sentence_embedding"  # what a Dense module after pooling reads and writes


def read_dense_modules(dirs: Sequence[Path], hidden_size: int) -> tuple[DenseLayer, ...]:
    """The Dense modules in ``dirs`` (modules.json's order), each checked against its
    config.json and chained from the ``hidden_size``-wide pooled vector."""
    layers: list[DenseLayer] = []
    width = hidden_size
    for directory in dirs:
        layer = _read_module(directory)
        if layer.in_features != width:
            raise ModelImportError(
                f"{directory / 'config.json'}: in_features {layer.in_features}, but the "
                f"vector before this Dense module has {width} features"
            )
        layers.append(layer)
        width = layer.out_features
    return tuple(layers)


def _read_module(directory: Path) -> DenseLayer:
    path = directory / "config.json"
    config = read_object(path, "a sentence-transformers Dense module needs its config")
    in_features, out_features = (_positive(config, key, path) for key in _FEATURES)
    bias = config.get("bias", True)
    if not isinstance(bias, bool):
        raise ModelImportError(f"{path}: 'bias' must be true or false (got {bias!r})")
    if config.get("use_residual", False):
        raise ModelImportError(
            f"{path}: a Dense module with use_residual is not supported (only "
            "activation(linear(x)))"
        )
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, _INPUT) != _INPUT:
            raise ModelImportError(
                f"{path}: {key} {config[key]!r}; embedd applies Dense modules to the pooled "
                f"{_INPUT!r} only"
            )
    activation = _activation(config, path)
    weights = _weights(directory)
    weight = _tensor(weights, "linear.weight", (out_features, in_features), directory)
    bias_value = _tensor(weights, "linear.bias", (out_features,), directory) if bias else None
    extra = sorted(set(weights) - {"linear.weight", "linear.bias"})
    if extra or (not bias and "linear.bias" in weights):
        unexpected = extra or ["linear.bias"]
        raise ModelImportError(
            f"{directory}: unexpected tensors {', '.join(unexpected)} for a Dense module "
            f"with bias {str(bias).lower()}"
        )
    return DenseLayer(weight, bias_value, activation)


_FEATURES = ("in_features", "out_features")


def _positive(config: dict[str, object], key: str, path: Path) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ModelImportError(f"{path} has no valid integer {key!r} (got {value!r})")
    return value


def _activation(config: dict[str, object], path: Path) -> str:
    name = str(config.get("activation_function", _DEFAULT_ACTIVATION))
    # torch.nn.Tanh and torch.nn.modules.activation.Tanh are the same class.
    short = name.rsplit(".", 1)[-1]
    if name.startswith("torch.nn.") and (
        found := next((v for k, v in _ACTIVATION_NAMES.items() if k.endswith("." + short)), None)
    ):
        return found
    supported = ", ".join(_ACTIVATION_NAMES)
    raise ModelImportError(
        f"{path}: activation_function {name!r} is not supported; embedd applies {supported} "
        f"({', '.join(ACTIVATIONS)})"
    )


def _weights(directory: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    file = directory / "model.safetensors"
    if not file.is_file():
        if (directory / "pytorch_model.bin").is_file():
            raise ModelImportError(
                f"{directory} has only pytorch_model.bin; a Dense module's weights must be in "
                "safetensors. Convert them first, e.g. load the model with sentence-transformers "
                "and save it again (it writes model.safetensors)"
            )
        raise ModelImportError(f"{file} is missing; a Dense module's weights are needed")
    try:
        return dict(load_file(str(file)))
    except Exception as exc:
        raise ModelImportError(f"{file} cannot be read as safetensors: {exc}") from exc


def _tensor(
    weights: dict[str, np.ndarray], name: str, shape: tuple[int, ...], directory: Path
) -> np.ndarray:
    if name not in weights:
        raise ModelImportError(f"tensor {name!r} is missing from {directory / 'model.safetensors'}")
    value = np.ascontiguousarray(weights[name], dtype=np.float32)
    if value.shape != shape:
        raise ModelImportError(
            f"tensor {name!r} in {directory} has shape {value.shape}, but its config.json "
            f"implies {shape}"
        )
    return value
