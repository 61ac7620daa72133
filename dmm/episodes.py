"""The one episode loop: a gymnasium vector env stepped against an :class:`Actor`.

``dmm eval`` (and evaluation during training) acts with a local ``PolicyRunner``;
``PolicyClient.rollout`` acts over the server's ``ActVector`` stream (or one ``Act`` stream per
episode). Both play their episodes here, so seeds, resets, returns, lengths and returns-to-go are
computed by the same lines and the two paths agree by construction: same seeds and same model give
the same actions and returns.

The rules, shared with the server's ``ActVector`` protocol (docs/serving.md):

* episode ``k`` resets its row with seed ``seed + k``; rows take the next episode as theirs end, so
  results depend on ``seed`` alone, not on how many envs run at once;
* the first step steps every row; later steps step the rows that are inside an episode, each with the
  reward of its last action; a row whose episode just ended is stepped with ``restart`` set, its
  reward completing the old episode and its state starting the new one;
* a row's return-to-go is the target return less the rewards of its episode so far;
* rows without an episode left idle with zero actions (a vector env steps all of its envs) and are
  reset when they end, with no seed of their own; the rows' final rewards go to :meth:`Actor.finish`.

Torch-free (numpy, gymnasium imported when an env is made): the client imports it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dmm.envs import make_env, normalized_score
from dmm.errors import ConfigError, DMMError

if TYPE_CHECKING:
    from gymnasium.vector import VectorEnv


@dataclass(frozen=True)
class Started:
    """What an actor conditions on, as it reports it once started: the target return (a server
    chooses its model's when the client names none), the inference mode and the model version
    (None for a policy that is not from the store)."""

    target_return: float
    mode: str
    version: int | None = None


@dataclass(frozen=True)
class Step:
    """One step's input to an actor: the rows (envs) that act, their raw states [m, obs_dim] and
    returns-to-go [m], the rewards of their last actions [m] (None on the first step, which steps every
    row) and ``restart`` [m], the rows whose episode just ended and whose state starts a new one."""

    rows: np.ndarray
    states: np.ndarray
    rtgs: np.ndarray
    rewards: np.ndarray | None
    restart: np.ndarray


class Actor(ABC):
    """Chooses the actions of :class:`EpisodeEngine`'s rows: a local policy runner, or a server's
    stream, which also learns from :meth:`finish` how the episodes ended and from :meth:`cancel` that
    they were abandoned."""

    @abstractmethod
    def start(self, rows: int) -> Started:
        """Get ready for ``rows`` episodes at a time; what the actions will be conditioned on."""

    @abstractmethod
    def act(self, step: Step) -> np.ndarray:
        """The actions [m, act_dim] of ``step.rows``, in their order."""

    @abstractmethod
    def finish(self, rows: np.ndarray, rewards: np.ndarray) -> None:
        """Every episode is over; ``rows`` ended their last ones with final ``rewards``."""

    @abstractmethod
    def cancel(self) -> None:
        """The episodes were abandoned (an error); release what :meth:`start` took."""


@dataclass(frozen=True)
class Episodes:
    """Per-episode results in episode order (not the order the episodes ended)."""

    env: str
    started: Started
    returns: np.ndarray  # float64 [episodes]
    lengths: np.ndarray  # int64 [episodes]

    @property
    def normalized(self) -> np.ndarray:
        """D4RL-normalized scores of :attr:`returns`."""
        return np.asarray(normalized_score(self.env, self.returns))


class EpisodeEngine:
    """A vector env of ``num_envs`` copies of ``env`` (gymnasium's autoreset off: the engine resets
    rows itself, with each episode's seed) that plays episodes against actors. ``make_kwargs`` go to
    :func:`dmm.envs.make_env` (e.g. ``max_episode_steps``). Close it, or use it as a context manager."""

    def __init__(self, env: str, num_envs: int, **make_kwargs: Any) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ConfigError(f"num_envs must be a positive integer, got {num_envs!r}")
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        self.env = env
        self.num_envs = num_envs
        self.venv: VectorEnv = SyncVectorEnv(
            [lambda: make_env(env, **make_kwargs) for _ in range(num_envs)],
            autoreset_mode=AutoresetMode.DISABLED,
        )
        self.act_dim = int(np.prod(self.venv.single_action_space.shape))

    def close(self) -> None:
        self.venv.close()

    def __enter__(self) -> EpisodeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def play(
        self, actor: Actor, episodes: int, seed: int, on_episode: Callable[[], None] | None = None
    ) -> Episodes:
        """Play episodes ``0..episodes-1`` (episode ``k`` seeded ``seed + k``), every row at once;
        ``on_episode`` is called as each ends. An error cancels the actor and propagates."""
        if episodes < self.num_envs:
            raise ConfigError(
                f"{episodes} episodes cannot keep {self.num_envs} envs busy: run at least one each"
            )
        try:
            started = actor.start(self.num_envs)
            returns, lengths, last_rows, last_rewards = _Rows(self, episodes, started).play(
                actor, seed, on_episode or (lambda: None)
            )
        except BaseException:
            actor.cancel()
            raise
        actor.finish(last_rows, last_rewards)
        return Episodes(self.env, started, returns, lengths)


class _Rows:
    """The bookkeeping of one :meth:`EpisodeEngine.play`: which episode each row runs, its return,
    length and return-to-go so far, and the results of the episodes that ended."""

    def __init__(self, engine: EpisodeEngine, episodes: int, started: Started) -> None:
        n = engine.num_envs
        self.engine, self.episodes, self.target = engine, episodes, float(started.target_return)
        self.episode_of = np.arange(n)  # each row's episode; -1 once it has none left
        self.next_episode = n
        self.ret, self.length = np.zeros(n), np.zeros(n, dtype=np.int64)
        self.rtg = np.full(n, self.target)
        self.returns, self.lengths = np.zeros(episodes), np.zeros(episodes, dtype=np.int64)
        self.last_reward: dict[int, float] = {}  # rows whose last episode ended: its final reward

    def play(
        self, actor: Actor, seed: int, on_episode: Callable[[], None]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step until every episode has ended; returns, lengths, and the final rewards of the rows."""
        venv, n = self.engine.venv, self.engine.num_envs
        obs, _ = venv.reset(seed=[seed + i for i in range(n)])
        rows, rewards, restart = np.arange(n), None, np.zeros(n, dtype=bool)
        while True:
            step = Step(
                rows, np.asarray(obs, dtype=np.float64)[rows], self.rtg[rows].copy(), rewards, restart
            )
            actions = np.zeros((n, self.engine.act_dim), dtype=np.float32)
            actions[rows] = self._checked(actor.act(step), rows.size)
            obs, reward, terminated, truncated, _ = venv.step(actions)
            reward = np.asarray(reward, dtype=np.float64)
            active = self.episode_of >= 0
            self.ret[active] += reward[active]
            self.length[active] += 1
            self.rtg[active] -= reward[active]
            ended = np.flatnonzero(np.asarray(terminated) | np.asarray(truncated))
            restarted = [
                row for row in ended.tolist() if active[row] and self._end(row, reward[row], on_episode)
            ]
            if (self.episode_of < 0).all():
                last = np.array(sorted(self.last_reward), dtype=np.int64)
                return self.returns, self.lengths, last, np.array([self.last_reward[r] for r in last])
            if ended.size:  # rows with a new episode, and idle rows that a vector env must keep going
                seeds = [seed + int(e) if r in restarted else None for r, e in enumerate(self.episode_of)]
                mask = np.zeros(n, dtype=bool)
                mask[ended] = True
                obs, _ = venv.reset(seed=seeds, options={"reset_mask": mask})
            rows = np.flatnonzero(self.episode_of >= 0)
            rewards, restart = reward[rows], np.isin(rows, restarted)

    def _end(self, row: int, reward: float, on_episode: Callable[[], None]) -> bool:
        """Record ``row``'s episode; True if the row starts the next one, False if none is left."""
        episode = int(self.episode_of[row])
        self.returns[episode], self.lengths[episode] = self.ret[row], self.length[row]
        self.ret[row], self.length[row], self.rtg[row] = 0.0, 0, self.target
        on_episode()
        if self.next_episode < self.episodes:
            self.episode_of[row], self.next_episode = self.next_episode, self.next_episode + 1
            return True
        self.episode_of[row] = -1
        self.last_reward[row] = float(reward)
        return False

    def _checked(self, actions: np.ndarray, m: int) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (m, self.engine.act_dim):
            raise DMMError(
                f"the actor answered actions of shape {actions.shape} for {m} rows of "
                f"{self.engine.env}, which acts in {self.engine.act_dim} dims"
            )
        return actions
