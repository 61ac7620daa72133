"""Versioned model store on the local filesystem.

Layout::

    <root>/<name>/<version>/model.safetensors   weights (safetensors; no pickle anywhere)
                            config.json         architecture, env, normalization, ...
                            metrics.json        training and evaluation results
                            checksums.sha256    sha256sum format, one line per file, written last
                            <extra files>       e.g. learning_curve.png, also checksummed

Versions are positive integers, increasing per model. A version is written into
``<root>/<name>/.tmp-<uuid>/`` (files and folder fsynced) and then renamed to ``<root>/<name>/<n>``.
The rename is atomic, so a reader sees either no version ``n`` or a complete one. When two writers
race for the same number, the loser's rename fails because the target exists, and it retries with the
next number. A writer killed mid-way leaves only a ``.tmp-*`` folder, which readers ignore and
:meth:`ModelStore.prune_stale` removes.

A version is *complete* when its folder has an integer name and a ``checksums.sha256`` that lists
``model.safetensors``, ``config.json`` and ``metrics.json``; only complete versions are listed and
``latest`` is the highest of them. :meth:`ModelStore.load` verifies every listed checksum and raises
:class:`CorruptVersionError` naming the file rather than serving a damaged version.

:class:`ModelStore` is the store in a local folder. :func:`open_store` opens a store from what
``--store`` says: a folder, or an ``s3://bucket/prefix`` URL, which gives the S3 store of
:mod:`dmm.store_s3` (same layout and guarantees, for many servers reading one store).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import safetensors.torch
import torch

from dmm.errors import DMMError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CHECKSUMS_FILE = "checksums.sha256"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, METRICS_FILE)
RESERVED_FILES = (*REQUIRED_FILES, CHECKSUMS_FILE)
TMP_PREFIX = ".tmp-"

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
_VERSION_RE = re.compile(r"[1-9][0-9]*", re.ASCII)
# sha256sum output: "<hex>  <name>" (text mode) or "<hex> *<name>" (binary mode).
_CHECKSUM_LINE_RE = re.compile(r"([0-9a-f]{64}) [ *](.+)", re.ASCII)
_MAX_NAME_LEN = 200
_MAX_PUBLISH_ATTEMPTS = 1000
_CHUNK = 1 << 20


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


@dataclass(frozen=True)
class Checkpoint:
    """One loaded, checksum-verified version."""

    name: str
    version: int
    path: Path
    tensors: dict[str, torch.Tensor]
    config: dict
    metrics: dict


def _validate_name(name: object, what: str = "model name") -> str:
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


def _validate_json(value: Any, where: str) -> None:
    """Reject anything that would not survive a JSON round trip unchanged (NaN, non-str keys, objects)."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StoreError(f"{where} is {value}, which is not valid JSON")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _validate_json(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"{where} has a non-string key {key!r}; JSON keys must be strings")
            _validate_json(item, f"{where}[{key!r}]")
        return
    raise StoreError(
        f"{where} is a {type(value).__name__}, which is not JSON (use int, float, str, list, dict)"
    )


