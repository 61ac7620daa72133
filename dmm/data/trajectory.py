"""The one trajectory type every dataset format loads into, and the arithmetic on it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dmm.errors import DatasetError

STD_EPS = 1e-6


@dataclass(eq=False)
class Trajectory:
    """One episode: ``observations [T, S]``, ``actions [T, A]``, ``rewards [T]`` (all float32).

    ``terminal`` is True when the episode ended in a terminal state (not a time limit and not
    cut off by the end of the data).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminal: bool

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def total_return(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))


def returns_to_go(rewards: np.ndarray) -> np.ndarray:
    """Undiscounted returns-to-go, inclusive: ``rtg[t] = sum(rewards[t:])`` (float64)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return np.cumsum(rewards[::-1])[::-1]


def rewards_from_cumulative(cumulative: np.ndarray) -> np.ndarray:
    """Per-step rewards from a per-episode cumulative reward array (Kitchen data; paper App. E, Alg. 1).

    Kitchen's reward array holds, at each step, the number of tasks completed so far. Algorithm 1
    takes ``r <- diff(r)`` with ``r[0] <- 0``, so the reward appears once, at the step where a task
    was completed, and the array keeps its length. It must run on one episode at a time: across an
    episode boundary the difference would be a negative jump.
    """
    cumulative = np.asarray(cumulative)
    if cumulative.ndim != 1 or cumulative.shape[0] == 0:
        raise ValueError(f"expected a non-empty 1-D reward array, got shape {cumulative.shape}")
    return np.diff(cumulative, prepend=cumulative[:1]).astype(np.float32)


def split_episodes(
    observations: np.ndarray,
    actions: np.ndarray,
    rewards: np.ndarray,
    terminals: np.ndarray,
    timeouts: np.ndarray,
) -> list[Trajectory]:
    """Cut flat D4RL arrays into episodes: an episode ends at a step with ``terminals | timeouts``.

    Steps after the last end form one more (unfinished, non-terminal) episode. The trajectories
    are views into the given arrays.
    """
    ends = np.flatnonzero(np.logical_or(terminals, timeouts))
    n = rewards.shape[0]
    stops = ends + 1
    if stops.size == 0 or stops[-1] != n:
        stops = np.append(stops, n)
    starts = np.concatenate(([0], stops[:-1]))
    return [
        Trajectory(observations[a:b], actions[a:b], rewards[a:b], bool(terminals[b - 1]))
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True)
    ]


def state_stats(trajectories: list[Trajectory]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of every observation of every trajectory (float32); std gets ``+ 1e-6``.

    The small constant keeps normalization finite for a constant observation dimension.
    """
    if not trajectories:
        raise DatasetError("cannot compute state statistics of an empty dataset")
    observations = np.concatenate([t.observations for t in trajectories], axis=0)
    mean = observations.mean(axis=0, dtype=np.float64)
    std = observations.std(axis=0, dtype=np.float64) + STD_EPS
    return mean.astype(np.float32), std.astype(np.float32)
