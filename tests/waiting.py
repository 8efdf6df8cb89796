"""Waiting in tests for something to happen: a condition polled until a deadline, never a fixed
sleep (which is too short on a loaded machine and too long everywhere else)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


def wait_until(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Polls ``condition`` until it is true; fails the test, naming ``what``, if it is still
    false after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.01)
