"""Loaders, returns-to-go, the Kitchen reward fix, state statistics, name resolution, the sampler."""

from __future__ import annotations

import os
import pickle
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from conftest import write_hdf5

import dmm.data.download as download
from dmm.data import (
    Dataset,
    Trajectory,
    WindowSampler,
    cache_path,
    dataset_url,
    default_cache_dir,
    load_dataset,
    load_hdf5,
    load_pickle,
    returns_to_go,
    rewards_from_cumulative,
    state_stats,
)
from dmm.envs import reference_table
from dmm.errors import DatasetError

# ---------------------------------------------------------------- loaders


def assert_same_trajectories(a: list[Trajectory], b: list[Trajectory]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in ("observations", "actions", "rewards"):
            assert getattr(x, key).dtype == np.float32
            np.testing.assert_array_equal(getattr(x, key), getattr(y, key))
        assert x.terminal == y.terminal


def test_hdf5_splits_on_terminals_and_timeouts_and_keeps_trailing_episode(d4rl_hdf5, d4rl_arrays):
    trajectories = load_hdf5(d4rl_hdf5)
    assert [len(t) for t in trajectories] == [3, 4, 2]
    assert [t.terminal for t in trajectories] == [True, False, False]
    for t, (a, b) in zip(trajectories, [(0, 3), (3, 7), (7, 9)], strict=True):
        np.testing.assert_array_equal(t.observations, d4rl_arrays["observations"][a:b])
        np.testing.assert_array_equal(t.actions, d4rl_arrays["actions"][a:b])
        np.testing.assert_array_equal(t.rewards, d4rl_arrays["rewards"][a:b])


def test_hdf5_without_timeouts_splits_on_terminals_only(tmp_path, d4rl_arrays):
    arrays = {k: v for k, v in d4rl_arrays.items() if k != "timeouts"}
    trajectories = load_hdf5(write_hdf5(tmp_path / "v0.hdf5", arrays))
    assert [len(t) for t in trajectories] == [3, 6]


def test_hdf5_accepts_column_vectors_and_next_observations(tmp_path, d4rl_arrays):
    arrays = dict(d4rl_arrays)
    arrays["rewards"] = arrays["rewards"][:, None]
    arrays["next_observations"] = arrays["observations"] + 1
    trajectories = load_hdf5(write_hdf5(tmp_path / "col.hdf5", arrays))
    assert_same_trajectories(trajectories, load_hdf5(write_hdf5(tmp_path / "flat.hdf5", d4rl_arrays)))


def test_pickle_and_hdf5_give_identical_trajectories(tmp_path, d4rl_hdf5, d4rl_arrays):
    episodes = []
    for a, b in [(0, 3), (3, 7), (7, 9)]:
        episode = {key: d4rl_arrays[key][a:b] for key in ("observations", "actions", "rewards")}
        episode["terminals"] = d4rl_arrays["terminals"][a:b].astype(np.float32)
        episodes.append(episode)
    episodes[1]["dones"] = episodes[1].pop("terminals")  # either flag name is accepted
    path = tmp_path / "tiny.pkl"
    path.write_bytes(pickle.dumps(episodes))
    assert_same_trajectories(load_pickle(path), load_hdf5(d4rl_hdf5))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"observations": Exploit()}]))
    with pytest.raises(DatasetError, match="only numpy arrays"):
        load_pickle(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.pop("actions"), "missing key.*actions"),
        (lambda a: a.update(rewards=a["rewards"][:-1]), "different lengths.*rewards=8"),
        (lambda a: a["observations"].__setitem__((4, 1), np.nan), "'observations' has a NaN.*row 4"),
        (lambda a: a.update(actions=a["actions"][:, 0]), "'actions' must have 2 dimension"),
    ],
)
def test_malformed_hdf5_raises_dataset_error(tmp_path, d4rl_arrays, change, message):
    change(d4rl_arrays)
    with pytest.raises(DatasetError, match=message):
        load_hdf5(write_hdf5(tmp_path / "bad.hdf5", d4rl_arrays))


