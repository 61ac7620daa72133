"""AntMaze and Kitchen: D4RL's flat layouts checked against MuJoCo, D4RL's tasks, and ``dmm collect``,
``dmm train``, ``dmm eval``, ``dmm serve`` + ``PolicyClient.rollout`` on tiny data from a random policy.

The expected values are written out as D4RL documents them (``locomotion/maze_env.py``, ``ant.py``,
``goal_reaching_env.py``, ``kitchen_envs.py``), not read from the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from dmm.client import PolicyClient
from dmm.data import load_dataset, rewards_from_cumulative
from dmm.envs import env_spec, make_env, normalized_score
from dmm.errors import DMMError
from dmm.robotics import antmaze_success, d4rl_view, kitchen_tasks
from dmm.server.testing import ServerProcess

ANTMAZE, KITCHEN = "antmaze-umaze-v2", "kitchen-mixed-v0"
# D4RL's U_MAZE_TEST: walls 1; the ant starts in row 1, column 1 and the goal is in row 3, column 1.
D4RL_UMAZE = ((1, 1, 1, 1, 1), (1, 0, 0, 0, 1), (1, 1, 1, 0, 1), (1, 0, 0, 0, 1), (1, 1, 1, 1, 1))
# gymnasium-robotics' position of D4RL's origin (the start cell's centre).
GYM_ORIGIN = np.array([-4.0, -4.0])
ANT_JOINTS = ("hip_1", "ankle_1", "hip_2", "ankle_2", "hip_3", "ankle_3", "hip_4", "ankle_4")
# D4RL's kitchen_envs.py: OBS_ELEMENT_INDICES -> OBS_ELEMENT_GOALS, by qpos entry.
KITCHEN_GOALS = {
    "bottom burner": {11: -0.88, 12: -0.01},
    "top burner": {15: -0.92, 16: -0.01},
    "light switch": {17: -0.69, 18: -0.05},
    "slide cabinet": {19: 0.37},
    "hinge cabinet": {20: 0.0, 21: 1.45},
    "microwave": {22: -0.75},
    "kettle": {23: -0.23, 24: 0.75, 25: 1.62, 26: 0.99, 27: 0.0, 28: 0.0, 29: -0.06},
}
MKLS = ("microwave", "kettle", "light switch", "slide cabinet")  # KitchenMicrowaveKettleLightSliderV0
MKBL = ("microwave", "kettle", "bottom burner", "light switch")  # KitchenMicrowaveKettleBottomBurnerLightV0
TINY_YAML = "model: {d_model: 16, n_layer: 1}\nwarmup_updates: 1\nbatch_size: 8\n"
# family -> (dataset name the env runs as, name of the collected data, steps collected)
FAMILIES = {
    "antmaze": (ANTMAZE, "antmaze-umaze-sim-v2", 300),
    "kitchen": (KITCHEN, "kitchen-mixed-sim-v0", 120),
}


def dmm(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmm.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def ant_state(env) -> np.ndarray:
    """D4RL's AntMaze observation straight from MuJoCo: qpos[:15] ++ qvel[:14], x and y in D4RL's frame."""
    data = env.unwrapped.ant_env.data
    state = np.concatenate([data.qpos[:15], data.qvel[:14]])
    state[:2] -= GYM_ORIGIN
    return state


# ------------------------------------------------------------------------------------------ AntMaze


def test_antmaze_observation_is_d4rl_s_ant_state_element_by_element():
    env = make_env(ANTMAZE)
    try:
        model = env.unwrapped.ant_env.model
        assert [model.joint(i).name for i in range(1, model.njnt)] == list(ANT_JOINTS)
        assert env.observation_space.shape == (29,)
        obs, _ = env.reset(seed=0)
        rng = np.random.default_rng(0)
        for _ in range(5):
            expected = ant_state(env)
            assert obs.shape == (29,)
            for index in range(29):
                assert obs[index] == expected[index], index
            obs, *_ = env.step(rng.uniform(-1, 1, size=8))
    finally:
        env.close()


def test_antmaze_walls_are_d4rl_s_umaze_moved_not_mirrored():
    """D4RL puts cell (i, j) at (4j, 4i) minus the start cell's; a mirror image would not match."""
    env = make_env(ANTMAZE)
    try:
        model = env.unwrapped.ant_env.model
        blocks = [model.geom(i) for i in range(model.ngeom) if model.geom(i).name.startswith("block_")]
        ours = {tuple(np.round(geom.pos[:2] - GYM_ORIGIN, 6)) for geom in blocks}
    finally:
        env.close()
    d4rl = {
        (4.0 * j - 4.0, 4.0 * i - 4.0)
        for i, row in enumerate(D4RL_UMAZE)
        for j, wall in enumerate(row)
        if wall == 1
    }
    assert ours == d4rl


