"""The calibration `embedd import` stores in a GGUF: the model's own raw vectors of the fixed
text set that int8/uint8 vectors are scaled by (embedd_server.core.quantization).

They are computed by the engine the server itself would use for the file, through the same
core (tokenization, scheduling, pooling), so they are exactly what the server would compute on
first use for a file without them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from embedd_server.compute.engine import FloatMatrix
from embedd_server.compute.settings import EngineSettings
from embedd_server.core.registry import ModelRegistry
from embedd_server.core.service import EmbeddingService
from embedd_server.engines.choice import load_runtime


async def _calibrate(path: Path) -> FloatMatrix:
    # One in-process worker: a one-off job, not a server.
    settings = EngineSettings(
        models_dir=path.parent, default_model=path.stem, workers=1, worker_processes=False
    )
    registry = ModelRegistry(settings, load_runtime)
    try:
        return await EmbeddingService(settings, registry).calibration_vectors(path.stem)
    finally:
        await registry.close()


def calibration_vectors(path: Path) -> FloatMatrix:
    """The raw vectors of the calibration texts by the model in the GGUF file ``path``.

    Runs its own event loop in a thread, so it may be called from async code too."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _calibrate(path)).result()
