"""Ollama's model-name rules, as far as they name embedd's models.

Ollama names a model ``host/namespace/model:tag`` and fills in what is left out with
``registry.ollama.ai``, ``library`` and ``latest`` (its types/model/name.go), matching the
parts without regard to case. So ``all-minilm``, ``all-minilm:latest``,
``library/all-minilm`` and ``registry.ollama.ai/library/all-minilm:latest`` are one model, and
Ollama lists it as ``all-minilm:latest``. embedd's models are the files of its models
directory, named without a tag: a name with the default tag, namespace or host means the model
of the plain name. Any other tag is a name of its own (found only if such a model or alias
exists), as in Ollama.
"""

from __future__ import annotations

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"


def plain_name(name: str) -> str:
    """``name`` without Ollama's default host, namespace and tag (``library/x:latest`` -> ``x``);
    a name with another tag, namespace or host is returned as it is."""
    rest, tag = _split_tag(name)
    if tag is not None and tag.lower() != DEFAULT_TAG:
        return name
    parts = rest.split("/")
    if len(parts) == 3 and parts[0].lower() == DEFAULT_HOST:
        parts = parts[1:]
    if len(parts) == 2 and parts[0].lower() == DEFAULT_NAMESPACE:
        parts = parts[1:]
    if len(parts) != 1 or not parts[0] or ":" in parts[0]:  # Ollama's model part has no ":"
        return name
    return parts[0]


def tagged_name(name: str) -> str:
    """A model's name as Ollama lists it (``x`` -> ``x:latest``); one with a tag stays as it is."""
    _, tag = _split_tag(name)
    return name if tag is not None else f"{name}:{DEFAULT_TAG}"


def _split_tag(name: str) -> tuple[str, str | None]:
    """(the name before its tag, the tag or None); a ":" before the last "/" is a host's port."""
    colon = name.rfind(":")
    if colon <= name.rfind("/"):
        return name, None
    return name[:colon], name[colon + 1 :]
