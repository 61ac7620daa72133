"""Subcommands of the trainer: ``collect``, ``train`` and ``eval``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dmm.cli_common import (
    add_mode_option,
    add_name_option,
    add_renamed_option,
    add_scan_backend_option,
    add_target_return_option,
    add_version_option,
    positive_int,
)
from dmm.errors import ConfigError

COLLECT = "roll out a behaviour policy and write a D4RL-layout hdf5 or a Minari dataset"
COLLECT_DESCRIPTION = """Roll out a D4RL reference SAC policy (npz) in gymnasium and write exactly --steps \
transitions in D4RL's hdf5 layout or as a Minari dataset."""


def _register_collect(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dmm collect``."""
    parser = subparsers.add_parser("collect", help=COLLECT, description=COLLECT_DESCRIPTION)
    parser.add_argument("--env", help="gymnasium id (Hopper-v4) or dataset name (hopper-medium-v2)")
    parser.add_argument(
        "--policy",
        type=Path,
        help="behaviour policy .npz, or random: actions tanh(N(0, 1)), for small test data where no "
        "reference policy exists (AntMaze, Kitchen)",
    )
    parser.add_argument("--steps", type=int, help="number of transitions to write")
    parser.add_argument(
        "--out",
        required=True,
        help="output .hdf5 file, or with --format minari a new Minari dataset id (dmm/hopper/random-v0), "
        "written into $MINARI_DATASETS_PATH",
    )
    parser.add_argument(
        "--format",
        choices=["hdf5", "minari"],
        default="hdf5",
        dest="data_format",
        help="hdf5 (default, D4RL layout) or minari",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of resets and action noise (default 0)")
    parser.add_argument(
        "--num-envs", type=positive_int, default=1, help="environments stepped together (default 1)"
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="take the policy's mean action instead of sampling"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--recipe",
        metavar="NAME",
        help="instead of --env, --policy and --steps: build a committed dataset (hopper-, walker2d- or "
        "halfcheetah-medium-sim-v4) into the --out folder and check its sha256",
    )
    parser.add_argument(
        "--policies", type=Path, metavar="DIR", help="with --recipe: the folder of D4RL's reference policies"
    )
    parser.set_defaults(handler=_collect)


# What --recipe sets: option -> (attribute, default); any other value beside --recipe is an error.
_RECIPE_SETS = {
    "--env": ("env", None),
    "--policy": ("policy", None),
    "--steps": ("steps", None),
    "--seed": ("seed", 0),
    "--num-envs": ("num_envs", 1),
    "--deterministic": ("deterministic", False),
    "--format": ("data_format", "hdf5"),
}


def _collect_recipe(args: argparse.Namespace) -> int:
    """``dmm collect --recipe NAME --policies DIR --out DIR``: the recipe sets everything else."""
    from dmm.trainer.recipes import build

    given = [flag for flag, (key, default) in _RECIPE_SETS.items() if getattr(args, key) != default]
    if given:
        raise ConfigError(f"--recipe sets {', '.join(given)} itself: leave them out")
    if args.recipe is None or args.policies is None:
        raise ConfigError("--recipe NAME and --policies DIR go together")
    build(args.recipe, args.policies, args.out, progress=not args.no_progress)
    return 0


def _collect(args: argparse.Namespace) -> int:
    from dmm.data.minari_datasets import MINARI_PREFIX
    from dmm.trainer.collect import collect

    if args.recipe is not None or args.policies is not None:
        return _collect_recipe(args)
    missing = [f"--{key}" for key in ("env", "policy", "steps") if getattr(args, key) is None]
    if missing:
        raise ConfigError(f"the following arguments are required: {', '.join(missing)} (or --recipe NAME)")

    options = {
        k: getattr(args, k) for k in ("steps", "out", "seed", "num_envs", "deterministic", "data_format")
    }
    path = collect(env=args.env, policy_path=args.policy, progress=not args.no_progress, **options)
    print(f"wrote {args.steps} transitions to {path}")
    if args.data_format == "minari":
        print(f"train on it with --dataset {MINARI_PREFIX}{args.out.removeprefix(MINARI_PREFIX)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the trainer's subcommands to ``dmm``."""
    _register_collect(subparsers)
    _register_train(subparsers)
    _register_eval(subparsers)


TRAIN = "train a policy on a D4RL-style dataset and publish it to the store"
TRAIN_DESCRIPTION = """Train Decision MetaMamba with the paper's settings (overridable), evaluate it, and \
publish a new version to the model store."""


def _register_train(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help=TRAIN, description=TRAIN_DESCRIPTION)
    train.add_argument(
        "--dataset",
        help="D4RL name (hopper-medium-v2), a .hdf5/.pkl path or minari:<dataset id> (required)",
    )
    train.add_argument("--store", help="model store: a folder or s3://bucket/prefix (required)")
    add_name_option(train, default="the dataset name")
    train.add_argument("--updates", type=positive_int, help="gradient updates (paper: 100000)")
    train.add_argument("--seed", type=int)
    train.add_argument("--config", type=Path, help="YAML with TrainConfig fields, over the paper's defaults")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    groups = (_add_architecture_options, _add_optimization_options, _add_evaluation_options)
    for add_options in (*groups, _add_hardware_options, add_scan_backend_option, _add_run_dir_options):
        add_options(train)
    train.set_defaults(handler=run_train)


def _add_architecture_options(train: argparse.ArgumentParser) -> None:
    """Which architecture, and the ablations of DMM (``--model`` named the architecture before ``--arch``)."""
    g = train.add_argument_group("architecture")
    g.add_argument(
        "--arch",
        choices=["dmm", "dt"],
        help="dmm (default) or the Decision Transformer baseline with its usual settings",
    )
    add_renamed_option(
        g, "--model", "is now --arch (the architecture: dmm or dt); the model's name in the store is --name"
    )
    g.add_argument(
        "--local-mixer",
        choices=["dsm", "conv"],
        help="ablation: conv replaces the DSM with a causal depthwise convolution",
    )
    g.add_argument(
        "--global-mixer",
        choices=["mamba", "attention"],
        help="ablation: attention replaces the modified Mamba with causal self-attention",
    )


def _add_optimization_options(train: argparse.ArgumentParser) -> None:
    """The learning-rate schedule and the weight average that is served."""
    g = train.add_argument_group("optimization")
    schedules = ["constant", "cosine"]
    text = "after the warm-up: constant (the paper's) or a half cosine to 0 at the last update"
    g.add_argument("--lr-schedule", choices=schedules, help=text)
    g.add_argument(
        "--ema-decay",
        type=float,
        help="evaluate and publish an exponential moving average of the weights (e.g. 0.999)",
    )
    g.add_argument(
        "--episode-fraction",
        type=float,
        help="share of each batch's rows that walk whole episodes, K steps per update, carrying the "
        "recurrent state (trains what recurrent inference sees; DMM only; default 0)",
    )


def _add_evaluation_options(train: argparse.ArgumentParser) -> None:
    """When and how the model is played in its environment while it trains."""
    g = train.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, help="updates between evaluations (0: only at the end)")
    g.add_argument("--eval-episodes", type=int, help="episodes per target return at each evaluation")
    g.add_argument("--eval-num-envs", type=positive_int, help="vector envs evaluated in parallel")
    g.add_argument("--eval-mode", choices=["window", "recurrent"])
    add_target_return_option(g, default="the environment's")
    g.add_argument(
        "--publish-every-eval",
        action="store_true",
        default=None,
        help="also publish a version at each evaluation",
    )


