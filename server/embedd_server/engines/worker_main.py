"""The program of a worker process: ``python -m embedd_server.engines.worker_main FD``.

It reads its :class:`~embedd_server.engines.process.EngineSpec` from the socket ``FD``, loads
the GGUF with llama.cpp (or opens an ONNX Runtime session on the graph file the spec names),
answers ready, then decodes one pack per message until the server
closes the socket (see :mod:`embedd_server.engines.process` for the wire).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from embedd_server.compute.engine import Engine
from embedd_server.compute.pack import Pack
from embedd_server.engines.llama import LlamaEngine, LlamaModelWeights
from embedd_server.engines.process import ERROR, READY, VECTORS, EngineSpec
from embedd_server.logs import configure_logging

log = logging.getLogger(__name__)


def _build(spec: EngineSpec) -> Engine:
    """The engine the spec names: an ONNX Runtime session on the graph file, or a llama.cpp
    context on the GGUF. Either takes the packs it is sent as they are."""
    if spec.engine.startswith("onnxruntime"):
        from embedd_server.engines.onnx import OnnxEngine, open_session

        session = open_session(spec.onnx_path, threads=spec.n_threads, spinning=spec.spinning)
        return OnnxEngine(session, max_batch_tokens=spec.max_tokens)
    weights = LlamaModelWeights(Path(spec.path), spec.n_gpu_layers)
    return LlamaEngine.from_spec(weights, spec)


def _serve(conn: Connection) -> int:
    spec = EngineSpec(**json.loads(conn.recv_bytes()))
    configure_logging("warning", spec.log_json)
    try:
        engine = _build(spec)
    except Exception as exc:  # the server turns this into a ModelLoadError
        conn.send_bytes(ERROR + str(exc).encode())
        return 1
    conn.send_bytes(READY + np.int32(engine.dimensions).tobytes())
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return 0  # the server closed the socket (or died)
        try:
            vectors = engine.embed(Pack.from_wire(message))
        except Exception as exc:
            log.exception("decode failed")
            conn.send_bytes(ERROR + str(exc).encode())
            continue
        conn.send_bytes(VECTORS + vectors.tobytes())


def main(argv: Sequence[str]) -> int:
    """Entry point of a worker process: ``python -m embedd_server.engines.worker_main FD``."""
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