def _json_bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, Mapping):
        raise StoreError(f"{what} must be a dict, got {type(value).__name__}")
    _validate_json(value, what)
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _prepare_tensors(tensors: object) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage, as safetensors requires."""
    if not isinstance(tensors, Mapping):
        raise StoreError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    if not tensors:
        raise StoreError("tensors is empty: there are no weights to publish")
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str) or not key:
            raise StoreError(f"tensor names must be non-empty strings, got {key!r}")
        if key == "__metadata__":
            raise StoreError("tensor name '__metadata__' is reserved by safetensors")
        if not isinstance(value, torch.Tensor):
            raise StoreError(f"tensors[{key!r}] is a {type(value).__name__}, not a torch.Tensor")
        if value.layout != torch.strided:
            raise StoreError(f"tensors[{key!r}] has layout {value.layout}; only dense tensors can be stored")
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        whole = tensor.storage_offset() == 0 and tensor.nbytes == storage.nbytes()
        if storage.data_ptr() in seen_storages or not whole:
            tensor = tensor.clone()  # tied or sliced weights: give each its own buffer
        seen_storages.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the new entries durable; it is a POSIX notion.
    if os.name == "posix":
        _fsync_path(path)


def _write_bytes(path: Path, data: bytes) -> str:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return hashlib.sha256(data).hexdigest()


class VersionResolver:
    """``latest`` and ``resolve`` over a store's complete versions, the same for every backend.

    A backend gives ``root``, ``models()``, ``versions(name)`` and ``_explain_incomplete``, which
    raises CorruptVersionError where a version number exists but is unusable, so that a damaged
    version is reported as such instead of as absent.
    """

    root: Path | str

    def models(self) -> list[str]:
        raise NotImplementedError

    def versions(self, name: str) -> list[int]:
        raise NotImplementedError

    def _explain_incomplete(self, name: str, number: int) -> None:
        raise NotImplementedError

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
        _validate_name(name)
        if version is None or (isinstance(version, str) and version.strip() == "latest"):
            return self.latest(name)
        number = _parse_version(version)
        found = self.versions(name)
        if number in found:
            return number
        self._explain_incomplete(name, number)
        if not found:
            raise self._model_not_found(name)
        listing = ", ".join(str(v) for v in found)
        raise VersionNotFoundError(f"model {name!r} has no version {number}; available versions: {listing}")


class ModelStore(VersionResolver):
    """A folder of named models, each with integer versions. Safe for concurrent readers and writers."""

    def __init__(self, root: str | os.PathLike[str]):
        if not isinstance(root, (str, os.PathLike)):
            raise StoreError(f"store root must be a path, got {type(root).__name__}")
        text = os.fspath(root)
        if not isinstance(text, str):
            raise StoreError("store root must be a str path, not bytes")
        if "://" in text:
            raise StoreError(
                f"store root {text!r} is a URL; ModelStore takes only local folders (open_store also "
                "opens s3:// URLs)"
            )
        if not text:
            raise StoreError("store root is empty")
        self.root: Path = Path(os.path.expanduser(text))

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ----------------------------------------------------------------- listing

    def _check_root(self) -> bool:
        """True if the root folder exists; a root that is a file is an error.

        One ``stat`` answers both questions, so a root another process creates between two checks
        is never mistaken for a file.
        """
        try:
            mode = self.root.stat().st_mode
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(mode):
            raise StoreError(f"store root {self.root} exists and is not a folder")
        return True

    def _version_dirs(self, name: str) -> list[int]:
        """Integer-named entries under the model folder, complete or not."""
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in model_dir.iterdir() if _VERSION_RE.fullmatch(p.name))

    def _is_complete(self, path: Path) -> bool:
        try:
            listed = self._read_checksums(path)
        except CorruptVersionError:
            return False
        return all(f in listed for f in REQUIRED_FILES)

    def models(self) -> list[str]:
        """Names with at least one complete version, sorted."""
        if not self._check_root():
            return []
        names = [p.name for p in self.root.iterdir() if _NAME_RE.fullmatch(p.name) and p.name != "latest"]
        return sorted(n for n in names if len(n) <= _MAX_NAME_LEN and self.versions(n))

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending; ``[]`` if there are none."""
        _validate_name(name)
        if not self._check_root():
            return []
        return [v for v in self._version_dirs(name) if self._is_complete(self.root / name / str(v))]

    def _explain_incomplete(self, name: str, number: int) -> None:
        path = self.root / name / str(number)
        if path.is_dir():
            # An integer folder that is not complete: say why instead of pretending it is absent.
            self._verify_listing(path)

    def version_path(self, name: str, version: int) -> Path:
        """Folder of ``name`` version ``version``; pure path arithmetic, the folder need not exist."""
        _validate_name(name)
        return self.root / name / str(_parse_version(version))

    # ----------------------------------------------------------------- reading

    def _read_checksums(self, path: Path) -> dict[str, str]:
        """File name -> sha256 hex from ``checksums.sha256``; CorruptVersionError if missing or malformed."""
        checksum_path = path / CHECKSUMS_FILE
        try:
            text = checksum_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CorruptVersionError(f"{checksum_path} is missing: the version is incomplete") from None
        except (OSError, UnicodeDecodeError) as err:
            raise CorruptVersionError(f"{checksum_path} cannot be read: {err}") from None
        return parse_checksums(text, str(checksum_path))

    def _verify_listing(self, path: Path) -> dict[str, str]:
        return check_required(self._read_checksums(path), str(path / CHECKSUMS_FILE))

    @staticmethod
    def _read_verified(path: Path, fname: str, expected: str) -> bytes:
        """Read one file and check its sha256, so the bytes checked are the bytes used."""
        file_path = path / fname
        try:
            data = file_path.read_bytes()
        except FileNotFoundError:
            raise CorruptVersionError(f"{file_path} is listed in {CHECKSUMS_FILE} but missing") from None
        except OSError as err:
            raise CorruptVersionError(f"{file_path} cannot be read: {err}") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise CorruptVersionError(f"{file_path} fails its sha256 checksum: the file is corrupt")
        return data

    @staticmethod
    def _parse_json(path: Path, fname: str, data: bytes) -> dict:
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptVersionError(f"{path / fname} is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise CorruptVersionError(f"{path / fname} must hold a JSON object, got {type(value).__name__}")
        return value

    def load(
        self, name: str, version: int | str | None = None, device: str | torch.device = "cpu"
    ) -> Checkpoint:
        """Load and verify one version (every checksum listed), tensors on ``device``."""
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise StoreError(f"invalid device {device!r}: {err}") from None
        number = self.resolve(name, version)
        path = self.version_path(name, number)
        listed = self._verify_listing(path)
        contents: dict[str, bytes] = {}
        for fname, digest in listed.items():
            if fname in REQUIRED_FILES:
                contents[fname] = self._read_verified(path, fname, digest)
            else:
                file_path = path / fname
                if not file_path.is_file():
                    raise CorruptVersionError(f"{file_path} is listed in {CHECKSUMS_FILE} but missing")
                if _sha256_file(file_path) != digest:
                    raise CorruptVersionError(f"{file_path} fails its sha256 checksum: the file is corrupt")
        try:
            tensors = safetensors.torch.load(contents[WEIGHTS_FILE])
        except Exception as err:  # safetensors raises its own SafetensorError for bad headers
            raise CorruptVersionError(
                f"{path / WEIGHTS_FILE} is not a valid safetensors file: {err}"
            ) from None
        if target.type != "cpu":
            try:
                tensors = {k: t.to(target) for k, t in tensors.items()}
            except (RuntimeError, AssertionError) as err:  # e.g. torch built without CUDA
                raise StoreError(f"cannot load tensors onto device {target}: {err}") from None
        return Checkpoint(
            name=name,
            version=number,
            path=path,
            tensors=tensors,
            config=self._parse_json(path, CONFIG_FILE, contents[CONFIG_FILE]),
            metrics=self._parse_json(path, METRICS_FILE, contents[METRICS_FILE]),
        )

    def read_config(self, name: str, version: int | str | None = None) -> dict:
        """``config.json`` of one version (checksum-verified) without reading the weights."""
        number = self.resolve(name, version)
        path = self.version_path(name, number)
        listed = self._verify_listing(path)
        return self._parse_json(
            path, CONFIG_FILE, self._read_verified(path, CONFIG_FILE, listed[CONFIG_FILE])
        )

    # ----------------------------------------------------------------- writing

    def publish(
        self,
        name: str,
        tensors: dict[str, torch.Tensor],
        config: dict,
        metrics: dict | None = None,
        files: dict[str, bytes | os.PathLike[str]] | None = None,
    ) -> int:
        """Write a new version atomically and return its number."""
        _validate_name(name)
        prepared = _prepare_tensors(tensors)
        config_bytes = _json_bytes(config, "config")
        metrics_bytes = _json_bytes({} if metrics is None else metrics, "metrics")
        extra = _prepare_files(files)

        model_dir = self.root / name
        try:
            if not self._check_root():
                self.root.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.root.parent)
            if not model_dir.is_dir():
                model_dir.mkdir(exist_ok=True)
                _fsync_dir(self.root)
            tmp = model_dir / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            tmp.mkdir()
        except OSError as err:
            raise StoreError(f"cannot create {model_dir}: {err}") from None
        try:
            digests = self._write_version(tmp, prepared, config_bytes, metrics_bytes, extra)
            lines = "".join(f"{digests[f]}  {f}\n" for f in sorted(digests))
            _write_bytes(tmp / CHECKSUMS_FILE, lines.encode("utf-8"))
            _fsync_dir(tmp)
            version = self._rename_into_place(model_dir, tmp)
        except BaseException as err:
            # Nothing half-written stays behind; the temp folder was never visible as a version.
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise StoreError(f"cannot write a new version of {name!r} in {model_dir}: {err}") from err
            raise
        _fsync_dir(model_dir)  # make the rename durable
        return version

    @staticmethod
    def _write_version(
        tmp: Path,
        tensors: dict[str, torch.Tensor],
        config_bytes: bytes,
        metrics_bytes: bytes,
        extra: dict[str, bytes | Path],
    ) -> dict[str, str]:
        digests: dict[str, str] = {}
        weights = tmp / WEIGHTS_FILE
        try:
            safetensors.torch.save_file(tensors, weights, metadata={"format": "pt"})
        except (ValueError, TypeError, RuntimeError) as err:
            raise StoreError(f"cannot serialize tensors with safetensors: {err}") from None
        # safetensors creates the file owner-only; give it the same umask-based mode as the other
        # files, so a server running as another user (e.g. in a container) can read the store.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(weights, 0o666 & ~umask)
        _fsync_path(weights)
        digests[WEIGHTS_FILE] = _sha256_file(weights)
        digests[CONFIG_FILE] = _write_bytes(tmp / CONFIG_FILE, config_bytes)
        digests[METRICS_FILE] = _write_bytes(tmp / METRICS_FILE, metrics_bytes)
        for fname, source in extra.items():
            if isinstance(source, Path):
                try:
                    shutil.copyfile(source, tmp / fname)
                except OSError as err:
                    raise StoreError(f"cannot copy extra file {fname!r} from {source}: {err}") from None
                _fsync_path(tmp / fname)
                digests[fname] = _sha256_file(tmp / fname)
            else:
                digests[fname] = _write_bytes(tmp / fname, source)
        return digests

    def _rename_into_place(self, model_dir: Path, tmp: Path) -> int:
        for _ in range(_MAX_PUBLISH_ATTEMPTS):
            existing = self._version_dirs(model_dir.name)
            version = existing[-1] + 1 if existing else 1
            try:
                os.rename(tmp, model_dir / str(version))
            except OSError as err:
                # Another writer took this number first (its folder is non-empty): try the next one.
                if err.errno in (errno.EEXIST, errno.ENOTEMPTY) and (model_dir / str(version)).exists():
                    continue
                raise StoreError(f"cannot publish into {model_dir}: {err}") from None
            return version
        raise StoreError(
            f"could not claim a version number in {model_dir} after {_MAX_PUBLISH_ATTEMPTS} tries"
        )

    def prune_stale(self, older_than_s: float = 3600.0) -> list[Path]:
        """Remove ``.tmp-*`` folders left by killed writers, untouched for ``older_than_s`` seconds.

        A live writer keeps touching its folder, so a generous age never removes one in progress.
        """
        if older_than_s < 0:
            raise StoreError(f"older_than_s must be >= 0, got {older_than_s}")
        if not self._check_root():
            return []
        cutoff = time.time() - older_than_s
        removed: list[Path] = []
        for model_dir in sorted(self.root.iterdir()):
            if not model_dir.is_dir():
                continue
            for tmp in sorted(model_dir.glob(f"{TMP_PREFIX}*")):
                if not tmp.is_dir():
                    continue
                try:
                    newest = max([tmp.stat().st_mtime, *(p.stat().st_mtime for p in tmp.iterdir())])
                except FileNotFoundError:
                    continue  # its writer finished or another pruner got there first
                if newest <= cutoff:
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(tmp)
        return removed


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


