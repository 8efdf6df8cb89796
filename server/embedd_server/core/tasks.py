"""What each task's models are asked through, and the error for a model used on the wrong one.

A model's task (``ModelInfo.task``) decides which RPCs and REST routes serve it: an embedding
model is refused by Rerank, a classifier by Embed, and so on, each time with a 400 that names
the routes the model *does* serve, so the caller knows where to go.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from embedd_server.errors import (
    ModelNotClassifier,
    ModelNotEmbedding,
    ModelNotReranker,
    ModelNotSparse,
    ModelWrongTask,
)
from embedd_server.model.catalog import CLASSIFY, EMBED, RERANK, SPARSE, ModelInfo

# Each task: how a model of it is described, and the RPCs and routes that serve it.
TASK_NOUNS = {
    EMBED: "an embedding model",
    RERANK: "a reranker (cross-encoder)",
    CLASSIFY: "a classifier",
    SPARSE: "a sparse encoder (SPLADE)",
}
TASK_ROUTES = {
    EMBED: "the Embed RPC, POST /v1/embeddings, /api/embed, /v2/embed or /embed",
    RERANK: "the Rerank RPC, POST /v1/rerank, /v2/rerank or /rerank (or Classify, /predict)",
    CLASSIFY: "the Classify RPC or POST /predict",
    SPARSE: "the EmbedSparse RPC or POST /embed_sparse",
}
# The error a request of each task raises for a model of another.
_REFUSALS: dict[str, type[ModelWrongTask]] = {
    EMBED: ModelNotEmbedding,
    RERANK: ModelNotReranker,
    CLASSIFY: ModelNotClassifier,
    SPARSE: ModelNotSparse,
}


def describe(info: ModelInfo) -> str:
    """The model's task in words, with a classifier's labels."""
    noun = TASK_NOUNS.get(info.task, f"a {info.task} model")
    if info.task == CLASSIFY and info.label_names:
        noun += f" (labels: {', '.join(info.label_names)})"
    return noun


def require_task(
    info: ModelInfo,
    wanted: str,
    serving: Callable[[], Sequence[str]],
    accepted: Collection[str] = (),
) -> None:
    """Raises the ``wanted`` task's ModelWrongTask unless ``info``'s task is ``wanted`` (or
    one of ``accepted``). The message names the routes that serve ``info`` and the models
    that serve ``wanted`` (``serving``, asked only then: it reads the catalogue)."""
    if info.task == wanted or info.task in accepted:
        return
    others = ", ".join(serving()) or "none (import one with `embedd import`)"
    raise _REFUSALS[wanted](
        f"Model '{info.name}' is {describe(info)}, not {TASK_NOUNS[wanted]}; use it with "
        f"{TASK_ROUTES.get(info.task, 'its own routes')}. Models here for this route: "
        f"{others}.",
        param="model",
    )
