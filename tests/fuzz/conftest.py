"""Shared by the fuzz tests: Hypothesis keeps its files out of the working tree and reports
failing examples in full.

- Hypothesis caches the constants it finds in the code (and Unicode tables) under
  ``.hypothesis/``; the tests keep no example database (database=None), and the cache goes to
  the temporary directory instead.
- Importing schemathesis' Hypothesis glue swaps Hypothesis' failing-example printer for one
  that prints nothing (a speed-up for schemathesis' own runner); these tests use schemathesis'
  strategies directly, and a failure must show the request that caused it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis.generation.hypothesis.builder  # noqa: F401  (applies the swap first)
from hypothesis import core
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.vendor import pretty

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "embedd-fuzz-hypothesis")
core.RepresentationPrinter = pretty.RepresentationPrinter  # type: ignore[attr-defined]
