"""Server reflection that also answers for method names.

Load testers such as ghz ask reflection for the file containing ``embedd.v1.Embedder.Embed``;
protobuf's (upb) descriptor pool only resolves messages, enums and services, so the stock
servicer answers NOT_FOUND ("Symbol not found"). This pool falls back to the service.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pool
from grpc import aio
from grpc_reflection.v1alpha import reflection


class MethodAwarePool:
    """The default descriptor pool, plus lookups of ``package.Service.Method`` symbols."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> Any:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method_name = symbol.rpartition(".")
            service = self._pool.FindServiceByName(service_name)  # KeyError if not one
            if method_name not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(service_names: Iterable[str], server: aio.Server) -> None:
    """Registers server reflection for these services (and reflection itself)."""
    names = (*service_names, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=MethodAwarePool())
