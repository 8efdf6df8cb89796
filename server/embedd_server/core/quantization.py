"""Compact vectors: int8 / uint8 / binary / ubinary, as sentence-transformers'
``quantize_embeddings`` makes them.

- ``binary`` / ``ubinary``: one sign bit per dimension (value > 0), packed 8 dimensions a byte
  with ``np.packbits`` (first dimension in the high bit); ``binary`` is ``ubinary - 128`` as
  int8. Compare them with the Hamming distance.
- ``int8`` / ``uint8``: each dimension scaled linearly from its calibration range
  ``[min, max]`` onto 256 steps: ``(x - min) / ((max - min) / 255)``, minus 128 for int8, cut
  toward zero as numpy's ``astype`` does. Values outside the range are clipped to it
  (sentence-transformers lets them wrap around). The ranges are those of the model's own
  vectors of a fixed text set (:data:`CALIBRATION_TEXTS`), taken after ``dimensions`` and
  normalization, exactly as the request's vectors are. ``embedd import`` stores the model's
  raw vectors of that set in the GGUF (:data:`CALIBRATION_VECTORS_KEY`); for a file without
  them (or with those of another text set) the server embeds the set once, on first use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from embedd_server.compute.engine import FloatMatrix

FLOAT = "float"
INT8 = "int8"
UINT8 = "uint8"
BINARY = "binary"
UBINARY = "ubinary"
OUTPUT_TYPES = (FLOAT, INT8, UINT8, BINARY, UBINARY)
CALIBRATED_TYPES = frozenset({INT8, UINT8})

ByteMatrix = npt.NDArray[np.int8] | npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Ranges:
    """Per-dimension calibration ranges: where each dimension's 256 steps start, and their size."""

    starts: FloatMatrix
    steps: FloatMatrix

    @classmethod
    def of(cls, calibration: FloatMatrix) -> Ranges:
        """The ranges of calibration vectors (one per row), as sentence-transformers takes them."""
        low = calibration.min(axis=0)
        high = calibration.max(axis=0)
        # A dimension that never varied would divide by zero: give it one tiny step.
        steps = np.maximum((high - low) / 255, np.finfo(np.float32).tiny)
        return cls(low.astype(np.float32), steps.astype(np.float32))


