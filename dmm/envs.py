"""Environment specs for D4RL dataset names: gymnasium ids, dimensions, reference scores, defaults.

Torch-free and cheap to import; gymnasium (and gymnasium-robotics for AntMaze and Kitchen) is
imported only when an environment is created.

Names accepted by :func:`env_spec`: D4RL dataset names (``hopper-medium-v2``), names of locally
collected data of the same family (``hopper-medium-sim-v4``), file names or stems of both
(``hopper_medium-v2.hdf5``: the official download names), and the gymnasium ids themselves
(``Hopper-v4``). Names outside D4RL's reference table use the reference scores of their family,
which are the same for every dataset of a family.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from dmm.errors import ConfigError, DMMError

if TYPE_CHECKING:
    import gymnasium


@dataclass(frozen=True)
class EnvSpec:
    """Everything the trainer, evaluator and client need to know about one dataset's environment."""

    dataset: str
    env_id: str
    obs_dim: int
    act_dim: int
    ref_min_score: float
    ref_max_score: float
    target_returns: tuple[float, ...]
    rtg_scale: float
    max_episode_steps: int
    extra: str | None  # pip extra needed to create the environment, e.g. "robotics"


@dataclass(frozen=True)
class _Family:
    env_id: str
    obs_dim: int
    act_dim: int
    reference_dataset: str  # entry of the reference table whose scores the whole family shares
    target_returns: tuple[float, ...]
    rtg_scale: float
    max_episode_steps: int
    extra: str | None


_FAMILIES: dict[str, _Family] = {
    "hopper": _Family("Hopper-v4", 11, 3, "hopper-medium-v2", (3600.0, 1800.0), 1000.0, 1000, None),
    "walker2d": _Family("Walker2d-v4", 17, 6, "walker2d-medium-v2", (5000.0, 2500.0), 1000.0, 1000, None),
    "halfcheetah": _Family(
        "HalfCheetah-v4", 17, 6, "halfcheetah-medium-v2", (6000.0, 12000.0), 1000.0, 1000, None
    ),
    # Sparse rewards (dmm.robotics has the tasks): an AntMaze episode returns 0 or 1 (reaching the
    # goal ends it), a Kitchen episode the number of its four tasks done (paper, Appendix E). The
    # returns are already of order 1, so the RTG is not scaled (the appendix's 1000 is for the
    # locomotion returns in the thousands, DESIGN.md), and the target is the best return, D4RL's
    # reference maximum. D4RL only has the U-maze at this size; its episodes last 700 steps.
    "antmaze": _Family("AntMaze_UMaze-v4", 29, 8, "antmaze-umaze-v2", (1.0,), 1.0, 700, "robotics"),
    "kitchen": _Family("FrankaKitchen-v1", 60, 9, "kitchen-mixed-v0", (4.0,), 1.0, 280, "robotics"),
}

_GYMNASIUM_IDS = {family.env_id.lower(): name for name, family in _FAMILIES.items()}
_FAMILY_PREFIX = re.compile(r"^(hopper|walker2d|halfcheetah|antmaze|kitchen)(?:[-_]|$)", re.IGNORECASE)
_FILE_SUFFIXES = (".hdf5", ".h5", ".pkl")


@cache
def reference_table() -> dict[str, dict[str, Any]]:
    """D4RL's reference scores and download URLs, keyed by dataset name (``d4rl/infos.py``)."""
    text = resources.files("dmm").joinpath("reference_scores.json").read_text(encoding="utf-8")
    return json.loads(text)["scores"]


@cache
def _download_stems() -> dict[str, str]:
    """Official download file stem (``hopper_medium-v2``) -> dataset name (``hopper-medium-v2``)."""
    return {PurePath(entry["dataset_url"]).stem.lower(): name for name, entry in reference_table().items()}


def _strip_file(name: str) -> str:
    """``/data/hopper_medium-v2.hdf5`` -> ``hopper_medium-v2``; plain names are returned as given."""
    path = PurePath(name)
    if path.suffix.lower() in _FILE_SUFFIXES:
        return path.stem
    return path.name


def _known_names() -> str:
    return (
        f"families {', '.join(_FAMILIES)} (e.g. hopper-medium-v2, hopper-medium-sim-v4), "
        f"gymnasium ids {', '.join(f.env_id for f in _FAMILIES.values())}"
    )


def _versioned_id(env_id: str, key: str) -> str:
    """``env_id`` in the version ``key`` names when ``key`` is another version of it (``Hopper-v5``,
    in which Minari's MuJoCo data was recorded and must be evaluated), else ``env_id`` itself."""
    base = env_id.rpartition("-v")[0]
    match = re.fullmatch(rf"{re.escape(base)}-v(\d+)", key, re.IGNORECASE)
    return f"{base}-v{match.group(1)}" if match else env_id


