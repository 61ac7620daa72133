"""Policy step speed with and without CUDA graphs: ``PolicyRunner``'s plain torch step against
:class:`~dmm.model.graphs.GraphedRunner` (one captured graph per power-of-two bucket), per inference
mode and batch size B, on one freshly initialized paper-size DMM.

For every mode and B, three runners with B slots step in turn on the same states and returns-to-go,
so machine noise hits all alike and their actions can be compared: plain, static (the graphed
runner's static-buffer step run eagerly: what the padding to a bucket and window mode's full K
columns cost) and graphed. The graphed runner's first step captures its bucket (timed apart, as
``first step``); after ``--warmup`` untimed steps (past the context K, so window rows run full
windows) come ``--steps`` timed ones. A step is what a server's batch costs: staging the inputs,
the forward, the actions back on the host. ``python -m bench.device`` runs it on a GPU host within
its ``serve`` step; on the CPU the graphed runner runs the static-buffer step eagerly too (what a dry
run rehearses).

    python -m tools.device.graph_speed --device cuda
    python -m tools.device.graph_speed --quick --out /tmp/graph-speed
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import FRESH_POLICY_ENV, fresh_policy
from bench.harness import command_line, format_table, machine, median, new_figure, now_utc, write_report

SCRIPT = "graph_speed"
MODULE = f"tools.device.{SCRIPT}"
COLUMNS = (
    ("mode", "{mode}"),
    ("B", "{batch}"),
    ("step", "{step}"),
    ("ms/step (median)", "{median_step_ms:.3f}"),
    ("p99 ms", "{p99_step_ms:.3f}"),
    ("actions/s", "{actions_per_second:.0f}"),
    ("x plain", "{x_plain:.2f}"),
    ("first step ms", "{first_step_ms:.1f}"),
    ("max abs action diff vs plain", "{max_action_difference:.1e}"),
)


def time_steps(policy: Any, mode: str, batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Three rows, plain, static and graphed: ``batch`` slots stepped ``1 + args.warmup + args.steps``
    times."""
    from dmm.model import GraphedRunner, PolicyRunner

    slots = list(range(batch))
    runners = {
        "plain": PolicyRunner(policy, mode, capacity=batch, recurrent_step="torch"),
        "static": GraphedRunner(policy, mode, capacity=batch, capture=False),
        "graphed": GraphedRunner(policy, mode, capacity=batch),
    }
    for runner in runners.values():
        runner.reset(slots)
    rng = np.random.default_rng(args.seed)
    total = 1 + args.warmup + args.steps
    states = rng.normal(size=(total, batch, policy.config.state_dim)).astype(np.float32)
    rtgs = np.linspace(policy.meta.target_return, 0.0, total, dtype=np.float32)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    actions: dict[str, list[np.ndarray]] = {name: [] for name in runners}
    for t in range(total):
        for name, runner in runners.items():
            start = time.perf_counter()
            out = runner.step(slots, states[t], np.full(batch, rtgs[t], dtype=np.float32))
            seconds[name].append(time.perf_counter() - start)
            actions[name].append(out)
    rows = []
    for name, runner in runners.items():
        timed = seconds[name][1 + args.warmup :]
        step_s = median(timed)
        rows.append(
            {
                "mode": mode,
                "batch": batch,
                "step": name,
                "median_step_ms": step_s * 1e3,
                "p99_step_ms": float(np.percentile(timed, 99)) * 1e3,
                "actions_per_second": batch / step_s,
                "first_step_ms": seconds[name][0] * 1e3,
                "step_seconds": timed,
                "graphs": getattr(runner, "graphs_captured", []),
                "actions": np.stack(actions[name]),
            }
        )
    plain = rows[0]
    for r in rows:
        r["x_plain"] = plain["median_step_ms"] / r["median_step_ms"]
        r["max_action_difference"] = float(np.abs(r["actions"] - plain["actions"]).max())
    for r in rows:
        del r["actions"]
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (B 1 4, few steps)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--batches", type=int, nargs="+", help="slots per step (default 1 32 256 1024; quick 1 4)")
    p.add_argument("--modes", nargs="+", choices=("window", "recurrent"), default=["recurrent", "window"])
    p.add_argument("--steps", type=int, help="timed steps per row (default 100; 3 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps after the first (default 20; 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    defaults = {"batches": ([1, 32, 256, 1024], [1, 4]), "steps": (100, 3), "warmup": (20, 2)}
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.batches) < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--batches and --steps must be positive, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    policy = fresh_policy("dmm", FRESH_POLICY_ENV, args.seed, args.device)
    rows = []
    for mode in args.modes:
        for batch in args.batches:
            print(f"{mode}, B={batch}: plain, graphed...", file=sys.stderr, flush=True)
            rows += time_steps(policy, mode, batch, args)
    fig, axes = new_figure()
    ax = axes[0][0]
    for mode in args.modes:
        for step in ("plain", "static", "graphed"):
            pts = [r for r in rows if r["mode"] == mode and r["step"] == step]
            style = {"plain": "--", "static": ":", "graphed": "-"}[step]
            ax.plot([r["batch"] for r in pts], [r["median_step_ms"] for r in pts], style, marker="o")
            ax.lines[-1].set_label(f"{mode}, {step}")
    ax.set(xscale="log", yscale="log", xlabel="slots per step (B)", ylabel="ms per step (median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    settings = {k: getattr(args, k) for k in ("batches", "modes", "steps", "warmup", "threads")}
    payload = {
        **{"script": SCRIPT, "machine": machine(args.device), "date": now_utc()},
        **{"command": command_line(MODULE, argv), "settings": settings, "peak_gpu_mib": gpu_mib},
        "rows": rows,
    }
    graphed = "one CUDA graph per power-of-two bucket" if args.device == "cuda" else "run eagerly (no GPU)"
    notes = [
        f"policy: freshly initialized paper-size DMM ({FRESH_POLICY_ENV}); torch threads {args.threads}; "
        f"the median (and p99) of {args.steps} timed steps per row after {args.warmup} untimed ones",
        "plain: PolicyRunner's torch step (recurrent_step='torch'); static: GraphedRunner's static-buffer "
        "step (dmm/model/graphs.py: power-of-two buckets, window mode over all K columns) run eagerly; "
        f"graphed: the same, {graphed}; the three steps interleaved",
        "first step: the runner's first step, which for graphed includes warming up and capturing its bucket",
    ]
    if gpu_mib is not None:
        notes.append(f"peak GPU memory allocated by torch over all rows: {gpu_mib:.0f} MiB")
    table = format_table(COLUMNS, rows)
    write_report(args.out, SCRIPT, "Policy step speed with CUDA graphs", table, payload, fig, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
