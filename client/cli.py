"""Subcommands of the client: ``dmm rollout``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dmm.cli_common import (
    add_mode_option,
    add_name_option,
    add_target_return_option,
    add_version_option,
    positive_int,
)

TOKEN_ENV = "DMM_TOKEN"  # the bearer token when --token-file is not given
DEFAULT_TARGET = "localhost:50051"
# gRPC's own multi-address targets: their commas separate the addresses of one balanced target
MULTI_ADDRESS_SCHEMES = ("ipv4:", "ipv6:")


def server_targets(text: str) -> list[str]:
    """An argparse type: one ``--target``, a server address or a comma-separated list of them (each
    then its own target, which a rollout fails over between). A gRPC multi-address target
    (``ipv4:10.0.0.1:5001,10.0.0.2:5001``) stays one target, balanced round-robin by gRPC."""
    if text.startswith(MULTI_ADDRESS_SCHEMES):
        targets = [text] if text.partition(":")[2].strip(", ") else []
    else:
        targets = [t.strip() for t in text.split(",")]
    if not targets or not all(targets):
        raise argparse.ArgumentTypeError(
            f"must be a server address or a comma-separated list of them, got {text!r}"
        )
    return targets


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this application's subcommands to ``dmm``."""
    p = subparsers.add_parser(
        "rollout",
        help="evaluate a served policy by rolling out gymnasium episodes against a dmm server",
        description="Run episodes of a gymnasium env as a vector env on one ActVector stream (or one Act "
        "stream per episode with --per-episode-streams), and print the mean/std return and D4RL normalized "
        "score.",
    )
    p.add_argument(
        "--target",
        action="append",
        type=server_targets,
        help=f"server address; repeat it or give a comma-separated list for several servers, which the "
        f"episodes fail over between when one dies or drains (default: {DEFAULT_TARGET})",
    )
    p.add_argument("--env", default="hopper-medium-v2", help="dataset / env name (default: hopper-medium-v2)")
    p.add_argument(
        "--episodes", type=positive_int, default=10, help="episodes per target return (default: 10)"
    )
    p.add_argument("--num-envs", type=positive_int, default=4, help="episodes run at once (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="episode i resets with seed+i (default: 0)")
    add_name_option(p, default="the env name")
    # The name's older spelling here (it never meant anything else in this command): scripts keep working.
    p.add_argument("--model", dest="name", help=argparse.SUPPRESS)
    add_version_option(p)
    add_target_return_option(p, default="the model's own")
    add_mode_option(p, "auto", "the server's default (dmm serve --mode), by default the policy's own")
    p.add_argument("--max-episode-steps", type=int, default=None, help="default: the env's limit")
    p.add_argument(
        "--per-episode-streams",
        action="store_true",
        help="one Act stream per episode, --num-envs in threads, as a robot would (default: one ActVector "
        "stream for a gymnasium vector env of --num-envs envs)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    security = p.add_argument_group("security")
    security.add_argument(
        "--tls-ca", type=Path, help="PEM CA certificate of the server's certificate: connect with TLS"
    )
    security.add_argument(
        "--tls-cert", type=Path, help="PEM client certificate, for a server that wants mutual TLS"
    )
    security.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    security.add_argument(
        "--token-file",
        type=Path,
        help=f"file whose first line is the bearer token (default: ${TOKEN_ENV}, if set)",
    )
    p.set_defaults(handler=_rollout)


def _rollout(args: argparse.Namespace) -> int:
    from dmm.client import PolicyClient
    from dmm.client.channel import read_token

    token = read_token(args.token_file) if args.token_file else os.environ.get(TOKEN_ENV) or None
    tls = {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}
    targets = [t for group in args.target or [[DEFAULT_TARGET]] for t in group]
    with PolicyClient(targets, token=token, **tls) as client:
        for target_return in args.target_returns or [None]:
            result = client.rollout(
                env=args.env,
                episodes=args.episodes,
                target_return=target_return,
                num_envs=args.num_envs,
                seed=args.seed,
                model=args.name,
                version=args.version,
                mode=None if args.mode == "auto" else args.mode,
                progress=not args.no_progress,
                max_episode_steps=args.max_episode_steps,
                vectorized=not args.per_episode_streams,
            )
            print(f"{result}, target {result.target_return:g}, failovers {result.failovers}", flush=True)
    return 0
