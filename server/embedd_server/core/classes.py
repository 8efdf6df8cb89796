"""A sequence classifier's class probabilities from its raw logits, as transformers gives them.

The engines return a classifier's raw logits, one per label (``ModelInfo.labels``); what turns
them into the scores a user sees depends on the model's ``problem_type`` (config.json, stored
by ``embedd import`` as ``ModelInfo.problem_type``), as transformers' text-classification
pipeline decides: the raw values for ``regression``, a sigmoid per label for
``multi_label_classification`` or a model with one label (a cross-encoder's relevance), else
(``single_label_classification`` or none) a softmax over the labels.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from embedd_server.model.catalog import MULTI_LABEL

REGRESSION = "regression"  # problem_type: the logits are the scores
SINGLE_LABEL = "single_label_classification"  # problem_type: a softmax over the labels

Floats = npt.NDArray[np.float64]


def class_probabilities(logits: npt.ArrayLike, problem_type: str) -> Floats:
    """Each row's class probabilities, in float64, from raw logits ``[texts, labels]`` (or one
    text's ``[labels]``; the result has the same shape).

    ``problem_type`` ``"regression"``: the logits unchanged (transformers applies no
    function); ``"multi_label_classification"``, or a single label: an independent sigmoid
    per label (the labels need not sum to 1); anything else (``"single_label_classification"``,
    ``""``): a softmax over the labels, computed after subtracting each row's maximum so that
    large logits cannot overflow. Computed in float64: a float32 softmax of the engines'
    float32 logits would add rounding of its own to the 1e-4 the probabilities are held to.
    """
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim not in (1, 2) or values.shape[-1] == 0:
        raise ValueError(f"logits must be [labels] or [texts, labels], got shape {values.shape}")
    if problem_type == REGRESSION:
        return values.copy()
    if problem_type == MULTI_LABEL or values.shape[-1] == 1:
        # 1 / (1 + e^-x), written through tanh so that neither tail overflows
        sigmoid: Floats = 0.5 * (1.0 + np.tanh(0.5 * values))
        return sigmoid
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    softmax: Floats = shifted / shifted.sum(axis=-1, keepdims=True)
    return softmax
