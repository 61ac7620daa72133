"""Versioned model store in S3 (or an S3-compatible service): the local store's layout and guarantees.

``s3://bucket/prefix`` holds what a local store's folder holds, key for file::

    <prefix>/<name>/<version>/.claim              who claimed the number: written first
                              model.safetensors   then the files, as in a folder
                              config.json
                              metrics.json
                              <extra files>
                              checksums.sha256    the manifest: uploaded last

so ``aws s3 sync s3://bucket/prefix models`` gives a folder ``ModelStore`` reads as it is; the
training markers are ``<prefix>/.training/<name>.json`` too.

S3 has no rename, so a version cannot appear all at once as a folder does. Instead:

* **Claim.** A writer takes version ``n`` by creating ``<name>/<n>/.claim`` with ``If-None-Match: *``:
  S3 creates an object conditionally and atomically, so of two writers racing for ``n`` exactly one
  gets it; the other gets 412 Precondition Failed and claims ``n + 1``. Only the claimant writes under
  ``<name>/<n>/``, so the files of two writers never mix. The claimant then creates its claim once
  more, which must fail: a service that ignores the condition is refused, not trusted.
* **Commit.** The claimant uploads the files, then ``checksums.sha256`` last (conditionally too).
  A version exists iff its manifest exists and lists ``model.safetensors``, ``config.json`` and
  ``metrics.json``; S3's strong read-after-write consistency means a reader that sees the manifest
  can read every file uploaded before it.
* **A writer killed mid-upload** leaves a claimed number without a manifest: readers never list it,
  and its number is not reused (the next writer claims the one after it), so a listed number always
  names the same bytes. :meth:`S3ModelStore.prune_stale` deletes such leftovers.

Loading downloads a version once into a local cache (``$DMM_STORE_CACHE``, else
``$XDG_CACHE_HOME/dmm/store``, else ``~/.cache/dmm/store``; then ``<bucket>/<prefix>``), itself a
local store: each file is checked against the remote manifest while it is downloaded, the version
appears in the cache by an atomic rename, and it is loaded (and verified again) by ``ModelStore``. A
cached copy whose manifest differs from the remote one (the version was deleted and published again)
is replaced, and one that fails its checksums is fetched again.

A server lists the store at each session start to find ``latest``; ``refresh_s`` lets it reuse a
listing for that many seconds, so a new version serves new sessions within ``refresh_s`` without a
restart, and a busy server does not list the bucket per session. Manifests are read once each
(they never change once written). Endpoint, region and credentials come from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...) through botocore; a bad
URL, missing credentials, an unreachable endpoint or a missing bucket is a :class:`StoreError`
when the store is opened.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import s3fs
import torch
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)
from fsspec.exceptions import FSTimeoutError

from dmm.store.base import Checkpoint, PreparedVersion, VersionResolver
from dmm.store.errors import CorruptVersionError, StoreError
from dmm.store.layout import (
    CHECKSUMS_FILE,
    MAX_PUBLISH_ATTEMPTS,
    TMP_PREFIX,
    TRAINING_DIR,
    TrainingMarker,
    check_required,
    corrupt_file,
    is_model_name,
    is_version_name,
    missing_file,
    parse_checksums,
    read_checksums,
    sha256_file,
    stale_cutoff,
    training_marker_name,
    validate_name,
)
from dmm.store.local import ModelStore

SCHEME = "s3://"
CLAIM_FILE = ".claim"
CACHE_ENV = "DMM_STORE_CACHE"
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", re.ASCII)
_PREFIX_PART_RE = re.compile(r"[A-Za-z0-9_.=+-]+", re.ASCII)
_INSTALL_ATTEMPTS = 10
_T = TypeVar("_T")


def default_cache_dir() -> Path:
    """Where downloaded versions are kept: ``$DMM_STORE_CACHE``, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dmm" / "store"


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``); StoreError naming what is wrong."""
    if not url.startswith(SCHEME):
        raise StoreError(f"store URL {url!r} does not start with {SCHEME}")
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise StoreError(
            f"store URL {url!r}: {bucket!r} is not an S3 bucket name (3-63 lowercase letters, digits, "
            "'.' and '-'); use s3://bucket/prefix"
        )
    parts = prefix.strip("/").split("/") if prefix.strip("/") else []
    for part in parts:
        if not _PREFIX_PART_RE.fullmatch(part) or part in (".", ".."):
            raise StoreError(
                f"store URL {url!r}: prefix part {part!r} is not allowed (use letters, digits and "
                "'_.=+-', separated by single '/')"
            )
    return bucket, "/".join(parts)


def _endpoint() -> str:
    return (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the default AWS endpoint (set AWS_ENDPOINT_URL for another)"
    )


class S3ModelStore(VersionResolver):
    """The model store under an ``s3://bucket/prefix`` URL, with a local download cache.

    Same methods and errors as :class:`ModelStore`; safe for concurrent readers and writers on any
    number of machines, and for threads sharing one instance (the server's executor).
    """

    def __init__(self, url: str, refresh_s: float = 0.0) -> None:
        if refresh_s < 0:
            raise StoreError(f"the store's refresh interval must be >= 0 s, got {refresh_s}")
        self.bucket, self.prefix = parse_url(url)
        self.root = SCHEME + self.key()
        self.refresh_s = refresh_s
        self.cache = ModelStore(default_cache_dir() / self.bucket / self.prefix)
        # A private instance that never caches listings: new versions must show up.
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        self._lock = threading.Lock()
        self._scans: dict[str, tuple[float, dict[int, tuple[str | None, float]]]] = {}
        self._names: tuple[float, list[str]] | None = None
        self._manifests: dict[str, tuple[str, dict[str, str] | str]] = {}  # key: (ETag, listing or why not)
        self._check_bucket()

    def __repr__(self) -> str:
        return f"S3ModelStore({self.root!r})"

    # ----------------------------------------------------------------- S3 access

    def key(self, *parts: str | int) -> str:
        """``bucket/prefix/part/...``: the path s3fs takes (the URL without ``s3://``)."""
        return "/".join([self.bucket, *([self.prefix] if self.prefix else []), *map(str, parts)])

    def _call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run one S3 operation; a missing object (FileNotFoundError) or a lost conditional write
        (FileExistsError) is the caller's to handle, anything else becomes a StoreError."""
        try:
            return fn(*args, **kwargs)
        except (FileNotFoundError, FileExistsError):
            raise
        except (NoCredentialsError, PartialCredentialsError) as err:
            raise StoreError(
                f"no AWS credentials for store {self.root}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE ({err})"
            ) from None
        except (EndpointConnectionError, ConnectTimeoutError, FSTimeoutError) as err:
            raise StoreError(f"cannot reach {_endpoint()} for store {self.root}: {err}") from None
        except PermissionError as err:
            raise StoreError(f"access to store {self.root} denied: {err}") from None
        except (OSError, BotoCoreError, ClientError) as err:
            raise StoreError(f"S3 request for store {self.root} failed: {err}") from None

    def _check_bucket(self) -> None:
        """One request, so that a store that cannot be used fails when it is opened (before
        ``dmm train`` trains, or before the server reports ready), not at the first model."""
        try:
            self._call(
                self.fs.call_s3,
                "list_objects_v2",
                Bucket=self.bucket,
                Prefix=f"{self.prefix}/" if self.prefix else "",
                MaxKeys=1,
            )
        except FileNotFoundError:
            raise StoreError(f"bucket {self.bucket!r} of store {self.root} does not exist") from None

    def _read(self, key: str) -> bytes:
        try:
            return self._call(self.fs.cat_file, key)
        except FileNotFoundError:
            raise CorruptVersionError(f"{SCHEME}{key} is missing: the version is incomplete") from None

    # ----------------------------------------------------------------- listing

    def scan(self, name: str) -> dict[int, tuple[str | None, float]]:
        """Every numbered version of ``name``, complete or not: its manifest's ETag (None: no
        manifest) and when its newest object was written. One listing request per 1000 objects."""
        start = len(self.key(name)) + 1
        found: dict[int, tuple[str | None, float]] = {}
        for key, info in self._call(self.fs.find, self.key(name) + "/", detail=True).items():
            number, _, fname = key[start:].partition("/")
            if not is_version_name(number):
                continue
            etag, newest = found.get(int(number), (None, 0.0))
            if fname == CHECKSUMS_FILE:
                etag = info["ETag"]
            found[int(number)] = (etag, max(newest, info["LastModified"].timestamp()))
        return found

    def _listing(self, name: str) -> dict[int, tuple[str | None, float]]:
        """:meth:`scan`, reused for ``refresh_s`` seconds."""
        with self._lock:
            cached = self._scans.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.refresh_s:
            return cached[1]
        scan = self.scan(name)
        with self._lock:
            self._scans[name] = (time.monotonic(), scan)
        return scan

    def _forget(self, name: str) -> None:
        """Drop the listings that a publish made stale, so this process sees its own version."""
        with self._lock:
            self._scans.pop(name, None)
            self._names = None

    def _manifest(self, name: str, number: int, etag: str) -> dict[str, str]:
        """The parsed manifest of a listed version (read once per ETag); CorruptVersionError if it is
        malformed or lacks a required file."""
        key = self.key(name, number, CHECKSUMS_FILE)
        with self._lock:
            cached = self._manifests.get(key)
        if cached is None or cached[0] != etag:
            try:
                cached = (etag, self._remote_manifest(name, number)[1])
            except CorruptVersionError as err:
                cached = (etag, str(err))
            with self._lock:
                self._manifests[key] = cached
        if isinstance(cached[1], str):
            raise CorruptVersionError(cached[1])
        return cached[1]

    def _remote_manifest(self, name: str, number: int) -> tuple[bytes, dict[str, str]]:
        """The manifest of ``name`` ``number`` as stored, and parsed (required files checked)."""
        key = self.key(name, number, CHECKSUMS_FILE)
        data = self._read(key)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise CorruptVersionError(f"{SCHEME}{key} cannot be read: {err}") from None
        return data, check_required(parse_checksums(text, SCHEME + key), SCHEME + key)

    def _is_complete(self, name: str, number: int, etag: str | None) -> bool:
        if etag is None:
            return False
        try:
            self._manifest(name, number, etag)
        except CorruptVersionError:
            return False
        return True

    def _model_dirs(self) -> list[str]:
        """Names of the folders at the store's root that may be models."""
        try:
            entries = self._call(self.fs.ls, self.key(), detail=True)
        except FileNotFoundError:  # nothing published under the prefix yet
            return []
        names = [e["name"].rsplit("/", 1)[-1] for e in entries if e["type"] == "directory"]
        return sorted(n for n in names if is_model_name(n))

    def models(self) -> list[str]:
        """Names with at least one complete version, sorted."""
        with self._lock:
            cached = self._names
        if cached is not None and time.monotonic() - cached[0] < self.refresh_s:
            return cached[1]
        names = [n for n in self._model_dirs() if self.versions(n)]
        with self._lock:
            self._names = (time.monotonic(), names)
        return names

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending; ``[]`` if there are none."""
        validate_name(name)
        listing = self._listing(name)
        return [n for n in sorted(listing) if self._is_complete(name, n, listing[n][0])]

    def explain_incomplete(self, name: str, number: int) -> None:
        """A version still being uploaded (no manifest yet) is absent; one whose manifest is there
        but unusable is a CorruptVersionError saying why."""
        etag = self._listing(name).get(number, (None, 0.0))[0]
        if etag is not None:
            self._manifest(name, number, etag)

    # ----------------------------------------------------------------- reading

    def load(
        self, name: str, version: int | str | None = None, device: str | torch.device = "cpu"
    ) -> Checkpoint:
        """Download (once) and load one version, verified against its manifest; ``path`` of the
        result is the cached copy."""
        number = self._cached(name, version)
        try:
            return self.cache.load(name, number, device)
        except CorruptVersionError:
            # The copy was damaged on disk after it was verified: fetch it once more. Failing again,
            # the fault is in the bytes the store holds, so the message names the S3 object.
            self._evict(self.cache.version_path(name, number))
            self._cached(name, number)
            try:
                return self.cache.load(name, number, device)
            except CorruptVersionError as err:
                local = str(self.cache.version_path(name, number))
                raise CorruptVersionError(str(err).replace(local, SCHEME + self.key(name, number))) from None

    def read_config(self, name: str, version: int | str | None = None) -> dict:
        """``config.json`` of one version (checksum-verified), from the cached copy."""
        return self.cache.read_config(name, self._cached(name, version))

    def _cached(self, name: str, version: int | str | None) -> int:
        """Resolve ``version`` and make sure the cache holds exactly the stored bytes of it."""
        number = self.resolve(name, version)
        manifest, listed = self._remote_manifest(name, number)
        target = self.cache.version_path(name, number)
        if self._cached_listing(target) != listed:
            self._download(name, number, manifest, listed, target)
        return number

    @staticmethod
    def _cached_listing(target: Path) -> dict[str, str] | None:
        """The manifest of a cached version (None if there is none, or it cannot be read)."""
        try:
            return read_checksums(target)
        except CorruptVersionError:
            return None

    def _download(
        self, name: str, number: int, manifest: bytes, listed: dict[str, str], target: Path
    ) -> None:
        """Download into a temporary folder, checking each file, then rename it into the cache."""
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
            tmp.mkdir()
        except OSError as err:
            raise StoreError(
                f"cannot create the download cache {target.parent}: {err} (set {CACHE_ENV} to a writable "
                "folder)"
            ) from None
        try:
            for fname, digest in listed.items():
                self._fetch(self.key(name, number, fname), tmp / fname, digest)
            (tmp / CHECKSUMS_FILE).write_bytes(manifest)
            self._install(tmp, target, listed)
        except OSError as err:
            raise StoreError(f"cannot write the download cache {target.parent}: {err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _fetch(self, key: str, local: Path, digest: str) -> None:
        """Download one listed file and check it against the manifest's ``digest``."""
        try:
            self._call(self.fs.get_file, key, str(local))
        except FileNotFoundError:
            raise missing_file(SCHEME + key) from None
        if sha256_file(local) != digest:
            raise corrupt_file(SCHEME + key)

    def _install(self, tmp: Path, target: Path, listed: dict[str, str]) -> None:
        """Rename a downloaded version into place. Another process (a worker of the same server) may
        have installed it first: keep theirs if it is the same version, else replace it."""
        for _ in range(_INSTALL_ATTEMPTS):
            try:
                os.rename(tmp, target)
                return
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            if self._cached_listing(target) == listed:
                return
            self._evict(target)
        raise StoreError(f"cannot replace {target} in the download cache: other processes keep rewriting it")

    @staticmethod
    def _evict(target: Path) -> None:
        """Remove a cached version: renamed aside first, so no reader sees it half-deleted."""
        aside = target.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            os.rename(target, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)

    # ----------------------------------------------------------------- writing

    def publish_prepared(self, version: PreparedVersion) -> int:
        """Upload a new version and return its number: files first, manifest last.

        The version is written (serialized, checksummed) by the local store into a temporary folder
        first, so both stores write exactly the same versions."""
        name = version.name
        with tempfile.TemporaryDirectory(prefix="dmm-publish-") as tmp:
            staged = ModelStore(tmp)
            source = staged.version_path(name, staged.publish_prepared(version))
            number = self._claim(name)
            self._upload(name, number, source)
        self._forget(name)
        return number

    def _claim(self, name: str) -> int:
        """Take the next free version number by creating its claim object conditionally."""
        scan = self.scan(name)
        number = max(scan, default=0) + 1
        claim = {
            "writer": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": datetime.now(timezone.utc).isoformat(),
        }
        body = json.dumps(claim).encode("utf-8")
        for _ in range(MAX_PUBLISH_ATTEMPTS):
            key = self.key(name, number, CLAIM_FILE)
            try:
                self._call(self.fs.pipe_file, key, body, mode="create")
            except FileExistsError:  # another writer holds this number
                number += 1
                continue
            self._check_conditional_writes(name, number, key, body)
            return number
        raise StoreError(
            f"could not claim a version number of {name!r} in {self.root} after {MAX_PUBLISH_ATTEMPTS} tries"
        )

    def _check_conditional_writes(self, name: str, number: int, key: str, body: bytes) -> None:
        """Creating our claim a second time must fail. A service that ignores ``If-None-Match`` (or a
        botocore too old to send it, which s3fs then drops without a word) would let racing writers
        share a number, so such a store takes no versions."""
        try:
            self._call(self.fs.pipe_file, key, body, mode="create")
        except FileExistsError:
            return
        self._discard(name, number)
        raise StoreError(
            f"the S3 service of store {self.root} ignores conditional writes (If-None-Match), which "
            "versions are claimed with: use a service that supports them (AWS S3, MinIO, ...) and "
            "botocore >= 1.35.21"
        )

    def _upload(self, name: str, number: int, source: Path) -> None:
        listed = read_checksums(source)
        try:
            for fname in sorted(listed):
                self._call(self.fs.put_file, str(source / fname), self.key(name, number, fname))
        except BaseException:
            self._discard(name, number)
            raise
        manifest = self.key(name, number, CHECKSUMS_FILE)
        try:
            self._call(self.fs.put_file, str(source / CHECKSUMS_FILE), manifest, mode="create")
        except FileExistsError:
            raise StoreError(
                f"{SCHEME}{manifest} was written by another writer while this one uploaded version "
                f"{number}: its claim was deleted (by prune_stale with too short an age?)"
            ) from None

    def _discard(self, name: str, number: int) -> None:
        """Best effort after a failed upload: what is left is never listed, and prune_stale removes it."""
        with contextlib.suppress(Exception):
            self.fs.rm(self.key(name, number) + "/", recursive=True)

    # ----------------------------------------------------------------- training markers

    def read_training_marker(self, name: str) -> bytes | None:
        """The bytes of ``name``'s marker (``<prefix>/.training/<name>.json``), None when there is none."""
        try:
            return self._call(self.fs.cat_file, self.key(TRAINING_DIR, training_marker_name(name)))
        except FileNotFoundError:
            return None

    def write_training_marker(self, marker: TrainingMarker) -> None:
        """Upload the marker; S3 replaces an object at once, so readers see the old or the new one."""
        key = self.key(TRAINING_DIR, training_marker_name(marker.model))
        self._call(self.fs.pipe_file, key, marker.to_bytes())

    def remove_training_marker(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(self.fs.rm, self.key(TRAINING_DIR, training_marker_name(name)))

    def prune_stale(self, older_than_s: float = 3600.0) -> list[str]:
        """Delete versions without a manifest (writers killed mid-upload) whose newest object is older
        than ``older_than_s`` seconds; returns their URLs.

        A live writer uploads its files one after another, so a generous age never removes one in
        progress (unless a single file takes longer than that to upload)."""
        cutoff = stale_cutoff(older_than_s)
        removed: list[str] = []
        for name in self._model_dirs():
            for number, (etag, newest) in sorted(self.scan(name).items()):
                if etag is None and newest <= cutoff:
                    self._call(self.fs.rm, self.key(name, number) + "/", recursive=True)
                    removed.append(SCHEME + self.key(name, number))
            self._forget(name)
        return removed
