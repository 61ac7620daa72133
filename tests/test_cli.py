"""End to end through the ``dmm`` command: collect -> train -> eval, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_HOPPER_POLICY, random_sac_policy

TINY_YAML = "model: {d_model: 16, n_layer: 2}\nwarmup_updates: 50\nlearning_rate: 1.0e-3\n"


def dmm(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dmm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, pattern: str) -> None:
    import re

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"dmm {command}: error:") or lines[0].startswith("dmm: error:"), lines[0]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def collected(workdir) -> Path:
    policy = (
        SHARED_HOPPER_POLICY
        if SHARED_HOPPER_POLICY.is_file()
        else random_sac_policy(workdir / "p.npz", 11, 3)
    )
    out = workdir / "hopper-tiny.hdf5"
    result = dmm(
        "collect", "--env", "Hopper-v4", "--policy", policy, "--steps", "3000", "--out", out, "--seed", "1"
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def trained(workdir, collected) -> Path:
    (workdir / "tiny.yaml").write_text(TINY_YAML)
    store = workdir / "store"
    result = dmm(
        "train",
        "--dataset",
        collected,
        "--store",
        store,
        "--updates",
        "300",
        "--config",
        workdir / "tiny.yaml",
        "--eval-episodes",
        "2",
        "--eval-num-envs",
        "2",
        "--no-compile",
        "--target-return",
        "3600",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "scan backend: numba" in result.stdout
    assert "published hopper-tiny version 1" in result.stdout
    assert "final: target 3600: normalized" in result.stdout
    return store


def test_collect_train_eval_end_to_end(trained):
    version = trained / "hopper-tiny" / "1"
    assert {p.name for p in version.iterdir()} == {
        "model.safetensors",
        "config.json",
        "metrics.json",
        "checksums.sha256",
        "learning_curve.png",
    }
    metrics = json.loads((version / "metrics.json").read_text())
    assert metrics["updates"] == 300 and len(metrics["loss_curve"]) == 3
    assert metrics["scan_backend"] == "numba"
    for mode in ("window", "recurrent"):
        result = dmm(
            "eval",
            "--store",
            trained,
            "--name",
            "hopper-tiny",
            "--episodes",
            "3",
            "--num-envs",
            "3",
            "--mode",
            mode,
            "--json",
            "--no-progress",
        )
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["scan_backend"] == "numba"
        assert (summary["version"], summary["episodes"], summary["mode"]) == (1, 3, mode)
        assert summary["target_return"] == 3600.0
        expected = 100 * (summary["mean_return"] + 20.272305) / (3234.3 + 20.272305)
        assert summary["normalized_mean"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("args", "command", "pattern"),
    [
        (
            ["train", "--dataset", "missing.hdf5", "--store", "s"],
            "train",
            "no such dataset file: missing.hdf5",
        ),
        (
            ["train", "--dataset", "x.hdf5", "--store", "s", "--updates", "0"],
            "train",
            "must be a positive integer",
        ),
        (["eval", "--store", "store", "--name", "nope"], "eval", "nope"),
        (["eval", "--store", "store", "--name", "hopper-tiny", "--version", "9"], "eval", "9"),
        (
            ["eval", "--store", "store", "--name", "hopper-tiny", "--env", "walker2d-medium-v2"],
            "eval",
            r"\(Walker2d-v4\) has 17 and 6",
        ),
        (["eval", "--store", "store", "--name", "hopper-tiny", "--env", "pong-v0"], "eval", "pong-v0"),
        (["serve", "--store", "store", "--device", "tpu"], "serve", "use auto, cpu, cuda or cuda:N"),
        (
            ["eval", "--store", "store", "--name", "hopper-tiny", "--scan-backend", "cuda"],
            "eval",
            "the cuda scan backend needs a CUDA device",
        ),
        (
            ["train", "--dataset", "hopper-tiny.hdf5", "--store", "s", "--scan-backend", "fast"],
            "train",
            "unknown scan backend 'fast'",
        ),
        (
            ["train", "--dataset", "hopper-tiny.hdf5", "--store", "s", "--config", "nope.yaml"],
            "train",
            "cannot read config nope.yaml",
        ),
        (
            [
                "train",
                "--dataset",
                "hopper-tiny.hdf5",
                "--store",
                "s",
                "--model",
                "dt",
                "--local-mixer",
                "conv",
            ],
            "train",
            "ablations",
        ),
    ],
)
def test_bad_arguments_exit_2_with_one_line(workdir, trained, args, command, pattern):
    result = dmm(*args, cwd=workdir)
    assert_one_line_error(result, command, pattern)
    assert not (workdir / "s").exists()


def test_serve_flags_default_to_the_server_options_and_import_no_torch():
    from dataclasses import fields

    from dmm.cli import build_parser
    from dmm.server.options import ServeOptions

    args = build_parser().parse_args(["serve", "--store", "s"])
    flag_of = {"idle_timeout_s": "idle_timeout", "grace_s": "grace"}
    for field in fields(ServeOptions):
        if field.name != "store":
            value = getattr(args, flag_of.get(field.name, field.name))
            if isinstance(field.default, tuple):  # a repeatable flag collects a list
                value = tuple(value)
            assert value == field.default, field.name
    probe = "import sys, dmm.cli; dmm.cli.build_parser(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )


def test_serve_on_cuda_without_a_gpu_is_refused(workdir, trained):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_one_line_error(
        dmm("serve", "--store", "store", "--device", "cuda", cwd=workdir),
        "serve",
        "CUDA is not available on this machine",
    )


def test_max_batch_defaults_to_the_device_s_and_a_given_one_wins():
    from dmm.server.options import CPU_MAX_BATCH, GPU_MAX_BATCH, ServeOptions

    assert ServeOptions(store=Path("s"), device="cpu").resolved_max_batch == CPU_MAX_BATCH
    assert ServeOptions(store=Path("s"), device="cuda:0").resolved_max_batch == GPU_MAX_BATCH
    assert ServeOptions(store=Path("s"), device="cuda", max_batch=8).resolved_max_batch == 8
