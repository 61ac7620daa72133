"""Resumable training: a stopped and resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_hdf5

from dmm.data import load_dataset
from dmm.errors import ConfigError
from dmm.model import load_policy
from dmm.store import ModelStore
from dmm.trainer import run_dir as run_dir_module
from dmm.trainer.config import load_train_config
from dmm.trainer.run_dir import RunDir, TrainingStopped
from dmm.trainer.train import TrainStep, train

SETTINGS = {
    "model": {"d_model": 16, "n_layer": 2, "dropout": 0.1},  # dropout: the torch RNG matters
    "updates": 40,
    "batch_size": 8,
    "warmup_updates": 10,
    "eval_episodes": 0,
    "compile": False,
}


@pytest.fixture(scope="module")
def hopper_random(tmp_path_factory) -> Path:
    """400 random Hopper-shaped transitions in four episodes."""
    rng = np.random.default_rng(0)
    n = 400
    terminals = np.zeros(n, dtype=bool)
    terminals[[99, 199, 299]] = True
    arrays = {
        "observations": rng.normal(size=(n, 11)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        "rewards": rng.uniform(0, 3, size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": np.zeros(n, dtype=bool),
    }
    return write_hdf5(tmp_path_factory.mktemp("data") / "hopper-random.hdf5", arrays)


def _quiet(_: str) -> None:
    pass


def _stop_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Deliver a real SIGTERM to this process during the ``call``-th update."""
    original, calls = TrainStep.__call__, []

    def counting(self, batch):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGTERM)
        return original(self, batch)

    monkeypatch.setattr(TrainStep, "__call__", counting)


@pytest.mark.parametrize(
    "levers",
    [{}, {"lr_schedule": "cosine", "ema_decay": 0.95}, {"episode_fraction": 0.5}],
    ids=["paper", "cosine-ema", "episodes"],
)
def test_a_stopped_and_resumed_run_ends_bit_identical(hopper_random, tmp_path, monkeypatch, levers):
    dataset = load_dataset(hopper_random)
    cfg = load_train_config(dataset.name, overrides={**SETTINGS, **levers})
    straight = train(cfg, dataset, ModelStore(tmp_path / "a"), "m", progress=False, log=_quiet)

    run = RunDir(tmp_path / "run", checkpoint_every=15)
    _stop_at(monkeypatch, 23)
    with pytest.raises(TrainingStopped, match=r"after update 2[34] of 40.*--resume"):
        train(cfg, dataset, ModelStore(tmp_path / "b"), "m", progress=False, log=_quiet, run=run)
    monkeypatch.undo()
    assert ModelStore(tmp_path / "b").versions("m") == []
    resumed = train(cfg, dataset, ModelStore(tmp_path / "b"), "m", progress=False, log=_quiet, run=run)

    a, b = (load_policy(ModelStore(tmp_path / s), "m").network.state_dict() for s in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["loss_curve"] == straight.metrics["loss_curve"]  # the chunk's pending losses too
    with pytest.raises(ConfigError, match="is finished: it published version 1"):
        train(cfg, dataset, ModelStore(tmp_path / "b"), "m", progress=False, log=_quiet, run=run)


def test_a_damaged_state_is_a_one_line_error_naming_the_file(hopper_random, tmp_path):
    dataset = load_dataset(hopper_random)
    cfg = load_train_config(dataset.name, overrides=SETTINGS)
    run = RunDir(tmp_path / "run", checkpoint_every=10)
    run.path.mkdir()
    run.state_file.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"state\.pt is damaged"):
        train(cfg, dataset, ModelStore(tmp_path / "s"), "m", progress=False, log=_quiet, run=run)


def test_a_failed_save_keeps_the_previous_state(hopper_random, tmp_path, monkeypatch):
    dataset = load_dataset(hopper_random)
    cfg = load_train_config(dataset.name, overrides=SETTINGS)
    run = RunDir(tmp_path / "run", checkpoint_every=10)
    _stop_at(monkeypatch, 12)
    with pytest.raises(TrainingStopped):
        train(cfg, dataset, ModelStore(tmp_path / "s"), "m", progress=False, log=_quiet, run=run)
    monkeypatch.undo()
    good = run.state_file.read_bytes()

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_dir_module.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        train(cfg, dataset, ModelStore(tmp_path / "s"), "m", progress=False, log=_quiet, run=run)
    assert run.state_file.read_bytes() == good
    assert [p.name for p in run.path.iterdir()] == ["state.pt"]  # no temporary file left


def _dmm(*args: object, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def test_the_cli_stops_on_sigterm_and_resumes_with_the_saved_options(hopper_random, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({k: v for k, v in SETTINGS.items() if k != "updates"}))
    run, store = tmp_path / "run", tmp_path / "store"
    train_args = ["--dataset", hopper_random, "--store", store, "--config", config, "--no-progress"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dmm.cli",
            "train",
            *map(str, train_args),
            "--updates",
            "1000",
            "--run-dir",
            run,
            "--checkpoint-every",
            "50",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 300
    while not (run / "state.pt").exists():  # the first checkpoint: training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"continue with dmm train --resume {run}" in err
    assert json.loads((run / "run.json").read_text())["options"]["updates"] == 1000

    changed = _dmm("train", "--resume", run, "--updates", "10")
    assert changed.returncode == 2
    assert changed.stderr.strip().splitlines() == [
        "dmm train: error: --updates 10 differs from the run's 1000: a resumed run keeps its settings"
    ]
    again = _dmm("train", *train_args, "--run-dir", run)
    assert again.returncode == 2 and "already holds a run: continue it with --resume" in again.stderr

    resumed = _dmm("train", "--resume", run, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming hopper-random at update" in resumed.stdout
    assert "published hopper-random version 1" in resumed.stdout
    metrics = json.loads((store / "hopper-random" / "1" / "metrics.json").read_text())
    assert metrics["updates"] == 1000
