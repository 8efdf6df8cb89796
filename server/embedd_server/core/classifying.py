"""Classification's rules, whatever protocol a request came in: what a valid request is and
how a classifier's logits become labelled scores.

Scores are what transformers' text-classification pipeline (and TEI's /predict) give
(core/classes.py): the softmax over the labels, or each label's sigmoid for a model whose
``problem_type`` is ``multi_label_classification`` or that has a single label (a
cross-encoder), the logits of a regression model; ``raw_scores`` gives the logits. Each
input's labels are sorted by score, highest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedd_server.compute.engine import FloatMatrix
from embedd_server.core.classes import Floats, class_probabilities
from embedd_server.core.tokenization import RIGHT
from embedd_server.errors import EmptyInput, InvalidInput

# One input: a text, or a pair (text, text_pair) read with the tokenizer's pair template.
ClassifyInput = tuple[str] | tuple[str, str]


@dataclass(frozen=True)
class ClassifyParams:
    """One classification request, whatever protocol it came in."""

    model: str = ""  # "": the first classifier of the catalogue
    inputs: Sequence[ClassifyInput] = ()
    raw_scores: bool = False  # the logits instead of their softmax / sigmoid
    truncate: bool = True  # cut over-long inputs; False: InputTooLong
    truncation_direction: str = RIGHT  # for single texts (pairs are cut longest-first)
    truncation_hint: str = ""  # how the caller's protocol turns truncation on
    keep_alive_s: float | None = None


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float


@dataclass(frozen=True)
class ClassifyOutcome:
    model: str
    # One list per input, in order; each every label of the model, highest score first.
    predictions: list[list[LabelScore]]
    prompt_tokens: int
    total_seconds: float
    truncated_inputs: int = 0


def check_classify_params(params: ClassifyParams, max_inputs: int) -> None:
    """Raises InvalidInput naming the input of a malformed request."""
    if not params.inputs:
        raise EmptyInput("The request has no input; give at least one text.", param="inputs")
    if len(params.inputs) > max_inputs:
        raise InvalidInput(
            f"The request has {len(params.inputs)} inputs; at most {max_inputs} are allowed "
            "per request. Split it.",
            param="inputs",
        )
    for index, item in enumerate(params.inputs):
        if not 1 <= len(item) <= 2:
            raise InvalidInput(
                f"Input {index} has {len(item)} texts; an input is a text or a pair of texts.",
                param=f"inputs[{index}]",
            )
        if not all(item):
            raise EmptyInput(
                f"Input {index} has an empty text; every text needs some content.",
                param=f"inputs[{index}]",
            )


def class_scores(logits: FloatMatrix, problem_type: str, raw: bool) -> Floats:
    """Each row's scores, in float64: the logits when ``raw``, else the model's class
    probabilities (core/classes.py: softmax, or a sigmoid per label)."""
    if raw:
        return logits.astype(np.float64)
    return class_probabilities(logits, problem_type)


def labelled(scores: Floats, labels: Sequence[str]) -> list[list[LabelScore]]:
    """Each row's labels with their scores, highest first (ties keep the labels' order)."""
    rows: list[list[LabelScore]] = []
    for row in scores:
        order = sorted(range(len(labels)), key=lambda i: -row[i])
        rows.append([LabelScore(labels[i], float(row[i])) for i in order])
    return rows