def check_required(listed: dict[str, str], where: str) -> dict[str, str]:
    """``listed`` (a parsed ``checksums.sha256`` read from ``where``) if it lists every required file."""
    for required in REQUIRED_FILES:
        if required not in listed:
            raise CorruptVersionError(f"{where} does not list {required}: the version is incomplete")
    return listed


def _parse_version(version: object) -> int:
    if isinstance(version, bool):
        raise StoreError(f"invalid version {version!r}: use a positive integer or 'latest'")
    if isinstance(version, int):
        if version < 1:
            raise StoreError(f"invalid version {version}: versions start at 1")
        return version
    if isinstance(version, str) and _VERSION_RE.fullmatch(version.strip()):
        return int(version.strip())
    raise StoreError(f"invalid version {version!r}: use a positive integer or 'latest'")


def _prepare_files(files: object) -> dict[str, bytes | Path]:
    """Validate extra files: name -> bytes, or name -> path of an existing file to copy."""
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise StoreError(f"files must be a dict of file name -> bytes or path, got {type(files).__name__}")
    out: dict[str, bytes | Path] = {}
    for fname, source in files.items():
        _validate_name(fname, "extra file name")
        if fname in RESERVED_FILES:
            raise StoreError(f"extra file name {fname!r} is reserved by the store")
        if isinstance(source, (bytes, bytearray, memoryview)):
            out[fname] = bytes(source)
        elif isinstance(source, os.PathLike):
            path = Path(os.path.expanduser(os.fspath(source)))
            if not path.is_file():
                raise StoreError(f"extra file {fname!r}: {path} is not a file")
            out[fname] = path
        else:
            raise StoreError(
                f"extra file {fname!r} must be bytes or a pathlib.Path, got {type(source).__name__}"
            )
    return out


class Store(Protocol):
    """What the trainer and the server use of a store: :class:`ModelStore` or the S3 store."""

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


def open_store(root: str | os.PathLike[str], refresh_s: float = 0.0) -> Store:
    """The store ``--store`` names: an ``s3://bucket/prefix`` URL or a local folder.

    ``refresh_s`` is how long an S3 store reuses a listing (a long-running server sets it, so that
    session starts do not list the bucket each time); a local folder is always read afresh.
    """
    text = os.fspath(root) if isinstance(root, (str, os.PathLike)) else root
    if isinstance(text, str) and "://" in text and not text.startswith("s3://"):
        raise StoreError(f"store {text!r}: unsupported URL; use a local folder or s3://bucket/prefix")
    if isinstance(text, str) and text.startswith("s3://"):
        try:
            from dmm.store_s3 import S3ModelStore
        except ModuleNotFoundError as err:
            raise StoreError(
                f"store {text!r} needs {err.name}, which is not installed: "
                "pip install 'decision-metamamba[s3]'"
            ) from None
        return S3ModelStore(text, refresh_s=refresh_s)
    return ModelStore(root)
