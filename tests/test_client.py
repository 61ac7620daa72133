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


@pytest.mark.parametrize("vectorized", [True, False], ids=["vector-env", "per-episode-streams"])
def test_rollout_returns_normalized_scores(server: ServerProcess, vectorized: bool) -> None:
    pytest.importorskip("mujoco")
    per_version = {"model": ENV, "version": "1"}
    latency = "dmm_act_vector_latency_seconds_count" if vectorized else "dmm_act_latency_seconds_count"
    names = (
        "dmm_episode_return_count",
        "dmm_episode_return_sum",
        "dmm_episode_length_sum",
        "dmm_episode_normalized_score_sum",
    )

    def read() -> dict[str, float]:
        text = server.scrape()
        values = {name: metric_value(text, name, per_version) or 0.0 for name in names}
        values[latency] = metric_value(text, latency, {"model": ENV, "mode": "window"}) or 0.0
        return values

    before = read()
    with PolicyClient(server.target) as client:
        result = client.rollout(
            env=ENV,
            episodes=3,
            num_envs=2,
            seed=1,
            max_episode_steps=25,
            progress=False,
            vectorized=vectorized,
        )
    assert result.model == ENV and result.version == 1 and result.mode == "window"
    assert result.target_return == TARGET_RETURN
    assert len(result.returns) == len(result.lengths) == len(result.normalized_scores) == 3
    assert all(1 <= n <= 25 for n in result.lengths)
    np.testing.assert_allclose(result.normalized_scores, normalized_score(ENV, np.array(result.returns)))
    assert result.mean_normalized_score == pytest.approx(np.mean(result.normalized_scores))
    assert "normalized score" in str(result)
    got = {k: v - before[k] for k, v in read().items()}
    # one message per action, or per step of the vector env (both rows at first, then fewer)
    if vectorized:
        assert max(result.lengths) <= got[latency] <= sum(result.lengths)
    else:
        assert got[latency] == sum(result.lengths)
    # live policy quality: the server's episode metrics agree with the returns the client computed
    assert got["dmm_episode_return_count"] == 3
    assert got["dmm_episode_return_sum"] == pytest.approx(sum(result.returns), rel=1e-12)
    assert got["dmm_episode_length_sum"] == sum(result.lengths)
    assert got["dmm_episode_normalized_score_sum"] == pytest.approx(sum(result.normalized_scores), rel=1e-9)


def test_rollouts_are_reproducible_per_seed_on_either_path(server: ServerProcess) -> None:
    pytest.importorskip("mujoco")
    with PolicyClient(server.target) as client:
        kwargs = {"env": ENV, "episodes": 3, "seed": 5, "max_episode_steps": 15, "progress": False}
        first = client.rollout(num_envs=2, mode="recurrent", **kwargs)
        second = client.rollout(num_envs=1, mode="recurrent", target_return=TARGET_RETURN, **kwargs)
        third = client.rollout(num_envs=3, mode="recurrent", vectorized=False, **kwargs)
    assert first.mode == "recurrent"
    # Same seeds, same actions up to float32 rounding (batched and single forwards may differ).
    assert first.lengths == second.lengths == third.lengths
    np.testing.assert_allclose(first.returns, second.returns, rtol=1e-5)
    np.testing.assert_allclose(first.returns, third.returns, rtol=1e-5)


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
