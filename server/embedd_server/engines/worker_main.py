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
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import numpy.typing as npt

from embedd_server.compute.engine import FloatMatrix
from embedd_server.compute.pack import Pack, decode_pack
from embedd_server.engines.llama import LlamaEngine, LlamaModelWeights
from embedd_server.engines.process import ERROR, READY, VECTORS, EngineSpec
from embedd_server.logs import configure_logging

log = logging.getLogger(__name__)

Int32Array = npt.NDArray[np.int32]
PackedEmbed = Callable[[Pack], FloatMatrix]


def _build(spec: EngineSpec) -> tuple[int, PackedEmbed]:
    """The engine the spec names: its width and how it embeds a (tokens, lengths) pack."""
    if spec.engine.startswith("onnxruntime"):
        from embedd_server.engines.onnx import OnnxEngine

        session = OnnxEngine(
            spec.onnx_path, threads=spec.n_threads, max_batch_tokens=spec.max_tokens
        )

        def embed_onnx(pack: Pack) -> FloatMatrix:
            sequences: list[Int32Array] = np.split(pack.tokens, np.cumsum(pack.lengths)[:-1])
            if pack.token_states:
                return session.token_states(sequences)  # type: ignore[arg-type]
            return session.embed_batch(
                sequences,  # type: ignore[arg-type]  # arrays index like lists
                pack.pooling_starts.tolist() if pack.pooling_starts.any() else None,
                pack.token_type_starts.tolist(),
            )

        return session.dimensions, embed_onnx
    weights = LlamaModelWeights(Path(spec.path), spec.n_gpu_layers)
    context = LlamaEngine.from_spec(weights, spec)

    def embed_llama(pack: Pack) -> FloatMatrix:
        if pack.token_states:
            raise ValueError("llama.cpp's engine gives pooled vectors only, not token states")
        return context.embed_packed(
            pack.tokens, pack.lengths, pack.pooling_starts, pack.token_type_starts
        )

    return context.dimensions, embed_llama


def _serve(conn: Connection) -> int:
    spec = EngineSpec(**json.loads(conn.recv_bytes()))
    configure_logging("warning", spec.log_json)
    try:
        dimensions, embed = _build(spec)
    except Exception as exc:  # the server turns this into a ModelLoadError
        conn.send_bytes(ERROR + str(exc).encode())
        return 1
    conn.send_bytes(READY + np.int32(dimensions).tobytes())
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return 0  # the server closed the socket (or died)
        try:
            vectors = embed(decode_pack(message))
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
