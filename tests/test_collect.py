"""``dmm collect``: D4RL layout, exact length, reproducibility, episode continuity, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SHARED_HOPPER_HDF5, SHARED_HOPPER_POLICY, random_sac_policy

from dmm.data import load_dataset
from dmm.errors import DMMError
from dmm.trainer.collect import SACPolicy, collect

KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmm.cli", "collect", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def read(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with h5py.File(path, "r") as f:
        return {key: f[key][()] for key in f}, dict(f.attrs)


def test_cli_writes_a_d4rl_file_the_loader_reads(tmp_path, hopper_policy_npz):
    out = tmp_path / "hopper-random-sim.hdf5"
    args = ("--env", "Hopper-v4", "--policy", hopper_policy_npz, "--steps", 300, "--seed", 3)
    result = run_cli(*args, "--out", out)
    assert result.returncode == 0, result.stderr
    arrays, attrs = read(out)
    assert sorted(arrays) == sorted(KEYS)
    assert {key: arrays[key].shape for key in KEYS} == {
        "observations": (300, 11),
        "actions": (300, 3),
        "rewards": (300,),
        "next_observations": (300, 11),
        "terminals": (300,),
        "timeouts": (300,),
    }
    assert arrays["observations"].dtype == np.float32 and arrays["terminals"].dtype == bool
    assert attrs["env_id"] == "Hopper-v4" and attrs["behavior_policy"] == hopper_policy_npz.name
    assert attrs["seed"] == 3
    assert arrays["terminals"][-1] or arrays["timeouts"][-1]
    assert np.abs(arrays["actions"]).max() <= 1.0
    dataset = load_dataset(out)
    assert dataset.num_transitions == 300 and dataset.env == "hopper-random-sim"
    assert dataset.returns.sum() == pytest.approx(arrays["rewards"].sum(dtype=np.float64))

    assert "collect:" in result.stderr  # the progress bar
    again = tmp_path / "again.hdf5"
    quiet = run_cli(*args, "--out", again, "--no-progress")
    assert quiet.returncode == 0 and "collect:" not in quiet.stderr
    repeated, _ = read(again)
    for key in KEYS:
        np.testing.assert_array_equal(arrays[key], repeated[key])
    other = tmp_path / "other.hdf5"
    collect("Hopper-v4", hopper_policy_npz, 300, other, seed=4)
    assert not np.array_equal(read(other)[0]["actions"], arrays["actions"])


@pytest.mark.parametrize("num_envs", [1, 3])
def test_episodes_are_contiguous_and_never_contain_reset_steps(tmp_path, hopper_policy_npz, num_envs):
    out = collect("hopper-medium-v2", hopper_policy_npz, 700, tmp_path / "c.hdf5", seed=0, num_envs=num_envs)
    arrays, _ = read(out)
    ends = arrays["terminals"] | arrays["timeouts"]
    assert ends.sum() >= 3  # a random policy falls within a few hundred steps
    # within an episode each step starts where the previous one ended
    inside = ~ends[:-1]
    np.testing.assert_array_equal(
        arrays["observations"][1:][inside], arrays["next_observations"][:-1][inside]
    )
    # and every episode starts from a fresh reset (Hopper's initial height is 1.25 +- 0.005)
    starts = np.concatenate(([0], np.flatnonzero(ends[:-1]) + 1))
    assert np.all(np.abs(arrays["observations"][starts, 0] - 1.25) <= 0.005 + 1e-6)


def test_episode_k_is_reset_with_seed_plus_k(tmp_path, hopper_policy_npz):
    import gymnasium as gym

    arrays, _ = read(collect("Hopper-v4", hopper_policy_npz, 400, tmp_path / "c.hdf5", seed=10))
    starts = np.concatenate(([0], np.flatnonzero(arrays["terminals"] | arrays["timeouts"])[:-1] + 1))
    env = gym.make("Hopper-v4")
    for k, start in enumerate(starts[:3]):
        expected, _ = env.reset(seed=10 + k)
        np.testing.assert_array_equal(arrays["observations"][start], expected.astype(np.float32))


def test_deterministic_actions_are_the_policy_mean(tmp_path, hopper_policy_npz):
    arrays, attrs = read(collect("Hopper-v4", hopper_policy_npz, 50, tmp_path / "d.hdf5", deterministic=True))
    policy = SACPolicy.load(hopper_policy_npz)
    expected = policy.act(arrays["observations"].astype(np.float64), None).astype(np.float32)
    np.testing.assert_allclose(arrays["actions"], expected, atol=1e-6)  # obs stored as float32
    assert attrs["sampling"] == "tanh_gaussian_mean"


def test_reproduces_the_shared_dataset(tmp_path):
    if not (SHARED_HOPPER_HDF5.is_file() and SHARED_HOPPER_POLICY.is_file()):
        pytest.skip("shared Hopper data or policy not present")
    steps = 1500  # three whole episodes and part of a fourth
    ours, attrs = read(collect("Hopper-v4", SHARED_HOPPER_POLICY, steps, tmp_path / "c.hdf5", seed=0))
    with h5py.File(SHARED_HOPPER_HDF5, "r") as f:
        for key in KEYS:
            reference = f[key][:steps]
            if key == "timeouts":  # our file ends here, so its last step is marked as a timeout
                reference[-1] = True
            np.testing.assert_array_equal(ours[key], reference, err_msg=key)
        assert attrs["behavior_policy"] == f.attrs["behavior_policy"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--steps": "0"}, "--steps must be positive, got 0"),
        ({"--policy": "missing.npz"}, "policy file not found"),
        ({"--env": "NoSuchEnv-v0"}, "cannot create environment 'NoSuchEnv-v0'"),
        (
            {"--env": "Walker2d-v4"},
            "observations of dim 11 .* Walker2d-v4 has observation dim 17 and action dim 6",
        ),
        ({"--num-envs": "0"}, "--num-envs: must be a positive integer, got 0"),
        ({"--out": "nowhere/x.hdf5"}, "output folder does not exist"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, hopper_policy_npz, change, message):
    import re

    options = {
        "--env": "Hopper-v4",
        "--policy": str(hopper_policy_npz),
        "--steps": "20",
        "--out": str(tmp_path / "x.hdf5"),
    }
    for key, value in change.items():
        options[key] = str(tmp_path / value) if key in ("--policy", "--out") else value
    result = run_cli(*[item for pair in options.items() for item in pair])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmm collect: error:"), result.stderr
    assert re.search(message, lines[0])
    assert list(tmp_path.glob("*.hdf5")) == [] and list(tmp_path.glob(".x.hdf5*")) == []


def test_policy_with_wrong_shapes_is_rejected(tmp_path):
    path = random_sac_policy(tmp_path / "p.npz", 11, 3)
    params = dict(np.load(path))
    params["fc1.weight"] = params["fc1.weight"][:, :5]
    np.savez(path, **params)
    with pytest.raises(DMMError, match=r"fc1.weight has shape \(32, 5\), expected \(32, 32\)"):
        SACPolicy.load(path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DMMError, match="not a readable policy npz"):
        SACPolicy.load(bad)
