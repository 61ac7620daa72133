"""What ``publish`` accepts: weights, JSON config and metrics, and extra files, each checked before
anything is written, so that a bad input is a :class:`StoreError` naming it and never a half-written
version. The S3 store stages its versions through the local store, so both accept exactly these."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dmm.store.errors import StoreError
from dmm.store.layout import RESERVED_FILES, validate_name


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


def json_bytes(value: Any, what: str) -> bytes:
    """A dict as the JSON file the store writes (sorted keys, indented); ``what`` names it in errors."""
    if not isinstance(value, Mapping):
        raise StoreError(f"{what} must be a dict, got {type(value).__name__}")
    _validate_json(value, what)
    return (json.dumps(value, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _check_tensor(key: object, value: object) -> torch.Tensor:
    if not isinstance(key, str) or not key:
        raise StoreError(f"tensor names must be non-empty strings, got {key!r}")
    if key == "__metadata__":
        raise StoreError("tensor name '__metadata__' is reserved by safetensors")
    if not isinstance(value, torch.Tensor):
        raise StoreError(f"tensors[{key!r}] is a {type(value).__name__}, not a torch.Tensor")
    if value.layout != torch.strided:
        raise StoreError(f"tensors[{key!r}] has layout {value.layout}; only dense tensors can be stored")
    return value


def prepare_tensors(tensors: object) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors with no shared storage, as safetensors requires."""
    if not isinstance(tensors, Mapping):
        raise StoreError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    if not tensors:
        raise StoreError("tensors is empty: there are no weights to publish")
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in tensors.items():
        tensor = _check_tensor(key, value).detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        whole = tensor.storage_offset() == 0 and tensor.nbytes == storage.nbytes()
        if storage.data_ptr() in seen_storages or not whole:
            tensor = tensor.clone()  # tied or sliced weights: give each its own buffer
        seen_storages.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def prepare_files(files: object) -> dict[str, bytes | Path]:
    """Validate extra files: name -> bytes, or name -> path of an existing file to copy."""
    if files is None:
        return {}
    if not isinstance(files, Mapping):
        raise StoreError(f"files must be a dict of file name -> bytes or path, got {type(files).__name__}")
    out: dict[str, bytes | Path] = {}
    for fname, source in files.items():
        validate_name(fname, "extra file name")
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
