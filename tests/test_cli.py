"""End to end through the ``dmm`` command: collect -> train -> eval, and one-line errors with exit 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from conftest import SHARED_HOPPER_POLICY, random_sac_policy

from dmm.errors import ConfigError

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


def test_eval_plays_each_target_return_given(trained):
    """``--target-return`` is repeatable in dmm eval as in dmm train: one JSON line per target."""
    targets = ("1000", "3600")
    result = dmm(
        *("eval", "--store", trained, "--name", "hopper-tiny", "--episodes", "1", "--num-envs", "1"),
        *(arg for target in targets for arg in ("--target-return", target)),
        *("--version", "latest", "--json", "--no-progress"),
    )
    assert result.returncode == 0, result.stderr
    summaries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [s["target_return"] for s in summaries] == [1000.0, 3600.0]
    # no --mode: the mode the policy was trained for (random windows only: window)
    assert {(s["version"], s["episodes"], s["mode"]) for s in summaries} == {(1, 1, "window")}


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
                "--arch",
                "dt",
                "--local-mixer",
                "conv",
            ],
            "train",
            "ablations",
        ),
        (
            ["train", "--dataset", "hopper-tiny.hdf5", "--store", "s", "--model", "dt"],
            "train",
            r"--model is now --arch \(the architecture: dmm or dt\); the model's name in the store is --name",
        ),
        (["eval", "--store", "store", "--name", "hopper-tiny", "--version", "newest"], "eval", "or 'latest'"),
        (["eval", "--store", "store", "--name", "hopper-tiny", "--target-return", "inf"], "eval", "finite"),
        (["rollout", "--num-envs", "0"], "rollout", "--num-envs: must be a positive integer"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(workdir, trained, args, command, pattern):
    result = dmm(*args, cwd=workdir)
    assert_one_line_error(result, command, pattern)
    assert not (workdir / "s").exists()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    from dmm.cli import build_parser

    (commands,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(commands.choices)


def test_a_flag_means_the_same_in_every_command():
    """A flag that several commands take parses the same way into the same attribute in each of them
    (whether it is required may differ: ``dmm train --resume`` needs no ``--store``).

    The one exception is ``--model``: ``dmm train`` refuses it (it named the architecture, now
    ``--arch``), ``dmm rollout`` keeps it as the older spelling of ``--name``. Both hide it from --help.
    """
    seen: dict[str, dict[str, tuple]] = {}
    for command, parser in _subcommands().items():
        for action in parser._actions:
            choices = tuple(action.choices) if action.choices is not None else None
            shape = (action.dest, action.type, type(action), action.nargs, choices)
            for flag in action.option_strings:
                seen.setdefault(flag, {})[command] = shape
    assert {"--name", "--version", "--target-return", "--episodes", "--num-envs"} <= set(seen)
    differing = {flag: by for flag, by in seen.items() if len(set(by.values())) > 1}
    assert set(differing) == {"--model"}, differing
    assert seen["--model"]["rollout"][0] == "name"
    assert all(action.help == argparse.SUPPRESS for action in _model_flags())
    assert seen["--target-return"]["eval"][0] == "target_returns"


def _model_flags() -> list[argparse.Action]:
    return [a for p in _subcommands().values() for a in p._actions if "--model" in a.option_strings]


def test_the_architecture_is_arch_and_the_store_name_is_name_everywhere():
    from dmm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--dataset", "d", "--store", "s", "--arch", "dt", "--name", "n"])
    assert (args.arch, args.name) == ("dt", "n")
    args = parser.parse_args(["rollout", "--model", "old", "--version", "latest", "--target-return", "1"])
    assert (args.name, args.version, args.target_returns) == ("old", None, [1.0])
    args = parser.parse_args(["eval", "--store", "s", "--name", "n", "--version", "3"])
    assert (args.version, args.target_returns) == (3, None)


def test_a_run_started_before_arch_resumes_with_its_architecture():
    """Runs saved by earlier versions keep the architecture under ``model`` in run.json's options."""
    from dmm.cli import build_parser
    from dmm.trainer.cli import RUN_OPTIONS, _resumed_options

    saved = {key: None for key in RUN_OPTIONS if key != "arch"} | {
        "model": "dt",
        "dataset": "d",
        "store": "s",
    }
    args = build_parser().parse_args(["train", "--resume", "run"])
    _resumed_options(args, saved)
    assert (args.arch, args.dataset, args.store) == ("dt", "d", "s")
    args = build_parser().parse_args(["train", "--resume", "run", "--arch", "dmm"])
    with pytest.raises(ConfigError, match="--arch dmm differs from the run's dt"):
        _resumed_options(args, saved)


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


def test_serve_defaults_to_each_policy_s_mode_and_refuses_cuda_graphs_on_the_cpu():
    from dmm.cli_common import MODES
    from dmm.errors import ConfigError
    from dmm.server.options import ServeOptions, ServingMode

    assert ServeOptions(store="s").mode == "auto"
    assert get_args(ServingMode) == MODES  # every command's --mode takes what dmm serve's does
    ServeOptions(store="s", mode="window", device="cpu").validate()
    with pytest.raises(ConfigError, match="use auto, window or recurrent"):
        ServeOptions(store="s", mode="fast").validate(probe_device=False)
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA device"):
        ServeOptions(store="s", device="cpu", cuda_graphs=True).validate()


def test_max_batch_defaults_to_the_device_s_and_a_given_one_wins():
    from dmm.server.options import CPU_MAX_BATCH, GPU_MAX_BATCH, ServeOptions

    assert ServeOptions(store=Path("s"), device="cpu").resolved_max_batch == CPU_MAX_BATCH
    assert ServeOptions(store=Path("s"), device="cuda:0").resolved_max_batch == GPU_MAX_BATCH
    assert ServeOptions(store=Path("s"), device="cuda", max_batch=8).resolved_max_batch == 8
