"""Shared fixtures: small D4RL-layout data, a random SAC behaviour policy, the shared data files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_HOPPER_HDF5 = SHARED / "data" / "hopper-medium-sim-v4.hdf5"
SHARED_HOPPER_POLICY = SHARED / "policies" / "hopper_online_5.npz"


def write_hdf5(path: Path, arrays: dict[str, np.ndarray], attrs: dict | None = None) -> Path:
    """Write ``arrays`` as top-level datasets of an hdf5 file."""
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        f.attrs.update(attrs or {})
    return path


@pytest.fixture
def d4rl_arrays() -> dict[str, np.ndarray]:
    """9 transitions, obs dim 3, act dim 2: an episode ending in a terminal (steps 0-2), one ending
    in a timeout (3-6) and an unfinished one (7-8). Values are distinct per step."""
    n = 9
    steps = np.arange(n, dtype=np.float32)
    terminals = np.zeros(n, dtype=bool)
    timeouts = np.zeros(n, dtype=bool)
    terminals[2] = True
    timeouts[6] = True
    return {
        "observations": steps[:, None] * 10 + np.arange(3, dtype=np.float32),
        "actions": steps[:, None] / 10 + np.arange(2, dtype=np.float32),
        "rewards": steps + 1,
        "terminals": terminals,
        "timeouts": timeouts,
    }


@pytest.fixture
def d4rl_hdf5(tmp_path: Path, d4rl_arrays: dict[str, np.ndarray]) -> Path:
    """:func:`d4rl_arrays` written as ``tiny.hdf5``."""
    return write_hdf5(tmp_path / "tiny.hdf5", d4rl_arrays)


def policy_of(model):
    """``model`` with the tests' fixed normalization (state mean 0.1, std 2, RTG scale 10), ready for a
    ``PolicyRunner``; references that recompute a forward by hand use the same constants."""
    from dmm.model import Policy, PolicyMeta

    S = model.config.state_dim
    meta = PolicyMeta(
        env="test",
        env_id="Test-v0",
        state_mean=[0.1] * S,
        state_std=[2.0] * S,
        rtg_scale=10.0,
        target_return=1.0,
    )
    return Policy(model, meta)


def random_sac_policy(path: Path, obs_dim: int, act_dim: int, hidden: int = 32, seed: int = 0) -> Path:
    """A D4RL-layout SAC policy npz with random weights."""
    rng = np.random.default_rng(seed)
    shapes = {
        "fc0.weight": (hidden, obs_dim),
        "fc0.bias": (hidden,),
        "fc1.weight": (hidden, hidden),
        "fc1.bias": (hidden,),
        "last_fc.weight": (act_dim, hidden),
        "last_fc.bias": (act_dim,),
        "last_fc_log_std.weight": (act_dim, hidden),
        "last_fc_log_std.bias": (act_dim,),
    }
    np.savez(path, **{k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()})
    return path


@pytest.fixture
def hopper_policy_npz(tmp_path: Path) -> Path:
    """A random SAC policy with Hopper's dimensions (obs 11, action 3)."""
    return random_sac_policy(tmp_path / "hopper_random_policy.npz", 11, 3)


@pytest.fixture
def shared_hopper_hdf5() -> Path:
    """The shared 1e6-transition Hopper dataset; the test is skipped where it is absent."""
    if not SHARED_HOPPER_HDF5.is_file():
        pytest.skip(f"{SHARED_HOPPER_HDF5} not present")
    return SHARED_HOPPER_HDF5
