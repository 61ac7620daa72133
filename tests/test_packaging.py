"""The base install is the client: a fresh virtual environment with ``pip install .`` has no torch,
yet ``PolicyClient`` imports and ``dmm rollout`` runs, and the server and trainer commands name the
extra they need. Needs the package index (as CI's own install does)."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client-venv")
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(REPO)], capture_output=True, text=True, timeout=900
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return root


def _run(venv_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=300, cwd=venv_root)


def test_the_base_install_is_a_torch_free_client(client_venv: Path) -> None:
    python, dmm = str(client_venv / "bin" / "python"), str(client_venv / "bin" / "dmm")
    installed = _run(client_venv, python, "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert "torch" not in installed and "decision-metamamba" in installed
    imports = _run(client_venv, python, "-c", "from dmm.client import PolicyClient; print(PolicyClient)")
    assert imports.returncode == 0, imports.stderr
    assert _run(client_venv, dmm, "rollout", "--help").returncode == 0
    for command, extra in (
        (["serve", "--store", "s"], "serve"),
        (["eval", "--store", "s", "--name", "m"], "train"),
    ):
        proc = _run(client_venv, dmm, *command)
        assert proc.returncode == 2, proc.stderr
        assert f"pip install 'decision-metamamba[{extra}]'" in proc.stderr, proc.stderr


def test_a_client_only_install_rolls_out_against_a_server(client_venv: Path, tmp_path: Path) -> None:
    """The torch-free client drives a real server (run from this environment) end to end."""
    from serving_fixtures import publish_tiny

    from dmm.server.testing import ServerProcess

    publish_tiny(tmp_path)
    with ServerProcess(tmp_path) as server:
        rollout = [str(client_venv / "bin" / "dmm"), "rollout", "--target", server.target, "--model", "tiny"]
        rollout += ["--episodes", "2", "--num-envs", "2", "--max-episode-steps", "5", "--no-progress"]
        proc = _run(client_venv, *rollout)
    assert proc.returncode == 0, proc.stderr
    assert "2 episodes of tiny v1" in proc.stdout
