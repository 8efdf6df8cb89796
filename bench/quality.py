"""STS-B from a server's own vectors: whether every system serves the model's vectors.

The sentence pairs of the STS-B test split go to the server's OpenAI-shaped route, 32 texts
a request; the score is the Spearman correlation (x100) of the pairs' cosines with the gold
scores (what MTEB reports for STS-B), computed as the acceptance tests do
(``tests/metrics.py``).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.loadgen import Endpoint
from bench.texts import STSB_TEST
from tests.metrics import StsB, read_stsb, stsb_score

BATCH = 32
TIMEOUT_S = 120.0


def parse_embeddings(payload: Any, count: int) -> npt.NDArray[np.float32]:
    """The vectors of an OpenAI-shaped embeddings answer, in input order."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise ValueError(f"expected {count} embeddings, got {str(payload)[:200]}")
    ordered = sorted(data, key=lambda item: int(item.get("index", 0))) if count > 1 else data
    return np.array([item["embedding"] for item in ordered], dtype=np.float32)


def embed(endpoint: Endpoint, texts: Sequence[str], batch: int = BATCH) -> npt.NDArray[np.float32]:
    """``texts`` embedded by the server, ``batch`` texts a request."""
    parts = []
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        request = urllib.request.Request(
            endpoint.url,
            data=endpoint.body(chunk),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
            parts.append(parse_embeddings(json.loads(answer.read()), len(chunk)))
    return np.concatenate(parts)


def stsb_pairs(pairs: int | None = None) -> StsB:
    """The first ``pairs`` pairs of the STS-B test split (all of them: None)."""
    stsb = read_stsb(STSB_TEST)
    if pairs is None:
        return stsb
    return StsB(stsb.firsts[:pairs], stsb.seconds[:pairs], stsb.scores[:pairs])


def stsb_of(endpoint: Endpoint, stsb: StsB) -> float:
    """The STS-B score of the server's vectors; each distinct sentence is embedded once."""
    texts = list(dict.fromkeys([*stsb.firsts, *stsb.seconds]))
    vectors = embed(endpoint, texts)
    row = {text: number for number, text in enumerate(texts)}
    firsts = vectors[[row[text] for text in stsb.firsts]]
    seconds = vectors[[row[text] for text in stsb.seconds]]
    return stsb_score(firsts, seconds, stsb.scores)
