"""Env specs: name resolution, dimensions, reference scores, defaults, env creation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dmm.envs import env_spec, make_env, make_vector_env, normalized_score
from dmm.errors import ConfigError, DMMError


@pytest.mark.parametrize(
    ("name", "env_id", "obs_dim", "act_dim", "targets", "rtg_scale", "max_steps", "extra"),
    [
        ("hopper-medium-v2", "Hopper-v4", 11, 3, (3600, 1800), 1000, 1000, None),
        ("walker2d-medium-replay-v2", "Walker2d-v4", 17, 6, (5000, 2500), 1000, 1000, None),
        ("halfcheetah-expert-v2", "HalfCheetah-v4", 17, 6, (6000, 12000), 1000, 1000, None),
        ("antmaze-umaze-diverse-v2", "AntMaze_UMaze-v4", 29, 8, (1,), 1, 700, "robotics"),
        ("kitchen-mixed-v0", "FrankaKitchen-v1", 60, 9, (4,), 1, 280, "robotics"),
    ],
)
def test_family_specs(name, env_id, obs_dim, act_dim, targets, rtg_scale, max_steps, extra):
    spec = env_spec(name)
    assert spec.dataset == name
    assert (spec.env_id, spec.obs_dim, spec.act_dim) == (env_id, obs_dim, act_dim)
    assert spec.target_returns == targets
    assert (spec.rtg_scale, spec.max_episode_steps, spec.extra) == (rtg_scale, max_steps, extra)


def test_reference_scores_come_from_d4rl_table():
    assert (env_spec("walker2d-medium-v2").ref_min_score, env_spec("walker2d-medium-v2").ref_max_score) == (
        1.629008,
        4592.3,
    )
    assert env_spec("halfcheetah-random-v2").ref_min_score == -280.178953
    assert env_spec("kitchen-partial-v0").ref_max_score == 4.0


@pytest.mark.parametrize(
    "name",
    [
        "hopper-medium-sim-v4",
        "Hopper-v4",
        "hopper_medium-v2",
        "/data/hopper-medium-sim-v4.hdf5",
        "HOPPER-expert-v2",
    ],
)
def test_other_name_forms_use_the_family_reference(name):
    spec = env_spec(name)
    assert (spec.env_id, spec.ref_min_score, spec.ref_max_score) == ("Hopper-v4", -20.272305, 3234.3)


def test_official_download_file_stems_resolve_to_their_dataset():
    assert env_spec("hopper_medium_replay-v2.hdf5").dataset == "hopper-medium-replay-v2"
    stem = "Ant_maze_u-maze_noisy_multistart_True_multigoal_True_sparse_fixed"
    assert env_spec(stem).dataset == "antmaze-umaze-diverse-v2"


def test_normalized_score_on_known_values():
    assert normalized_score("hopper-medium-v2", -20.272305) == pytest.approx(0.0)
    assert normalized_score("hopper-medium-v2", 3234.3) == pytest.approx(100.0)
    assert isinstance(normalized_score("Hopper-v4", 1617.0), float)
    scores = normalized_score("kitchen-mixed-v0", np.array([0.0, 2.0, 4.0]))
    np.testing.assert_allclose(scores, [0.0, 50.0, 100.0])


@pytest.mark.parametrize("name", ["ant-medium-v2", "CartPole-v1", "", "antmaze-large-play-v2"])
def test_unknown_names_raise_config_error_listing_families(name):
    with pytest.raises(ConfigError) as err:
        env_spec(name)
    if name != "antmaze-large-play-v2":
        assert "hopper, walker2d, halfcheetah, antmaze, kitchen" in str(err.value)
    else:
        assert "U-maze" in str(err.value)


def test_make_env_creates_the_gymnasium_env_with_the_dataset_time_limit():
    env = make_env("hopper-medium-v2")
    try:
        assert env.spec.id == "Hopper-v4"
        assert env.spec.max_episode_steps == 1000
        observation, _ = env.reset(seed=0)
        assert observation.shape == (11,)
        assert env.action_space.shape == (3,)
    finally:
        env.close()


def test_make_vector_env():
    venv = make_vector_env("walker2d-medium-v2", num_envs=2)
    try:
        observations, _ = venv.reset(seed=0)
        assert observations.shape == (2, 17)
    finally:
        venv.close()
    with pytest.raises(ConfigError):
        make_vector_env("walker2d-medium-v2", num_envs=0)


def test_robotics_envs_without_the_extra_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gymnasium_robotics", None)  # import fails as if not installed
    with pytest.raises(DMMError, match=r"pip install decision-metamamba\[robotics\]"):
        make_env("antmaze-umaze-v2")


def test_importing_envs_imports_neither_torch_nor_gymnasium():
    code = (
        "import sys, dmm.envs; dmm.envs.env_spec('hopper-medium-v2'); "
        "print('torch' in sys.modules, 'gymnasium' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
