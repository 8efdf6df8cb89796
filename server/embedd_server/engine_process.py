"""A worker's engine in a process of its own: the server's default layout on CPU.

Each :class:`ProcessEngine` starts ``python -m embedd_server.engine_process``, which loads the
GGUF (memory-mapped, so the page cache holds the weights once for every process) and owns one
llama.cpp context. The worker thread in the server sends it a pack of token ids and waits for
the vectors, releasing the GIL while it waits.

Why processes: on the 2-core machines measured here two processes with one single-thread
context each ran ~10% faster than two threads of one process (docs/design.md), and under load
the contexts compute without ever waiting for the server's GIL. And a crash inside llama.cpp
kills one worker process, not the server: its callers get UNAVAILABLE and the pool starts a
new process. A hung decode can be stopped too (the process is killed), which a thread can't.

The wire between them is a socket pair with length-prefixed messages
(``multiprocessing.connection``), no pickle:

- server -> worker, first: the :class:`EngineSpec` as JSON; then per pack: int32 values
  ``[n, len_1 .. len_n, tokens ...]``.
- worker -> server: ``R`` + int32 dimensions when ready; ``V`` + the float32 vectors (row
  major) per pack; ``E`` + a UTF-8 message when loading or decoding failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import numpy.typing as npt

from embedd_server.errors import ModelLoadError
from embedd_server.logs import configure_logging

log = logging.getLogger(__name__)

_READY, _VECTORS, _ERROR = b"R", b"V", b"E"
_CLOSE_TIMEOUT_S = 5.0


class EngineDied(RuntimeError):
    """The engine's process ended (crashed or was killed): the worker must be replaced."""


@dataclass(frozen=True)
class EngineSpec:
    """What a worker process needs to build its engine."""

    path: str
    max_tokens: int
    max_sequences: int
    n_threads: int
    n_gpu_layers: int
    pooling_type: int | None = None
    log_json: bool = False  # the server's log format, for the worker's own lines


def flatten(
    sequences: Sequence[Sequence[int]],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """Token sequences as (all tokens in one array, each sequence's length)."""
    if any(not ids for ids in sequences):
        raise ValueError("empty token sequence")
    lengths = np.fromiter(map(len, sequences), dtype=np.int32, count=len(sequences))
    tokens = np.fromiter(chain.from_iterable(sequences), dtype=np.int32, count=lengths.sum())
    return tokens, lengths


def encode_pack(sequences: Sequence[Sequence[int]]) -> bytes:
    """A pack of token sequences as the int32 message ``[n, lengths..., tokens...]``."""
    tokens, lengths = flatten(sequences)
    return np.int32(len(lengths)).tobytes() + lengths.tobytes() + tokens.tobytes()


def decode_pack(message: bytes) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """The (tokens, lengths) of an :func:`encode_pack` message."""
    values = np.frombuffer(message, dtype=np.int32)
    count = int(values[0])
    lengths = values[1 : 1 + count]
    tokens = values[1 + count :]
    if count < 1 or int(lengths.sum()) != len(tokens) or (lengths < 1).any():
        raise ValueError("malformed pack")
    return tokens, lengths


class ProcessEngine:
    """An :class:`~embedd_server.engine.Engine` whose llama.cpp context lives in a child
    process. One thread calls :meth:`embed_batch`; :meth:`abort` may come from another."""

    def __init__(self, spec: EngineSpec) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "embedd_server.engine_process", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._closed = False
        self._dimensions = self._handshake(spec)

    def _handshake(self, spec: EngineSpec) -> int:
        try:
            self._conn.send_bytes(json.dumps(dataclasses.asdict(spec)).encode())
            reply = self._conn.recv_bytes()
        except (EOFError, OSError):
            self.close()
            raise ModelLoadError(
                f"The worker process for {Path(spec.path).name} exited while loading it "
                f"(exit code {self._process.poll()}); see the server log."
            ) from None
        if reply[:1] != _READY:
            self.close()
            raise ModelLoadError(reply[1:].decode("utf-8", "replace"))
        return int(np.frombuffer(reply[1:5], dtype=np.int32)[0])

    @property
    def dimensions(self) -> int:
        return self._dimensions

    @property
    def pid(self) -> int:
        """The worker process (tests kill it to prove a crash is survived)."""
        return self._process.pid

    def embed_batch(self, sequences: Sequence[Sequence[int]]) -> npt.NDArray[np.float32]:
        message = encode_pack(sequences)
        try:
            self._conn.send_bytes(message)
            reply = self._conn.recv_bytes()  # blocks without the GIL while the child decodes
        except (EOFError, OSError):
            raise EngineDied(
                f"worker process {self._process.pid} ended (exit code {self._process.poll()})"
            ) from None
        if reply[:1] == _ERROR:
            raise RuntimeError(reply[1:].decode("utf-8", "replace"))
        vectors = np.frombuffer(reply, dtype=np.float32, offset=1)
        return vectors.reshape(len(sequences), self._dimensions)

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def abort(self) -> None:
        """Kills the process now (a hung decode): the waiting thread gets EngineDied."""
        with contextlib.suppress(ProcessLookupError):
            self._process.kill()

    def close(self) -> None:
        """Ends the process: it exits when it reads the end of its socket."""
        if self._closed:
            return
        self._closed = True
        self._conn.close()
        try:
            self._process.wait(_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


# --- the worker process --------------------------------------------------------------------


def _serve(conn: Connection) -> int:
    from embedd_server.engine import LlamaEngine, LlamaModelWeights

    spec = EngineSpec(**json.loads(conn.recv_bytes()))
    configure_logging("warning", spec.log_json)
    try:
        weights = LlamaModelWeights(Path(spec.path), spec.n_gpu_layers)
        engine = LlamaEngine(
            weights, spec.max_tokens, spec.max_sequences, spec.n_threads, spec.pooling_type
        )
    except Exception as exc:  # the server turns this into a ModelLoadError
        conn.send_bytes(_ERROR + str(exc).encode())
        return 1
    conn.send_bytes(_READY + np.int32(engine.dimensions).tobytes())
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return 0  # the server closed the socket (or died)
        try:
            tokens, lengths = decode_pack(message)
            vectors = engine.embed_packed(tokens, lengths)
        except Exception as exc:
            log.exception("decode failed")
            conn.send_bytes(_ERROR + str(exc).encode())
            continue
        conn.send_bytes(_VECTORS + vectors.tobytes())


def main(argv: Sequence[str]) -> int:
    """Entry point of a worker process: ``python -m embedd_server.engine_process FD``."""
    # Ctrl-C reaches the whole process group: the server drains and then closes our socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # No PR_SET_PDEATHSIG: it fires when the *thread* that started us ends, and replacement
    # workers are started by the thread of the worker they replace. If the server dies, our
    # socket reaches its end and we exit after the decode in progress.
    conn = Connection(int(argv[1]))
    try:
        return _serve(conn)
    finally:
        conn.close()


if __name__ == "__main__":
    os._exit(main(sys.argv))  # no interpreter teardown: llama.cpp's globals may outlive it
