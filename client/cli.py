"""Subcommands of the client: ``dmm rollout``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this application's subcommands to ``dmm``."""
    p = subparsers.add_parser(
        "rollout",
        help="evaluate a served policy by rolling out gymnasium episodes against a dmm server",
        description="Run episodes of a gymnasium env, one Act stream per episode, and print the mean/std "
        "return and D4RL normalized score.",
    )
    p.add_argument("--target", default="localhost:50051", help="server address (default: localhost:50051)")
    p.add_argument("--env", default="hopper-medium-v2", help="dataset / env name (default: hopper-medium-v2)")
    p.add_argument("--episodes", type=int, default=10, help="episodes to run (default: 10)")
    p.add_argument("--num-envs", type=int, default=4, help="episodes run at once (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="episode i resets with seed+i (default: 0)")
    p.add_argument("--model", default=None, help="model name (default: the env name)")
    p.add_argument("--version", type=int, default=None, help="model version (default: latest)")
    p.add_argument("--target-return", type=float, default=None, help="default: the model's own")
    p.add_argument("--mode", choices=("window", "recurrent"), default=None, help="default: the server's")
    p.add_argument("--max-episode-steps", type=int, default=None, help="default: the env's limit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_rollout)


def _rollout(args: argparse.Namespace) -> int:
    from dmm.client import PolicyClient

    with PolicyClient(args.target) as client:
        result = client.rollout(
            env=args.env,
            episodes=args.episodes,
            target_return=args.target_return,
            num_envs=args.num_envs,
            seed=args.seed,
            model=args.model,
            version=args.version,
            mode=args.mode,
            progress=not args.no_progress,
            max_episode_steps=args.max_episode_steps,
        )
    print(result)
    return 0
