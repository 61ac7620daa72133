"""``load_dataset``: a D4RL name or a local file -> trajectories with their state statistics."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmm.data.download import default_cache_dir, fetch_dataset
from dmm.data.formats import load_hdf5, load_pickle, read_hdf5_attrs
from dmm.data.minari_datasets import MINARI_PREFIX, load_minari
from dmm.data.trajectory import Trajectory, rewards_from_cumulative, state_stats
from dmm.envs import EnvSpec, env_spec, reference_table
from dmm.errors import ConfigError, DatasetError

HDF5_SUFFIXES = (".hdf5", ".h5")
PICKLE_SUFFIXES = (".pkl",)
SUFFIXES = (*HDF5_SUFFIXES, *PICKLE_SUFFIXES)


@dataclass(eq=False)
class Dataset:
    """Trajectories of one dataset with their state statistics.

    ``env`` is a name :func:`dmm.envs.env_spec` resolves (the dataset name, the file stem, the
    file's ``env_id`` attribute or the gymnasium id a Minari dataset was recorded in), or None when
    the data names no known environment.
    """

    name: str
    trajectories: list[Trajectory]
    state_mean: np.ndarray = field(repr=False)
    state_std: np.ndarray = field(repr=False)
    env: str | None = None

    @classmethod
    def from_trajectories(cls, name: str, trajectories: list[Trajectory], env: str | None = None) -> Dataset:
        """A dataset whose state statistics are computed over all ``trajectories``."""
        mean, std = state_stats(trajectories)
        return cls(name, trajectories, mean, std, env)

    @property
    def obs_dim(self) -> int:
        return int(self.trajectories[0].observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.trajectories[0].actions.shape[1])

    @property
    def num_transitions(self) -> int:
        return sum(len(t) for t in self.trajectories)

    @property
    def returns(self) -> np.ndarray:
        """Undiscounted return of every trajectory (float64)."""
        return np.array([t.total_return for t in self.trajectories], dtype=np.float64)

    @property
    def spec(self) -> EnvSpec:
        if self.env is None:
            raise ConfigError(
                f"dataset {self.name!r} names no known environment; give the environment explicitly"
            )
        return env_spec(self.env)


def _resolvable(name: object) -> str | None:
    if not isinstance(name, str):
        return None
    try:
        env_spec(name)
    except ConfigError:
        return None
    return name


def _is_kitchen(env: str | None) -> bool:
    return env is not None and env_spec(env).env_id == "FrankaKitchen-v1"


def _local_file(name_or_path: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """A file path given directly, or ``<cache>/<name>.<suffix>`` for a name outside D4RL's table."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix.lower() in SUFFIXES or os.sep in name_or_path or candidate.is_file():
        if not candidate.is_file():
            raise DatasetError(f"no such dataset file: {candidate}")
        return candidate
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    for suffix in SUFFIXES:
        if (folder / f"{name_or_path}{suffix}").is_file():
            return folder / f"{name_or_path}{suffix}"
    return None


def _load_file(text: str, cache_dir: str | os.PathLike | None) -> tuple[str, list[Trajectory], str | None]:
    """``(name, trajectories, env)`` of a D4RL name or a local hdf5/pickle file."""
    if text in reference_table():
        path, name, env = fetch_dataset(text, cache_dir), text, text
    else:
        path = _local_file(text, cache_dir)
        if path is None:
            raise DatasetError(
                f"unknown dataset {text!r}: not a D4RL dataset name ({', '.join(reference_table())}) and no "
                f"file {text}.hdf5 in {Path(cache_dir) if cache_dir is not None else default_cache_dir()}; "
                f"pass a path to a {'/'.join(SUFFIXES)} file or a {MINARI_PREFIX}<dataset id>"
            )
        name = path.stem
        env = None
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        trajectories = load_hdf5(path)
        if env is None:
            env = _resolvable(name) or _resolvable(read_hdf5_attrs(path).get("env_id"))
    elif suffix in PICKLE_SUFFIXES:
        trajectories = load_pickle(path)
        env = env or _resolvable(name)
    else:
        raise DatasetError(
            f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}"
        )
    return name, trajectories, env


def _load_minari(dataset_id: str) -> tuple[str, list[Trajectory], str | None]:
    """``(name, trajectories, env)`` of a Minari dataset. The name is the id with ``-`` for ``/``, so
    that it can name the trained model in the store; env is the gymnasium id the data was recorded in."""
    trajectories, env_id = load_minari(dataset_id)
    return dataset_id.replace("/", "-"), trajectories, _resolvable(env_id)


def load_dataset(
    name_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    *,
    kitchen_fix: bool | None = None,
) -> Dataset:
    """Load a dataset by D4RL name (downloaded into the cache on first use), Minari id or file.

    ``name_or_path``: a D4RL name (``hopper-medium-v2``), a ``.hdf5``/``.h5``/``.pkl`` path, the
    stem of such a file in the cache folder (``$D4RL_DATASET_DIR`` or ``~/.d4rl/datasets``), or
    ``minari:<dataset id>`` (``minari:mujoco/hopper/medium-v0``, from ``$MINARI_DATASETS_PATH``,
    downloaded there on first use).
    ``kitchen_fix``: turn cumulative Kitchen rewards into per-step rewards (paper, Appendix E);
    None applies it exactly to D4RL-format Kitchen datasets (Minari's FrankaKitchen-v1 rewards are
    already per step).
    """
    text = os.fspath(name_or_path)
    minari = text.startswith(MINARI_PREFIX)
    if minari:
        name, trajectories, env = _load_minari(text.removeprefix(MINARI_PREFIX))
    else:
        name, trajectories, env = _load_file(text, cache_dir)
    if kitchen_fix if kitchen_fix is not None else not minari and _is_kitchen(env):
        trajectories = [
            Trajectory(t.observations, t.actions, rewards_from_cumulative(t.rewards), t.terminal)
            for t in trajectories
        ]
    return Dataset.from_trajectories(name, trajectories, env)
