"""What the stream handlers refuse: :class:`Abort` ends an RPC with a status, and the input checks that
``Act`` and ``ActVector`` share (finite values that fit the model's float32)."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)


class Abort(Exception):
    """Raised inside a handler to end its RPC with ``code`` and ``details``; ``reason`` is how the
    session it ends is counted (dmm_sessions_ended)."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "error") -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason


def invalid(details: str) -> Abort:
    return Abort(grpc.StatusCode.INVALID_ARGUMENT, details)


def check_float32(field: str, value: float, where: str = "") -> None:
    """Inputs must be finite in the model's float32, or the session's actions would be NaN."""
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise invalid(f"{field} is {value:g}, outside float32{where}")


def check_float32_rows(field: str, values: np.ndarray, where: Callable[[int], str]) -> None:
    """:func:`check_float32` for each of ``values`` [n] at once; ``where(i)`` names value i in the error
    (built only then: a vector stream's message has many rows)."""
    bad = ~(np.isfinite(values) & (np.abs(values) <= FLOAT32_MAX))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise invalid(f"{field} is {values[i]:g}, outside float32{where(i)}")


def check_states(states: np.ndarray, mean: np.ndarray, std: np.ndarray, where: Callable[[int], str]) -> None:
    """Every row of ``states`` [n, state_dim] finite, and in float32 range before and after the
    model's normalization; ``where(i)`` names row i in the error (e.g. " (step 3)").

    The common case, every value fine, costs two reductions; only a bad state takes the checks that
    name it (NaN compares False, so non-finite values take them too)."""
    if states.size:
        scaled = np.abs(states - mean) / std
        if np.abs(states).max() <= FLOAT32_MAX and scaled.max() <= FLOAT32_MAX:
            return
    finite = np.isfinite(states)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        bad = np.flatnonzero(~finite[row]).tolist()
        raise invalid(f"state has non-finite values at indices {bad}{where(row)}")
    too_large = (np.abs(states) > FLOAT32_MAX) | (np.abs(states - mean) / std > FLOAT32_MAX)
    if too_large.any():
        row = int(np.flatnonzero(too_large.any(axis=1))[0])
        i = int(np.flatnonzero(too_large[row])[0])
        raise invalid(f"state[{i}] = {states[row, i]:g} is out of the model's float32 range{where(row)}")
