"""Policy evaluation in batched gymnasium vector environments: one forward for all envs per step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from dmm.envs import env_spec, make_vector_env, normalized_score
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

    Env i is reset with seed ``seed + i``; gymnasium's autoreset continues its generator for the
    next episode, so results are reproducible for a given (seed, num_envs). Results are in the
    order episodes started (env 0..n-1 first), not the order they ended.
    """
    env = env or policy.meta.env
    check_compatible(policy, env)
    if episodes < 1:
        raise ConfigError(f"episodes must be positive, got {episodes}")
    n = min(num_envs, episodes)
    vec = make_vector_env(env, n)
    runner = PolicyRunner(policy, mode, capacity=n)
    finished: dict[int, tuple[float, int]] = {}  # episode number (in start order) -> (return, length)
    try:
        obs, _ = vec.reset(seed=seed)
        runner.reset(range(n))
        rtg = np.full(n, target_return, dtype=np.float64)
        ep_return = np.zeros(n)
        ep_length = np.zeros(n, dtype=np.int64)
        running = np.ones(n, dtype=bool)  # env i is inside an episode we count
        resetting = np.zeros(n, dtype=bool)  # env i's next step is gymnasium's autoreset step
        episode = np.arange(n)  # the episode number env i is running
        started = n
        actions = np.zeros((n, policy.config.act_dim), dtype=np.float32)
        with tqdm(
            total=episodes, desc=f"eval {env} R={target_return:g} ({mode})", disable=not progress
        ) as bar:
            while len(finished) < episodes:
                acting = np.flatnonzero(running & ~resetting)
                actions[:] = 0.0
                if acting.size:
                    actions[acting] = runner.step(acting, obs[acting], rtg[acting])
                was_resetting = resetting.copy()
                obs, reward, terminated, truncated, _ = vec.step(actions)
                for i in np.flatnonzero(was_resetting):  # obs[i] now starts a new episode
                    resetting[i] = False
                    runner.reset([i])
                    rtg[i], ep_return[i], ep_length[i] = target_return, 0.0, 0
                for i in acting:
                    ep_return[i] += reward[i]
                    ep_length[i] += 1
                    rtg[i] -= reward[i]
                    if terminated[i] or truncated[i]:
                        finished[int(episode[i])] = (float(ep_return[i]), int(ep_length[i]))
                        bar.update(1)
                        if started < episodes:
                            episode[i] = started
                            started += 1
                            resetting[i] = True
                        else:
                            running[i] = False
    finally:
        vec.close()
    returns, lengths = zip(*(finished[k] for k in range(episodes)), strict=True)
    return EvalResult(env, float(target_return), mode, np.array(returns), np.array(lengths))
