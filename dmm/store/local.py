"""Versioned model store on the local filesystem, in the layout of :mod:`dmm.store.layout`.

A version is written into ``<root>/<name>/.tmp-<uuid>/`` (files and folder fsynced) and then renamed
to ``<root>/<name>/<n>``. The rename is atomic, so a reader sees either no version ``n`` or a complete
one. When two writers race for the same number, the loser's rename fails because the target exists,
and it retries with the next number. A writer killed mid-way leaves only a ``.tmp-*`` folder, which
readers ignore and :meth:`ModelStore.prune_stale` removes. A training marker
(``<root>/.training/<name>.json``) is replaced the same way: written under a temporary name, renamed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path

import safetensors.torch
import torch

from dmm.store.base import Checkpoint, PreparedVersion, VersionResolver
from dmm.store.errors import CorruptVersionError, StoreError
from dmm.store.layout import (
    CHECKSUMS_FILE,
    CONFIG_FILE,
    MAX_PUBLISH_ATTEMPTS,
    METRICS_FILE,
    REQUIRED_FILES,
    TMP_PREFIX,
    TRAINING_DIR,
    WEIGHTS_FILE,
    TrainingMarker,
    check_required,
    corrupt_file,
    format_checksums,
    is_model_name,
    is_version_name,
    missing_file,
    parse_version,
    read_checksums,
    sha256_file,
    stale_cutoff,
    training_marker_name,
    validate_name,
)


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
        return sorted(int(p.name) for p in model_dir.iterdir() if is_version_name(p.name))

    @staticmethod
    def _is_complete(path: Path) -> bool:
        try:
            listed = read_checksums(path)
        except CorruptVersionError:
            return False
        return all(f in listed for f in REQUIRED_FILES)

    def models(self) -> list[str]:
        """Names with at least one complete version, sorted."""
        if not self._check_root():
            return []
        return sorted(p.name for p in self.root.iterdir() if is_model_name(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending; ``[]`` if there are none."""
        validate_name(name)
        if not self._check_root():
            return []
        return [v for v in self._version_dirs(name) if self._is_complete(self.root / name / str(v))]

    def explain_incomplete(self, name: str, number: int) -> None:
        """An integer folder that is not complete: say why instead of pretending it is absent."""
        path = self.root / name / str(number)
        if path.is_dir():
            self._verify_listing(path)

    def version_path(self, name: str, version: int) -> Path:
        """Folder of ``name`` version ``version``; pure path arithmetic, the folder need not exist."""
        validate_name(name)
        return self.root / name / str(parse_version(version))

    # ----------------------------------------------------------------- reading

    @staticmethod
    def _verify_listing(path: Path) -> dict[str, str]:
        return check_required(read_checksums(path), str(path / CHECKSUMS_FILE))

    @staticmethod
    def _read_verified(path: Path, fname: str, expected: str) -> bytes:
        """Read one file and check its sha256, so the bytes checked are the bytes used."""
        file_path = path / fname
        try:
            data = file_path.read_bytes()
        except FileNotFoundError:
            raise missing_file(str(file_path)) from None
        except OSError as err:
            raise CorruptVersionError(f"{file_path} cannot be read: {err}") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise corrupt_file(str(file_path))
        return data

    @staticmethod
    def _verify_extra(path: Path, fname: str, expected: str) -> None:
        """Check an extra file without holding it in memory (it is not loaded, only verified)."""
        file_path = path / fname
        if not file_path.is_file():
            raise missing_file(str(file_path))
        if sha256_file(file_path) != expected:
            raise corrupt_file(str(file_path))

    @staticmethod
    def _parse_json(path: Path, fname: str, data: bytes) -> dict:
        try:
            value = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptVersionError(f"{path / fname} is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise CorruptVersionError(f"{path / fname} must hold a JSON object, got {type(value).__name__}")
        return value

    @staticmethod
    def _load_tensors(path: Path, data: bytes, target: torch.device) -> dict[str, torch.Tensor]:
        try:
            tensors = safetensors.torch.load(data)
        except Exception as err:  # safetensors raises its own SafetensorError for bad headers
            raise CorruptVersionError(
                f"{path / WEIGHTS_FILE} is not a valid safetensors file: {err}"
            ) from None
        if target.type == "cpu":
            return tensors
        try:
            return {k: t.to(target) for k, t in tensors.items()}
        except (RuntimeError, AssertionError) as err:  # e.g. torch built without CUDA
            raise StoreError(f"cannot load tensors onto device {target}: {err}") from None

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
        contents: dict[str, bytes] = {}
        for fname, digest in self._verify_listing(path).items():
            if fname in REQUIRED_FILES:
                contents[fname] = self._read_verified(path, fname, digest)
            else:
                self._verify_extra(path, fname, digest)
        return Checkpoint(
            name=name,
            version=number,
            path=path,
            tensors=self._load_tensors(path, contents[WEIGHTS_FILE], target),
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

    def publish_prepared(self, version: PreparedVersion) -> int:
        """Write a new version atomically (a temporary folder renamed into place) and return its number."""
        name = version.name
        model_dir = self.root / name
        tmp = self._make_tmp(model_dir)
        try:
            digests = self._write_version(tmp, version)
            _write_bytes(tmp / CHECKSUMS_FILE, format_checksums(digests))
            _fsync_dir(tmp)
            number = self._rename_into_place(model_dir, tmp)
        except BaseException as err:
            # Nothing half-written stays behind; the temp folder was never visible as a version.
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, OSError):
                raise StoreError(f"cannot write a new version of {name!r} in {model_dir}: {err}") from err
            raise
        _fsync_dir(model_dir)  # make the rename durable
        return number

    def _make_tmp(self, model_dir: Path) -> Path:
        """A new temporary folder in ``model_dir``, creating the root and ``model_dir`` as needed."""
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
        return tmp

    @staticmethod
    def _write_weights(tmp: Path, tensors: dict[str, torch.Tensor]) -> str:
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
        return sha256_file(weights)

    @staticmethod
    def _copy_extra(tmp: Path, fname: str, source: Path) -> str:
        try:
            shutil.copyfile(source, tmp / fname)
        except OSError as err:
            raise StoreError(f"cannot copy extra file {fname!r} from {source}: {err}") from None
        _fsync_path(tmp / fname)
        return sha256_file(tmp / fname)

    def _write_version(self, tmp: Path, version: PreparedVersion) -> dict[str, str]:
        """Write every file of a version into ``tmp``; file name -> sha256 hex."""
        digests = {
            WEIGHTS_FILE: self._write_weights(tmp, version.tensors),
            CONFIG_FILE: _write_bytes(tmp / CONFIG_FILE, version.config),
            METRICS_FILE: _write_bytes(tmp / METRICS_FILE, version.metrics),
        }
        for fname, source in version.files.items():
            if isinstance(source, Path):
                digests[fname] = self._copy_extra(tmp, fname, source)
            else:
                digests[fname] = _write_bytes(tmp / fname, source)
        return digests

    def _rename_into_place(self, model_dir: Path, tmp: Path) -> int:
        for _ in range(MAX_PUBLISH_ATTEMPTS):
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
            f"could not claim a version number in {model_dir} after {MAX_PUBLISH_ATTEMPTS} tries"
        )

    # ----------------------------------------------------------------- training markers

    def _marker_path(self, name: str) -> Path:
        return self.root / TRAINING_DIR / training_marker_name(name)

    def read_training_marker(self, name: str) -> bytes | None:
        """The bytes of ``name``'s marker, None when there is none (or it cannot be read)."""
        try:
            return self._marker_path(name).read_bytes()
        except OSError:
            return None

    def write_training_marker(self, marker: TrainingMarker) -> None:
        """Write the marker to a temporary name and rename it over the old one, so a reader never
        sees half a marker."""
        path = self._marker_path(marker.model)
        tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(marker.to_bytes())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write the training marker {path}: {err}") from None

    def remove_training_marker(self, name: str) -> None:
        path = self._marker_path(name)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise StoreError(f"cannot remove the training marker {path}: {err}") from None

    def prune_stale(self, older_than_s: float = 3600.0) -> list[Path]:
        """Remove ``.tmp-*`` folders left by killed writers, untouched for ``older_than_s`` seconds.

        A live writer keeps touching its folder, so a generous age never removes one in progress.
        """
        cutoff = stale_cutoff(older_than_s)
        if not self._check_root():
            return []
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
