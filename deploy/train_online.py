"""Background training for ``docker compose up``: a real ``hopper-medium-v2`` model, published when done.

The compose service ``train-online`` runs this beside the server, which does not wait for it and
serves the pre-trained model meanwhile. If the store already has the model (``--name``, default the
dataset's name), or another live run is training it, nothing is done. Otherwise the D4RL dataset
``--dataset`` is downloaded (from D4RL's server, or the mirror ``$D4RL_BASE_URL``) and ``dmm train``
trains on it for ``--updates`` updates (20,000) with a cosine learning-rate schedule, an EMA of the
weights and half of each batch's rows walking whole episodes (the pre-trained model's recipe, which
makes it play as well in recurrent mode as in window mode: docs/training.md), then publishes it; the
server reads the store at each session start, so new sessions get it without a restart. While it
trains, the store's marker ``.training/<name>.json`` says so, and a client asking for the model is
told that it is being trained and which models are available.

Offline (the download fails) it prints one line and exits 0, marking nothing. Every option can also
be set by an environment variable (``DMM_TRAIN_ONLINE_*``, ``DMM_STORE``), which is how
docker-compose.yml configures it. Exit status: 0 when the model is in the store at the end or there
was nothing to do, 2 for bad options, otherwise that of the failing step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


FALSE = ("0", "false", "no")  # what turns a switch off


def _setting(key: str, default: str) -> str:
    """``$DMM_TRAIN_ONLINE_<key>``, else ``default``."""
    return _env(f"DMM_TRAIN_ONLINE_{key}", default)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--store", default=_env("DMM_STORE", "/models"), help="model store to publish into")
    add("--dataset", default=_setting("DATASET", "hopper-medium-v2"), help="D4RL dataset")
    add("--name", default=_setting("NAME", ""), help="model name (default: the dataset's name)")
    add(
        "--updates",
        type=_non_negative,
        default=_setting("UPDATES", "20000"),
        help="training updates (0: online training off)",
    )
    add("--lr-schedule", choices=("constant", "cosine"), default=_setting("LR_SCHEDULE", "cosine"))
    add("--ema-decay", type=float, default=_setting("EMA_DECAY", "0.999"))
    add("--episode-fraction", type=float, default=_setting("EPISODE_FRACTION", "0.5"))
    add("--seed", type=int, default=_setting("SEED", "0"))
    add(
        "--eval-episodes",
        type=_non_negative,
        default=_setting("EVAL_EPISODES", "5"),
        help="evaluation episodes per target return at the end (0: none)",
    )
    compile_on = _setting("COMPILE", "1") not in FALSE
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=compile_on,
        help="torch.compile the model for training",
    )
    add(
        "--log",
        default=_setting("LOG", "the output of train_online.py"),
        help="where the training's progress can be seen, recorded in the store's training marker",
    )
    return parser


def train_online(args: argparse.Namespace) -> int:
    """Download, train and publish ``args.name`` unless the store has it or a run is training it."""
    from dmm.errors import DMMError
    from dmm.store import open_store
    from dmm.store.errors import started_ago

    name = args.name or args.dataset
    try:
        refusal = _refusal(args.dataset, name)
        if refusal:
            print(f"train-online: error: {refusal}", file=sys.stderr)
            return 2
        if args.updates == 0:
            print("train-online: online training is off (0 updates); nothing to do")
            return 0
        store = open_store(args.store)
        if name in store.models():
            print(f"train-online: store {args.store} already has {name}; nothing to do")
            return 0
        running = store.training(name)
        if running is not None:
            where = f"pid {running.pid} on {running.host}, {started_ago(running.started)}"
            print(f"train-online: {name} is already being trained ({where}); nothing to do")
            return 0
        dataset = _download(args.dataset)
        if dataset is None:
            return 0
        with store.mark_training(name, args.updates, args.log), _sigterm_exits():
            status = _train(args, name, dataset)
        if status == 0 and name not in store.models():
            print(
                f"train-online: error: training finished but {args.store} has no model {name}",
                file=sys.stderr,
            )
            return 1
    except DMMError as err:
        print(f"train-online: error: {err}", file=sys.stderr)
        return 1
    if status == 0:
        print(f"train-online: store {args.store} now serves {name} to new sessions; try it with")
        print(f"  dmm rollout --target localhost:50051 --env {name}")
    return status


def _train(args: argparse.Namespace, name: str, dataset: Path) -> int:
    """``dmm train`` with the online budget; its exit status."""
    from dmm.cli import main as dmm_main

    print(f"train-online: training {name} for {args.updates} updates (progress every 1,000 updates)")
    train = ["train", "--dataset", str(dataset), "--store", str(args.store), "--name", name]
    train += ["--updates", str(args.updates), "--lr-schedule", args.lr_schedule]
    train += ["--ema-decay", str(args.ema_decay), "--episode-fraction", str(args.episode_fraction)]
    train += ["--seed", str(args.seed), "--no-progress"]
    train += ["--eval-every", "0", "--eval-episodes", str(args.eval_episodes)]
    return dmm_main([*train, "--compile" if args.compile else "--no-compile"])


def _refusal(dataset: str, name: str) -> str | None:
    """Why the options cannot work, or None."""
    from dmm.data import dataset_url
    from dmm.errors import DMMError
    from dmm.store.layout import validate_name

    try:
        dataset_url(dataset)
        validate_name(name)
    except DMMError as err:
        return str(err)
    return None


def _download(dataset: str) -> Path | None:
    """The D4RL file of ``dataset`` (downloaded into the D4RL cache), or None when it cannot be had."""
    from dmm.data import fetch_dataset
    from dmm.errors import DMMError

    print(f"train-online: fetching the D4RL dataset {dataset}")
    try:
        return fetch_dataset(dataset)
    except DMMError as err:
        print(f"train-online: offline, no online training: {err}", file=sys.stderr)
        return None


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (``docker compose stop``) ends the run through ``finally`` blocks, so that the training
    marker is removed. As a container's PID 1, Python would otherwise ignore SIGTERM until killed."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    return train_online(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