def quantize(vectors: FloatMatrix, output_type: str, ranges: Ranges | None = None) -> ByteMatrix:
    """The vectors as ``output_type`` (not ``float``); int8/uint8 need ``ranges``."""
    if output_type in (BINARY, UBINARY):
        packed = np.packbits(vectors > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if output_type == BINARY else packed
    if ranges is None:
        raise ValueError(f"{output_type} needs calibration ranges")
    scaled = (vectors - ranges.starts) / ranges.steps
    if output_type == INT8:
        signed: npt.NDArray[np.int8] = np.clip(scaled - 128, -128, 127).astype(np.int8)
        return signed
    if output_type == UINT8:
        unsigned: npt.NDArray[np.uint8] = np.clip(scaled, 0, 255).astype(np.uint8)
        return unsigned
    raise ValueError(f"unknown output type {output_type!r}")


# A fixed, varied text set (questions, statements, keywords, several topics and lengths, a few
# languages) whose vectors give each model its int8 ranges. Changing it changes every model's
# int8 vectors: keep it as it is.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "How do I reset my password?",
    "Click 'Forgot password' on the sign-in page to receive a reset link by email.",
    "The cat sits on the mat.",
    "A dog runs across the park chasing a ball.",
    "Stock markets fell sharply today after the central bank raised interest rates.",
    "The company reported record quarterly revenue and raised its annual forecast.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Mitochondria are the powerhouse of the cell.",
    "The theory of general relativity describes gravity as the curvature of spacetime.",
    "Water boils at 100 degrees Celsius at sea level.",
    "How many calories are in a banana?",
    "Preheat the oven to 200 degrees and bake the bread for 35 minutes.",
    "Add a pinch of salt, two eggs and a cup of flour, then whisk until smooth.",
    "The recipe calls for fresh basil, garlic, pine nuts and parmesan.",
    "The home team scored in the final minute to win the championship.",
    "She finished the marathon in under three hours.",
    "Who won the World Cup in 2018?",
    "Tennis players serve alternately from the right and left sides of the court.",
    "def add(a, b):\n    return a + b",
    "SELECT name, email FROM users WHERE active = 1 ORDER BY name;",
    "The function raises a ValueError when the input list is empty.",
    "How do I sort a dictionary by value in Python?",
    "git rebase rewrites the commits of a branch on top of another one.",
    "The server returned HTTP 503 Service Unavailable.",
    "Kubernetes schedules containers onto nodes in a cluster.",
    "A neural network learns weights by gradient descent on a loss function.",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "Symptoms include fever, cough and shortness of breath.",
    "Regular exercise lowers the risk of heart disease.",
    "What are the side effects of ibuprofen?",
    "The court ruled that the contract was void.",
    "Tenants must give thirty days' written notice before moving out.",
    "The law takes effect on the first of January next year.",
    "The Roman Empire reached its greatest extent under Trajan.",
    "The printing press was invented by Johannes Gutenberg around 1440.",
    "World War II ended in 1945.",
    "The Amazon rainforest produces a large share of the world's oxygen.",
    "Mount Everest is the highest mountain above sea level.",
    "The river flooded the valley after days of heavy rain.",
    "Tomorrow will be sunny with a high of 24 degrees.",
    "I loved this movie, the acting was brilliant.",
    "The product broke after two days; I want a refund.",
    "Terrible customer service, I waited an hour on the phone.",
    "Great value for the price, would buy again.",
    "The hotel room was clean and the staff were friendly.",
    "Our flight was delayed by four hours.",
    "Book a table for two at eight tonight.",
    "Remind me to call mom tomorrow morning.",
    "Play some relaxing jazz music.",
    "Turn off the lights in the living room.",
    "The meeting has been moved to Thursday at 3 pm.",
    "Please find the quarterly report attached.",
    "Thank you for your order! It will ship within two business days.",
    "Your subscription will renew automatically on March 3.",
    "The novel follows a young woman who leaves her village for the city.",
    "He opened the old letter and recognized his grandfather's handwriting.",
    "Once upon a time there lived a king who had three daughters.",
    "The poem describes the sea at dawn.",
    "Jazz originated in New Orleans in the early twentieth century.",
    "The orchestra performed Beethoven's Ninth Symphony.",
    "Impressionist painters captured the changing effects of light.",
    "The museum is closed on Mondays.",
    "Electric cars are becoming cheaper to own than petrol cars.",
    "The new smartphone has a larger battery and a better camera.",
    "Solar panels convert sunlight directly into electricity.",
    "Renewable energy",
    "machine learning",
    "cheap flights to tokyo",
    "best pizza near me",
    "python list comprehension",
    "symptoms of flu",
    "mortgage interest rates",
    "used cars for sale",
    "how to tie a tie",
    "weather",
    "error",
    "hello",
    "yes",
    "The quick brown fox jumps over the lazy dog.",
    "Colorless green ideas sleep furiously.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Tel. +1 555 0100, 42 Main Street, Springfield",
    "Le chat est assis sur le tapis.",
    "Der Hund läuft durch den Park.",
    "El tiempo mañana será soleado.",
    "Il museo è chiuso il lunedì.",
    "東京は日本の首都です。",
    "오늘 날씨가 좋습니다.",
    "Москва — столица России.",
    "The committee will review the applications and announce the results next month, "
    "after consulting the external experts and the members of the board.",
    "Despite the rain, thousands of people gathered in the square to celebrate the "
    "anniversary of the city's founding with music, food and fireworks.",
    "The study, which followed ten thousand participants over twenty years, found no link "
    "between moderate coffee consumption and heart disease.",
    "To install the package, run the installer, accept the license agreement, choose a "
    "destination folder and restart the computer when prompted.",
)


# The GGUF keys of the stored calibration: the model's raw (pooled, not normalized) vectors of
# CALIBRATION_TEXTS as one float32 array, row after row, and the sha256 of the text set they
# belong to (vectors of another set are ignored).
CALIBRATION_VECTORS_KEY = "embedd.calibration.vectors"
CALIBRATION_SET_KEY = "embedd.calibration.texts_sha256"
CALIBRATION_SET_SHA256 = hashlib.sha256("\n".join(CALIBRATION_TEXTS).encode()).hexdigest()
