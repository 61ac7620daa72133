"""Versioned model store: named models, each with integer versions of checksummed files.

:mod:`dmm.store.layout` is the layout every backend shares (file names, names and versions, the
``checksums.sha256`` manifest), :mod:`dmm.store.base` the :class:`Store` protocol and version
resolution, :mod:`dmm.store.inputs` what ``publish`` accepts. :class:`ModelStore`
(:mod:`dmm.store.local`) is the store in a local folder; :class:`~dmm.store.s3.S3ModelStore`
(:mod:`dmm.store.s3`) the same layout and guarantees in S3, for many servers reading one store, with
a local store as its download cache. :func:`open_store` opens either from what ``--store`` says.

The S3 module is imported only by :func:`open_store`, when a URL asks for it, so that s3fs and
botocore stay optional; it builds on the modules here, never the other way round.
"""

from __future__ import annotations

import os

from dmm.store.base import Checkpoint, Store, VersionResolver
from dmm.store.errors import CorruptVersionError, ModelNotFoundError, StoreError, VersionNotFoundError
from dmm.store.layout import (
    CHECKSUMS_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    REQUIRED_FILES,
    RESERVED_FILES,
    TMP_PREFIX,
    WEIGHTS_FILE,
    check_required,
    parse_checksums,
)
from dmm.store.local import ModelStore

__all__ = [
    "CHECKSUMS_FILE",
    "CONFIG_FILE",
    "METRICS_FILE",
    "REQUIRED_FILES",
    "RESERVED_FILES",
    "TMP_PREFIX",
    "WEIGHTS_FILE",
    "Checkpoint",
    "CorruptVersionError",
    "ModelNotFoundError",
    "ModelStore",
    "Store",
    "StoreError",
    "VersionNotFoundError",
    "VersionResolver",
    "check_required",
    "open_store",
    "parse_checksums",
]


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
            from dmm.store.s3 import S3ModelStore
        except ModuleNotFoundError as err:
            raise StoreError(
                f"store {text!r} needs {err.name}, which is not installed: "
                "pip install 'decision-metamamba[s3]'"
            ) from None
        return S3ModelStore(text, refresh_s=refresh_s)
    return ModelStore(root)
