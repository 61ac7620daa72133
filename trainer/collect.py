"""Write a D4RL-layout hdf5 or a Minari dataset by rolling out a behaviour policy in gymnasium envs
(`dmm collect`).

The behaviour policies are D4RL's reference SAC policies (``fc0``, ``fc1``, ``last_fc``,
``last_fc_log_std`` in an npz): two ReLU layers of 256 and a tanh-Gaussian head, evaluated in
numpy; or ``random`` (:data:`RANDOM_POLICY`), the same head with zero weights, for environments
with no reference policy (AntMaze, Kitchen). Reproducibility: episode ``k`` is reset with seed
``seed + k`` and the action noise comes from one generator seeded with ``seed``, drawn as
``[num_envs, act_dim]`` per vector step; the same arguments give the same file. Episodes are
written whole and in the order they started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

POLICY_KEYS = (
    "fc0.weight",
    "fc0.bias",
    "fc1.weight",
    "fc1.bias",
    "last_fc.weight",
    "last_fc.bias",
    "last_fc_log_std.weight",
    "last_fc_log_std.bias",
)
RANDOM_POLICY = "random"  # --policy value: actions tanh(N(0, 1)), whatever the state


class SACPolicy:
    """D4RL's reference SAC actor: ``tanh(mean + exp(clip(log_std, -20, 2)) * noise)``."""

    def __init__(self, params: dict[str, Any]) -> None:
        import numpy as np

        # float64, like the environments' observations: float32 arithmetic would drift from the
        # reference data within a few hundred steps.
        self._w = {key: np.asarray(params[key], dtype=np.float64) for key in POLICY_KEYS}
        self.obs_dim = int(self._w["fc0.weight"].shape[1])
        self.act_dim = int(self._w["last_fc.weight"].shape[0])

    @classmethod
    def random(cls, obs_dim: int, act_dim: int) -> SACPolicy:
        """Zero weights: mean 0 and log-std 0, so actions are ``tanh(N(0, 1))`` whatever the state. A
        random behaviour policy for small test data where no trained one exists."""
        import numpy as np

        shapes = {
            "fc0.weight": (1, obs_dim),
            "fc0.bias": (1,),
            "fc1.weight": (1, 1),
            "fc1.bias": (1,),
            "last_fc.weight": (act_dim, 1),
            "last_fc.bias": (act_dim,),
            "last_fc_log_std.weight": (act_dim, 1),
            "last_fc_log_std.bias": (act_dim,),
        }
        return cls({key: np.zeros(shape) for key, shape in shapes.items()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SACPolicy:
        import zipfile

        import numpy as np

        from dmm.errors import DMMError

        path = Path(path)
        if not path.is_file():
            raise DMMError(f"policy file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                params = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise DMMError(f"{path}: not a readable policy npz ({err})") from err
        missing = [key for key in POLICY_KEYS if key not in params]
        if missing:
            raise DMMError(f"{path}: not a SAC policy, missing {', '.join(missing)}")
        hidden = params["fc0.weight"].shape[0]
        expected = {
            "fc0.bias": (hidden,),
            "fc1.weight": (hidden, hidden),
            "fc1.bias": (hidden,),
            "last_fc.weight": (params["last_fc.weight"].shape[0], hidden),
            "last_fc_log_std.weight": params["last_fc.weight"].shape,
            "last_fc.bias": params["last_fc.weight"].shape[:1],
            "last_fc_log_std.bias": params["last_fc.weight"].shape[:1],
        }
        for key, shape in expected.items():
            if params[key].shape != shape:
                raise DMMError(f"{path}: {key} has shape {params[key].shape}, expected {shape}")
        return cls(params)

    def act(self, observations: Any, noise: Any | None) -> Any:
        """Actions ``[B, act_dim]`` for ``observations [B, obs_dim]``.

        ``noise`` is ``[B, act_dim]`` standard normal; None gives the deterministic (mean) action.
        """
        import numpy as np

        w = self._w
        x = np.asarray(observations, dtype=np.float64)
        h = np.maximum(x @ w["fc0.weight"].T + w["fc0.bias"], 0.0)
        h = np.maximum(h @ w["fc1.weight"].T + w["fc1.bias"], 0.0)
        mean = h @ w["last_fc.weight"].T + w["last_fc.bias"]
        if noise is None:
            return np.tanh(mean)
        log_std = np.clip(h @ w["last_fc_log_std.weight"].T + w["last_fc_log_std.bias"], -20.0, 2.0)
        return np.tanh(mean + np.exp(log_std) * noise)


class _Recorder:
    """Transitions of all envs as they come, in arrays that double when full, each row tagged
    with its episode. Rows of one episode are in time order, so a stable sort by episode gives
    the D4RL layout (whole episodes, in start order)."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int) -> None:
        import numpy as np

        self.size = 0
        self.columns = {
            "observations": np.empty((capacity, obs_dim), np.float32),
            "actions": np.empty((capacity, act_dim), np.float32),
            "rewards": np.empty(capacity, np.float32),
            "next_observations": np.empty((capacity, obs_dim), np.float32),
            "terminals": np.empty(capacity, bool),
            "timeouts": np.empty(capacity, bool),
            "episode": np.empty(capacity, np.int64),
        }

    def append(self, **batch: Any) -> None:
        import numpy as np

        n = len(batch["episode"])
        capacity = len(self.columns["episode"])
        if self.size + n > capacity:
            grown = max(2 * capacity, self.size + n)
            for key, column in self.columns.items():
                bigger = np.empty((grown, *column.shape[1:]), column.dtype)
                bigger[: self.size] = column[: self.size]
                self.columns[key] = bigger
        for key, value in batch.items():
            self.columns[key][self.size : self.size + n] = value
        self.size += n

    def first(self, steps: int) -> dict[str, Any]:
        """The first ``steps`` transitions in episode order, without the episode tags."""
        import numpy as np

        order = np.argsort(self.columns["episode"][: self.size], kind="stable")[:steps]
        return {key: column[order] for key, column in self.columns.items() if key != "episode"}


def _make_vector_env(env: str, num_envs: int) -> tuple[Any, str]:
    """``(vector env, gymnasium id)``: known datasets and ids through dmm.envs (their time limits),
    any other gymnasium id as registered."""
    import gymnasium

    from dmm.envs import env_spec, make_env
    from dmm.errors import ConfigError, DMMError

    try:
        env_id = env_spec(env).env_id
    except ConfigError:
        env_id = None

    def make() -> Any:
        return make_env(env) if env_id is not None else gymnasium.make(env)

    try:
        return gymnasium.vector.SyncVectorEnv([make for _ in range(num_envs)]), env_id or env
    except gymnasium.error.Error as err:
        raise DMMError(f"cannot create environment {env!r}: {err}") from err


def _rollout(
    venv: Any, policy: SACPolicy, steps: int, seed: int, deterministic: bool, progress: bool = True
) -> dict[str, Any]:
    """The first ``steps`` transitions, whole episodes in the order they started."""
    import numpy as np
    from tqdm import tqdm

    num_envs = venv.num_envs
    rng = np.random.default_rng(seed)
    recorder = _Recorder(policy.obs_dim, policy.act_dim, capacity=steps + num_envs)
    slot_episode = np.arange(num_envs)  # which episode each env is playing
    lengths = [0] * num_envs  # per episode, in start order
    finished = [False] * num_envs
    observations, _ = venv.reset(seed=[seed + k for k in range(num_envs)])
    first_open = 0  # episodes before it are finished
    finished_steps = 0  # transitions in episodes before first_open
    with tqdm(total=steps, unit="step", desc="collect", disable=not progress) as bar:
        while True:
            noise = None if deterministic else rng.standard_normal((num_envs, policy.act_dim))
            actions = policy.act(observations, noise)  # float64: the env steps with them unrounded
            next_observations, rewards, terminated, truncated, _ = venv.step(actions)
            recorder.append(
                observations=observations,
                actions=actions,
                rewards=rewards,
                next_observations=next_observations,
                terminals=terminated,
                timeouts=truncated,
                episode=slot_episode,
            )
            for k in slot_episode:
                lengths[k] += 1
            done = np.logical_or(terminated, truncated)
            for i in np.flatnonzero(done):
                finished[slot_episode[i]] = True
                slot_episode[i] = len(lengths)
                lengths.append(0)
                finished.append(False)
            while finished[first_open]:
                finished_steps += lengths[first_open]
                first_open += 1
            covered = finished_steps + lengths[first_open]
            bar.update(min(covered, steps) - bar.n)
            if covered >= steps:
                return recorder.first(steps)
            if done.any():
                # Reset finished envs ourselves, each with its episode's seed. This also clears the
                # vector env's NEXT_STEP autoreset, so no reset step is ever recorded.
                reset_seeds = [int(seed + k) for k in slot_episode]
                observations, _ = venv.reset(seed=reset_seeds, options={"reset_mask": done})
            else:
                observations = next_observations


def _tasks_done_so_far(columns: dict[str, Any]) -> Any:
    """Kitchen rewards as D4RL's Kitchen files hold them: at each step, the number of tasks done so
    far in the episode (the running sum of the per-step rewards), which ``load_dataset`` turns back
    into per-step rewards (paper, Appendix E). The last step always ends an episode."""
    import numpy as np

    stops = np.flatnonzero(columns["terminals"] | columns["timeouts"])[:-1] + 1
    return np.concatenate([np.cumsum(part) for part in np.split(columns["rewards"], stops)])


def _write(out: Path, columns: dict[str, Any], attrs: dict[str, Any]) -> None:
    """Write into a temporary file beside ``out`` and rename it, so ``out`` is never half written."""
    import tempfile

    import h5py

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            for key, value in columns.items():
                # gzip after byte shuffling: 13% smaller than gzip alone, and the encoding the
                # committed digests (dmm.trainer.recipes) were taken with.
                f.create_dataset(key, data=value, compression="gzip", shuffle=True)
            f.attrs.update(attrs)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _minari_episodes(columns: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Minari's episode layout: each episode's observations end with the state after its last step
    (from ``next_observations``); episode ``k`` was reset with ``seed + k``."""
    import numpy as np

    stops = np.flatnonzero(columns["terminals"] | columns["timeouts"]) + 1  # the last step always ends one
    starts = np.concatenate(([0], stops[:-1]))
    return [
        {
            "seed": seed + k,
            "observations": np.concatenate(
                [columns["observations"][a:b], columns["next_observations"][b - 1 : b]]
            ),
            "actions": columns["actions"][a:b],
            "rewards": columns["rewards"][a:b],
            "terminations": columns["terminals"][a:b],
            "truncations": columns["timeouts"][a:b],
        }
        for k, (a, b) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True))
    ]


def _checked_out(out: str | os.PathLike, data_format: str) -> Path | str:
    """The hdf5 file to write, or the Minari dataset id (``minari:`` prefix optional), checked before
    the rollout so that a bad ``--out`` costs nothing."""
    from dmm.data.minari_datasets import MINARI_PREFIX, new_dataset_folder
    from dmm.errors import DMMError

    if data_format == "minari":
        dataset_id = os.fspath(out).removeprefix(MINARI_PREFIX)
        new_dataset_folder(dataset_id)
        return dataset_id
    if data_format != "hdf5":
        raise DMMError(f"--format must be hdf5 or minari, got {data_format!r}")
    out = Path(out)
    if out.suffix.lower() not in (".hdf5", ".h5"):
        raise DMMError(f"--out must name an .hdf5 or .h5 file, got {out}")
    if not out.parent.is_dir():
        raise DMMError(f"output folder does not exist: {out.parent}")
    return out


def _behaviour_policy(policy_path: str | os.PathLike, venv: Any, env: str) -> SACPolicy:
    """The policy to roll out (a reference .npz or ``random``), checked against the env's spaces."""
    import numpy as np

    from dmm.errors import DMMError

    obs_space, act_space = venv.single_observation_space, venv.single_action_space
    obs_dim, act_dim = int(np.prod(obs_space.shape or (0,))), int(np.prod(act_space.shape or (0,)))
    if os.fspath(policy_path) == RANDOM_POLICY:
        policy = SACPolicy.random(obs_dim, act_dim)
    else:
        policy = SACPolicy.load(policy_path)
    if (obs_dim, act_dim) != (policy.obs_dim, policy.act_dim) or len(obs_space.shape or ()) != 1:
        raise DMMError(
            f"policy {Path(policy_path).name} takes observations of dim {policy.obs_dim} and gives "
            f"actions of dim {policy.act_dim}, but {env} has observation dim {obs_dim} and action dim "
            f"{act_dim}"
        )
    return policy


def collect(
    env: str,
    policy_path: str | os.PathLike,
    steps: int,
    out: str | os.PathLike,
    seed: int = 0,
    num_envs: int = 1,
    deterministic: bool = False,
    data_format: str = "hdf5",
    progress: bool = True,
) -> Path:
    """Roll out the policy and write exactly ``steps`` transitions; returns where they went.

    ``data_format`` ``hdf5``: ``out`` is the file (D4RL layout). ``minari``: ``out`` is a Minari
    dataset id, written into the Minari root (``$MINARI_DATASETS_PATH``) with the environment's
    spec; the returned path is the dataset's folder.
    """
    import numpy as np

    from dmm.data.minari_datasets import write_minari
    from dmm.errors import DMMError
    from dmm.robotics import KITCHEN_ID

    if steps <= 0:
        raise DMMError(f"--steps must be positive, got {steps}")
    if num_envs <= 0:
        raise DMMError(f"--num-envs must be positive, got {num_envs}")
    target = _checked_out(out, data_format)
    venv, env_id = _make_vector_env(env, num_envs)
    try:
        policy = _behaviour_policy(policy_path, venv, env)
        columns = _rollout(venv, policy, steps, seed, deterministic, progress)
    finally:
        venv.close()
    if not (columns["terminals"][-1] or columns["timeouts"][-1]):
        columns["timeouts"][-1] = True  # the data ends mid-episode: a time limit, not a terminal state
    sampling = "tanh_gaussian_mean" if deterministic else "tanh_gaussian_sampled"
    if data_format == "minari":
        return write_minari(
            str(target),
            _minari_episodes(columns, seed),
            venv.envs[0],  # closed, but its spec and spaces are what Minari records
            algorithm_name=f"behaviour policy {Path(policy_path).name} ({sampling})",
            description=f"dmm collect: {steps} transitions of {env_id}, seed {seed}",
        )
    if env_id == KITCHEN_ID:
        columns["rewards"] = _tasks_done_so_far(columns)
    attrs = {
        "env_id": env_id,
        "behavior_policy": Path(policy_path).name,
        "seed": np.int64(seed),
        "sampling": sampling,
    }
    _write(Path(target), columns, attrs)
    return Path(target)
