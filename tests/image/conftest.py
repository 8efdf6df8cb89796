"""Fixtures of the image tests: the engine `make image` uses and the image it builds, once per
session (test_image.py and test_k8s_play.py share one build)."""

from __future__ import annotations

import time

import pytest

from tests.image.engine import Engine, find_engine, image_tool


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The engine `make image` uses; the test fails, naming the install, when none works."""
    return find_engine()


@pytest.fixture(scope="session")
def image(engine: Engine) -> str:
    """`make image`: cached layers make it quick after the first build (a few seconds when
    nothing changed, so an image that is present and current is not rebuilt)."""
    started = time.monotonic()
    image_tool("build", engine.environment, timeout=1400)
    print(f"make image: {time.monotonic() - started:.1f} s")  # shown by -rP
    return engine.image