def test_antmaze_start_and_goal_are_d4rl_s_and_follow_the_seed():
    env = make_env(ANTMAZE)
    try:
        goals = []
        for seed in range(8):
            obs, info = env.reset(seed=seed)
            assert np.all(np.abs(obs[:2]) <= 0.1)  # the start cell, plus D4RL's U(-0.1, 0.1) qpos noise
            assert np.all(np.abs(obs[2:15] - [0.75, 1, 0, 0, 0, *[0] * 8]) <= 0.1)
            assert np.any(obs[15:] != 0.0)  # and its N(0, 0.1²) qvel noise
            assert 0.0 <= env.goal[0] <= 1.5 and 8.0 <= env.goal[1] <= 9.5  # (0, 8) + U(0, 1) + U(0, 0.5)
            np.testing.assert_allclose(env.unwrapped.goal, env.goal + GYM_ORIGIN)
            assert info["success"] is False
            goals.append(env.goal.copy())
        assert len({tuple(goal) for goal in goals}) == len(goals)
        again, _ = env.reset(seed=3)
        np.testing.assert_array_equal(env.goal, goals[3])
        np.testing.assert_array_equal(again, ant_state(env))
    finally:
        env.close()


def test_antmaze_success_radius_is_d4rl_s_half_unit():
    assert antmaze_success(np.array([0.3, 8.4]), np.array([0.3, 8.9]))
    assert not antmaze_success(np.array([0.3, 8.39]), np.array([0.3, 8.9]))


@pytest.mark.parametrize(("offset", "reached"), [(0.0, True), (0.475, True), (0.53, False)])
def test_antmaze_reward_is_one_and_ends_the_episode_within_half_a_unit_of_the_goal(offset, reached):
    """0.475 is outside gymnasium-robotics' own radius (0.45): the reward is D4RL's."""
    env = make_env(ANTMAZE)
    try:
        env.reset(seed=1)
        ant = env.unwrapped.ant_env
        qpos = ant.data.qpos.copy()
        qpos[:2] = env.goal + GYM_ORIGIN + [offset, 0.0]
        ant.set_state(qpos, np.zeros(ant.model.nv))
        obs, reward, terminated, truncated, info = env.step(np.zeros(8))
        assert abs(np.linalg.norm(obs[:2] - env.goal) - offset) < 0.01  # one step from rest barely moves
        assert (reward, terminated, truncated, info["success"]) == (float(reached), reached, False, reached)
    finally:
        env.close()


def test_other_versions_than_the_mapped_ones_are_refused():
    import gymnasium

    env = gymnasium.make("AntMaze_UMaze-v5")  # its ant also observes contact forces
    with pytest.raises(
        DMMError, match="mapped for AntMaze_UMaze-v4 and FrankaKitchen-v1, not AntMaze_UMaze-v5"
    ):
        d4rl_view(env)


# ------------------------------------------------------------------------------------------ Kitchen


