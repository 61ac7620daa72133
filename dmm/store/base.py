"""What every store backend shares: the :class:`Store` protocol that the trainer and the server use,
the :class:`Checkpoint` a load returns, and :class:`VersionResolver`, which turns ``latest`` or a
number into a version the same way for every backend, and keeps the "being trained" markers."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from dmm.store.errors import ModelNotFoundError, StoreError, VersionNotFoundError, started_ago
from dmm.store.inputs import json_bytes, prepare_files, prepare_tensors
from dmm.store.layout import TRAINING_HEARTBEAT_S, TrainingMarker, parse_version, validate_name

logger = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]  # a version's weights by name
Files = (
    dict[str, bytes | os.PathLike[str]] | None
)  # a version's extra files: their bytes, or the file to copy


@dataclass(frozen=True)
class Checkpoint:
    """One loaded, checksum-verified version."""

    name: str
    version: int
    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict
    metrics: dict


@dataclass(frozen=True)
class PreparedVersion:
    """A version to publish, checked and serialized: what every backend writes, byte for byte."""

    name: str
    tensors: dict[str, torch.Tensor]  # contiguous CPU tensors, no shared storage
    config: bytes  # config.json
    metrics: bytes  # metrics.json
    files: dict[str, bytes | Path]  # extra files: their bytes, or the file to copy

    @classmethod
    def of(
        cls, name: str, tensors: Tensors, config: dict, metrics: dict | None = None, files: Files = None
    ) -> PreparedVersion:
        """Check every input (StoreError) before anything is written, so a bad one leaves no trace."""
        return cls(
            validate_name(name),
            prepare_tensors(tensors),
            json_bytes(config, "config"),
            json_bytes({} if metrics is None else metrics, "metrics"),
            prepare_files(files),
        )


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
        self, name: str, tensors: Tensors, config: dict, metrics: dict | None = None, files: Files = None
    ) -> int: ...

    def training(self, name: str) -> TrainingMarker | None: ...

    def mark_training(
        self, name: str, updates: int, log: str, heartbeat_s: float = TRAINING_HEARTBEAT_S
    ) -> contextlib.AbstractContextManager[TrainingMarker]: ...


class VersionResolver(ABC):
    """``latest`` and ``resolve`` over a store's complete versions, the same for every backend, and
    the markers of models being trained (:class:`~dmm.store.layout.TrainingMarker`).

    A backend gives ``root``, :meth:`models`, :meth:`versions` and :meth:`explain_incomplete`, so
    that a damaged version is reported as such instead of as absent, reads, writes and removes
    the marker files, and writes a :class:`PreparedVersion` (:meth:`publish_prepared`).
    """

    root: Path | str

    def publish(
        self, name: str, tensors: Tensors, config: dict, metrics: dict | None = None, files: Files = None
    ) -> int:
        """Publish a new version of ``name`` and return its number."""
        return self.publish_prepared(PreparedVersion.of(name, tensors, config, metrics, files))

    @abstractmethod
    def publish_prepared(self, version: PreparedVersion) -> int:
        """Write ``version`` as the next version number of its model, all or nothing; returns the number."""

    @abstractmethod
    def models(self) -> list[str]:
        """Names with at least one complete version, sorted."""

    @abstractmethod
    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending; ``[]`` if there are none."""

    @abstractmethod
    def explain_incomplete(self, name: str, number: int) -> None:
        """Raise CorruptVersionError if version ``number`` of ``name`` exists but is unusable."""

    @abstractmethod
    def read_training_marker(self, name: str) -> bytes | None:
        """The bytes of ``name``'s marker file, or None when there is none."""

    @abstractmethod
    def write_training_marker(self, marker: TrainingMarker) -> None:
        """Create or replace the marker of ``marker.model``, atomically for readers."""

    @abstractmethod
    def remove_training_marker(self, name: str) -> None:
        """Remove ``name``'s marker; no error when there is none."""

    def training(self, name: str) -> TrainingMarker | None:
        """The marker of a run training ``name`` now; None when there is none, or it is stale or
        unreadable (the marker only adds to a message, so reading it never fails a request)."""
        try:
            data = self.read_training_marker(validate_name(name))
        except StoreError:
            return None
        marker = None if data is None else TrainingMarker.from_bytes(data)
        if marker is None or marker.model != name or marker.is_stale():
            return None
        return marker

    @contextlib.contextmanager
    def mark_training(
        self, name: str, updates: int, log: str, heartbeat_s: float = TRAINING_HEARTBEAT_S
    ) -> Iterator[TrainingMarker]:
        """Mark ``name`` as being trained (``updates`` of them, progress in ``log``) for the ``with``
        block, refreshing the heartbeat every ``heartbeat_s`` s; the marker is removed however the
        block ends, and one left by a killed process goes stale."""
        now = time.time()
        marker = TrainingMarker(
            validate_name(name), now, now, updates, log, socket.gethostname(), os.getpid()
        )
        self.write_training_marker(marker)
        stop = threading.Event()
        beat = threading.Thread(
            target=self._beat, args=(marker, stop, heartbeat_s), name=f"training-marker-{name}", daemon=True
        )
        beat.start()
        try:
            yield marker
        finally:
            stop.set()
            beat.join()
            self.remove_training_marker(name)

    def _beat(self, marker: TrainingMarker, stop: threading.Event, heartbeat_s: float) -> None:
        """Refresh the marker until ``stop``. A failed refresh is logged, not raised: training goes on,
        and at worst the marker goes stale (the model is then only "unknown" until it is published)."""
        while not stop.wait(heartbeat_s):
            try:
                self.write_training_marker(replace(marker, heartbeat=time.time()))
            except StoreError as err:
                logger.warning("cannot refresh the training marker of %s: %s", marker.model, err)

    def latest(self, name: str) -> int:
        """The highest complete version of ``name``."""
        found = self.versions(name)
        if not found:
            raise self._model_not_found(name)
        return found[-1]

    def _model_not_found(self, name: str) -> ModelNotFoundError:
        available = self.models()
        listing = ", ".join(available) if available else "none"
        marker = self.training(name)
        if marker is None:
            return ModelNotFoundError(
                f"unknown model {name!r} in store {self.root}; available models: {listing}", name, available
            )
        return ModelNotFoundError(
            f"model {name!r} is being trained into store {self.root} ({started_ago(marker.started)}, "
            f"{marker.updates} updates, log: {marker.log}); available models: {listing}",
            name,
            available,
            marker.started,
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