def test_malformed_pickle_raises_dataset_error(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps([{"observations": np.zeros((2, 3)), "actions": np.zeros((2, 1))}]))
    with pytest.raises(DatasetError, match=r"trajectory 0: missing key.*rewards, terminals \(or dones\)"):
        load_pickle(path)
    path.write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(DatasetError, match="expected a non-empty list"):
        load_pickle(path)


def test_files_that_are_not_datasets_raise_dataset_error(tmp_path):
    junk = tmp_path / "junk.hdf5"
    junk.write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetError, match="not a readable HDF5 file"):
        load_dataset(junk)
    with pytest.raises(DatasetError, match="no such dataset file"):
        load_dataset(tmp_path / "absent.hdf5")
    other = tmp_path / "data.csv"
    other.write_text("1,2\n")
    with pytest.raises(DatasetError, match=r"unsupported file type '\.csv'"):
        load_dataset(other)


# ---------------------------------------------------------------- returns, Kitchen fix, statistics


def test_returns_to_go_is_inclusive_and_undiscounted():
    np.testing.assert_allclose(returns_to_go(np.array([1.0, 2.0, 3.0, -0.5])), [5.5, 4.5, 2.5, -0.5])
    np.testing.assert_allclose(returns_to_go(np.array([7.0])), [7.0])


