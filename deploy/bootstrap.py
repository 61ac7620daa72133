"""One-shot store bootstrap, so that a fresh ``docker compose up`` serves a policy within a minute.

If the store already holds a model, nothing is done. Otherwise every model of the pre-trained store
shipped with the deployment (``--pretrained``: ``pretrained/`` beside this file, ``/opt/dmm/pretrained``
in the image) is published into it at once: each version is loaded through the store, which verifies
its checksums, and published with its config, metrics and extra files. That takes seconds, and the
server then serves ``hopper-medium-sim-v4``. A better model, ``hopper-medium-v2``, follows from the
background compose service ``train-online`` (train_online.py beside this file).

Without a pre-trained store (a checkout the checkpoint has not been added to), a demonstration model
is made instead, so that the deployment still serves something: a small dataset is collected with
the bundled D4RL reference policy (``dmm collect``), a model is trained on it for a few minutes and
published under ``--name`` (``hopper-medium-sim-v4``). It plays badly; the log prints the rollout
command that works.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmm.store import Checkpoint, Store

HERE = Path(__file__).resolve().parent
DEFAULT_PRETRAINED = HERE / "pretrained"
DEFAULT_POLICY = HERE / "policies" / "hopper_online_5.npz"
# The episodes the pre-trained models' scores are measured on (pretrained/README.md): the printed
# rollout plays these, so that its score is the documented one.
PRETRAINED_EPISODES = 100


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


FALSE = ("0", "false", "no")  # what turns a switch off


def _setting(key: str, default: str) -> str:
    """``$DMM_BOOTSTRAP_<key>``, else ``default``."""
    return _env(f"DMM_BOOTSTRAP_{key}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--store", default=_env("DMM_STORE", "/models"), help="model store to fill")
    add(
        "--pretrained",
        type=Path,
        default=_setting("PRETRAINED", str(DEFAULT_PRETRAINED)),
        help="store folder of the pre-trained models published into an empty store",
    )
    fallback = parser.add_argument_group("fallback without pre-trained models: collect and train")
    add = fallback.add_argument
    add(
        "--name",
        default=_setting("NAME", "hopper-medium-sim-v4"),
        help="model name (a dataset name of --env)",
    )
    add("--env", default=_setting("ENV", "Hopper-v4"), help="gymnasium env to collect in")
    policy = _setting("POLICY", str(DEFAULT_POLICY))
    add("--policy", type=Path, default=policy, help="D4RL reference policy (.npz) that collects the dataset")
    add("--steps", type=int, default=int(_setting("STEPS", "20000")), help="transitions to collect")
    add("--updates", type=int, default=int(_setting("UPDATES", "1000")), help="training updates")
    add(
        "--eval-episodes",
        type=int,
        default=int(_setting("EVAL_EPISODES", "2")),
        help="evaluation episodes per target return after training (0: none)",
    )
    add(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=_setting("COMPILE", "1") not in FALSE,
        help="torch.compile the model for training (pays off from a few hundred updates)",
    )
    add("--seed", type=int, default=int(_setting("SEED", "0")))
    add(
        "--workdir",
        type=Path,
        default=None,
        help="where the collected dataset is written (default: a temporary folder, removed at the end)",
    )
    return parser


def bootstrap(args: argparse.Namespace) -> int:
    """Fill an empty store from the pre-trained store, else by collecting and training; return 0 when
    the store then has a model."""
    from dmm.errors import DMMError
    from dmm.store import open_store

    try:
        target = open_store(args.store)
        models = target.models()
        if models:
            print(f"bootstrap: store {args.store} already has {', '.join(models)}; nothing to do")
            return 0
        checkpoints = load_pretrained(args.pretrained)
        if checkpoints:
            publish_pretrained(checkpoints, target)
            return 0
    except DMMError as err:
        print(f"bootstrap: error: {err}", file=sys.stderr)
        return 1
    print(f"bootstrap: no pre-trained models in {args.pretrained}; training a demonstration model instead")
    return collect_and_train(args)


def load_pretrained(source: Path) -> list[Checkpoint]:
    """Every version of every model in the store folder ``source``, loaded and checksum-verified
    (``[]`` when there is no such folder; a file there is an error). All are read before any is
    published, so that a damaged pre-trained store leaves the target empty instead of half-filled."""
    from dmm.store import ModelStore

    if not source.exists():
        return []
    store = ModelStore(source)
    return [store.load(name, version) for name in store.models() for version in store.versions(name)]


def publish_pretrained(checkpoints: Sequence[Checkpoint], target: Store) -> None:
    """Publish ``checkpoints`` into ``target``, each with its config, metrics and extra files."""
    from dmm.store.layout import RESERVED_FILES, read_checksums

    for ckpt in checkpoints:
        extra = {f: ckpt.path / f for f in read_checksums(ckpt.path) if f not in RESERVED_FILES}
        version = target.publish(ckpt.name, ckpt.tensors, ckpt.config, ckpt.metrics, extra or None)
        print(f"bootstrap: published the pre-trained {ckpt.name} version {ckpt.version} as version {version}")
    # The shipped models are trained on whole episodes (--episode-fraction): recurrent mode, O(1) per
    # action, plays them as well as the window (deploy/pretrained/README.md). Their scores there are
    # means over 100 episodes; the rollout's default 10 (seeds 0-9) scatter by several points.
    names = sorted({ckpt.name for ckpt in checkpoints})
    _print_rollout(str(target.root), names, "recurrent", episodes=PRETRAINED_EPISODES)


def collect_and_train(args: argparse.Namespace) -> int:
    """The fallback: collect a small dataset with the reference policy, train on it, publish it."""
    from dmm.cli import main as dmm_main
    from dmm.store import open_store

    refusal = _refusal(args)
    if refusal:
        print(f"bootstrap: error: {refusal}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dmm-bootstrap-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        dataset = workdir / f"{args.name}.hdf5"
        print(f"bootstrap: collecting {args.steps} steps of {args.env}")
        collect = ["collect", "--env", args.env, "--policy", str(args.policy), "--steps", str(args.steps)]
        status = dmm_main([*collect, "--out", str(dataset), "--seed", str(args.seed)])
        if status != 0:
            return status
        print(f"bootstrap: training {args.name} for {args.updates} updates")
        train = ["train", "--dataset", str(dataset), "--store", str(args.store), "--name", args.name]
        train += ["--updates", str(args.updates), "--eval-episodes", str(args.eval_episodes)]
        status = dmm_main([*train, "--compile" if args.compile else "--no-compile"])
        if status != 0:
            return status
    if args.name not in open_store(args.store).models():
        print(
            f"bootstrap: error: training finished but {args.store} has no model {args.name}", file=sys.stderr
        )
        return 1
    _print_rollout(args.store, [args.name])
    return 0


def _print_rollout(
    store: str, names: Sequence[str], mode: str | None = None, episodes: int | None = None
) -> None:
    """The rollout to try; ``mode`` where the model plays best in that one (else the server's), and
    ``episodes`` where its score was measured on that many (else the client's default, 10)."""
    flag, kwarg = (f" --mode {mode}", f', mode="{mode}"') if mode else ("", "")
    if episodes:
        flag += f" --episodes {episodes}"
    print(f"bootstrap: store {store} now serves {', '.join(names)}; try it with")
    print(f"  dmm rollout --target localhost:50051 --env {names[0]}{flag}")
    print(f'  or in Python: PolicyClient("localhost:50051").rollout(env="{names[0]}"{kwarg})')
    if episodes:
        print(f"  ({episodes} episodes, as its documented score; the default 10 scatter by several points)")


def _refusal(args: argparse.Namespace) -> str | None:
    """Why the fallback's options cannot work, or None."""
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
    if name_env != collect_env:
        return (
            f"model name {args.name!r} is a {name_env} dataset name, but the data is collected in "
            f"{collect_env}; use a name like 'hopper-medium-sim-v4' for Hopper-v4"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    return bootstrap(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
