"""Errors of the model store, the same for every backend.

All are :class:`~dmm.errors.DMMError`: caused by input or by the store's contents, not by a bug, so
the CLI prints them on one line and the server maps them to gRPC status codes.
"""

from __future__ import annotations

from collections.abc import Sequence

from dmm.errors import DMMError


class StoreError(DMMError):
    """Bad input to the store, or a store that cannot be used."""


class ModelNotFoundError(StoreError):
    """No complete version of the requested model exists."""

    def __init__(self, message: str, model: str = "", available: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.model = model
        self.available = list(available)

    def remote_message(self) -> str:
        """The same, without the store's location (for clients of a server)."""
        listing = ", ".join(self.available) if self.available else "none"
        return f"unknown model {self.model!r}; available models: {listing}"


class VersionNotFoundError(StoreError):
    """The model exists but the requested version does not."""


class CorruptVersionError(StoreError):
    """A version folder is incomplete or a file fails its checksum; it is never served."""
