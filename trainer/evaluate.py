"""Policy evaluation in batched gymnasium vector environments: one forward for all envs per step.

The episodes are played by :mod:`dmm.episodes`, the loop ``PolicyClient.rollout`` plays its own
with; this module adds the local actor, a :class:`PolicyRunner` over the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from dmm.envs import env_spec, normalized_score
from dmm.episodes import Actor, EpisodeEngine, Started, Step
from dmm.errors import ConfigError
from dmm.model import Policy, PolicyRunner
from dmm.model.config import InferenceMode


@dataclass(frozen=True)
class EvalResult:
    env: str
    target_return: float
    mode: str
    returns: np.ndarray
    lengths: np.ndarray

    @property
    def normalized(self) -> np.ndarray:
        return np.asarray(normalized_score(self.env, self.returns))

    def summary(self) -> dict[str, float | int | str]:
        norm = self.normalized
        return {
            "target_return": self.target_return,
            "mode": self.mode,
            "episodes": len(self.returns),
            "mean_return": float(self.returns.mean()),
            "std_return": float(self.returns.std()),
            "mean_length": float(self.lengths.mean()),
            "normalized_mean": float(norm.mean()),
            "normalized_std": float(norm.std()),
        }

    def describe(self) -> str:
        s = self.summary()
        return (
            f"return {s['mean_return']:.1f} ± {s['std_return']:.1f}, normalized {s['normalized_mean']:.1f} "
            f"± {s['normalized_std']:.1f} over {s['episodes']} episodes"
        )


def check_compatible(policy: Policy, env: str) -> None:
    spec = env_spec(env)
    if (spec.obs_dim, spec.act_dim) != (policy.config.state_dim, policy.config.act_dim):
        raise ConfigError(
            f"{policy.label} takes states of {policy.config.state_dim} and acts in "
            f"{policy.config.act_dim} dims, but {env} ({spec.env_id}) has {spec.obs_dim} and {spec.act_dim}"
        )


class RunnerActor(Actor):
    """The local actor: a :class:`PolicyRunner` with one slot per env row, conditioned on the
    engine's returns-to-go (``target_return`` less each episode's rewards so far)."""

    def __init__(self, policy: Policy, mode: InferenceMode, target_return: float) -> None:
        self.policy, self.mode, self.target_return = policy, mode, float(target_return)
        self.runner: PolicyRunner | None = None

    def start(self, rows: int) -> Started:
        self.runner = PolicyRunner(self.policy, self.mode, capacity=rows)
        self.runner.reset(range(rows))
        return Started(self.target_return, self.mode, getattr(self.policy, "version", None))

    def act(self, step: Step) -> np.ndarray:
        assert self.runner is not None, "start() first"
        self.runner.reset(step.rows[step.restart].tolist())
        return self.runner.step(step.rows, step.states, step.rtgs)

    def finish(self, rows: np.ndarray, rewards: np.ndarray) -> None:
        """Nothing to record: the engine's returns are the evaluation's."""

    def cancel(self) -> None:
        """Nothing to release beyond the runner's buffers, which go with the actor."""


def evaluate(
    policy: Policy,
    episodes: int,
    target_return: float,
    env: str | None = None,
    mode: InferenceMode = "window",
    num_envs: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Run ``episodes`` episodes, ``num_envs`` at a time, conditioning on ``target_return``.

    Episode k resets its env with seed ``seed + k`` (:mod:`dmm.episodes`, the loop
    ``PolicyClient.rollout`` runs too), so results are reproducible for a given seed whatever
    ``num_envs`` is. Results are in episode order, not the order episodes ended.
    """
    env = env or policy.meta.env
    check_compatible(policy, env)
    if episodes < 1:
        raise ConfigError(f"episodes must be positive, got {episodes}")
    desc = f"eval {env} R={target_return:g} ({mode})"
    with (
        EpisodeEngine(env, min(num_envs, episodes)) as engine,
        tqdm(total=episodes, desc=desc, disable=not progress) as bar,
    ):
        played = engine.play(RunnerActor(policy, mode, target_return), episodes, seed, lambda: bar.update(1))
    return EvalResult(env, float(target_return), mode, played.returns, played.lengths)
