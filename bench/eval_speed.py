"""Evaluation speed: batched vector-env evaluation against the authors' sequential batch-1 loop.

Both run the same policy on the same episodes: batched is ``dmm.trainer.evaluate.evaluate`` (one
forward for all ``--num-envs`` envs per step; env i starts with seed ``seed + i``); sequential is
one env, one episode at a time, a fresh ``PolicyRunner(capacity=1)`` per episode and one forward
per step, episode i reset with seed ``seed + i``. With ``--num-envs >= --episodes`` every episode
has the same seed in both, so their returns are compared episode by episode. Both use
``--scan-backend``; unless that is ``torch``, the batched run is repeated with the torch scan, the
reference the speed-up of the backend is measured against.

    python -m bench.eval_speed --store models --name hopper-medium-sim-v4     # a trained policy
    python -m bench.eval_speed                  # a freshly initialized paper-size DMM (short episodes)
    python -m bench.eval_speed --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    FRESH_POLICY_ENV,
    VARIANTS,
    default_out,
    fresh_policy,
    machine,
    markdown_table,
    new_figure,
    report_header,
    write_report,
)

SCRIPT = "eval_speed"
MODULE = f"bench.{SCRIPT}"


def sequential(
    policy: Any, env: str, episodes: int, target: float, mode: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' loop: one env, one episode at a time, batch-1 forwards."""
    from dmm.envs import make_env
    from dmm.model import PolicyRunner

    returns, lengths = np.zeros(episodes), np.zeros(episodes, dtype=np.int64)
    e = make_env(env)
    try:
        for i in range(episodes):
            runner = PolicyRunner(policy, mode, capacity=1)
            runner.reset([0])
            obs, _ = e.reset(seed=seed + i)
            rtg, done = target, False
            while not done:
                action = runner.step([0], obs[None], np.array([rtg]))[0]
                obs, reward, terminated, truncated, _ = e.step(action)
                returns[i] += reward
                lengths[i] += 1
                rtg -= reward
                done = terminated or truncated
    finally:
        e.close()
    return returns, lengths


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, help="model store (default: a freshly initialized policy)")
    p.add_argument("--name", help="model name in the store (with --store)")
    p.add_argument("--version", help="version (default: latest)")
    p.add_argument(
        "--variant", choices=("dmm", "dt"), default="dmm", help="architecture of a fresh policy (default dmm)"
    )
    p.add_argument(
        "--env", help=f"environment / dataset name (default: the policy's; {FRESH_POLICY_ENV} if fresh)"
    )
    p.add_argument("--episodes", type=int, help="default 100; 4 with --quick")
    p.add_argument("--num-envs", type=int, help="vector envs of the batched run (default: --episodes)")
    p.add_argument("--mode", choices=("window", "recurrent"), default="window")
    p.add_argument("--target-return", type=float, help="default: the policy's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--scan-backend", default="auto", choices=("auto", "torch", "numba", "cuda"), help="default: auto"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own choice; 1 with --quick)")
    p.add_argument("--out", type=Path, default=default_out(SCRIPT))
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = p.parse_args(argv)
    if (args.store is None) != (args.name is None):
        p.error("--store and --name go together")
    args.episodes = args.episodes or (4 if args.quick else 100)
    args.threads = args.threads if args.threads is not None else (1 if args.quick else None)
    args.num_envs = args.num_envs or args.episodes
    if args.episodes < 1 or args.num_envs < 1:
        p.error("--episodes and --num-envs must be positive")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    from dmm.envs import normalized_score
    from dmm.model import load_policy
    from dmm.model.scan import resolve_backend
    from dmm.store import ModelStore
    from dmm.trainer.evaluate import check_compatible, evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.store is not None:
        policy = load_policy(ModelStore(args.store), args.name, args.version, device=args.device)
        source = f"{policy.name} v{policy.version} from {args.store}"
    else:
        policy = fresh_policy(args.variant, args.env or FRESH_POLICY_ENV, args.seed, args.device)
        source = f"freshly initialized {VARIANTS[args.variant].label} (seed {args.seed})"
    env = args.env or policy.meta.env
    check_compatible(policy, env)
    target = args.target_return if args.target_return is not None else policy.meta.target_return

    backend = resolve_backend(args.scan_backend, torch.device(args.device))
    scans = {"batched": backend, "batched-torch": "torch", "sequential": backend}
    if backend == "torch":
        del scans["batched-torch"]  # the batched run is the torch reference itself
    runs = {}
    for key, scan in scans.items():
        print(f"{key}: {args.episodes} episodes, {scan} scan...", file=sys.stderr, flush=True)
        policy.model.set_scan_backend(scan)
        t0 = time.perf_counter()
        if key == "sequential":
            returns, lengths = sequential(policy, env, args.episodes, target, args.mode, args.seed)
        else:
            run = evaluate(
                policy, args.episodes, target, env, args.mode, args.num_envs, args.seed, progress=False
            )
            returns, lengths = run.returns, run.lengths
        runs[key] = (returns, lengths, time.perf_counter() - t0)
    batched_s, sequential_s = runs["batched"][2], runs["sequential"][2]
    (batched_returns, _, _), (seq_returns, _, _) = runs["batched"], runs["sequential"]
    results: dict[str, dict[str, Any]] = {}
    for key, (returns, lengths, wall) in runs.items():
        results[key] = {
            "scan_backend": scans[key],
            "wall_seconds": wall,
            "episodes_per_second": len(returns) / wall,
            "env_steps": int(lengths.sum()),
            "env_steps_per_second": float(lengths.sum()) / wall,
            "mean_return": float(returns.mean()),
            "std_return": float(returns.std()),
            "normalized_mean": float(np.mean(normalized_score(env, returns))),
            "returns": returns,
            "lengths": lengths,
        }
    paired = min(args.num_envs, args.episodes)  # episodes with the same reset seed in both runs
    diff = np.abs(batched_returns[:paired] - seq_returns[:paired])
    same = np.isclose(batched_returns[:paired], seq_returns[:paired], rtol=1e-5, atol=1e-3)
    agreement = {
        "paired_episodes": paired,
        "identical_returns": int(same.sum()),
        "max_abs_return_difference": float(diff.max()),
        "mean_return_difference": results["batched"]["mean_return"] - results["sequential"]["mean_return"],
    }
    speedup = sequential_s / batched_s
    torch_s = runs["batched-torch"][2] if "batched-torch" in runs else batched_s
    speedup_vs_torch = torch_s / batched_s

    rows = []
    for key, r in results.items():
        rows.append(
            [
                key,
                r["scan_backend"],
                f"{args.num_envs}" if key.startswith("batched") else "1",
                f"{r['wall_seconds']:.2f}",
                f"{r['episodes_per_second']:.2f}",
                f"{r['env_steps']}",
                f"{r['env_steps_per_second']:.0f}",
                f"{r['mean_return']:.1f} ± {r['std_return']:.1f}",
                f"{r['normalized_mean']:.1f}",
            ]
        )
    table = markdown_table(
        [
            "evaluation",
            "scan",
            "batch",
            "wall s",
            "episodes/s",
            "env steps",
            "env steps/s",
            "return",
            "normalized",
        ],
        rows,
    )
    table += (
        f"\n\nspeed-up of the {backend} scan (batched, torch-scan wall / {backend}-scan wall, same run): "
        f"**{speedup_vs_torch:.2f}x**; batched over sequential (same run): **{speedup:.2f}x**; "
        "returns identical in "
        f"{agreement['identical_returns']} of {paired} paired episodes (max |difference| "
        f"{agreement['max_abs_return_difference']:.3g})"
    )
    info = machine(args.device)
    fig, axes = new_figure(ncols=2, width=5.0)
    ax = axes[0][0]
    ax.bar(list(results), [r["env_steps_per_second"] for r in results.values()], color="tab:blue")
    ax.set(ylabel="env steps/s", title=f"{args.episodes} episodes, speed-up {speedup:.1f}x")
    ax = axes[0][1]
    ax.scatter(seq_returns[:paired], batched_returns[:paired], s=10)
    lo = float(min(seq_returns.min(), batched_returns.min()))
    hi = float(max(seq_returns.max(), batched_returns.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel="sequential return", ylabel="batched return", title="same seeds, per episode")
    payload = {
        **report_header(SCRIPT, argv, info),
        "policy": source,
        "num_parameters": policy.model.num_parameters(),
        "env": env,
        "mode": args.mode,
        "target_return": target,
        "episodes": args.episodes,
        "num_envs": args.num_envs,
        "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
        "speedup": speedup,
        "scan_backend": backend,
        "speedup_vs_torch_scan": speedup_vs_torch,
        "agreement": agreement,
        "results": results,
    }
    notes = [
        f"policy: {source}, {args.mode} mode, target return {target:g}, env {env}, torch threads "
        f"{torch.get_num_threads()}",
        "batched: dmm.trainer.evaluate.evaluate (SyncVectorEnv, one forward per step for all envs); "
        "sequential: one env, a fresh PolicyRunner(capacity=1) per episode, one forward per step",
        f"episode i starts from reset seed {args.seed}+i in both for the first {paired} episodes; "
        "batched and batch-1 forwards may round differently, and Hopper amplifies tiny differences",
    ]
    write_report(args.out, SCRIPT, "Evaluation speed: batched vs sequential", table, payload, fig, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
