"""The layout of a model store, shared by every backend: file names, model names, version numbers and
the ``checksums.sha256`` manifest.

Layout::

    <root>/<name>/<version>/model.safetensors   weights (safetensors; no pickle anywhere)
                            config.json         architecture, env, normalization, ...
                            metrics.json        training and evaluation results
                            checksums.sha256    sha256sum format, one line per file, written last
                            <extra files>       e.g. learning_curve.png, also checksummed

Versions are positive integers, increasing per model. A version is *complete* when its folder has an
integer name and a ``checksums.sha256`` that lists ``model.safetensors``, ``config.json`` and
``metrics.json``; only complete versions are listed and ``latest`` is the highest of them. A reader
verifies every listed checksum and raises :class:`CorruptVersionError` naming the file rather than
serving a damaged version. Names starting with ``.tmp-`` are a writer's work in progress: readers
ignore them.

``<root>/.training/<name>.json`` says that a run is training model ``name`` right now (a
:class:`TrainingMarker`), so that a request for a model that is not published yet can say it is on
its way. The run refreshes the marker's heartbeat every :data:`TRAINING_HEARTBEAT_S` seconds and
removes it when it ends; one not refreshed for :data:`TRAINING_STALE_S` seconds was left by a killed
run and is ignored. The folder's name starts with a dot, which no model name does, so it is never
listed as a model.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from dmm.store.errors import CorruptVersionError, StoreError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKSUMS_FILE = "checksums.sha256"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE)
RESERVED_FILES = (*REQUIRED_FILES, CHECKSUMS_FILE)
TMP_PREFIX = ".tmp-"
TRAINING_DIR = ".training"
# A training run rewrites its marker this often; a marker older than TRAINING_STALE_S is a dead run's.
TRAINING_HEARTBEAT_S = 60.0
TRAINING_STALE_S = 600.0
# How many version numbers a writer tries before giving up (each one lost to a racing writer).
MAX_PUBLISH_ATTEMPTS = 1000

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
_VERSION_RE = re.compile(r"[1-9][0-9]*", re.ASCII)
# sha256sum output: "<hex>  <name>" (text mode) or "<hex> *<name>" (binary mode).
_CHECKSUM_LINE_RE = re.compile(r"([0-9a-f]{64}) [ *](.+)", re.ASCII)
_MAX_NAME_LEN = 200
_CHUNK = 1 << 20


# ----------------------------------------------------------------- names and versions


def validate_name(name: object, what: str = "model name") -> str:
    """``name`` if it can name a model (or an extra file): one safe path component, not ``latest``."""
    if not isinstance(name, str):
        raise StoreError(f"{what} must be a string, got {type(name).__name__}")
    if len(name) > _MAX_NAME_LEN:
        raise StoreError(f"{what} is too long ({len(name)} characters, at most {_MAX_NAME_LEN})")
    if not _NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-', starting with a letter "
            "or digit (no path separators)"
        )
    if name == "latest":
        raise StoreError(f"invalid {what} 'latest': it is reserved for the newest version")
    return name


def is_model_name(name: str) -> bool:
    """Whether a folder (or key prefix) at the store's root may hold a model; others are ignored."""
    return bool(_NAME_RE.fullmatch(name)) and name != "latest" and len(name) <= _MAX_NAME_LEN


def is_version_name(name: str) -> bool:
    """Whether a folder (or key prefix) under a model is a version number; others are ignored."""
    return bool(_VERSION_RE.fullmatch(name))


def parse_version(version: object) -> int:
    """``3`` or ``"3"`` as a version number; StoreError for anything else (``latest`` included)."""
    if isinstance(version, bool):
        raise StoreError(f"invalid version {version!r}: use a positive integer or 'latest'")
    if isinstance(version, int):
        if version < 1:
            raise StoreError(f"invalid version {version}: versions start at 1")
        return version
    if isinstance(version, str) and _VERSION_RE.fullmatch(version.strip()):
        return int(version.strip())
    raise StoreError(f"invalid version {version!r}: use a positive integer or 'latest'")


