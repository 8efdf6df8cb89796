"""The container engine `make image` uses, as the image tests call it: tools/image.sh picks
podman or docker (and writes podman a containers.conf for this machine's quirks); these helpers
call that same engine with that same configuration."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

import pytest

from tests.conftest import REPO

IMAGE_TOOL = REPO / "tools" / "image.sh"


@dataclass(frozen=True)
class Engine:
    """How to call the container engine tools/image.sh chose (and its containers.conf)."""

    name: str
    image: str
    environment: Mapping[str, str]

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        return self.run(*args, check=check, timeout=timeout).stdout.strip()

    def run(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """The engine's command; a failure fails the test with its message when ``check``."""
        result = subprocess.run(
            [self.name, *args],
            env=dict(self.environment),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(f"{self.name} {' '.join(args)} failed: {result.stderr.strip()}")
        return result


def clean_environment() -> dict[str, str]:
    """This process's environment without EMBEDD_* (tools/image.sh run passes those along)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("EMBEDD_")}


def image_tool(command: str, environment: Mapping[str, str], timeout: float) -> str:
    """``tools/image.sh COMMAND`` (what `make image` and `make image-run` run); its stdout."""
    result = subprocess.run(
        [str(IMAGE_TOOL), command],
        env=dict(environment),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"tools/image.sh {command} failed:\n{result.stdout[-3000:]}{result.stderr}")
    return result.stdout


def find_engine() -> Engine:
    """The engine `make image` uses; the test fails, naming the install, when none works."""
    lines = image_tool("env", clean_environment(), timeout=60).splitlines()
    found = dict(line.split("=", 1) for line in lines if "=" in line)
    environment = clean_environment()
    if found["CONTAINERS_CONF"]:
        environment["CONTAINERS_CONF"] = found["CONTAINERS_CONF"]
    return Engine(found["ENGINE"], found["IMAGE"], environment)
