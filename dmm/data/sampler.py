"""Random context windows for training, built with one vectorized gather per batch.

The padding rule, shared with window inference: a window ends at a timestep chosen uniformly over all
timesteps of the dataset and covers ``[max(trajectory start, end - K + 1), end]``. A window that
would reach before its trajectory's start is shorter; it is left-padded with zeros, and
``mask`` is False at the pads. Windows never cross a trajectory boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmm.data.dataset import Dataset
from dmm.data.trajectory import returns_to_go
from dmm.errors import ConfigError


@dataclass(frozen=True, eq=False)
class WindowBatch:
    """``states [B, K, S]`` normalized, ``actions [B, K, A]``, ``rtg [B, K, 1]`` scaled, ``mask [B, K]``,
    ``timesteps [B, K]`` (step within the trajectory; 0 at padding); ``fresh [B]`` (with a
    :class:`EpisodeSampler`) is False for rows that continue the previous batch's row."""

    states: np.ndarray
    actions: np.ndarray
    rtg: np.ndarray
    mask: np.ndarray
    timesteps: np.ndarray
    fresh: np.ndarray | None = None


class WindowSampler:
    """Samples :class:`WindowBatch` es of ``context`` steps from a dataset.

    States are normalized with the dataset's mean and std; returns-to-go are divided by
    ``rtg_scale``. ``seed`` makes the sequence of batches reproducible.
    """

    def __init__(
        self, dataset: Dataset, context: int, batch_size: int, rtg_scale: float, seed: int | None = None
    ) -> None:
        if not isinstance(context, int) or context < 1:
            raise ConfigError(f"context must be a positive integer, got {context!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not rtg_scale > 0:
            raise ConfigError(f"rtg_scale must be positive, got {rtg_scale!r}")
        if not dataset.trajectories:
            raise ConfigError(f"dataset {dataset.name!r} has no trajectories")
        self.context = context
        self.batch_size = batch_size
        self.rtg_scale = float(rtg_scale)
        self.state_mean = dataset.state_mean.astype(np.float32)
        self.state_std = dataset.state_std.astype(np.float32)
        trajectories = dataset.trajectories
        observations = np.concatenate([t.observations for t in trajectories], axis=0)
        self._states = ((observations - self.state_mean) / self.state_std).astype(np.float32)
        self._actions = np.concatenate([t.actions for t in trajectories], axis=0).astype(np.float32)
        rtg = np.concatenate([returns_to_go(t.rewards) for t in trajectories])
        self._rtg = (rtg / self.rtg_scale).astype(np.float32)
        lengths = np.array([len(t) for t in trajectories], dtype=np.int64)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        self._trajectory_start = np.repeat(starts, lengths)
        self._offsets = np.arange(-context + 1, 1, dtype=np.int64)
        self._rng = np.random.default_rng(seed)

    @property
    def num_timesteps(self) -> int:
        return int(self._states.shape[0])

    def normalization(self) -> tuple[np.ndarray, np.ndarray]:
        """``(state_mean, state_std)`` used to normalize states (float32, shape ``[S]``)."""
        return self.state_mean.copy(), self.state_std.copy()

    def state(self) -> dict:
        """Where the sampler is: its RNG (what a resumed run restores)."""
        return {"rng": self._rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]

    def sample(self) -> WindowBatch:
        """``batch_size`` windows with ends drawn uniformly over all timesteps."""
        return self.windows(self._rng.integers(0, self.num_timesteps, size=self.batch_size))

    def windows(self, ends: np.ndarray) -> WindowBatch:
        """The windows ending at the given flat timestep indices (into the concatenated trajectories)."""
        ends = np.asarray(ends, dtype=np.int64)
        if ends.ndim != 1 or ends.size == 0 or ends.min() < 0 or ends.max() >= self.num_timesteps:
            raise ValueError(f"window ends must be a non-empty 1-D array in [0, {self.num_timesteps})")
        index = ends[:, None] + self._offsets[None, :]
        mask = index >= self._trajectory_start[ends][:, None]
        index = np.where(mask, index, ends[:, None])
        pad = ~mask
        states = self._states[index]
        actions = self._actions[index]
        rtg = self._rtg[index]
        states[pad] = 0.0
        actions[pad] = 0.0
        rtg[pad] = 0.0
        timesteps = np.where(mask, index - self._trajectory_start[ends][:, None], 0)
        return WindowBatch(states=states, actions=actions, rtg=rtg[..., None], mask=mask, timesteps=timesteps)


class EpisodeSampler(WindowSampler):
    """Batches whose first ``episode_rows`` rows each walk through a whole trajectory, ``context`` steps
    per batch, from its first step to its last; the other rows are random windows as above.

    Recurrent inference feeds a policy the whole episode so far through its state, while random
    windows only ever show it ``context`` steps from a zero state. An episode row continues in the
    next batch where it stopped (``fresh`` False), so a trainer that carries the row's recurrent state
    from batch to batch (truncated backpropagation through time) trains on the states that inference
    builds over whole episodes. An episode row's last chunk of a trajectory is right-padded (``mask``
    False); the row then starts a trajectory drawn uniformly, so every step is seen equally often.
    """

    def __init__(
        self,
        dataset: Dataset,
        context: int,
        batch_size: int,
        rtg_scale: float,
        episode_rows: int,
        seed: int | None = None,
    ) -> None:
        super().__init__(dataset, context, batch_size, rtg_scale, seed)
        if not 0 <= episode_rows <= batch_size:
            raise ConfigError(f"episode rows must be in [0, batch size {batch_size}], got {episode_rows}")
        lengths = np.array([len(t) for t in dataset.trajectories], dtype=np.int64)
        self._starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        self._ends = self._starts + lengths
        self._cursor = np.zeros(episode_rows, dtype=np.int64)  # next step of each episode row
        self._row_end = np.zeros(episode_rows, dtype=np.int64)  # its trajectory's end: a new one is due

    def state(self) -> dict:
        return {**super().state(), "cursor": self._cursor.copy(), "row_end": self._row_end.copy()}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._cursor, self._row_end = np.array(state["cursor"]), np.array(state["row_end"])

    def sample(self) -> WindowBatch:
        fresh = self._cursor >= self._row_end
        picks = self._rng.integers(0, len(self._starts), size=int(fresh.sum()))
        self._cursor[fresh], self._row_end[fresh] = self._starts[picks], self._ends[picks]
        index = self._cursor[:, None] + np.arange(self.context)[None, :]
        mask = index < self._row_end[:, None]
        index = np.where(mask, index, self._cursor[:, None])
        timesteps = np.where(mask, index - self._trajectory_start[index], 0)
        self._cursor += self.context
        pad = ~mask
        states, actions, rtg = self._states[index], self._actions[index], self._rtg[index]
        states[pad], actions[pad], rtg[pad] = 0.0, 0.0, 0.0
        parts = [(states, actions, rtg[..., None], mask, timesteps)]
        if len(fresh) < self.batch_size:
            w = self.windows(self._rng.integers(0, self.num_timesteps, size=self.batch_size - len(fresh)))
            parts.append((w.states, w.actions, w.rtg, w.mask, w.timesteps))
        joined = [np.concatenate(column) for column in zip(*parts, strict=True)]
        rows = np.ones(self.batch_size, dtype=bool)
        rows[: len(fresh)] = fresh
        return WindowBatch(*joined, fresh=rows)
