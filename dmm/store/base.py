"""What every store backend shares: the :class:`Store` protocol that the trainer and the server use,
the :class:`Checkpoint` a load returns, and :class:`VersionResolver`, which turns ``latest`` or a
number into a version the same way for every backend."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from dmm.store.errors import ModelNotFoundError, VersionNotFoundError
from dmm.store.layout import parse_version, validate_name


@dataclass(frozen=True)
class Checkpoint:
    """One loaded, checksum-verified version."""

    name: str
    version: int
    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict
    metrics: dict


class Store(Protocol):
    """What the trainer and the server use of a store: the local folder store or the S3 store."""

    @property
    def root(self) -> Path | str:
        """Where the store is, for messages: a folder or an ``s3://`` URL."""

    def models(self) -> list[str]: ...

    def versions(self, name: str) -> list[int]: ...

    def latest(self, name: str) -> int: ...

    def resolve(self, name: str, version: int | str | None = None) -> int: ...

    def load(
        self, name: str, version: int | str | None = None, device: str | torch.device = "cpu"
    ) -> Checkpoint: ...

    def read_config(self, name: str, version: int | str | None = None) -> dict: ...

    def publish(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        config: dict,
        metrics: dict | None = None,
        files: dict[str, bytes | os.PathLike[str]] | None = None,
    ) -> int: ...


class VersionResolver(ABC):
    """``latest`` and ``resolve`` over a store's complete versions, the same for every backend.

    A backend gives ``root``, :meth:`models`, :meth:`versions` and :meth:`explain_incomplete`, so
    that a damaged version is reported as such instead of as absent.
    """

    root: Path | str

    @abstractmethod
    def models(self) -> list[str]:
        """Names with at least one complete version, sorted."""

    @abstractmethod
    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending; ``[]`` if there are none."""

    @abstractmethod
    def explain_incomplete(self, name: str, number: int) -> None:
        """Raise CorruptVersionError if version ``number`` of ``name`` exists but is unusable."""

    def latest(self, name: str) -> int:
        """The highest complete version of ``name``."""
        found = self.versions(name)
        if not found:
            raise self._model_not_found(name)
        return found[-1]

    def _model_not_found(self, name: str) -> ModelNotFoundError:
        available = self.models()
        listing = ", ".join(available) if available else "none"
        return ModelNotFoundError(
            f"unknown model {name!r} in store {self.root}; available models: {listing}", name, available
        )

    def resolve(self, name: str, version: int | str | None = None) -> int:
        """Turn ``None``, ``"latest"``, ``"3"`` or ``3`` into an existing complete version number."""
        validate_name(name)
        if version is None or (isinstance(version, str) and version.strip() == "latest"):
            return self.latest(name)
        number = parse_version(version)
        found = self.versions(name)
        if number in found:
            return number
        self.explain_incomplete(name, number)
        if not found:
            raise self._model_not_found(name)
        listing = ", ".join(str(v) for v in found)
        raise VersionNotFoundError(f"model {name!r} has no version {number}; available versions: {listing}")