# ----------------------------------------------------------------- the manifest


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def format_checksums(digests: Mapping[str, str]) -> bytes:
    """File name -> sha256 hex as a ``checksums.sha256`` (text-mode sha256sum lines, sorted)."""
    return "".join(f"{digests[f]}  {f}\n" for f in sorted(digests)).encode("utf-8")


def parse_checksums(text: str, where: str) -> dict[str, str]:
    """File name -> sha256 hex of a ``checksums.sha256`` text read from ``where`` (named in errors)."""
    listed: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        match = _CHECKSUM_LINE_RE.fullmatch(line)
        if match is None:
            raise CorruptVersionError(f"{where} line {lineno} is malformed: {line!r}")
        digest, fname = match.groups()
        if not _NAME_RE.fullmatch(fname) or fname == CHECKSUMS_FILE or fname in listed:
            raise CorruptVersionError(f"{where} line {lineno} lists a bad file name {fname!r}")
        listed[fname] = digest
    return listed


def read_checksums(path: Path) -> dict[str, str]:
    """The parsed ``checksums.sha256`` of the version folder ``path``; CorruptVersionError if it is
    missing or malformed."""
    checksum_path = path / CHECKSUMS_FILE
    try:
        text = checksum_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CorruptVersionError(f"{checksum_path} is missing: the version is incomplete") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CorruptVersionError(f"{checksum_path} cannot be read: {err}") from None
    return parse_checksums(text, str(checksum_path))


def check_required(listed: dict[str, str], where: str) -> dict[str, str]:
    """``listed`` (a parsed ``checksums.sha256`` read from ``where``) if it lists every required file."""
    for required in REQUIRED_FILES:
        if required not in listed:
            raise CorruptVersionError(f"{where} does not list {required}: the version is incomplete")
    return listed


def missing_file(where: str) -> CorruptVersionError:
    """The error for a file that the manifest lists but the store does not hold."""
    return CorruptVersionError(f"{where} is listed in {CHECKSUMS_FILE} but missing")


def corrupt_file(where: str) -> CorruptVersionError:
    """The error for a file whose bytes differ from its checksum in the manifest."""
    return CorruptVersionError(f"{where} fails its sha256 checksum: the file is corrupt")


# ----------------------------------------------------------------- leftovers


def stale_cutoff(older_than_s: float) -> float:
    """The time before which a killed writer's leftovers count as stale (``prune_stale``)."""
    if older_than_s < 0:
        raise StoreError(f"older_than_s must be >= 0, got {older_than_s}")
    return time.time() - older_than_s


# ----------------------------------------------------------------- training markers


@dataclass(frozen=True)
class TrainingMarker:
    """What ``<root>/.training/<name>.json`` records about a run training ``model`` (times: epoch s)."""

    model: str
    started: float
    heartbeat: float
    updates: int
    log: str
    host: str
    pid: int

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> TrainingMarker | None:
        """The marker ``data`` holds, or None when it is not one: a marker only adds to a message, so
        an unreadable one is ignored rather than turned into an error."""
        try:
            fields = json.loads(data.decode("utf-8"))
            marker = cls(**fields)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
            return None
        numbers = (marker.started, marker.heartbeat, marker.updates, marker.pid)
        if not isinstance(marker.model, str) or not all(isinstance(v, (int, float)) for v in numbers):
            return None
        return marker

    def is_stale(self, now: float | None = None) -> bool:
        """Whether the run stopped refreshing the marker long ago: it was killed, the marker is left."""
        return (time.time() if now is None else now) - self.heartbeat > TRAINING_STALE_S


def training_marker_name(name: str) -> str:
    """File name of model ``name``'s marker inside :data:`TRAINING_DIR`."""
    return f"{validate_name(name)}.json"
