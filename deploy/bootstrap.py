"""One-shot store bootstrap, so that a fresh ``docker compose up`` serves a policy with no manual step.

If the store already holds a model, nothing is done. Otherwise the D4RL dataset ``--dataset``
(``hopper-medium-v2``) is downloaded (from D4RL's server, or the mirror ``$D4RL_BASE_URL``) and a
small model is trained on it and published under the dataset's name, so that
``PolicyClient("localhost:50051").rollout(env="hopper-medium-v2")`` finds it. Offline, a small
dataset is collected instead with a bundled D4RL reference policy (``dmm collect``) and the model is
published under ``--name`` (``hopper-medium-sim-v4``); the log then prints the rollout command that
works. Either way it is a demonstration policy, trained for minutes, not a benchmark result: train a
real one with the compose ``trainer`` service (see deploy/README.md).

Every option can also be set by an environment variable (``DMM_BOOTSTRAP_*``, ``DMM_STORE``), which
is how docker-compose.yml configures it. Exit status: 0 when the store has a model at the end,
otherwise the failing step's status.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_POLICY = Path(__file__).resolve().parent / "policies" / "hopper_online_5.npz"


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=_env("DMM_STORE", "/models"), help="model store folder")
    parser.add_argument(
        "--dataset",
        default=_env("DMM_BOOTSTRAP_DATASET", "hopper-medium-v2"),
        help="D4RL dataset to download, train on and publish under its name ('' : collect only)",
    )
    parser.add_argument(
        "--name",
        default=_env("DMM_BOOTSTRAP_NAME", "hopper-medium-sim-v4"),
        help="model name of the offline fallback (collected data)",
    )
    parser.add_argument(
        "--env", default=_env("DMM_BOOTSTRAP_ENV", "Hopper-v4"), help="gymnasium env to collect in"
    )
    parser.add_argument(
        "--policy",
        type=Path,
        default=Path(_env("DMM_BOOTSTRAP_POLICY", str(DEFAULT_POLICY))),
        help="D4RL reference policy (.npz) that collects the dataset",
    )
    parser.add_argument(
        "--steps", type=int, default=int(_env("DMM_BOOTSTRAP_STEPS", "20000")), help="transitions to collect"
    )
    parser.add_argument(
        "--updates", type=int, default=int(_env("DMM_BOOTSTRAP_UPDATES", "1000")), help="training updates"
    )
    parser.add_argument(
        "--eval-episodes",
        type=int,
        default=int(_env("DMM_BOOTSTRAP_EVAL_EPISODES", "2")),
        help="evaluation episodes per target return after training (0: none)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=_env("DMM_BOOTSTRAP_COMPILE", "1") not in ("0", "false", "no"),
        help="torch.compile the model for training (pays off from a few hundred updates)",
    )
    parser.add_argument("--seed", type=int, default=int(_env("DMM_BOOTSTRAP_SEED", "0")))
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the collected dataset is written (default: a temporary folder, removed at the end)",
    )
    return parser


def store_models(store: str | os.PathLike) -> list[str]:
    """Names of the models with at least one complete version in ``store``."""
    from dmm.store import ModelStore

    return ModelStore(store).models()


def bootstrap(args: argparse.Namespace) -> int:
    """Download (or collect) and train into an empty store; return 0 when the store then has a model."""
    from dmm.cli import main as dmm_main

    models = store_models(args.store)
    if models:
        print(f"bootstrap: store {args.store} already has {', '.join(models)}; nothing to do")
        return 0
    refusal = _refusal(args)
    if refusal:
        print(f"bootstrap: error: {refusal}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dmm-bootstrap-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        downloaded = _download(args.dataset) if args.dataset else None
        if downloaded is not None:
            name, dataset = args.dataset, downloaded
        else:
            name, dataset = args.name, workdir / f"{args.name}.hdf5"
            print(f"bootstrap: store {args.store} is empty; collecting {args.steps} steps of {args.env}")
            collect = ["collect", "--env", args.env, "--policy", str(args.policy), "--steps", str(args.steps)]
            status = dmm_main([*collect, "--out", str(dataset), "--seed", str(args.seed)])
            if status != 0:
                return status
        print(f"bootstrap: training {name} for {args.updates} updates")
        train = ["train", "--dataset", str(dataset), "--store", str(args.store), "--name", name]
        train += ["--updates", str(args.updates), "--eval-episodes", str(args.eval_episodes)]
        status = dmm_main([*train, "--compile" if args.compile else "--no-compile"])
        if status != 0:
            return status
    if name not in store_models(args.store):
        print(f"bootstrap: error: training finished but {args.store} has no model {name}", file=sys.stderr)
        return 1
    print(f"bootstrap: store {args.store} now serves {name}; try it with")
    print(f"  dmm rollout --target localhost:50051 --env {name}")
    print(f'  or in Python: PolicyClient("localhost:50051").rollout(env="{name}")')
    return 0


def _refusal(args: argparse.Namespace) -> str | None:
    """Why the options cannot work, or None."""
    from dmm.data import dataset_url
    from dmm.envs import env_spec
    from dmm.errors import DMMError

    if not args.policy.is_file():
        return f"behaviour policy {args.policy} not found"
    # The trainer tells the environment from the dataset's name, so the model name (which names
    # the dataset file) must be a dataset name of the environment collected in.
    try:
        name_env, collect_env = env_spec(args.name).env_id, env_spec(args.env).env_id
    except DMMError as err:
        return str(err)
    if args.dataset:
        try:
            dataset_url(args.dataset)
        except DMMError as err:
            return f"--dataset: {err}"
    if name_env != collect_env:
        return (
            f"model name {args.name!r} is a {name_env} dataset name, but the data is collected in "
            f"{collect_env}; use a name like 'hopper-medium-sim-v4' for Hopper-v4"
        )
    return None


def _download(dataset: str) -> Path | None:
    """The D4RL file of ``dataset`` (downloaded into the D4RL cache), or None when it cannot be had."""
    from dmm.data import fetch_dataset
    from dmm.errors import DMMError

    print(f"bootstrap: fetching the D4RL dataset {dataset}")
    try:
        return fetch_dataset(dataset)
    except DMMError as err:
        print(f"bootstrap: {err}; falling back to collected data", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    return bootstrap(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
