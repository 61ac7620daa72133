"""The ``dmm`` command: one entry point, subcommands registered by each application.

Each application module (``dmm.trainer.cli``, ``dmm.server.cli``, ``dmm.client.cli``) exposes
``register(subparsers)``, which adds its subcommands with ``set_defaults(handler=...)``. Those
modules import no torch at module level, so ``dmm rollout`` never pays for importing it. What they
share (options, argparse types) lives in ``dmm.cli_common``: this module imports them, and they never
import it back.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from dmm.client import cli as client_cli
from dmm.errors import DMMError
from dmm.server import cli as server_cli
from dmm.trainer import cli as trainer_cli

# Each application's CLI module and the install extra its commands need (None: the base install).
APP_CLIS = ((trainer_cli, "train"), (server_cli, "serve"), (client_cli, None))
# Top-level modules that only an extra installs: a command that misses one names the extra.
EXTRA_MODULES = frozenset(
    [
        "torch",
        "numba",
        "safetensors",
        "pydantic",
        "yaml",
        "prometheus_client",
        "grpc_health",
        "grpc_reflection",
        "h5py",
        "matplotlib",
    ]
)


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2, without argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="dmm", description="Decision MetaMamba: train, store and serve offline-RL policies."
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser
    )
    for module, extra in APP_CLIS:
        known = set(subparsers.choices)
        module.register(subparsers)
        for name in set(subparsers.choices) - known:
            subparsers.choices[name].set_defaults(extra=extra)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except DMMError as err:
        print(f"dmm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        top = (err.name or "").split(".")[0]
        if args.extra is None or top not in EXTRA_MODULES:
            raise
        print(
            f"dmm {args.command}: error: {top} is not installed; dmm {args.command} needs the "
            f"'{args.extra}' extra: pip install 'decision-metamamba[{args.extra}]'",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"dmm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
