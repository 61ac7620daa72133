"""Minari datasets: ``minari:<id>`` loads like the same steps in hdf5, with the env it was recorded
in; a missing id is one clear line; ``dmm collect --format minari`` writes what Minari and
``dmm train`` read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_hdf5

from dmm.data import Dataset, load_dataset
from dmm.envs import env_spec, normalized_score
from dmm.errors import DatasetError, DMMError
from dmm.trainer.collect import collect

minari = pytest.importorskip("minari")

# Small enough that training and the final evaluation take seconds on a CPU.
TINY_YAML = "model: {d_model: 16, n_layer: 1, context: 4}\nbatch_size: 8\nwarmup_updates: 5\n"


@pytest.fixture
def minari_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Minari root for this test ($MINARI_DATASETS_PATH)."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def record(dataset_id: str, env_id: str = "Hopper-v5", steps: int = 300, seed: int = 0):
    """``steps`` uniform-random steps recorded by Minari's own DataCollector; the last episode is cut
    off (truncated) where the recording stops."""
    import gymnasium as gym

    env = minari.DataCollector(gym.make(env_id), record_infos=False)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            env.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Minari's notices about missing metadata
        dataset = env.create_dataset(dataset_id, algorithm_name="uniform random")
    env.close()
    return dataset


def dmm(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def assert_same_dataset(a: Dataset, b: Dataset) -> None:
    assert (a.env, a.num_transitions, len(a.trajectories)) == (b.env, b.num_transitions, len(b.trajectories))
    for x, y in zip(a.trajectories, b.trajectories, strict=True):
        for key in ("observations", "actions", "rewards"):
            assert getattr(x, key).dtype == getattr(y, key).dtype == np.float32
            np.testing.assert_array_equal(getattr(x, key), getattr(y, key))
        assert x.terminal == y.terminal
    np.testing.assert_array_equal(a.state_mean, b.state_mean)
    np.testing.assert_array_equal(a.state_std, b.state_std)


def test_a_minari_dataset_loads_its_episodes_with_the_env_it_was_recorded_in(minari_root):
    recorded = record("test/hopper/random-v0")
    dataset = load_dataset("minari:test/hopper/random-v0")
    episodes = list(recorded.iterate_episodes())
    assert dataset.name == "test-hopper-random-v0"  # a valid model name in the store
    assert dataset.num_transitions == 300 and len(dataset.trajectories) == len(episodes) >= 3
    for trajectory, episode in zip(dataset.trajectories, episodes, strict=True):
        np.testing.assert_array_equal(trajectory.observations, episode.observations[:-1].astype(np.float32))
        np.testing.assert_array_equal(trajectory.actions, episode.actions)
        assert trajectory.terminal == bool(episode.terminations[-1])
    assert [t.terminal for t in dataset.trajectories[:-1]] == [True] * (len(episodes) - 1)
    assert not dataset.trajectories[-1].terminal  # cut off by the end of the recording
    # evaluated in the env the data was recorded in, normalized with hopper's reference scores
    assert (dataset.env, dataset.spec.env_id, dataset.spec.obs_dim) == ("Hopper-v5", "Hopper-v5", 11)
    hopper = env_spec("hopper-medium-v2")
    assert (dataset.spec.ref_min_score, dataset.spec.ref_max_score) == (
        hopper.ref_min_score,
        hopper.ref_max_score,
    )
    assert normalized_score(dataset.env, 1617.0) == normalized_score("hopper-medium-v2", 1617.0)


def test_the_same_episodes_as_d4rl_hdf5_give_an_identical_dataset(minari_root, tmp_path):
    recorded = record("test/hopper/random-v0", seed=1)
    episodes = list(recorded.iterate_episodes())
    flat = {
        "observations": np.concatenate([e.observations[:-1] for e in episodes]),
        "actions": np.concatenate([e.actions for e in episodes]),
        "rewards": np.concatenate([e.rewards for e in episodes]),
        "terminals": np.concatenate([e.terminations for e in episodes]),
        "timeouts": np.concatenate([e.truncations for e in episodes]),
    }
    hdf5 = write_hdf5(tmp_path / "random.hdf5", flat, {"env_id": recorded.spec.env_spec.id})
    assert_same_dataset(load_dataset("minari:test/hopper/random-v0"), load_dataset(hdf5))


def test_a_missing_dataset_without_network_is_a_clear_error(minari_root, monkeypatch):
    def offline(dataset_id: str) -> None:
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(minari, "download_dataset", offline)
    with pytest.raises(DatasetError) as caught:
        load_dataset("minari:mujoco/hopper/medium-v0")
    message = str(caught.value)
    assert "'mujoco/hopper/medium-v0' is not in" in message and str(minari_root) in message
    assert "Name or service not known" in message and "\n" not in message


def test_dmm_train_on_a_missing_dataset_exits_2_with_one_line(minari_root, tmp_path):
    # HF_HUB_OFFLINE: Minari's default remote (Hugging Face) fails at once instead of going online
    result = dmm(
        "train",
        "--dataset",
        "minari:none/missing-v0",
        "--store",
        tmp_path / "store",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dmm train: error: Minari dataset 'none/missing-v0' is not in ")
    assert f"{minari_root} ($MINARI_DATASETS_PATH)" in lines[0]
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("name", ["hopper", "../outside-v0", "mujoco/hopper/medium"])
def test_a_malformed_id_is_refused(minari_root, name):
    with pytest.raises(DatasetError, match="is not a Minari dataset id"):
        load_dataset(f"minari:{name}")


def test_non_vector_spaces_are_refused_by_name(minari_root):
    record("test/blackjack/random-v0", env_id="Blackjack-v1", steps=20)
    with pytest.raises(DatasetError, match=r"observation space Tuple\(Discrete"):
        load_dataset("minari:test/blackjack/random-v0")


def test_collect_writes_a_minari_dataset_identical_to_its_hdf5(minari_root, tmp_path, hopper_policy_npz):
    args = ("--env", "Hopper-v4", "--policy", hopper_policy_npz, "--steps", 300, "--seed", 3)
    result = dmm("collect", *args, "--format", "minari", "--out", "minari:dmm/hopper/random-v0")
    assert result.returncode == 0, result.stderr
    assert "--dataset minari:dmm/hopper/random-v0" in result.stdout

    written = minari.load_dataset("dmm/hopper/random-v0")  # Minari reads it on its own
    assert (written.total_steps, written.spec.env_spec.id) == (300, "Hopper-v4")
    assert written.recover_environment().spec.id == "Hopper-v4"
    episodes = list(written.iterate_episodes())
    assert sum(len(e) for e in episodes) == 300
    assert all(len(e.observations) == len(e) + 1 for e in episodes)
    assert episodes[-1].terminations[-1] or episodes[-1].truncations[-1]

    hdf5 = collect("Hopper-v4", hopper_policy_npz, 300, tmp_path / "random.hdf5", seed=3)
    from_minari = load_dataset("minari:dmm/hopper/random-v0")
    assert from_minari.env == "Hopper-v4"
    assert_same_dataset(from_minari, load_dataset(hdf5))
    # within an episode, each observation is the previous step's next observation
    with h5py.File(hdf5, "r") as f:
        ends = np.flatnonzero(f["terminals"][()] | f["timeouts"][()])
        np.testing.assert_array_equal(episodes[0].observations[-1], f["next_observations"][ends[0]])


def test_collect_refuses_a_taken_or_malformed_id_before_rolling_out(minari_root, hopper_policy_npz):
    record("dmm/hopper/taken-v0", steps=10)
    with pytest.raises(DMMError, match="already exists"):
        collect("Hopper-v4", hopper_policy_npz, 10, "dmm/hopper/taken-v0", data_format="minari")
    with pytest.raises(DMMError, match="is not a Minari dataset id"):
        collect("Hopper-v4", hopper_policy_npz, 10, "no-version", data_format="minari")


def test_dmm_train_on_a_minari_dataset_evaluates_in_its_env(minari_root, tmp_path):
    record("test/hopper/random-v0")
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    store = tmp_path / "store"
    result = dmm(
        "train",
        "--dataset",
        "minari:test/hopper/random-v0",
        "--store",
        store,
        "--updates",
        "5",
        "--config",
        tmp_path / "tiny.yaml",
        "--eval-episodes",
        "1",
        "--eval-num-envs",
        "1",
        "--no-compile",
        "--target-return",
        "100",
        "--scan-backend",
        "torch",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "dataset test-hopper-random-v0: " in result.stdout and "env Hopper-v5" in result.stdout
    assert "final: target 100: normalized" in result.stdout
    meta = json.loads((store / "test-hopper-random-v0" / "1" / "config.json").read_text())
    assert meta["meta"]["env_id"] == "Hopper-v5"
