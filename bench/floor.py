"""The floor: what one request costs with no embedding work at all.

``python -m bench.floor PORT`` serves ``embedd.v1.Embedder/Embed`` on grpc.aio, as ``embedd
serve`` does, but answers every request at once with a fixed unit vector per text (built
from numpy as the real server builds its answers). Under the same ghz load as the real
server, its CPU per request plus ghz's is what the gRPC stack and the load generator take
from the machine's cores before any text is embedded; the bench derives from it the best
ratio to the engine's ceiling that any Python gRPC server could reach on this machine.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from embedd.v1 import embedder_pb2 as pb
from embedd.v1 import embedder_pb2_grpc as pb_grpc
from embedd_server.rpc import vectors as vector_messages
from embedd_server.rpc.reflection import enable_reflection

DIMENSIONS = 384


class FloorServicer(pb_grpc.EmbedderServicer):
    """Embed answered with fixed vectors: the cost of the RPC itself."""

    def __init__(self) -> None:
        vector = np.ones(DIMENSIONS, dtype=np.float32)
        self._vector = vector / np.linalg.norm(vector)

    async def Embed(self, request: pb.EmbedRequest, context: object) -> pb.EmbedResponse:
        vectors = np.tile(self._vector, (max(1, len(request.texts)), 1))
        return pb.EmbedResponse(
            model="floor",
            embeddings=vector_messages.embeddings(vectors),
            usage=pb.Usage(prompt_tokens=len(request.texts), total_tokens=len(request.texts)),
            request_id=request.request_id,
        )


async def serve(port: int) -> None:
    server = grpc.aio.server()
    # Only Embed is served: the stubs mark the other RPCs abstract; gRPC answers UNIMPLEMENTED.
    pb_grpc.add_EmbedderServicer_to_server(FloorServicer(), server)  # type: ignore[abstract]
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    enable_reflection([pb.DESCRIPTOR.services_by_name["Embedder"].full_name], server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"floor server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m bench.floor PORT", file=sys.stderr)
        return 2
    asyncio.run(serve(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
