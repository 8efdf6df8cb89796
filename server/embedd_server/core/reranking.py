"""Reranking's rules, whatever protocol a request came in: what a valid request is, which
model serves it, and how a cross-encoder's logits become ranked results.

Scores are what sentence-transformers' ``CrossEncoder.predict`` returns for a one-label model:
the sigmoid of the logit (``raw_scores``: the logit itself). Results are sorted by score,
highest first; ties keep the documents' order, as a stable sort does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from embedd_server.compute.engine import FloatMatrix
from embedd_server.core.tasks import require_task
from embedd_server.errors import EmptyInput, InvalidInput, NotImplementedFeature
from embedd_server.model.catalog import RERANK, ModelInfo


@dataclass(frozen=True)
class RerankParams:
    """One rerank request, whatever protocol it came in."""

    model: str = ""  # "": the first cross-encoder of the catalogue
    query: str = ""
    documents: Sequence[str] = ()
    top_n: int | None = None  # None: every document
    return_documents: bool = False
    raw_scores: bool = False  # the logits instead of their sigmoid
    truncate: bool = True  # cut over-long pairs longest-first; False: InputTooLong
    keep_alive_s: float | None = None


@dataclass(frozen=True)
class RankedDocument:
    """One document's place in the ranking."""

    index: int  # its position in the request
    score: float
    document: str | None  # its text, when asked for


@dataclass(frozen=True)
class RerankOutcome:
    model: str
    results: list[RankedDocument]
    prompt_tokens: int
    total_seconds: float


def check_rerank_params(params: RerankParams, max_documents: int) -> None:
    """Raises InvalidInput naming the field of a malformed request."""
    if not params.query:
        raise EmptyInput("The query is empty; give the text to rank documents by.", param="query")
    if not params.documents:
        raise EmptyInput(
            "The request has no documents; give at least one to rank.", param="documents"
        )
    if len(params.documents) > max_documents:
        raise InvalidInput(
            f"The request has {len(params.documents)} documents; at most {max_documents} are "
            "allowed per request. Split it and merge the rankings (scores are comparable).",
            param="documents",
        )
    for index, document in enumerate(params.documents):
        if not document:
            raise EmptyInput(
                f"Document {index} is an empty string; every document needs some text.",
                param=f"documents[{index}]",
            )
    if params.top_n is not None and params.top_n < 1:
        raise InvalidInput(
            f"top_n must be at least 1 (or left out for every document); got {params.top_n}.",
            param="top_n",
        )


def require_reranker(info: ModelInfo, rerankers: Callable[[], Sequence[str]]) -> None:
    """Raises ModelNotReranker, naming the routes of the model's own task and the models that
    do rerank (asked of ``rerankers`` only then: it reads the catalogue), unless ``info`` is
    a one-label cross-encoder."""
    require_task(info, RERANK, rerankers)
    if info.labels != 1:
        raise NotImplementedFeature(
            f"Model '{info.name}' is a classifier with {info.labels} labels; reranking needs a "
            "cross-encoder with one relevance label.",
            param="model",
        )


def scores_of(logits: FloatMatrix, raw: bool) -> list[float]:
    """A one-label cross-encoder's scores: sigmoid of each logit (the logit when ``raw``),
    computed in float64."""
    values = logits[:, 0].astype(np.float64)
    if raw:
        return [float(v) for v in values]
    return [float(v) for v in 1.0 / (1.0 + np.exp(-values))]


def ranked(
    scores: Sequence[float], documents: Sequence[str], top_n: int | None, with_documents: bool
) -> list[RankedDocument]:
    """The ``top_n`` best documents (all when None), highest score first, stable on ties."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n is not None:
        order = order[:top_n]
    return [RankedDocument(i, scores[i], documents[i] if with_documents else None) for i in order]