def env_spec(name: str) -> EnvSpec:
    """Resolve a dataset name, file name or gymnasium id to its :class:`EnvSpec`.

    Raises ConfigError for names of no known family.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"empty environment name; known: {_known_names()}")
    key = _strip_file(name.strip())
    lowered = key.lower()
    table = reference_table()
    dataset = lowered if lowered in table else _download_stems().get(lowered)
    if dataset is not None:
        family_name = _FAMILY_PREFIX.match(dataset).group(1)  # every table entry has a known family
    elif lowered in _GYMNASIUM_IDS:
        family_name = _GYMNASIUM_IDS[lowered]
    else:
        match = _FAMILY_PREFIX.match(lowered)
        if match is None:
            raise ConfigError(f"unknown environment or dataset {name!r}; known: {_known_names()}")
        family_name = match.group(1).lower()
        if family_name == "antmaze" and "umaze" not in lowered:
            raise ConfigError(
                f"unknown AntMaze dataset {name!r}: only the U-maze (antmaze-umaze-*) is supported"
            )
    family = _FAMILIES[family_name]
    scores = table[dataset if dataset is not None else family.reference_dataset]
    return EnvSpec(
        dataset=dataset if dataset is not None else key,
        env_id=_versioned_id(family.env_id, key),
        obs_dim=family.obs_dim,
        act_dim=family.act_dim,
        ref_min_score=float(scores["ref_min_score"]),
        ref_max_score=float(scores["ref_max_score"]),
        target_returns=family.target_returns,
        rtg_scale=family.rtg_scale,
        max_episode_steps=family.max_episode_steps,
        extra=family.extra,
    )


@overload
def normalized_score(name: str, score: float) -> float: ...
@overload
def normalized_score(name: str, score: np.ndarray) -> np.ndarray: ...
def normalized_score(name: str, score: float | np.ndarray) -> float | np.ndarray:
    """D4RL-normalized score: ``100 * (score - ref_min) / (ref_max - ref_min)``."""
    spec = env_spec(name)
    normalized = (
        100.0
        * (np.asarray(score, dtype=np.float64) - spec.ref_min_score)
        / (spec.ref_max_score - spec.ref_min_score)
    )
    if np.ndim(score) == 0 and not isinstance(score, np.ndarray):
        return float(normalized)
    return normalized


def _import_gymnasium(spec: EnvSpec) -> Any:
    import gymnasium

    if spec.extra == "robotics":
        try:
            # gymnasium-robotics prints a notice about its Adroit environments on import; it
            # concerns none of ours and would end up in every command's error output.
            with contextlib.redirect_stderr(io.StringIO()):
                import gymnasium_robotics
        except ImportError as err:
            raise DMMError(
                f"{spec.env_id} needs gymnasium-robotics: pip install decision-metamamba[robotics]"
            ) from err
        gymnasium.register_envs(gymnasium_robotics)
    return gymnasium


def make_env(name: str, **kwargs: Any) -> gymnasium.Env:
    """Create the gymnasium environment of a dataset, with the dataset's episode length.

    AntMaze and Kitchen come wrapped by :func:`dmm.robotics.d4rl_view`: flat observations in
    D4RL's layout and D4RL's task of the dataset. ``kwargs`` go to ``gymnasium.make`` (e.g.
    ``render_mode``, ``max_episode_steps``).
    """
    spec = env_spec(name)
    gymnasium = _import_gymnasium(spec)
    kwargs.setdefault("max_episode_steps", spec.max_episode_steps)
    robotics = None
    if spec.extra == "robotics":
        from dmm import robotics

        kwargs = {**robotics.make_kwargs(spec.env_id, spec.dataset), **kwargs}
    try:
        with warnings.catch_warnings():
            # The v4 MuJoCo envs are chosen on purpose (closest to D4RL's v2 data); gymnasium's
            # "out of date, upgrade to v5" notice would only be noise.
            warnings.filterwarnings("ignore", message=".*out of date.*", category=DeprecationWarning)
            env = gymnasium.make(spec.env_id, **kwargs)
    except gymnasium.error.Error as err:
        raise DMMError(f"cannot create {spec.env_id} for {name!r}: {err}") from err
    return robotics.d4rl_view(env) if robotics is not None else env


def make_vector_env(name: str, num_envs: int, **kwargs: Any) -> gymnasium.vector.VectorEnv:
    """``num_envs`` copies of :func:`make_env` in one ``SyncVectorEnv`` (gymnasium's default autoreset)."""
    if not isinstance(num_envs, int) or num_envs < 1:
        raise ConfigError(f"num_envs must be a positive integer, got {num_envs!r}")
    spec = env_spec(name)
    gymnasium = _import_gymnasium(spec)
    return gymnasium.vector.SyncVectorEnv([lambda: make_env(name, **kwargs) for _ in range(num_envs)])
