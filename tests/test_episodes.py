"""The episode engine (dmm.episodes): its rules with a scripted actor, and the acceptance check that
``dmm eval``'s local runner and ``PolicyClient.rollout`` against a server play the same episodes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from serving_fixtures import TARGET_RETURN, publish_tiny

from dmm import episodes as episodes_module
from dmm.envs import make_env, normalized_score
from dmm.episodes import Actor, EpisodeEngine, Started, Step
from dmm.errors import ConfigError, DMMError

pytest.importorskip("mujoco")

ENV = "hopper-medium-v2"
SHORT = {"max_episode_steps": 12}


class ScriptedActor(Actor):
    """Acts with a fixed linear function of the state (the same for every row, so an episode's
    actions depend on its seed alone) and records every step and what finish received."""

    def __init__(self, target_return: float = 100.0, act_dim: int = 3, obs_dim: int = 11) -> None:
        self.target_return = target_return
        self.weights = np.random.default_rng(0).normal(scale=0.3, size=(obs_dim, act_dim))
        self.steps: list[Step] = []
        self.finished: tuple[np.ndarray, np.ndarray] | None = None
        self.cancelled = False

    def start(self, rows: int) -> Started:
        return Started(self.target_return, "scripted")

    def act(self, step: Step) -> np.ndarray:
        self.steps.append(step)
        return np.tanh(step.states @ self.weights)

    def finish(self, rows: np.ndarray, rewards: np.ndarray) -> None:
        self.finished = (rows, rewards)

    def cancel(self) -> None:
        self.cancelled = True


def _play(episodes: int, num_envs: int, seed: int = 7) -> tuple[ScriptedActor, episodes_module.Episodes]:
    actor = ScriptedActor()
    with EpisodeEngine(ENV, num_envs, **SHORT) as engine:
        return actor, engine.play(actor, episodes, seed)


def test_episode_k_is_seeded_seed_plus_k_whatever_the_number_of_envs() -> None:
    _, alone = _play(5, 1)
    actor, batched = _play(5, 3)
    np.testing.assert_array_equal(alone.lengths, batched.lengths)
    np.testing.assert_allclose(alone.returns, batched.returns, rtol=1e-12)
    assert (batched.lengths <= SHORT["max_episode_steps"]).all()
    np.testing.assert_allclose(batched.normalized, normalized_score(ENV, batched.returns))
    first = make_env(ENV, **SHORT).reset(seed=7 + 2)[0]
    np.testing.assert_array_equal(actor.steps[0].states[2], first)  # row 2 starts episode 2


def test_steps_carry_rewards_restarts_and_returns_to_go() -> None:
    actor, played = _play(4, 2)
    first, later = actor.steps[0], actor.steps[1:]
    assert first.rewards is None and first.rows.tolist() == [0, 1] and not first.restart.any()
    np.testing.assert_array_equal(first.rtgs, [100.0, 100.0])
    # Follow row 0 through its episodes: its rtg is the target less its episode's rewards so far,
    # and a restart completes an episode with that step's reward.
    rtg, ret, completed = 100.0, 0.0, []
    for step in later:
        if 0 not in step.rows:
            continue
        i = step.rows.tolist().index(0)
        ret += step.rewards[i]
        if step.restart[i]:
            completed.append(ret)
            rtg, ret = 100.0, 0.0
        else:
            rtg -= step.rewards[i]
        assert step.rtgs[i] == pytest.approx(rtg, abs=1e-9)
    assert sum(s.restart.sum() for s in later) == 2  # episodes 2 and 3 start in rows that ended
    rows, rewards = actor.finished
    assert rows.tolist() == [0, 1] and rewards.shape == (2,)
    assert completed[0] == played.returns[0]  # row 0 played episode 0 first
    assert played.started == Started(100.0, "scripted")


class _WrongShape(ScriptedActor):
    def act(self, step: Step) -> np.ndarray:
        return np.zeros((step.rows.size, 2))


def test_bad_actions_and_too_few_episodes_are_refused() -> None:
    actor = _WrongShape()
    with EpisodeEngine(ENV, 2, **SHORT) as engine:
        with pytest.raises(DMMError, match=r"shape \(2, 2\) for 2 rows of hopper-medium-v2.*3 dims"):
            engine.play(actor, 2, 0)
        assert actor.cancelled and actor.finished is None
        with pytest.raises(ConfigError, match="1 episodes cannot keep 2 envs busy"):
            engine.play(ScriptedActor(), 1, 0)
    with pytest.raises(ConfigError, match="num_envs must be a positive integer"):
        EpisodeEngine(ENV, 0)


# ----------------------------------------------------------- local evaluation == remote rollout


class _Recorder(gymnasium.Wrapper):
    """Records the actions each episode of one env received."""

    def __init__(self, env: gymnasium.Env, log: list[list[list[np.ndarray]]]) -> None:
        super().__init__(env)
        self.episodes: list[list[np.ndarray]] = []
        log.append(self.episodes)

    def reset(self, **kwargs):
        self.episodes.append([])
        return super().reset(**kwargs)

    def step(self, action):
        self.episodes[-1].append(np.array(action))
        return super().step(action)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[list[list[np.ndarray]]]]:
    """Every env the engine makes records its actions, per env (in creation order) and episode."""
    log: list[list[list[np.ndarray]]] = []
    monkeypatch.setattr(episodes_module, "make_env", lambda name, **kw: _Recorder(make_env(name, **kw), log))
    yield log


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    from dmm.server.testing import ServerProcess

    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, ENV, seed=0)
    with ServerProcess(root) as server:
        yield root, server.target


@pytest.mark.parametrize(
    ("mode", "num_envs", "vectorized"),
    [("window", 2, True), ("recurrent", 3, True), ("window", 1, False)],
    ids=["window-vector", "recurrent-vector", "window-per-episode-streams"],
)
def test_dmm_eval_and_a_remote_rollout_play_the_same_episodes(
    served: tuple[Path, str], recorded: list, mode: str, num_envs: int, vectorized: bool
) -> None:
    """Same seeds, same model: the same actions, bit for bit, and the same returns."""
    from dmm.client import PolicyClient
    from dmm.model import load_policy
    from dmm.store import open_store
    from dmm.trainer.evaluate import evaluate

    root, target = served
    policy = load_policy(open_store(root), ENV)
    local = evaluate(policy, 4, TARGET_RETURN, mode=mode, num_envs=num_envs, seed=3, progress=False)
    local_actions, recorded[:] = list(recorded), []
    with PolicyClient(target) as client:
        remote = client.rollout(
            env=ENV, episodes=4, num_envs=num_envs, seed=3, mode=mode, progress=False, vectorized=vectorized
        )
    remote_actions = list(recorded)
    assert remote.target_return == local.target_return == TARGET_RETURN and remote.mode == mode
    assert remote.returns == local.returns.tolist() and remote.lengths == local.lengths.tolist()
    assert remote.normalized_scores == local.normalized.tolist()
    # per env, in the order the engine made them, and per episode (idle rows' zeros included)
    local_played, remote_played = (
        [[[a.tolist() for a in ep] for ep in env] for env in path] for path in (local_actions, remote_actions)
    )
    assert sum(len(ep) for env in local_played for ep in env) >= sum(local.lengths)
    assert local_played == remote_played
