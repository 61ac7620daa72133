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
from typing import Any

import numpy as np

from bench.common import FRESH_POLICY_ENV, VARIANTS, fresh_policy
from bench.harness import format_table, header, new_figure, parse, parser, write_report

SCRIPT = "eval_speed"
COLUMNS = (
    ("evaluation", "{key}"),
    ("scan", "{scan_backend}"),
    ("batch", "{batch}"),
    ("wall s", "{wall_seconds:.2f}"),
    ("episodes/s", "{episodes_per_second:.2f}"),
    ("env steps", "{env_steps}"),
    ("env steps/s", "{env_steps_per_second:.0f}"),
    ("return", "{mean_return:.1f} ± {std_return:.1f}"),
    ("normalized", "{normalized_mean:.1f}"),
)


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
    p = parser(__doc__, SCRIPT, device=True, threads=None, store=True)
    p.add_argument("--variant", choices=("dmm", "dt"), default="dmm", help="architecture of a fresh policy")
    p.add_argument("--env", help=f"environment / dataset (default: the policy's; {FRESH_POLICY_ENV} fresh)")
    p.add_argument("--episodes", type=int, help="default 100; 4 with --quick")
    p.add_argument("--num-envs", type=int, help="vector envs of the batched run (default: --episodes)")
    p.add_argument("--mode", choices=("window", "recurrent"), default="window")
    p.add_argument("--target-return", type=float, help="default: the policy's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scan-backend", default="auto", choices=("auto", "torch", "numba", "cuda"))
    args = parse(p, argv, {"episodes": (100, 4)}, positive=("episodes", "num_envs", "threads"))
    args.num_envs = args.num_envs or args.episodes
    return args


def load(args: argparse.Namespace) -> tuple[Any, str]:
    """The policy to evaluate and its description."""
    if args.store is None:
        policy = fresh_policy(args.variant, args.env or FRESH_POLICY_ENV, args.seed, args.device)
        return policy, f"freshly initialized {VARIANTS[args.variant].label} (seed {args.seed})"
    from dmm.model import load_policy
    from dmm.store import ModelStore

    policy = load_policy(ModelStore(args.store), args.name, args.version, device=args.device)
    return policy, f"{policy.name} v{policy.version} from {args.store}"


def run_all(args: argparse.Namespace, policy: Any, env: str, target: float) -> dict[str, dict[str, Any]]:
    """The batched run, the batched run with the torch scan (unless that is the backend) and the
    sequential one: per run its wall time, returns and lengths."""
    import torch

    from dmm.envs import normalized_score
    from dmm.model.scan import resolve_backend
    from dmm.trainer.evaluate import evaluate

    backend = resolve_backend(args.scan_backend, torch.device(args.device))
    scans = {"batched": backend, "batched-torch": "torch", "sequential": backend}
    if backend == "torch":
        del scans["batched-torch"]  # the batched run is the torch reference itself
    results = {}
    for key, scan in scans.items():
        print(f"{key}: {args.episodes} episodes, {scan} scan...", file=sys.stderr, flush=True)
        policy.network.set_scan_backend(scan)
        t0 = time.perf_counter()
        if key == "sequential":
            returns, lengths = sequential(policy, env, args.episodes, target, args.mode, args.seed)
        else:
            run = evaluate(
                policy, args.episodes, target, env, args.mode, args.num_envs, args.seed, progress=False
            )
            returns, lengths = run.returns, run.lengths
        wall, steps = time.perf_counter() - t0, int(lengths.sum())
        r = {"scan_backend": scan, "wall_seconds": wall, "episodes_per_second": len(returns) / wall}
        r |= {"env_steps": steps, "env_steps_per_second": steps / wall, "mean_return": float(returns.mean())}
        r |= {"std_return": float(returns.std()), "normalized_mean": np.mean(normalized_score(env, returns))}
        results[key] = r | {"returns": returns, "lengths": lengths}
    return results


