"""deploy/bootstrap.py publishing the shipped pre-trained store, and deploy/train_online.py training
in the background with its marker in the store, against real stores (``dmm train`` faked except in
the one test that runs it for real, tiny)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dmm.store import ModelNotFoundError, ModelStore
from dmm.store.layout import TRAINING_DIR, read_checksums

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
SIM = "hopper-medium-sim-v4"
ONLINE = "hopper-medium-v2"
CURVE = b"\x89PNG not really a png"


def load_module(name: str):
    """Import deploy/<name>.py (deploy/ is not a package: its files are copied into the image)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def publish_policy_version(root: Path, name: str, seed: int, files: dict | None = None) -> int:
    """A tiny Hopper-sized DMM policy published as a new version of ``name`` in the store ``root``."""
    from dmm.model import DMMConfig, PolicyMeta, PolicyNetwork, publish_policy

    torch.manual_seed(seed)
    model = PolicyNetwork(DMMConfig(state_dim=11, act_dim=3, d_model=16, n_layer=2))
    meta = PolicyMeta(
        env=name,
        env_id="Hopper-v4",
        state_mean=[0.1 * seed] * 11,
        state_std=[1.0] * 11,
        rtg_scale=1000.0,
        target_return=3600.0,
    )
    metrics = {"seed": seed, "normalized_score": 40.0 + seed}
    return publish_policy(ModelStore(root), name, model, meta, metrics=metrics, files=files)


@pytest.fixture
def pretrained(tmp_path: Path) -> Path:
    """A pre-trained store: SIM versions 1 and 2 (2 with an extra file) and another model."""
    root = tmp_path / "pretrained"
    publish_policy_version(root, SIM, seed=0)
    publish_policy_version(root, SIM, seed=1, files={"learning_curve.png": CURVE})
    publish_policy_version(root, "hopper-expert-sim-v4", seed=2)
    (root / "README.md").write_text("not a model")
    return root


@pytest.fixture
def no_dmm_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything runs a dmm command (collect, train)."""
    import dmm.cli

    def refuse(argv):
        raise AssertionError(f"unexpected dmm command {argv}")

    monkeypatch.setattr(dmm.cli, "main", refuse)


# ---------------------------------------------------------------------------------------------
# bootstrap.py: the pre-trained store


def test_bootstrap_publishes_every_pretrained_version_into_an_empty_store(
    tmp_path: Path, pretrained: Path, no_dmm_cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "store"
    started = time.monotonic()
    assert load_module("bootstrap").main(["--store", str(target), "--pretrained", str(pretrained)]) == 0
    assert time.monotonic() - started < 30
    source, store = ModelStore(pretrained), ModelStore(target)
    assert store.models() == ["hopper-expert-sim-v4", SIM]
    assert store.versions(SIM) == [1, 2] and store.versions("hopper-expert-sim-v4") == [1]
    for name in store.models():
        for version in store.versions(name):
            want, got = source.load(name, version), store.load(name, version)  # every checksum verified
            assert got.tensors.keys() == want.tensors.keys()
            assert all(torch.equal(got.tensors[k], v) for k, v in want.tensors.items())
            assert (got.config, got.metrics) == (want.config, want.metrics)
            assert read_checksums(got.path) == read_checksums(want.path)
    extra = target / SIM / "2" / "learning_curve.png"
    assert extra.read_bytes() == CURVE
    assert read_checksums(extra.parent)["learning_curve.png"] == hashlib.sha256(CURVE).hexdigest()
    out = capsys.readouterr().out
    assert f"published the pre-trained {SIM} version 2 as version 2" in out
    assert "dmm rollout --target localhost:50051 --env hopper-expert-sim-v4 --mode recurrent" in out
    assert 'rollout(env="hopper-expert-sim-v4", mode="recurrent")' in out


def test_bootstrap_leaves_a_store_with_a_model_alone(
    tmp_path: Path, pretrained: Path, no_dmm_cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "store"
    publish_policy_version(target, "mine", seed=5)
    assert load_module("bootstrap").main(["--store", str(target), "--pretrained", str(pretrained)]) == 0
    assert ModelStore(target).models() == ["mine"] and ModelStore(target).versions("mine") == [1]
    assert "already has mine; nothing to do" in capsys.readouterr().out


def test_a_damaged_pretrained_store_publishes_nothing(
    tmp_path: Path, pretrained: Path, no_dmm_cli: None, capsys: pytest.CaptureFixture[str]
) -> None:
    (pretrained / SIM / "2" / "learning_curve.png").write_bytes(b"damaged")
    target = tmp_path / "store"
    assert load_module("bootstrap").main(["--store", str(target), "--pretrained", str(pretrained)]) == 1
    assert "learning_curve.png fails its sha256 checksum" in capsys.readouterr().err
    assert ModelStore(target).models() == []
    (tmp_path / "a-file").write_text("x")
    assert (
        load_module("bootstrap").main(["--store", str(target), "--pretrained", str(tmp_path / "a-file")]) == 1
    )
    assert "is not a folder" in capsys.readouterr().err


def test_the_shipped_pretrained_store_loads_as_hopper_policies() -> None:
    """Whatever deploy/pretrained holds loads, checksums verified, as a Hopper policy."""
    from dmm.model import load_policy

    bootstrap = load_module("bootstrap")
    for ckpt in bootstrap.load_pretrained(bootstrap.DEFAULT_PRETRAINED):
        policy = load_policy(ModelStore(bootstrap.DEFAULT_PRETRAINED), ckpt.name, ckpt.version)
        assert (policy.config.state_dim, policy.config.act_dim, policy.meta.env_id) == (11, 3, "Hopper-v4")


# ---------------------------------------------------------------------------------------------
# train_online.py


@pytest.fixture
def d4rl_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """hopper-medium-v2 already in the D4RL cache (nothing is downloaded); D4RL itself unreachable."""
    from dmm.data.download import cache_path

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("D4RL_BASE_URL", "http://127.0.0.1:9")
    path = cache_path(ONLINE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"dataset")
    return path


@pytest.fixture
def fake_train(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace dmm.cli.main by a `dmm train` that records its argv and what a client would hear about
    the model meanwhile, then publishes it (or fails, or runs ``during``)."""
    import dmm.cli

    record: dict = {"calls": [], "status": 0, "during": None}

    def fake_main(argv):
        record["calls"].append(list(argv))
        assert argv[0] == "train"
        store, name = argv[argv.index("--store") + 1], argv[argv.index("--name") + 1]
        with pytest.raises(ModelNotFoundError) as info:
            ModelStore(store).resolve(name)
        record["message"], record["remote"] = str(info.value), info.value.remote_message()
        if record["during"] is not None:
            record["during"]()
        if record["status"] == 0:
            publish_policy_version(Path(store), name, seed=3)
        return record["status"]

    monkeypatch.setattr(dmm.cli, "main", fake_main)
    return record


