"""Policy step speed: ``PolicyRunner.step`` per scan backend, batch size and inference mode.

For every mode and batch size B, each backend gets a fresh runner with B slots; the runners step in
turn (backend 1, backend 2, backend 1, ...), so machine noise hits all backends alike. After
``--warmup`` untimed steps (past the context K, so window rows run full windows) come ``--steps``
timed ones; the median step time is reported. All backends see the same states and returns-to-go,
so their actions are compared too (max |difference| against the first backend). One process, one
policy; the policy's modules are shared, so each runner's step pins the scan backend first.

    python -m bench.step_speed                        # a fresh paper-size DMM, 1 thread
    python -m bench.step_speed --store models --name hopper-medium-sim-v4
    python -m bench.step_speed --quick
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
    default_out,
    fresh_policy,
    machine,
    markdown_table,
    median,
    new_figure,
    report_header,
    write_report,
)

SCRIPT = "step_speed"
MODULE = f"bench.{SCRIPT}"


def time_steps(policy: Any, mode: str, batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per backend: ``batch`` slots stepped ``args.warmup + args.steps`` times, interleaved."""
    from dmm.model import PolicyRunner

    slots = list(range(batch))
    runners = {backend: PolicyRunner(policy, mode, capacity=batch) for backend in args.backends}
    for runner in runners.values():
        runner.reset(slots)
    rng = np.random.default_rng(args.seed)
    total = args.warmup + args.steps
    states = rng.normal(size=(total, batch, policy.config.state_dim)).astype(np.float32)
    rtgs = np.linspace(policy.meta.target_return, 0.0, total, dtype=np.float32)
    seconds: dict[str, list[float]] = {backend: [] for backend in runners}
    actions: dict[str, list[np.ndarray]] = {backend: [] for backend in runners}
    for t in range(total):
        for backend, runner in runners.items():
            policy.model.set_scan_backend(backend)
            start = time.perf_counter()
            out = runner.step(slots, states[t], np.full(batch, rtgs[t], dtype=np.float32))
            if t >= args.warmup:
                seconds[backend].append(time.perf_counter() - start)
            actions[backend].append(out)
    rows = []
    for backend in runners:
        step_s = median(seconds[backend])
        rows.append(
            {
                "mode": mode,
                "batch": batch,
                "backend": backend,
                "step_seconds": seconds[backend],
                "median_step_ms": step_s * 1e3,
                "us_per_action": step_s * 1e6 / batch,
                "actions_per_second": batch / step_s,
                "actions": np.stack(actions[backend]),
            }
        )
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, help="model store (default: a freshly initialized policy)")
    p.add_argument("--name", help="model name in the store (with --store)")
    p.add_argument("--version", help="version (default: latest)")
    p.add_argument("--batches", type=int, nargs="+", help="slots per step (default 1 16 64 256; --quick 1 4)")
    p.add_argument("--modes", nargs="+", choices=("window", "recurrent"), default=["recurrent", "window"])
    p.add_argument(
        "--backends",
        nargs="+",
        choices=("torch", "numba"),
        default=["torch", "numba"],
        help="scan backends; the first is the reference (default: torch numba)",
    )
    p.add_argument("--steps", type=int, help="timed steps per row (default 50; 5 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 20; 10 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=default_out(SCRIPT))
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = p.parse_args(argv)
    if (args.store is None) != (args.name is None):
        p.error("--store and --name go together")
    args.batches = args.batches or ([1, 4] if args.quick else [1, 16, 64, 256])
    args.steps = args.steps or (5 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (10 if args.quick else 20)
    if min(args.batches) < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--batches, --steps and --threads must be positive, --warmup >= 0")
    return args


def load(args: argparse.Namespace) -> tuple[Any, str]:
    if args.store is None:
        return fresh_policy("dmm", FRESH_POLICY_ENV, args.seed, "cpu"), "freshly initialized paper-size DMM"
    from dmm.model import load_policy
    from dmm.store import ModelStore

    policy = load_policy(ModelStore(args.store), args.name, args.version)
    return policy, f"{policy.name} v{policy.version} from {args.store}"


def table(rows: list[dict[str, Any]], reference: str) -> str:
    ref = {(r["mode"], r["batch"]): r for r in rows if r["backend"] == reference}
    lines = []
    for r in rows:
        base = ref[(r["mode"], r["batch"])]
        r["x_reference"] = base["median_step_ms"] / r["median_step_ms"]
        r["max_action_difference"] = float(np.abs(r["actions"] - base["actions"]).max())
        lines.append(
            [
                r["mode"],
                r["batch"],
                r["backend"],
                f"{r['median_step_ms']:.3f}",
                f"{r['us_per_action']:.1f}",
                f"{r['actions_per_second']:.0f}",
                f"{r['x_reference']:.2f}",
                f"{r['max_action_difference']:.1e}",
            ]
        )
    headers = ["mode", "B", "scan", "ms/step (median)", "us/action", "actions/s"]
    return markdown_table([*headers, f"x {reference}", f"max abs action diff vs {reference}"], lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    policy, source = load(args)
    rows = []
    for mode in args.modes:
        for batch in args.batches:
            print(f"{mode}, B={batch}: {', '.join(args.backends)}...", file=sys.stderr, flush=True)
            rows += time_steps(policy, mode, batch, args)
    report = table(rows, args.backends[0])
    fig, axes = new_figure()
    ax = axes[0][0]
    for mode in args.modes:
        for backend in args.backends:
            pts = [r for r in rows if r["mode"] == mode and r["backend"] == backend]
            style = "-" if backend == args.backends[-1] else "--"
            ax.plot([r["batch"] for r in pts], [r["us_per_action"] for r in pts], style, marker="o")
            ax.lines[-1].set_label(f"{mode}, {backend}")
    ax.set(xscale="log", yscale="log", xlabel="slots per step (B)", ylabel="us per action (median step / B)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for r in rows:
        del r["actions"]
    payload = {
        **report_header(SCRIPT, argv, machine("cpu")),
        "model": source,
        "settings": {
            k: getattr(args, k) for k in ("batches", "modes", "backends", "steps", "warmup", "threads")
        },
        "rows": rows,
    }
    notes = [
        f"policy: {source}; torch threads {args.threads}; {args.warmup} untimed steps, then the median of "
        f"{args.steps} timed steps per row; a step = normalize, forward, read the actions back",
        f"x {args.backends[0]}: its median step time over this row's, same mode and B, steps interleaved",
    ]
    write_report(args.out, SCRIPT, "Policy step speed (PolicyRunner.step)", report, payload, fig, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
