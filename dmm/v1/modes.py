"""The proto's ``InferenceMode`` values and the library's mode names: one mapping for server,
client and tools (``INFERENCE_MODE_UNSPECIFIED`` means "the server's default" and has no name)."""

from __future__ import annotations

from dmm.v1 import policy_pb2

MODE_ENUM: dict[str, int] = {
    "window": policy_pb2.INFERENCE_MODE_WINDOW,
    "recurrent": policy_pb2.INFERENCE_MODE_RECURRENT,
}
MODE_NAME: dict[int, str] = {value: name for name, value in MODE_ENUM.items()}