def agreement(results: dict[str, dict[str, Any]], paired: int) -> dict[str, Any]:
    """How far the batched and sequential returns of the episodes with the same reset seed differ."""
    batched, seq = results["batched"]["returns"][:paired], results["sequential"]["returns"][:paired]
    return {
        "paired_episodes": paired,
        "identical_returns": int(np.isclose(batched, seq, rtol=1e-5, atol=1e-3).sum()),
        "max_abs_return_difference": float(np.abs(batched - seq).max()),
        "mean_return_difference": results["batched"]["mean_return"] - results["sequential"]["mean_return"],
    }


def figure(results: dict[str, dict[str, Any]], args: argparse.Namespace, speedup: float, paired: int) -> Any:
    fig, axes = new_figure(ncols=2, width=5.0)
    ax = axes[0][0]
    ax.bar(list(results), [r["env_steps_per_second"] for r in results.values()], color="tab:blue")
    ax.set(ylabel="env steps/s", title=f"{args.episodes} episodes, speed-up {speedup:.1f}x")
    ax = axes[0][1]
    seq, batched = results["sequential"]["returns"], results["batched"]["returns"]
    ax.scatter(seq[:paired], batched[:paired], s=10)
    lo, hi = float(min(seq.min(), batched.min())), float(max(seq.max(), batched.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set(xlabel="sequential return", ylabel="batched return", title="same seeds, per episode")
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    from dmm.trainer.evaluate import check_compatible

    if args.threads:
        torch.set_num_threads(args.threads)
    policy, source = load(args)
    env = args.env or policy.meta.env
    check_compatible(policy, env)
    target = args.target_return if args.target_return is not None else policy.meta.target_return
    results = run_all(args, policy, env, target)
    backend, batched_s = results["batched"]["scan_backend"], results["batched"]["wall_seconds"]
    speedup = results["sequential"]["wall_seconds"] / batched_s
    speedup_vs_torch = results.get("batched-torch", results["batched"])["wall_seconds"] / batched_s
    paired = min(args.num_envs, args.episodes)  # episodes with the same reset seed in both runs
    agree = agreement(results, paired)
    rows = [{"key": k, "batch": args.num_envs if k != "sequential" else 1, **r} for k, r in results.items()]
    table = format_table(COLUMNS, rows) + (
        f"\n\nspeed-up of the {backend} scan (batched, torch-scan wall / {backend}-scan wall, same run): "
        f"**{speedup_vs_torch:.2f}x**; batched over sequential (same run): **{speedup:.2f}x**; returns "
        f"identical in {agree['identical_returns']} of {paired} paired episodes (max |difference| "
        f"{agree['max_abs_return_difference']:.3g})"
    )
    payload = {**header(SCRIPT, argv, args.device), "policy": source}
    payload |= {"num_parameters": policy.network.num_parameters(), "env": env, "mode": args.mode}
    payload |= {"target_return": target, **{k: getattr(args, k) for k in ("episodes", "num_envs", "seed")}}
    payload |= {"torch_threads": torch.get_num_threads(), "speedup": speedup, "scan_backend": backend}
    payload |= {"speedup_vs_torch_scan": speedup_vs_torch, "agreement": agree, "results": results}
    notes = [
        f"policy: {source}, {args.mode} mode, target return {target:g}, env {env}, torch threads "
        f"{torch.get_num_threads()}",
        "batched: dmm.trainer.evaluate.evaluate (SyncVectorEnv, one forward per step for all envs); "
        "sequential: one env, a fresh PolicyRunner(capacity=1) per episode, one forward per step",
        f"episode i starts from reset seed {args.seed}+i in both for the first {paired} episodes; "
        "batched and batch-1 forwards may round differently, and Hopper amplifies tiny differences",
    ]
    fig = figure(results, args, speedup, paired)
    write_report(args.out, SCRIPT, "Evaluation speed: batched vs sequential", table, payload, fig, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
