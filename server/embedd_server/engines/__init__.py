"""Engines: what computes vectors from token ids. Imports no grpc, no protobuf.

ONNX Runtime's official builds send usage telemetry to Microsoft unless ``ORT_DISABLE_TELEMETRY``
is set before it initializes (its Privacy.md). embedd works offline and sends nothing: the
variable is set here, before any engine module can load onnxruntime, and worker processes
inherit it. A deployment that wants ORT's telemetry can set it to 0 itself.
"""

import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
