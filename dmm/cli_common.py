"""Options that several ``dmm`` subcommands share, so that one flag means one thing in every command.

The application CLIs (``dmm.trainer.cli``, ``dmm.server.cli``, ``dmm.client.cli``) import from here
and ``dmm.cli`` imports them, never the other way round: no import cycle. Like those modules, this
one imports only the standard library, so that ``dmm rollout`` runs on the base install.

The shared vocabulary:

- ``--arch``: the network architecture to train (``dmm`` or ``dt``); only ``dmm train`` builds one.
- ``--name``: a model's name in the store; ``--version``: one of its versions (a number or ``latest``).
- ``--target-return``: a return to condition the policy on, repeatable: every command that plays
  episodes plays them at each target given.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any, NoReturn

LATEST = "latest"
# Where options are added: a parser or one of its argument groups.
Options = argparse._ActionsContainer


def positive_int(text: str) -> int:
    """An argparse type: a count that must be at least 1 (episodes, envs, updates)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a float that is neither NaN nor infinite (a target return)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def version(text: str) -> int | None:
    """An argparse type: a version number, or ``latest`` (None: the newest complete version)."""
    if text.strip() == LATEST:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or '{LATEST}', got {text!r}")
    return value


def add_scan_backend_option(parser: Options) -> None:
    """``--scan-backend``, shared by the commands that run a model (checked by dmm.model.scan)."""
    parser.add_argument(
        "--scan-backend",
        metavar="NAME",
        help="selective-scan backend: auto, torch, numba, cuda or triton (default: $DMM_SCAN_BACKEND, "
        "else auto: cuda on a GPU with mamba_ssm, else triton there; numba on the CPU)",
    )


# --mode: an inference mode, or auto: the one the policy was trained for (its inference_mode)
MODES = ("auto", "window", "recurrent")


def add_mode_option(parser: Options, default: str, auto: str) -> None:
    """``--mode``, shared by the commands that play a policy: window, recurrent, or ``auto`` (what
    ``auto`` resolves to in this command: ``auto``), ``default`` when not given."""
    parser.add_argument(
        "--mode", choices=MODES, default=default, help=f"inference mode; auto: {auto} (default: {default})"
    )


def add_name_option(parser: Options, default: str | None) -> None:
    """``--name``: the model's name in the store; ``default`` says what none means (None: required)."""
    parser.add_argument(
        "--name",
        required=default is None,
        metavar="NAME",
        help="the model's name in the store" + (f" (default: {default})" if default else ""),
    )


def add_version_option(parser: Options) -> None:
    """``--version``: which version of ``--name``; ``args.version`` is an int, or None for the latest."""
    parser.add_argument(
        "--version",
        type=version,
        default=None,
        metavar="VERSION",
        help=f"version number or '{LATEST}' (default: {LATEST})",
    )


def add_target_return_option(parser: Options, default: str) -> None:
    """``--target-return``, repeatable into ``args.target_returns`` (None when not given)."""
    parser.add_argument(
        "--target-return",
        type=finite_float,
        action="append",
        dest="target_returns",
        metavar="RETURN",
        help=f"target return the episodes are conditioned on; repeatable: episodes are played at each "
        f"(default: {default})",
    )


class _RenamedOption(argparse.Action):
    """A flag that was renamed: using it is a one-line error (exit status 2) naming its new spelling."""

    def __init__(self, option_strings: Sequence[str], dest: str, message: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> NoReturn:
        parser.error(f"{option_string} {self.message}")


def add_renamed_option(parser: Options, old: str, message: str) -> None:
    """Refuse ``old`` with ``message`` (which names the flag to use instead); it is hidden from --help."""
    parser.add_argument(old, action=_RenamedOption, dest=argparse.SUPPRESS, message=message)
