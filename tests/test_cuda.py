"""The GPU path: a policy on a CUDA device acts as it does on the CPU, runner and server alike.

These run only where torch sees a CUDA GPU (``pytest -m cuda``; ``python -m bench.device`` runs them
on a GPU host); the scan backend is whatever ``auto`` picks there (mamba_ssm's kernels when
installed, else the PyTorch scan). The CPU side is the reference.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import policy_of
from serving_fixtures import STATE_DIM, play_episode, publish_tiny

from dmm.model import DMMConfig, PolicyNetwork, PolicyRunner
from dmm.server.testing import ServerProcess

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOLERANCE = 1e-4


def _episodes(runner: PolicyRunner, states: np.ndarray, rtgs: np.ndarray) -> np.ndarray:
    """Actions [n, T, act] of n episodes stepped together, one slot each."""
    slots = list(range(len(states)))
    runner.reset(slots)
    steps = [runner.step(slots, states[:, t], rtgs[:, t]) for t in range(states.shape[1])]
    return np.stack(steps, axis=1)


@pytest.mark.parametrize(
    ("mode", "overrides"),
    [
        ("window", {}),
        ("recurrent", {}),
        ("window", {"architecture": "dt", "n_head": 2}),
        ("recurrent", {"residual": "normalized", "timestep_embedding": False}),
    ],
)
def test_gpu_runner_acts_as_the_cpu_runner(mode, overrides):
    config = DMMConfig(state_dim=5, act_dim=2, d_model=32, n_layer=3, context=4, dsm_window=6, **overrides)
    torch.manual_seed(0)
    cpu_model = PolicyNetwork(config).float().eval()
    gpu_model = PolicyNetwork(config).float().eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    rng = np.random.default_rng(0)
    n, T = 3, 3 * config.context
    states = rng.normal(size=(n, T, 5)).astype(np.float32)
    rtgs = rng.normal(size=(n, T)).astype(np.float32) * 10
    on_cpu = _episodes(PolicyRunner(policy_of(cpu_model), mode, capacity=n), states, rtgs)
    on_gpu = _episodes(PolicyRunner(policy_of(gpu_model.to("cuda")), mode, capacity=n), states, rtgs)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=TOLERANCE, rtol=0)


def _serve_episode(server: ServerProcess, mode: str, states: np.ndarray) -> np.ndarray:
    from dmm.v1.modes import MODE_ENUM

    with grpc.insecure_channel(server.target) as channel:
        return play_episode(channel, states, mode=MODE_ENUM[mode])


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_dmm_serve_on_cuda_answers_as_on_cpu(tmp_path: Path, mode: str):
    publish_tiny(tmp_path)
    states = np.random.default_rng(1).normal(size=(30, STATE_DIM))
    with (
        ServerProcess(tmp_path, ["--device", "cuda"]) as gpu,
        ServerProcess(tmp_path, ["--device", "cpu"]) as cpu,
    ):
        assert any("device=cuda" in line for line in gpu.output), gpu.output
        np.testing.assert_allclose(
            _serve_episode(gpu, mode, states), _serve_episode(cpu, mode, states), atol=TOLERANCE, rtol=0
        )