@pytest.mark.parametrize(
    ("dataset", "tasks"),
    [("kitchen-complete-v0", MKLS), ("kitchen-partial-v0", MKLS), ("kitchen-mixed-v0", MKBL)],
)
def test_kitchen_observation_is_d4rl_s_qpos_and_goal_element_by_element(dataset, tasks):
    env = make_env(dataset, robot_noise_ratio=0.0, object_noise_ratio=0.0)
    try:
        assert set(env.unwrapped.goal) == set(tasks)  # the env rewards the dataset's four tasks
        goal = np.zeros(30)
        for task in tasks:
            for index, value in KITCHEN_GOALS[task].items():
                goal[index] = value
        obs, _ = env.reset(seed=0)
        rng = np.random.default_rng(0)
        for _ in range(3):
            qpos = env.unwrapped.data.qpos
            assert obs.shape == (60,)
            for index in range(30):  # robot qpos 0-8, object qpos 9-29
                assert obs[index] == qpos[index], index
            for index in range(30):
                assert obs[30 + index] == goal[index], 30 + index
            obs, *_ = env.step(rng.uniform(-1, 1, size=9))
    finally:
        env.close()


def test_kitchen_tasks_are_checked_with_d4rl_s_goals_and_threshold():
    from gymnasium_robotics.envs.franka_kitchen import kitchen_env

    for task, goal in KITCHEN_GOALS.items():
        assert kitchen_env.OBS_ELEMENT_INDICES[task].tolist() == list(goal)
        assert kitchen_env.OBS_ELEMENT_GOALS[task].tolist() == list(goal.values())
    assert kitchen_env.BONUS_THRESH == 0.3


def test_kitchen_tasks_of_each_name():
    assert kitchen_tasks("kitchen-complete-v0") == MKLS
    assert kitchen_tasks("kitchen-mixed-v0") == MKBL
    assert kitchen_tasks("kitchen-partial-sim-v0") == MKLS  # local data of a D4RL kind
    assert kitchen_tasks("FrankaKitchen-v1") == MKBL  # the family's reference dataset, kitchen-mixed-v0
    env = make_env("kitchen_microwave_kettle_light_slider-v0.hdf5")  # kitchen-partial-v0's download
    try:
        assert set(env.unwrapped.goal) == set(MKLS)
    finally:
        env.close()


def test_kitchen_reward_counts_each_task_once_and_all_four_end_the_episode():
    env = make_env(KITCHEN, robot_noise_ratio=0.0, object_noise_ratio=0.0)
    try:
        env.reset(seed=0)
        robot = env.unwrapped.robot_env

        def complete(*tasks: str) -> None:
            qpos = robot.data.qpos.copy()
            for task in tasks:
                for index, value in KITCHEN_GOALS[task].items():
                    qpos[index] = value
            robot.set_state(qpos, np.zeros(robot.model.nv))

        complete("microwave")
        assert env.step(np.zeros(9))[1:4] == (1.0, False, False)
        assert env.step(np.zeros(9))[1:4] == (0.0, False, False)  # still open, but counted already
        complete("kettle", "bottom burner", "light switch")
        assert env.step(np.zeros(9))[1:4] == (3.0, True, False)
    finally:
        env.close()


def test_collected_kitchen_rewards_are_d4rl_s_running_task_count():
    """D4RL's Kitchen files count the tasks done so far; loading turns that back into per-step rewards."""
    from dmm.trainer.collect import _tasks_done_so_far

    rewards = np.array([0, 1, 0, 2, 0, 0, 1, 0], dtype=np.float32)
    ends = np.array([0, 0, 0, 0, 1, 0, 0, 1], dtype=bool)
    columns = {"rewards": rewards, "terminals": ends, "timeouts": np.zeros(8, dtype=bool)}
    stored = _tasks_done_so_far(columns)
    np.testing.assert_array_equal(stored, [0, 1, 1, 3, 3, 0, 1, 1])
    np.testing.assert_array_equal(rewards_from_cumulative(stored[:5]), rewards[:5])
    np.testing.assert_array_equal(rewards_from_cumulative(stored[5:]), [0, 1, 0])  # r[0] <- 0 (Alg. 1)


# ------------------------------------------------------------------- collect, train, eval, serve


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("robotics")


