"""PolicyClient against a real server: remote rollouts on Hopper-v4, listing, errors, the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_fixtures import TARGET_RETURN, publish_tiny

from dmm.client import PolicyClient, PolicyServiceError
from dmm.envs import normalized_score
from dmm.server.testing import ServerProcess, metric_value

ENV = "hopper-medium-v2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, ENV, seed=0)
    with ServerProcess(root) as srv:
        yield srv


def test_client_does_not_import_torch() -> None:
    code = "import sys\nimport dmm.client\nassert 'torch' not in sys.modules, 'dmm.client imported torch'\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_rollout_returns_normalized_scores(server: ServerProcess) -> None:
    pytest.importorskip("mujoco")
    with PolicyClient(server.target) as client:
        result = client.rollout(env=ENV, episodes=3, num_envs=2, seed=1, max_episode_steps=25, progress=False)
    assert result.model == ENV and result.version == 1 and result.mode == "window"
    assert result.target_return == TARGET_RETURN
    assert len(result.returns) == len(result.lengths) == len(result.normalized_scores) == 3
    assert all(1 <= n <= 25 for n in result.lengths)
    np.testing.assert_allclose(result.normalized_scores, normalized_score(ENV, np.array(result.returns)))
    assert result.mean_normalized_score == pytest.approx(np.mean(result.normalized_scores))
    assert "normalized score" in str(result)
    text = server.scrape()
    assert metric_value(text, "dmm_sessions_ended_total", {"model": ENV, "reason": "completed"}) >= 3
    assert metric_value(text, "dmm_act_latency_seconds_count", {"model": ENV, "mode": "window"}) == sum(
        result.lengths
    )
    # live policy quality: the server's episode metrics agree with the returns the client computed
    per_version = {"model": ENV, "version": "1"}
    assert metric_value(text, "dmm_episode_return_count", per_version) == 3
    assert metric_value(text, "dmm_episode_return_sum", per_version) == pytest.approx(
        sum(result.returns), rel=1e-12
    )
    assert metric_value(text, "dmm_episode_length_sum", per_version) == sum(result.lengths)
    score_sum = metric_value(text, "dmm_episode_normalized_score_sum", per_version)
    assert score_sum == pytest.approx(sum(result.normalized_scores), rel=1e-9)


def test_rollouts_are_reproducible_per_seed(server: ServerProcess) -> None:
    pytest.importorskip("mujoco")
    with PolicyClient(server.target) as client:
        kwargs = {"env": ENV, "episodes": 2, "seed": 5, "max_episode_steps": 15, "progress": False}
        first = client.rollout(num_envs=2, mode="recurrent", **kwargs)
        second = client.rollout(num_envs=1, mode="recurrent", target_return=TARGET_RETURN, **kwargs)
    assert first.mode == "recurrent"
    # Same seeds, same actions up to float32 rounding (batched and single forwards may differ).
    assert first.lengths == second.lengths
    np.testing.assert_allclose(first.returns, second.returns, rtol=1e-5)


def test_list_describe_and_errors(server: ServerProcess) -> None:
    with PolicyClient(server.target) as client:
        assert client.list_models() == {ENV: [1]}
        description = client.describe(ENV)
        assert (description.version, description.state_dim, description.act_dim) == (1, 11, 3)
        assert description.config["d_model"] == 16
        assert description.meta["env_id"] == "Hopper-v4"
        assert description.metrics == {"seed": 0}
        with pytest.raises(PolicyServiceError) as info:
            client.describe("nope")
        assert info.value.code == grpc.StatusCode.NOT_FOUND and ENV in str(info.value)
        with pytest.raises(PolicyServiceError) as info:
            client.rollout(env="walker2d-medium-v2", model=ENV, episodes=1, progress=False)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "state_dim=17" in str(info.value)


def test_rollout_cli(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mujoco")
    from dmm.cli import main

    argv = ["rollout", "--target", server.target, "--env", ENV, "--episodes", "2", "--num-envs", "2"]
    assert main([*argv, "--max-episode-steps", "10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 episodes" in out and "normalized score" in out
    assert main(["rollout", "--target", server.target, "--model", "nope", "--no-progress"]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err
