"""How the tests are run, held to what the README promises: `make setup` then `make test`
passes on a fresh machine, so `pytest` alone (pyproject's testpaths) collects only what needs
nothing beyond `make setup`; what needs more has a target of its own, which CI runs and the
README names; `make test-fast` leaves out the `slow` marker that pyproject registers."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Test directories that need more than `make setup`, and the make target that runs each.
OWN_TARGETS = {"tests/image": "test-image"}  # podman or docker (root to install)


def _pytest_options() -> dict[str, object]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    options: dict[str, object] = pyproject["tool"]["pytest"]["ini_options"]
    return options


def _recipe(target: str) -> str:
    """The commands of a Makefile target."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert match, f"the Makefile has no target {target}"
    return match.group(1)


def test_pytest_collects_every_test_directory_but_those_with_their_own_target() -> None:
    test_dirs = {
        path.parent.relative_to(ROOT).as_posix() for path in ROOT.glob("tests/*/test_*.py")
    }
    assert set(OWN_TARGETS) <= test_dirs
    assert set(_pytest_options()["testpaths"]) == test_dirs - set(OWN_TARGETS)  # type: ignore[call-overload]
    assert "pytest -q\n" in _recipe("test")  # `make test` is pytest over the testpaths


def test_each_own_target_runs_its_directory_in_ci_and_the_readme_names_it() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    for directory, target in OWN_TARGETS.items():
        assert f"pytest -q {directory}" in _recipe(target)
        assert re.search(rf"^make {target}$", ci, re.MULTILINE), f".ci/run skips {target}"
        assert f"make {target}" in readme


def test_make_test_fast_leaves_out_the_registered_slow_marker() -> None:
    markers = [str(line).split(":")[0] for line in _pytest_options()["markers"]]  # type: ignore[attr-defined]
    assert "slow" in markers  # --strict-markers: an unregistered marker is an error
    assert '-m "not slow"' in _recipe("test-fast")
    assert "make test-fast" in (ROOT / "README.md").read_text()
