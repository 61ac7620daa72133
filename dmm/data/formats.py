"""Readers for the two on-disk formats: D4RL hdf5 and the Decision-Transformer pickle."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dmm.data.trajectory import Trajectory, split_episodes
from dmm.errors import DatasetError

HDF5_REQUIRED = ("observations", "actions", "rewards", "terminals")
# D4RL's v0 files have no ``timeouts``; without it, only terminals end episodes.
HDF5_OPTIONAL = ("timeouts",)


def _column(path: Path, key: str, value: Any, ndim: int) -> np.ndarray:
    """``value`` as an array with ``ndim`` dimensions; a trailing singleton axis is dropped for 1-D."""
    array = np.asarray(value)
    if ndim == 1 and array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != ndim:
        raise DatasetError(f"{path}: {key!r} must have {ndim} dimension(s), got shape {array.shape}")
    return array


def _check_finite(path: Path, where: str, arrays: Mapping[str, np.ndarray]) -> None:
    for key, array in arrays.items():
        bad = ~np.isfinite(array)
        if bad.any():
            row = int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])
            raise DatasetError(f"{path}: {where}{key!r} has a NaN or infinite value at row {row}")


def _check_lengths(path: Path, where: str, arrays: Mapping[str, np.ndarray]) -> int:
    lengths = {key: int(array.shape[0]) for key, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        detail = ", ".join(f"{key}={n}" for key, n in lengths.items())
        raise DatasetError(f"{path}: {where}arrays have different lengths ({detail})")
    n = next(iter(lengths.values()))
    if n == 0:
        raise DatasetError(f"{path}: {where}no transitions")
    return n


def read_hdf5_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """The file-level attributes of an hdf5 dataset (``dmm collect`` writes env_id, seed...)."""
    import h5py

    with h5py.File(path, "r") as f:
        attrs = dict(f.attrs)
    return {key: value.item() if isinstance(value, np.generic) else value for key, value in attrs.items()}


def load_hdf5(path: str | os.PathLike) -> list[Trajectory]:
    """Read a D4RL-layout hdf5 file and split it into episodes on ``terminals | timeouts``."""
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DatasetError(f"{path}: not a readable HDF5 file ({err})") from err
    with f:
        missing = [key for key in HDF5_REQUIRED if key not in f]
        if missing:
            raise DatasetError(
                f"{path}: missing key(s) {', '.join(missing)} "
                f"(found: {', '.join(sorted(f.keys())) or 'none'}); "
                f"a D4RL file needs {', '.join(HDF5_REQUIRED)} and usually timeouts"
            )
        try:
            raw = {key: f[key][()] for key in (*HDF5_REQUIRED, *HDF5_OPTIONAL) if key in f}
        except (OSError, TypeError, AttributeError) as err:
            raise DatasetError(f"{path}: cannot read datasets ({err})") from err
    observations = _column(path, "observations", raw["observations"], 2).astype(np.float32, copy=False)
    actions = _column(path, "actions", raw["actions"], 2).astype(np.float32, copy=False)
    rewards = _column(path, "rewards", raw["rewards"], 1).astype(np.float32, copy=False)
    terminals = _column(path, "terminals", raw["terminals"], 1).astype(bool, copy=False)
    timeouts = (
        _column(path, "timeouts", raw["timeouts"], 1).astype(bool, copy=False)
        if "timeouts" in raw
        else np.zeros_like(terminals)
    )
    columns = {
        "observations": observations,
        "actions": actions,
        "rewards": rewards,
        "terminals": terminals,
        "timeouts": timeouts,
    }
    _check_lengths(path, "", columns)
    _check_finite(path, "", {"observations": observations, "actions": actions, "rewards": rewards})
    return split_episodes(observations, actions, rewards, terminals, timeouts)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a dataset file must not run code."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "numpy" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")


def load_pickle(path: str | os.PathLike) -> list[Trajectory]:
    """Read a Decision-Transformer pickle: a list of dicts, one per trajectory.

    Each dict has ``observations, actions, rewards`` and ``terminals`` (or ``dones``); the
    trajectory is terminal when the flag of its last step is set.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = _ArrayUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable trajectory pickle ({err})") from err
    if not isinstance(data, list | tuple) or not data:
        raise DatasetError(
            f"{path}: expected a non-empty list of trajectory dicts, got {type(data).__name__}"
        )
    trajectories = []
    for i, item in enumerate(data):
        where = f"trajectory {i}: "
        if not isinstance(item, Mapping):
            raise DatasetError(f"{path}: {where}expected a dict, got {type(item).__name__}")
        flags_key = "dones" if "dones" in item and "terminals" not in item else "terminals"
        missing = [key for key in ("observations", "actions", "rewards") if key not in item]
        if flags_key not in item:
            missing.append("terminals (or dones)")
        if missing:
            raise DatasetError(
                f"{path}: {where}missing key(s) {', '.join(missing)} (found: {', '.join(map(str, item))}); "
                "needs observations, actions, rewards and terminals or dones"
            )
        observations = _column(path, f"{where}observations", item["observations"], 2).astype(np.float32)
        actions = _column(path, f"{where}actions", item["actions"], 2).astype(np.float32)
        rewards = _column(path, f"{where}rewards", item["rewards"], 1).astype(np.float32)
        flags = _column(path, f"{where}{flags_key}", item[flags_key], 1).astype(bool)
        columns = {"observations": observations, "actions": actions, "rewards": rewards, flags_key: flags}
        _check_lengths(path, where, columns)
        _check_finite(path, where, {"observations": observations, "actions": actions, "rewards": rewards})
        trajectories.append(Trajectory(observations, actions, rewards, bool(flags[-1])))
    _check_dims(path, trajectories)
    return trajectories


def _check_dims(path: Path, trajectories: list[Trajectory]) -> None:
    obs_dims = {t.observations.shape[1] for t in trajectories}
    act_dims = {t.actions.shape[1] for t in trajectories}
    if len(obs_dims) > 1 or len(act_dims) > 1:
        raise DatasetError(
            f"{path}: trajectories disagree on dimensions (observations {sorted(obs_dims)}, "
            f"actions {sorted(act_dims)})"
        )
