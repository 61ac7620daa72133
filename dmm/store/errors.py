"""Errors of the model store, the same for every backend.

All are :class:`~dmm.errors.DMMError`: caused by input or by the store's contents, not by a bug, so
the CLI prints them on one line and the server maps them to gRPC status codes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from dmm.errors import DMMError


class StoreError(DMMError):
    """Bad input to the store, or a store that cannot be used."""


def started_ago(started: float, now: float | None = None) -> str:
    """``started 3 min ago``: how long ago a run started, to the unit a person waiting cares about."""
    seconds = max(0, int((time.time() if now is None else now) - started))
    if seconds < 60:
        return f"started {seconds} s ago"
    if seconds < 3600:
        return f"started {seconds // 60} min ago"
    return f"started {seconds // 3600} h {seconds % 3600 // 60} min ago"


class ModelNotFoundError(StoreError):
    """No complete version of the requested model exists.

    ``training_started`` (epoch seconds) is set when a run is training the model right now, so that
    the message says it is coming rather than that it is unknown.
    """

    def __init__(
        self,
        message: str,
        model: str = "",
        available: Sequence[str] = (),
        training_started: float | None = None,
    ) -> None:
        super().__init__(message)
        self.model = model
        self.available = list(available)
        self.training_started = training_started

    def remote_message(self) -> str:
        """The same, without the store's location (for clients of a server)."""
        listing = ", ".join(self.available) if self.available else "none"
        if self.training_started is not None:
            return (
                f"model {self.model!r} is being trained ({started_ago(self.training_started)}); "
                f"available models: {listing}"
            )
        return f"unknown model {self.model!r}; available models: {listing}"


class VersionNotFoundError(StoreError):
    """The model exists but the requested version does not."""


class CorruptVersionError(StoreError):
    """A version folder is incomplete or a file fails its checksum; it is never served."""
