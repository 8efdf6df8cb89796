"""A worker's engine in a process of its own: llama.cpp's default layout on CPU.

Each :class:`ProcessEngine` starts ``python -m embedd_server.engines.worker_main``, which loads the
GGUF (memory-mapped, so the page cache holds the weights once for every process) and owns one
llama.cpp context (or, for the ONNX Runtime engine, one session on the graph the server built
once and wrote to a file). The worker thread in the server sends it a pack of token ids and
waits for the vectors, releasing the GIL while it waits.

Why processes: a crash inside llama.cpp kills one worker process, not the server: its callers
get UNAVAILABLE and the pool starts a new process. A hung decode can be stopped too (the process
is killed), which a thread can't. Speed is the same as threads on CPU; the measurements are in
docs/design.md ("Workers: llama.cpp in processes, ONNX Runtime in threads on one session").

The wire between them is a socket pair with length-prefixed messages
(``multiprocessing.connection``), no pickle:

- server -> worker, first: the :class:`EngineSpec` as JSON; then per pack its int32 values
  ``[n, lengths, pooling starts, token type starts, tokens ...]`` as they are
  (:attr:`~embedd_server.compute.pack.Pack.wire`); ``-n`` asks for every token's hidden state.
- worker -> server: ``R`` + int32 dimensions when ready; ``V`` + the float32 vectors (row
  major) per pack (one row per token for token states); ``E`` + a UTF-8 message when loading
  or decoding failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import subprocess
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import numpy.typing as npt

from embedd_server.compute.engine import EngineDied
from embedd_server.compute.pack import Pack
from embedd_server.errors import ModelLoadError

log = logging.getLogger(__name__)

# The first byte of each message from the worker: ready, vectors, error.
READY, VECTORS, ERROR = b"R", b"V", b"E"
_CLOSE_TIMEOUT_S = 5.0


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
    exact_attention: bool = False  # llama.cpp: f32 attention (see LlamaEngine)
    # Mean pooling from per-input starts (a model with include_prompt: false): see packing.
    pool_from_starts: bool = False
    engine: str = "llama.cpp"  # or "onnxruntime": then ``onnx_path`` is the graph to run
    onnx_path: str = ""
    spinning: bool = False  # ONNX Runtime: idle intra-op threads spin for work


class ProcessEngine:
    """An :class:`~embedd_server.compute.engine.Engine` that lives in a child process (a
    llama.cpp context or an ONNX Runtime session). One thread calls :meth:`embed`;
    :meth:`abort` may come from another."""

    def __init__(self, spec: EngineSpec) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "embedd_server.engines.worker_main", str(theirs.fileno())],
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
        if reply[:1] != READY:
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

    def embed(self, pack: Pack) -> npt.NDArray[np.float32]:
        """The pack's vectors (or token states), computed in the process: the pack's own
        bytes are sent, nothing is re-encoded."""
        reply = self._exchange(pack.wire)
        if pack.token_states:
            return reply.reshape(len(pack.tokens), -1)
        return reply.reshape(len(pack), self._dimensions)

    def _exchange(self, message: memoryview) -> npt.NDArray[np.float32]:
        """Sends a pack and returns the float32 values of the answer."""
        try:
            self._conn.send_bytes(message)
            reply = self._conn.recv_bytes()  # blocks without the GIL while the child decodes
        except (EOFError, OSError):
            raise EngineDied(
                f"worker process {self._process.pid} ended (exit code {self._process.poll()})"
            ) from None
        if reply[:1] == ERROR:
            raise RuntimeError(reply[1:].decode("utf-8", "replace"))
        return np.frombuffer(reply, dtype=np.float32, offset=1)

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