@pytest.fixture(scope="module")
def collected(workdir) -> dict[str, Path]:
    """``dmm collect --policy random`` on each family's D4RL name."""
    files = {}
    for family, (env, name, steps) in FAMILIES.items():
        out = workdir / f"{name}.hdf5"
        result = dmm(
            "collect", "--env", env, "--policy", "random", "--steps", steps, "--out", out, "--seed", 2
        )
        assert result.returncode == 0, result.stderr
        assert f"wrote {steps} transitions" in result.stdout
        files[family] = out
    return files


@pytest.fixture(scope="module")
def store(workdir, collected) -> Path:
    """A tiny policy trained by ``dmm train`` on each family's collected data."""
    (workdir / "tiny.yaml").write_text(TINY_YAML)
    root = workdir / "store"
    for family, path in collected.items():
        result = dmm(
            "train",
            "--dataset",
            path,
            "--store",
            root,
            "--updates",
            "2",
            "--config",
            workdir / "tiny.yaml",
            "--eval-episodes",
            "0",
            "--no-compile",
            "--no-progress",
        )
        assert result.returncode == 0, result.stderr
        assert f"published {FAMILIES[family][1]} version 1" in result.stdout
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_writes_d4rl_layout_data_of_the_flat_observations(collected, family):
    env, name, steps = FAMILIES[family]
    spec = env_spec(env)
    with h5py.File(collected[family], "r") as f:
        arrays = {key: f[key][()] for key in f}
        attrs = dict(f.attrs)
    assert arrays["observations"].shape == (steps, spec.obs_dim)
    assert arrays["actions"].shape == (steps, spec.act_dim)
    assert attrs["env_id"] == spec.env_id and attrs["behavior_policy"] == "random"
    assert np.abs(arrays["actions"]).max() < 1.0  # tanh(N(0, 1))
    assert arrays["timeouts"][-1] and not arrays["terminals"].any()
    np.testing.assert_array_equal(arrays["observations"][1:], arrays["next_observations"][:-1])
    if family == "antmaze":
        assert np.all(np.abs(arrays["observations"][0, :2]) <= 0.1)  # D4RL's start
    else:
        assert np.all(arrays["observations"][:, 30:] == arrays["observations"][0, 30:])  # a constant goal
        assert arrays["observations"][0, 30 + 22] == np.float32(-0.75)  # the microwave's goal
    dataset = load_dataset(collected[family])
    assert (dataset.env, dataset.num_transitions) == (name, steps)
    assert env_spec(dataset.env).env_id == spec.env_id


@pytest.mark.parametrize(("family", "mode"), [("antmaze", "window"), ("kitchen", "recurrent")])
def test_dmm_eval_runs_the_d4rl_task(store, family, mode):
    env, name, _ = FAMILIES[family]
    args = ("--env", env, "--mode", mode, "--episodes", "1", "--json", "--no-progress")
    result = dmm("eval", "--store", store, "--name", name, *args)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    spec = env_spec(env)
    assert (summary["env"], summary["mode"], summary["target_return"]) == (env, mode, spec.target_returns[0])
    assert summary["mean_length"] <= spec.max_episode_steps
    assert summary["mean_return"] in ((0.0, 1.0) if family == "antmaze" else (0.0, 1.0, 2.0, 3.0, 4.0))
    assert summary["normalized_mean"] == pytest.approx(normalized_score(env, summary["mean_return"]))


@pytest.fixture(scope="module")
def server(store) -> Iterator[ServerProcess]:
    with ServerProcess(store) as srv:
        yield srv


@pytest.mark.parametrize("vectorized", [True, False], ids=["vector-env", "per-episode-streams"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rollout_through_the_server(server, family, vectorized):
    env, name, _ = FAMILIES[family]
    with PolicyClient(server.target) as client:
        result = client.rollout(
            env=env,
            model=name,
            episodes=3,
            num_envs=2,
            seed=5,
            max_episode_steps=12,
            progress=False,
            vectorized=vectorized,
        )
    assert result.model == name and result.version == 1
    assert result.target_return == env_spec(env).target_returns[0]
    assert result.lengths == [12, 12, 12] and result.returns == [0.0, 0.0, 0.0]
    np.testing.assert_allclose(result.normalized_scores, normalized_score(env, np.zeros(3)))
