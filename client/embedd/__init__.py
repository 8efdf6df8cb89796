"""embedd: the Python client of an embedd text-embedding server.

::

    from embedd import Client

    with Client("127.0.0.1:50051") as client:
        vectors = client.embed(["hello world", "the cat sat"])  # numpy (2, d) float32

:class:`Client` blocks; :class:`AsyncClient` is the same API for asyncio. Failed calls raise
an :class:`EmbeddClientError` subclass (:class:`NotFound`, :class:`InvalidArgument`...).
The generated gRPC stubs are in :mod:`embedd.v1` for callers who want them.
"""

from embedd._convert import (
    ClassifyResult,
    EmbedResult,
    LabelScore,
    ModelInfo,
    RankedDocument,
    RerankResult,
    SparseResult,
    SparseVector,
    TokenizeResult,
)
from embedd.aio import AsyncClient
from embedd.client import Client
from embedd.errors import (
    Cancelled,
    DeadlineExceeded,
    EmbeddClientError,
    InternalServerError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)

__all__ = [
    "AsyncClient",
    "Cancelled",
    "ClassifyResult",
    "Client",
    "DeadlineExceeded",
    "EmbedResult",
    "EmbeddClientError",
    "InternalServerError",
    "InvalidArgument",
    "LabelScore",
    "ModelInfo",
    "NotFound",
    "RankedDocument",
    "RerankResult",
    "ResourceExhausted",
    "SparseResult",
    "SparseVector",
    "TokenizeResult",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]