def test_kitchen_cumulative_rewards_become_per_step_rewards():
    # tasks completed at steps 2 and 5: the cumulative count is 0,0,1,1,1,2,2
    cumulative = np.array([0, 0, 1, 1, 1, 2, 2], dtype=np.float32)
    rewards = rewards_from_cumulative(cumulative)
    np.testing.assert_array_equal(rewards, [0, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(returns_to_go(rewards), [2, 2, 2, 1, 1, 1, 0])
    # Algorithm 1 sets r[0] = 0 whatever the count at the first step
    np.testing.assert_array_equal(rewards_from_cumulative(np.array([1.0, 1.0, 2.0])), [0, 0, 1])


def kitchen_arrays() -> dict[str, np.ndarray]:
    """Two Kitchen-like episodes with cumulative rewards: tasks at steps 1, 3 and (episode 2) 5."""
    rewards = np.array([0, 1, 1, 2, 0, 1, 1], dtype=np.float32)
    terminals = np.array([0, 0, 0, 1, 0, 0, 0], dtype=bool)
    return {
        "observations": np.arange(7 * 2, dtype=np.float32).reshape(7, 2),
        "actions": np.zeros((7, 9), dtype=np.float32),
        "rewards": rewards,
        "terminals": terminals,
        "timeouts": np.zeros(7, dtype=bool),
    }


def test_kitchen_fix_is_applied_per_episode_to_kitchen_data(tmp_path):
    path = write_hdf5(tmp_path / "kitchen-mixed-v0.hdf5", kitchen_arrays())
    dataset = load_dataset(path)
    assert dataset.env == "kitchen-mixed-v0"
    assert [t.rewards.tolist() for t in dataset.trajectories] == [[0, 1, 0, 1], [0, 1, 0]]
    assert dataset.returns.tolist() == [2.0, 1.0]
    unfixed = load_dataset(path, kitchen_fix=False)
    assert [t.rewards.tolist() for t in unfixed.trajectories] == [[0, 1, 1, 2], [0, 1, 1]]


def test_kitchen_fix_is_off_for_other_data_unless_forced(tmp_path):
    path = write_hdf5(tmp_path / "hopper-toy.hdf5", kitchen_arrays())
    assert load_dataset(path).returns.tolist() == [4.0, 2.0]
    assert load_dataset(path, kitchen_fix=True).returns.tolist() == [2.0, 1.0]


def test_state_stats_over_all_observations():
    a = Trajectory(
        np.array([[0.0, 5.0], [2.0, 5.0]], np.float32), np.zeros((2, 1), np.float32), np.zeros(2), True
    )
    b = Trajectory(np.array([[4.0, 5.0]], np.float32), np.zeros((1, 1), np.float32), np.zeros(1), False)
    mean, std = state_stats([a, b])
    np.testing.assert_allclose(mean, [2.0, 5.0])
    np.testing.assert_allclose(std, [np.sqrt(8 / 3) + 1e-6, 1e-6], rtol=1e-6)
    assert mean.dtype == std.dtype == np.float32


def test_load_dataset_from_a_path(d4rl_hdf5):
    dataset = load_dataset(d4rl_hdf5)
    assert dataset.name == "tiny"
    assert dataset.env is None  # "tiny" names no known environment
    assert (dataset.obs_dim, dataset.act_dim, dataset.num_transitions) == (3, 2, 9)
    np.testing.assert_allclose(dataset.state_mean, np.arange(3) + 40.0)


def test_collected_file_names_its_env_through_the_env_id_attribute(tmp_path, d4rl_arrays):
    path = write_hdf5(tmp_path / "my-run.hdf5", d4rl_arrays, attrs={"env_id": "Hopper-v4"})
    assert load_dataset(path).env == "Hopper-v4"


# ---------------------------------------------------------------- names, cache, download


HOPPER_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5"


def test_names_resolve_to_official_url_and_cache_path(tmp_path, monkeypatch):
    assert dataset_url("hopper-medium-v2") == HOPPER_URL
    monkeypatch.delenv("D4RL_DATASET_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".d4rl" / "datasets"
    assert cache_path("hopper-medium-v2") == tmp_path / ".d4rl" / "datasets" / "hopper_medium-v2.hdf5"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "elsewhere"))
    assert cache_path("hopper-medium-v2") == tmp_path / "elsewhere" / "hopper_medium-v2.hdf5"
    assert cache_path("hopper-medium-v2", tmp_path / "x") == tmp_path / "x" / "hopper_medium-v2.hdf5"


def test_offline_error_names_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    def offline(url: str, dest: Path) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(download, "download_file", offline)
    with pytest.raises(DatasetError) as err:
        load_dataset("walker2d-medium-v2", cache_dir=tmp_path)
    message = str(err.value)
    assert "walker2d_medium-v2.hdf5" in message
    assert f"place it at {tmp_path / 'walker2d_medium-v2.hdf5'}" in message
    assert "\n" not in message


def test_download_once_then_cache(tmp_path, monkeypatch, d4rl_arrays):
    calls = []

    def fake_download(url: str, dest: Path) -> None:
        calls.append(url)
        write_hdf5(dest, d4rl_arrays)

    monkeypatch.setattr(download, "download_file", fake_download)
    first = load_dataset("hopper-medium-v2", cache_dir=tmp_path)
    second = load_dataset("hopper-medium-v2", cache_dir=tmp_path)
    assert calls == [HOPPER_URL]
    assert first.name == first.env == "hopper-medium-v2"
    assert second.num_transitions == 9


def test_download_file_writes_complete_file_only(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(3 << 20))
    dest = tmp_path / "cache" / "copy.bin"
    download.download_file(source.as_uri(), dest)
    assert dest.read_bytes() == source.read_bytes()
    with pytest.raises(urllib.error.URLError):
        download.download_file((tmp_path / "absent.bin").as_uri(), tmp_path / "cache" / "absent.bin")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["copy.bin"]


def test_name_outside_d4rl_is_found_in_the_cache_folder(tmp_path, d4rl_arrays):
    write_hdf5(tmp_path / "hopper-medium-sim-v4.hdf5", d4rl_arrays)
    dataset = load_dataset("hopper-medium-sim-v4", cache_dir=tmp_path)
    assert (dataset.name, dataset.env) == ("hopper-medium-sim-v4", "hopper-medium-sim-v4")
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope-v1'.*no file nope-v1.hdf5"):
        load_dataset("nope-v1", cache_dir=tmp_path)


def test_shared_hopper_dataset_loads_quickly(shared_hopper_hdf5):
    start = time.perf_counter()
    dataset = load_dataset(shared_hopper_hdf5)
    elapsed = time.perf_counter() - start
    assert len(dataset.trajectories) == 2379
    assert dataset.num_transitions == 1_000_000
    assert dataset.env == "hopper-medium-sim-v4"
    assert dataset.returns.mean() == pytest.approx(1347.8, abs=0.1)
    assert elapsed < 10.0, f"loading took {elapsed:.1f}s"


# ---------------------------------------------------------------- window sampler


@pytest.fixture
def tiny_dataset(d4rl_hdf5) -> Dataset:
    return load_dataset(d4rl_hdf5)


def expected_window(dataset: Dataset, end: int, context: int, rtg_scale: float):
    """Reference construction of one window by walking the trajectories (slow and obvious)."""
    offset = 0
    for t in dataset.trajectories:
        if end < offset + len(t):
            local = end - offset
            first = max(0, local - context + 1)
            n = local - first + 1
            states = np.zeros((context, dataset.obs_dim), np.float32)
            actions = np.zeros((context, dataset.act_dim), np.float32)
            rtg = np.zeros((context, 1), np.float32)
            states[context - n :] = (
                t.observations[first : local + 1] - dataset.state_mean
            ) / dataset.state_std
            actions[context - n :] = t.actions[first : local + 1]
            rtg[context - n :, 0] = returns_to_go(t.rewards)[first : local + 1] / rtg_scale
            mask = np.arange(context) >= context - n
            return states, actions, rtg, mask
        offset += len(t)
    raise AssertionError("end out of range")


def test_sampler_shapes_and_dtypes(tiny_dataset):
    batch = WindowSampler(tiny_dataset, context=4, batch_size=5, rtg_scale=10.0, seed=0).sample()
    assert batch.states.shape == (5, 4, 3) and batch.states.dtype == np.float32
    assert batch.actions.shape == (5, 4, 2) and batch.actions.dtype == np.float32
    assert batch.rtg.shape == (5, 4, 1) and batch.rtg.dtype == np.float32
    assert batch.mask.shape == (5, 4) and batch.mask.dtype == bool


def test_window_at_trajectory_start_is_left_padded(tiny_dataset):
    sampler = WindowSampler(tiny_dataset, context=4, batch_size=1, rtg_scale=10.0)
    batch = sampler.windows(np.array([3, 4, 8]))  # first and second step of episode 2, last of episode 3
    assert batch.mask.tolist() == [
        [False, False, False, True],
        [False, False, True, True],
        [False, False, True, True],
    ]
    assert not batch.states[~batch.mask].any() and not batch.actions[~batch.mask].any()
    assert not batch.rtg[~batch.mask].any()
    np.testing.assert_array_equal(batch.actions[0, 3], tiny_dataset.trajectories[1].actions[0])
    # rtg of step 0 of episode 2 (rewards 4, 5, 6, 7), scaled by 10
    assert batch.rtg[0, 3, 0] == pytest.approx(2.2)


@pytest.mark.parametrize("context", [1, 3, 4, 12])
def test_every_window_equals_the_dataset_slice(tiny_dataset, context):
    sampler = WindowSampler(tiny_dataset, context=context, batch_size=1, rtg_scale=10.0)
    ends = np.arange(tiny_dataset.num_transitions)
    batch = sampler.windows(ends)
    for i, end in enumerate(ends):
        states, actions, rtg, mask = expected_window(tiny_dataset, int(end), context, 10.0)
        np.testing.assert_allclose(batch.states[i], states, rtol=1e-6)
        np.testing.assert_array_equal(batch.actions[i], actions)
        np.testing.assert_allclose(batch.rtg[i], rtg, rtol=1e-6)
        np.testing.assert_array_equal(batch.mask[i], mask)


def test_sampled_windows_never_cross_trajectories_and_cover_all_ends(tiny_dataset):
    sampler = WindowSampler(tiny_dataset, context=5, batch_size=256, rtg_scale=1.0, seed=3)
    batch = sampler.sample()
    # actions encode the global step (step/10 in column 0): real steps of a window are consecutive
    # and all in the trajectory of the window's last step
    step = np.rint(batch.actions[..., 0] * 10).astype(int)
    starts = np.array([0, 0, 0, 3, 3, 3, 3, 7, 7])
    for row, mask in zip(step, batch.mask, strict=True):
        real = row[mask]
        assert np.all(np.diff(real) == 1)
        assert real[0] == max(starts[real[-1]], real[-1] - 4)
    assert set(step[:, -1].tolist()) == set(range(9))


def test_sampler_is_deterministic_per_seed(tiny_dataset):
    def batches(seed):
        sampler = WindowSampler(tiny_dataset, context=3, batch_size=16, rtg_scale=1.0, seed=seed)
        return [sampler.sample() for _ in range(3)]

    for a, b in zip(batches(7), batches(7), strict=True):
        np.testing.assert_array_equal(a.states, b.states)
        np.testing.assert_array_equal(a.mask, b.mask)
    assert any(not np.array_equal(a.states, b.states) for a, b in zip(batches(7), batches(8), strict=True))


def test_sampler_normalization_matches_dataset(tiny_dataset):
    mean, std = WindowSampler(tiny_dataset, 2, 2, 1.0).normalization()
    np.testing.assert_array_equal(mean, tiny_dataset.state_mean)
    np.testing.assert_array_equal(std, tiny_dataset.state_std)


@pytest.mark.parametrize("kwargs", [{"context": 0}, {"batch_size": 0}, {"rtg_scale": 0.0}])
def test_sampler_rejects_bad_settings(tiny_dataset, kwargs):
    from dmm.errors import ConfigError

    settings = {"context": 2, "batch_size": 2, "rtg_scale": 1.0, **kwargs}
    with pytest.raises(ConfigError):
        WindowSampler(tiny_dataset, **settings)


def test_sampler_on_the_shared_dataset_is_fast(shared_hopper_hdf5):
    sampler = WindowSampler(
        load_dataset(shared_hopper_hdf5), context=8, batch_size=64, rtg_scale=1000.0, seed=0
    )
    start = time.perf_counter()
    for _ in range(200):
        batch = sampler.sample()
    per_batch = (time.perf_counter() - start) / 200
    assert batch.states.shape == (64, 8, 11)
    assert per_batch < 0.01, f"{per_batch * 1e3:.2f} ms per batch"


def test_a_d4rl_mirror_keeps_the_official_paths(monkeypatch):
    official = dataset_url("hopper-medium-v2")
    assert official == "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/hopper_medium-v2.hdf5"
    monkeypatch.setenv("D4RL_BASE_URL", "https://mirror.example/d4rl/")
    assert (
        dataset_url("hopper-medium-v2") == "https://mirror.example/d4rl/gym_mujoco_v2/hopper_medium-v2.hdf5"
    )
    assert all(e["dataset_url"].startswith(download.OFFICIAL_BASE_URL) for e in reference_table().values())


def test_episode_rows_walk_whole_trajectories_and_the_other_rows_are_windows(tiny_dataset):
    """Each episode row shows a trajectory from its first step to its last, K steps per batch (its last
    chunk right-padded), fresh only when it starts one; the remaining rows are random windows."""
    from dmm.data import EpisodeSampler

    K, rows = 3, 2
    sampler = EpisodeSampler(tiny_dataset, context=K, batch_size=5, rtg_scale=10.0, episode_rows=rows, seed=1)
    walked: list[list[np.ndarray]] = [[] for _ in range(rows)]
    done: list[list[np.ndarray]] = [[] for _ in range(rows)]
    for _ in range(40):
        batch = sampler.sample()
        assert batch.states.shape == (5, K, tiny_dataset.obs_dim) and batch.fresh[rows:].all()
        for r in range(rows):
            if batch.fresh[r] and walked[r]:
                done[r].append(np.concatenate(walked[r]))
                walked[r] = []
            real = batch.mask[r]
            assert real[0] and (real == (np.arange(K) < real.sum())).all()  # padding only at the end
            assert (batch.timesteps[r][real] == batch.timesteps[r][0] + np.arange(real.sum())).all()
            walked[r].append(batch.states[r][real])
    finished = [states for row in done for states in row]
    normalized = [
        (t.observations - tiny_dataset.state_mean) / tiny_dataset.state_std for t in tiny_dataset.trajectories
    ]
    assert finished
    for states in finished:
        assert any(
            len(states) == len(expected) and np.allclose(states, expected, rtol=1e-6)
            for expected in normalized
        )
    again = EpisodeSampler(tiny_dataset, context=K, batch_size=5, rtg_scale=10.0, episode_rows=rows, seed=1)
    for _ in range(7):
        again.sample()
    saved = again.state()
    first = again.sample()
    again.set_state(saved)
    np.testing.assert_array_equal(again.sample().states, first.states)
