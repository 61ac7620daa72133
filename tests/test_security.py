"""TLS, mutual TLS and bearer tokens of ``dmm serve``, end to end through ``dmm serve`` processes and
``PolicyClient``; the certificates are made at run time (a CA, a server and a client certificate,
and a second CA nobody trusts)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pki import make_pki
from serving_fixtures import STATE_DIM, play_episode, publish_tiny

from dmm.client import PolicyClient, PolicyServiceError
from dmm.client.channel import open_channel
from dmm.server.testing import ServerProcess, metric_value

TOKEN = "s3cret-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish_tiny(root)
    return root


def _tls_args(pki: Path) -> list[str]:
    return ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]


def _episode(channel: grpc.Channel, steps: int = 5) -> np.ndarray:
    return play_episode(channel, np.random.default_rng(0).normal(size=(steps, STATE_DIM)))


def test_tls_serves_clients_that_trust_its_ca_and_no_plaintext(pki: Path, store: Path) -> None:
    with ServerProcess(store, _tls_args(pki), channel={"tls_ca": pki / "ca.pem"}) as server:
        assert "tls=on auth=none" in "".join(server.output)
        with PolicyClient(server.target, tls_ca=pki / "ca.pem") as client:
            assert client.list_models() == {"tiny": [1]}
        with open_channel(server.target, tls_ca=pki / "ca.pem") as channel:
            assert _episode(channel).shape == (5, 3)
        with PolicyClient(server.target, timeout=3) as plaintext, pytest.raises(PolicyServiceError) as err:
            plaintext.list_models()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_wants_a_client_certificate_from_its_ca(pki: Path, store: Path) -> None:
    client_cert = {"tls_cert": pki / "client.pem", "tls_key": pki / "client.key"}
    args = [*_tls_args(pki), "--tls-client-ca", str(pki / "ca.pem")]
    with ServerProcess(store, args, channel={"tls_ca": pki / "ca.pem", **client_cert}) as server:
        assert "tls=mutual" in "".join(server.output)
        with PolicyClient(server.target, tls_ca=pki / "ca.pem", **client_cert) as client:
            assert client.list_models() == {"tiny": [1]}
        rogue = {"tls_cert": pki / "rogue-client.pem", "tls_key": pki / "rogue-client.key"}
        for refused in ({}, rogue):
            client = PolicyClient(server.target, tls_ca=pki / "ca.pem", timeout=3, **refused)
            with client, pytest.raises(PolicyServiceError) as err:
                client.list_models()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_tokens_guard_every_call_but_health_and_are_never_logged(tmp_path: Path, store: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# one token per line\n\nother-token\n{TOKEN}\n")
    with ServerProcess(store, ["--auth-token-file", str(tokens)]) as server:  # its health probe sends none
        for token, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("wrong", grpc.StatusCode.PERMISSION_DENIED),
        ):
            with PolicyClient(server.target, token=token) as client, pytest.raises(PolicyServiceError) as err:
                client.list_models()
            assert err.value.code == code
            with open_channel(server.target, token=token) as channel, pytest.raises(grpc.RpcError) as rpc:
                _episode(channel)
            assert rpc.value.code() == code
        with PolicyClient(server.target, token=TOKEN) as client:
            assert client.list_models() == {"tiny": [1]}
        with open_channel(server.target, token="other-token") as channel:
            assert _episode(channel).shape == (5, 3)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        text = server.scrape()
        assert metric_value(text, "dmm_errors_total", {"code": "UNAUTHENTICATED"}) == 2
        assert metric_value(text, "dmm_errors_total", {"code": "PERMISSION_DENIED"}) == 2
        server.terminate()
    log = "".join(server.output)
    assert "request refused" in log and "PERMISSION_DENIED" in log
    assert TOKEN not in log and "wrong" not in log


def test_rollout_cli_sends_the_token_from_a_file_or_the_environment(tmp_path: Path, store: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    with ServerProcess(store, ["--auth-token-file", str(tokens)]) as server:
        rollout = [sys.executable, "-m", "dmm.cli", "rollout", "--target", server.target, "--model", "tiny"]
        rollout += [
            "--env",
            "hopper-medium-v2",
            "--episodes",
            "1",
            "--num-envs",
            "1",
            "--max-episode-steps",
            "3",
        ]
        rollout += ["--no-progress"]
        denied = subprocess.run(rollout, capture_output=True, text=True, timeout=120)
        assert denied.returncode != 0 and "UNAUTHENTICATED" in denied.stderr
        by_file = subprocess.run(
            [*rollout, "--token-file", str(tokens)], capture_output=True, text=True, timeout=120
        )
        assert by_file.returncode == 0, by_file.stderr
        env = {"DMM_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
        by_env = subprocess.run(rollout, capture_output=True, text=True, timeout=120, env=env)
        assert by_env.returncode == 0, by_env.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "cannot read the TLS key"),
        (["--auth-token-file", "missing-tokens"], "cannot read --auth-token-file"),
    ],
)
def test_bad_security_options_exit_with_a_message(tmp_path: Path, store: Path, args: list[str], message: str):
    serve = [
        sys.executable,
        "-m",
        "dmm.cli",
        "serve",
        "--store",
        str(store),
        "--port",
        "0",
        "--metrics-port",
        "0",
    ]
    proc = subprocess.run([*serve, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