def test_train_online_marks_trains_with_the_budget_and_publishes(
    tmp_path: Path, pretrained: Path, d4rl_cached: Path, fake_train: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    assert load_module("bootstrap").main(["--store", str(store), "--pretrained", str(pretrained)]) == 0
    online = load_module("train_online")
    assert online.main(["--store", str(store), "--log", "docker compose logs -f train-online"]) == 0
    (argv,) = fake_train["calls"]
    flags = {
        flag: argv[argv.index(flag) + 1] for flag in ("--dataset", "--name", "--updates", "--eval-every")
    }
    assert flags == {
        "--dataset": str(d4rl_cached),
        "--name": ONLINE,
        "--updates": "20000",
        "--eval-every": "0",
    }
    assert argv[argv.index("--lr-schedule") :][:6] == [
        *("--lr-schedule", "cosine", "--ema-decay", "0.999"),
        *("--episode-fraction", "0.5"),  # the pre-trained model's recipe: served in recurrent mode
    ]
    assert re.fullmatch(
        rf"model '{ONLINE}' is being trained \(started \d+ s ago\); "
        rf"available models: hopper-expert-sim-v4, {SIM}",
        fake_train["remote"],
    )
    assert "20000 updates, log: docker compose logs -f train-online" in fake_train["message"]
    assert ModelStore(store).versions(ONLINE) == [1]
    assert not (store / TRAINING_DIR / f"{ONLINE}.json").exists(), "the marker must go once published"
    assert f"now serves {ONLINE}" in capsys.readouterr().out
    assert online.main(["--store", str(store)]) == 0 and len(fake_train["calls"]) == 1
    assert f"already has {ONLINE}; nothing to do" in capsys.readouterr().out


def test_train_online_budget_and_switch_come_from_the_environment(
    tmp_path: Path, d4rl_cached: Path, fake_train: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DMM_TRAIN_ONLINE_UPDATES", "1234")
    assert load_module("train_online").main(["--store", str(tmp_path / "a")]) == 0
    argv = fake_train["calls"][0]
    assert argv[argv.index("--updates") + 1] == "1234"
    monkeypatch.setenv("DMM_TRAIN_ONLINE_UPDATES", "0")
    assert load_module("train_online").main(["--store", str(tmp_path / "b")]) == 0
    assert len(fake_train["calls"]) == 1 and ModelStore(tmp_path / "b").models() == []


@pytest.mark.parametrize("failure", ["status", "exception", "sigterm"])
def test_a_failed_training_removes_its_marker(
    tmp_path: Path, d4rl_cached: Path, fake_train: dict, failure: str
) -> None:
    store = tmp_path / "store"
    online = load_module("train_online")
    if failure == "status":
        fake_train["status"] = 1
        assert online.main(["--store", str(store)]) == 1
    else:
        fake_train["status"] = None

        def fail() -> None:
            if failure == "exception":
                raise RuntimeError("out of memory")
            os.kill(os.getpid(), signal.SIGTERM)  # docker compose stop
            time.sleep(5)

        fake_train["during"] = fail
        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(RuntimeError if failure == "exception" else SystemExit):
            online.main(["--store", str(store)])
        assert signal.getsignal(signal.SIGTERM) == before
    assert "is being trained" in fake_train["remote"]
    assert not (store / TRAINING_DIR / f"{ONLINE}.json").exists()
    with pytest.raises(ModelNotFoundError) as info:
        ModelStore(store).resolve(ONLINE)
    assert info.value.remote_message() == f"unknown model '{ONLINE}'; available models: none"


def test_train_online_offline_says_so_once_and_marks_nothing(
    tmp_path: Path, fake_train: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("D4RL_BASE_URL", "http://127.0.0.1:9")
    store = tmp_path / "store"
    assert load_module("train_online").main(["--store", str(store)]) == 0
    assert fake_train["calls"] == [] and not (store / TRAINING_DIR).exists()
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "offline, no online training: cannot download" in err


def test_train_online_leaves_a_live_run_alone_and_replaces_a_stale_one(
    tmp_path: Path, d4rl_cached: Path, fake_train: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    store = ModelStore(tmp_path / "store")
    online = load_module("train_online")
    with store.mark_training(ONLINE, 500, "elsewhere") as marker:
        assert online.main(["--store", str(store.root)]) == 0
        assert fake_train["calls"] == []
        assert f"{ONLINE} is already being trained (pid {os.getpid()}" in capsys.readouterr().out
        store.write_training_marker(replace(marker, heartbeat=time.time() - 3600))  # its run was killed
        assert online.main(["--store", str(store.root)]) == 0
    assert len(fake_train["calls"]) == 1 and store.versions(ONLINE) == [1]


def test_train_online_refuses_bad_options(tmp_path: Path, fake_train: dict, capsys) -> None:
    online = load_module("train_online")
    assert online.main(["--store", str(tmp_path), "--dataset", "hopper-mediun-v2"]) == 2
    assert "'hopper-mediun-v2' is not a D4RL dataset name" in capsys.readouterr().err
    assert online.main(["--store", str(tmp_path), "--name", "../x"]) == 2
    assert "invalid model name '../x'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        online.main(["--store", str(tmp_path), "--updates", "-1"])
    assert info.value.code == 2 and "must be >= 0" in capsys.readouterr().err
    assert fake_train["calls"] == []


# ---------------------------------------------------------------------------------------------
# the whole promise, for real: pre-trained served at once, the online model after its training


@pytest.fixture
def d4rl_mirror(tmp_path: Path) -> Iterator[str]:
    """A local HTTP server laid out as D4RL's, holding a small hopper-medium-v2 file (random values)."""
    import http.server
    import threading
    from functools import partial

    import numpy as np
    from conftest import write_hdf5

    rng = np.random.default_rng(0)
    n = 600
    terminals, timeouts = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    terminals[[150, 420]], timeouts[-1] = True, True
    (tmp_path / "mirror" / "gym_mujoco_v2").mkdir(parents=True)
    arrays = {
        "observations": rng.normal(size=(n, 11)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        "rewards": rng.uniform(0, 3, size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    write_hdf5(tmp_path / "mirror" / "gym_mujoco_v2" / "hopper_medium-v2.hdf5", arrays)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "mirror"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_the_server_serves_pretrained_at_once_and_the_online_model_when_published(
    tmp_path: Path, pretrained: Path, d4rl_mirror: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mujoco")
    import grpc

    from dmm.client import PolicyClient, PolicyServiceError
    from dmm.server.testing import ServerProcess

    monkeypatch.setenv("D4RL_BASE_URL", d4rl_mirror)
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl-cache"))
    store = tmp_path / "store"
    assert load_module("bootstrap").main(["--store", str(store), "--pretrained", str(pretrained)]) == 0
    rollout = {"episodes": 1, "num_envs": 1, "max_episode_steps": 5, "progress": False}
    with ServerProcess(store) as server, PolicyClient(server.target) as client:
        assert client.rollout(env=SIM, **rollout).lengths == [5]
        with ModelStore(store).mark_training(ONLINE, 3, "test"), pytest.raises(PolicyServiceError) as info:
            client.rollout(env=ONLINE, **rollout)
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        assert re.search(
            rf"model '{ONLINE}' is being trained \(started \d+ s ago\); available models: ", str(info.value)
        )
        argv = ["--store", str(store), "--updates", "3", "--eval-episodes", "0", "--no-compile"]
        assert load_module("train_online").main(argv) == 0
        result = client.rollout(env=ONLINE, **rollout)  # the same server, not restarted
    assert result.model == ONLINE and result.lengths == [5]
