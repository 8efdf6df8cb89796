"""The native RPCs' ``Truncation`` enum as the core's truncate flag and direction.

Protobuf enums are open: a client may send a number the proto does not name (``truncation:
99``), and the message keeps it. Such a value is refused with INVALID_ARGUMENT naming the field,
never taken for one of the known modes.
"""

from __future__ import annotations

from embedd.v1 import embedder_pb2 as pb
from embedd_server.core.tokenization import LEFT, RIGHT
from embedd_server.errors import InvalidInput

_KNOWN = ", ".join(f"{name} ({number})" for name, number in pb.Truncation.items())


def native_truncation(value: int) -> tuple[bool, str]:
    """(truncate, direction) of a Truncation value; InvalidInput for an unknown number."""
    if value not in pb.Truncation.values():
        raise InvalidInput(
            f"truncation {value} is not a known Truncation; use one of {_KNOWN}.",
            param="truncation",
        )
    return value != pb.TRUNCATION_NONE, LEFT if value == pb.TRUNCATION_START else RIGHT
