"""Reading a model directory's files: JSON with errors that name the file, safetensors weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy.typing as npt
from safetensors.numpy import load_file

from embedd_server.errors import ModelImportError

Array = npt.NDArray[Any]


def read_json(path: Path, what: str) -> Any:
    """The JSON in ``path``; a missing or unreadable file is an error naming it and ``what``."""
    if not path.is_file():
        raise ModelImportError(f"{path} is missing; {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelImportError(f"{path} cannot be read as JSON: {exc}") from exc


def read_object(path: Path, what: str) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise ModelImportError(f"{path} is not a JSON object; {what}")
    return value


def optional_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path`` if the file exists, else an empty dict."""
    return read_object(path, "expected a JSON object") if path.is_file() else {}


def config_int(
    config: dict[str, Any], key: str, path: Path, default: int | None = None, minimum: int = 0
) -> int:
    """An integer of a config file, at least ``minimum``; else an error naming file and key."""
    value = config.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ModelImportError(f"{path} has no valid integer {key!r} (got {value!r})")
    return value


def config_float(config: dict[str, Any], key: str, path: Path, default: float) -> float:
    """A number of a config file; else an error naming file and key."""
    value = config.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ModelImportError(f"{path}: {key!r} must be a number (got {value!r})")
    return float(value)


def load_safetensors(src: Path) -> dict[str, Array]:
    """Every tensor of the model's safetensors file(s), by its name in the file."""
    single, index = src / "model.safetensors", src / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_object(index, "a sharded model needs its index").get("weight_map") or {}
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
            tensors.update(load_file(str(file)))
        except Exception as exc:
            raise ModelImportError(f"{file} cannot be read as safetensors: {exc}") from exc
    return tensors