def _add_hardware_options(train: argparse.ArgumentParser) -> None:
    """Where training runs and whether it is compiled."""
    g = train.add_argument_group("hardware")
    g.add_argument("--device", help="cpu or cuda")
    g.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model for training (default on; bench/results/train_speed has the gain)",
    )


def _add_run_dir_options(train: argparse.ArgumentParser) -> None:
    """Keep the training state so that a stopped run can continue."""
    g = train.add_argument_group("resumable runs")
    g.add_argument(
        "--run-dir",
        type=Path,
        help="keep the training state here (every --checkpoint-every updates and on SIGTERM/SIGINT), "
        "so that --resume can continue the run",
    )
    g.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=5000,
        help="updates between saved states with --run-dir (default: 5000)",
    )
    g.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue the run kept in RUN_DIR with its own settings (options given must agree with them)",
    )


def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a stored policy in its environment")
    ev.add_argument("--store", required=True, help="model store: a folder or s3://bucket/prefix")
    add_name_option(ev, default=None)
    add_version_option(ev)
    ev.add_argument("--episodes", type=positive_int, default=10, help="episodes per target return")
    add_target_return_option(ev, default="the one stored with the policy")
    add_mode_option(ev, "auto", "the one the policy was trained for")
    ev.add_argument("--num-envs", type=positive_int, default=10, help="vector envs evaluated in parallel")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--env", help="environment / dataset name (default: the policy's)")
    ev.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    ev.add_argument("--json", action="store_true", help="print each target's result as a line of JSON")
    add_scan_backend_option(ev)
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(handler=run_eval)


def use_scan_backend(name: str | None, device: str) -> str:
    """Make ``name`` (None: the environment's default) the process's scan backend; returns what runs."""
    from dmm.model.scan import default_backend, set_default_backend

    return set_default_backend(name or default_backend(), device)


# Options that override TrainConfig fields of the same name.
CONFIG_OPTIONS = (
    "updates",
    "seed",
    "lr_schedule",
    "ema_decay",
    "episode_fraction",
    "eval_every",
    "eval_episodes",
    "eval_num_envs",
    "eval_mode",
    "target_returns",
    "publish_every_eval",
    "device",
    "compile",
)
# The options that define a training run (what --resume restores and refuses to change).
RUN_OPTIONS = ("dataset", "store", "name", "config", "arch", "local_mixer", "global_mixer", *CONFIG_OPTIONS)


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {key: str(v) if isinstance(v := getattr(args, key), Path) else v for key in RUN_OPTIONS}


def _resumed_options(args: argparse.Namespace, saved: dict[str, Any]) -> None:
    """Fill ``args`` from the run's saved options; an option given now must agree with them.

    Runs started before ``--arch`` saved the architecture as ``model``: they resume with it.
    """
    if "arch" not in saved:
        saved = {**saved, "arch": saved.get("model")}
    for key, value in _run_options(args).items():
        if value is not None and value != saved.get(key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"{flag} {value} differs from the run's {saved.get(key)}: a resumed run keeps its settings"
            )
        setattr(args, key, saved.get(key))


def _train_config(args: argparse.Namespace) -> Any:
    from dmm.trainer.config import load_train_config

    overrides = {key: getattr(args, key) for key in CONFIG_OPTIONS}
    overrides["model"] = {"local_mixer": args.local_mixer, "global_mixer": args.global_mixer}
    return load_train_config(args.dataset, args.config, overrides, architecture=args.arch or "dmm")


def _run_dir(args: argparse.Namespace, cfg: Any) -> Any:
    """The RunDir to train in (None without --run-dir/--resume), started or checked against ``cfg``."""
    from dmm.trainer.run_dir import RunDir

    if args.resume is not None:
        run = RunDir(args.resume, args.checkpoint_every)
        if run.spec()["train_config"] != cfg.model_dump(mode="json"):
            raise ConfigError(f"the configuration of the run in {args.resume} changed since it started")
        return run
    if args.run_dir is None:
        return None
    run = RunDir(args.run_dir, args.checkpoint_every)
    run.start({"options": _run_options(args), "train_config": cfg.model_dump(mode="json")})
    return run


def run_train(args: argparse.Namespace) -> int:
    from dmm.data import load_dataset
    from dmm.store import open_store
    from dmm.trainer.run_dir import RunDir, TrainingStopped
    from dmm.trainer.train import train

    if args.resume is not None:
        if args.run_dir is not None:
            raise ConfigError(
                "--resume RUN_DIR continues a run; --run-dir starts a new one: give one of them"
            )
        _resumed_options(args, RunDir(args.resume, args.checkpoint_every).spec()["options"])
    if args.dataset is None or args.store is None:
        raise ConfigError("--dataset and --store are required (or --resume RUN_DIR)")
    cfg = _train_config(args)
    store = open_store(args.store)  # before the run, the dataset and the training: a bad store fails first
    run = _run_dir(args, cfg)
    print(f"scan backend: {use_scan_backend(args.scan_backend, cfg.device)}")
    dataset = load_dataset(args.dataset)
    print(
        f"dataset {dataset.name}: {len(dataset.trajectories)} trajectories, {dataset.num_transitions} steps, "
        f"env {dataset.env}"
    )
    name = args.name or dataset.name
    try:
        result = train(cfg, dataset, store, name, progress=not args.no_progress, run=run)
    except TrainingStopped as stop:
        print(f"dmm train: {stop}", file=sys.stderr)
        return 130
    for row in result.metrics["final_eval"]:
        print(
            f"final: target {row['target_return']:g}: normalized {row['normalized_mean']:.1f} "
            f"± {row['normalized_std']:.1f} over {row['episodes']} episodes"
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from dmm.model import load_policy
    from dmm.store import open_store
    from dmm.trainer.evaluate import evaluate

    store = open_store(args.store)  # before the scan backend's compilation: a bad store fails at once
    backend = use_scan_backend(args.scan_backend, args.device)
    policy = load_policy(store, args.name, args.version, device=args.device)
    mode = policy.meta.inference_mode if args.mode == "auto" else args.mode
    for target in args.target_returns or [policy.meta.target_return]:
        result = evaluate(
            policy,
            args.episodes,
            target,
            env=args.env,
            mode=mode,
            num_envs=args.num_envs,
            seed=args.seed,
            progress=not args.no_progress,
        )
        summary = {
            "name": policy.name,
            "version": policy.version,
            "env": result.env,
            "scan_backend": backend,
            **result.summary(),
        }
        if args.json:
            print(json.dumps(summary), flush=True)
        else:
            where = f"{policy.name} v{policy.version} on {result.env}, target {target:g}"
            where += f", {mode}, {backend} scan"
            print(f"{where}: {result.describe()}", flush=True)
    return 0
