"""Minari datasets (``minari:<dataset id>``): read from the local Minari root, written by ``dmm collect``.

A Minari episode stores one more observation than actions (the state after the last step, for
``next_observations``). The D4RL layout pairs each action with the state it was taken in and no
more, so the last observation is dropped and each episode becomes one :class:`Trajectory`,
terminal when its last step terminated: the same trajectories the hdf5 loader cuts from the same
steps laid out flat. Only vector observations and actions load; other spaces (the Dict
observations of Minari's AntMaze and Kitchen data) are refused with an error naming the space.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from dmm.data.formats import _check_finite, _check_lengths, _column
from dmm.data.trajectory import Trajectory
from dmm.errors import DatasetError

if TYPE_CHECKING:
    import gymnasium

MINARI_PREFIX = "minari:"
ROOT_ENV_VAR = "MINARI_DATASETS_PATH"
# Minari's id format, ``(namespace/)name-v(version)``; the version is required to open a dataset.
# Also keeps ids from naming folders outside the root.
_DATASET_ID = re.compile(r"(?:[-\w]+/)*[-\w]+-v\d+", re.ASCII)


def _import_minari() -> ModuleType:
    try:
        import minari
    except ImportError as err:
        raise DatasetError(
            "Minari datasets need the minari package (Python 3.11 or newer): "
            "pip install 'decision-metamamba[minari]'"
        ) from err
    return minari


def check_dataset_id(dataset_id: str) -> str:
    """``dataset_id`` when it has Minari's id form, else a DatasetError showing the form."""
    if not _DATASET_ID.fullmatch(dataset_id):
        raise DatasetError(
            f"{dataset_id!r} is not a Minari dataset id: expected (namespace/)name-v(version), "
            "e.g. mujoco/hopper/medium-v0"
        )
    return dataset_id


def minari_root() -> Path:
    """The local Minari root, by Minari's own rule: ``$MINARI_DATASETS_PATH``, else ``~/.minari/datasets``."""
    return Path(_import_minari().storage.get_dataset_path())


def _download(minari: ModuleType, dataset_id: str, root: Path) -> None:
    # The remote clients log every retry on stderr (Hugging Face's sets its own level when Minari
    # imports it, so only a global switch holds); the failure is reported once, on one line, below.
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        minari.download_dataset(dataset_id)
    # The remotes (Hugging Face, Google Cloud Storage) raise their own HTTP client's error types, and
    # Minari a ValueError for an id it does not host: every failure means "not available here".
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise DatasetError(
            f"Minari dataset {dataset_id!r} is not in {root} (${ROOT_ENV_VAR}) and cannot be downloaded "
            f"({reason}); download it where there is network (minari download {dataset_id}) and copy "
            f"it to {root / dataset_id}"
        ) from err
    finally:
        logging.disable(disabled)


def _open(minari: ModuleType, dataset_id: str) -> Any:
    """The MinariDataset of ``dataset_id``, downloaded into the root when it is not there."""
    root = minari_root()
    if not (root / dataset_id / "data").is_dir():
        _download(minari, dataset_id, root)
    try:
        return minari.load_dataset(dataset_id)
    except (OSError, ValueError, KeyError) as err:
        raise DatasetError(f"Minari dataset {dataset_id!r} in {root} is not readable ({err})") from err


def _check_vector_spaces(dataset_id: str, dataset: Any) -> None:
    from gymnasium import spaces

    for what, space in (("observation", dataset.observation_space), ("action", dataset.action_space)):
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise DatasetError(
                f"Minari dataset {dataset_id!r} has the {what} space {space}; "
                "only vector (1-D Box) observations and actions can be trained on"
            )


def _trajectory(folder: Path, episode: Any) -> Trajectory:
    where = f"episode {episode.id}: "
    steps = len(episode.rewards)
    observations = _column(folder, f"{where}observations", episode.observations, 2)
    if observations.shape[0] != steps + 1:
        raise DatasetError(
            f"{folder}: {where}{observations.shape[0]} observations for {steps} steps; "
            "a Minari episode has one more observation than steps"
        )
    columns = {
        "observations": observations[:-1].astype(np.float32),
        "actions": _column(folder, f"{where}actions", episode.actions, 2).astype(np.float32),
        "rewards": _column(folder, f"{where}rewards", episode.rewards, 1).astype(np.float32),
        "terminations": _column(folder, f"{where}terminations", episode.terminations, 1).astype(bool),
    }
    _check_lengths(folder, where, columns)
    _check_finite(folder, where, {key: columns[key] for key in ("observations", "actions", "rewards")})
    return Trajectory(
        columns["observations"], columns["actions"], columns["rewards"], bool(columns["terminations"][-1])
    )


def load_minari(dataset_id: str) -> tuple[list[Trajectory], str | None]:
    """The episodes of a Minari dataset as trajectories, and the gymnasium id it was recorded in.

    A dataset missing from the local root is downloaded into it; where that fails (no network, an
    id Minari does not host) the DatasetError names the id and the root folder.
    """
    minari = _import_minari()
    dataset = _open(minari, check_dataset_id(dataset_id))
    _check_vector_spaces(dataset_id, dataset)
    folder = Path(dataset.spec.data_path)
    trajectories = [_trajectory(folder, episode) for episode in dataset.iterate_episodes()]
    env_spec = dataset.spec.env_spec
    return trajectories, env_spec.id if env_spec is not None else None


def new_dataset_folder(dataset_id: str) -> Path:
    """Where ``dataset_id`` will be written; a DatasetError if the id is malformed or already taken.

    Checked before collecting, so that a taken id is reported before the rollout rather than after.
    """
    folder = minari_root() / check_dataset_id(dataset_id)
    if folder.exists():
        raise DatasetError(
            f"Minari dataset {dataset_id!r} already exists in {folder}; Minari datasets are immutable, "
            "give a new name or version"
        )
    return folder


def write_minari(
    dataset_id: str,
    episodes: list[dict[str, Any]],
    env: gymnasium.Env,
    algorithm_name: str,
    description: str,
) -> Path:
    """Write ``episodes`` as the Minari dataset ``dataset_id`` with Minari's own writer.

    Each episode holds ``observations [T+1, S]``, ``actions [T, A]``, ``rewards``, ``terminations``,
    ``truncations`` and the ``seed`` its reset used. ``env`` gives the spec Minari stores for
    ``recover_environment`` and the spaces; observations and actions take the spaces' dtypes. A
    failed write leaves no dataset behind.
    """
    minari = _import_minari()
    from minari.data_collector import EpisodeBuffer

    folder = new_dataset_folder(dataset_id)
    obs_dtype, act_dtype = env.observation_space.dtype, env.action_space.dtype
    buffers = [
        EpisodeBuffer(
            id=k,
            seed=episode["seed"],
            observations=np.asarray(episode["observations"], dtype=obs_dtype),
            actions=np.asarray(episode["actions"], dtype=act_dtype),
            rewards=np.asarray(episode["rewards"], dtype=np.float64),
            terminations=np.asarray(episode["terminations"], dtype=bool),
            truncations=np.asarray(episode["truncations"], dtype=bool),
            infos={},
        )
        for k, episode in enumerate(episodes)
    ]
    try:
        with warnings.catch_warnings():
            # Minari asks for an author, an e-mail, a code link and an evaluation env; the collector
            # knows none of them, and the notices would bury the command's one line of output.
            warnings.filterwarnings("ignore", message=r"`\w+` is set to None", category=UserWarning)
            minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                env=env,
                algorithm_name=algorithm_name,
                description=description,
            )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
