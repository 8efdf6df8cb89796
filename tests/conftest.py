"""Shared fixtures: paths to ../shared, a fake-engine server, the real default model's server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ServerProcess, ServerThread

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE_DIR = SHARED / "reference" / "all-MiniLM-L6-v2"
STSB_TEST = SHARED / "data" / "stsbenchmark" / "sts-test.csv"
MODELS_DIR = REPO / "models"
DEFAULT_MODEL = "all-minilm-l6-v2"


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[ServerThread]:
    """An in-process server on port 0 over the fake engine, with models 'fake' and 'other'."""
    with ServerThread.with_fake_models(tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def real_server() -> Iterator[ServerProcess]:
    """`embedd serve` on the real default model, as a subprocess (shared by the session).
    Its vector cache is off: these tests compare what the engine computes (alone, batched,
    over each route); tests/integration/test_cache_real.py runs the cache."""
    with ServerProcess.start(MODELS_DIR, ["--cache-mb", "0"]) as server:
        yield server
