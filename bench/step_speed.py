"""Policy step speed: ``PolicyRunner.step`` per step backend, batch size and inference mode.

Backends: ``torch`` (the torch step, torch scan), ``numba`` (the torch step, numba scan) and
``fused`` (the whole step as one numba kernel, :mod:`dmm.model.step_numba`: the runner's default
step on the CPU in both modes). For every mode and batch size B, each backend gets a
fresh runner with B slots; the runners step in turn (backend 1, backend 2, backend 1, ...), so
machine noise hits all backends alike. After ``--warmup`` untimed steps (past the context K, so
window rows run full windows) come ``--steps`` timed ones; the median step time is reported. All
backends see the same states and returns-to-go, so their actions are compared too (max |difference|
against the first backend). One process, one policy; the policy's modules are shared, so each torch
runner's step pins the scan backend first.

    python -m bench.step_speed                        # a fresh paper-size DMM, 1 thread
    python -m bench.step_speed --store models --name hopper-medium-sim-v4
    python -m bench.step_speed --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import FRESH_POLICY_ENV, fresh_policy
from bench.harness import format_table, header, median, new_figure, parse, parser, write_report

SCRIPT = "step_speed"
COLUMNS = (
    ("mode", "{mode}"),
    ("B", "{batch}"),
    ("step", "{backend}"),
    ("ms/step (median)", "{median_step_ms:.3f}"),
    ("cpu ms/step (median)", "{median_cpu_ms:.3f}"),
    ("us/action", "{us_per_action:.1f}"),
    ("actions/s", "{actions_per_second:.0f}"),
    ("x {reference}", "{x_reference:.2f}"),
    ("x {reference} (cpu)", "{x_reference_cpu:.2f}"),
    ("max abs action diff vs {reference}", "{max_action_difference:.1e}"),
)


def time_steps(policy: Any, mode: str, batch: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per backend: ``batch`` slots stepped ``args.warmup + args.steps`` times, interleaved."""
    from dmm.model import PolicyRunner

    slots = list(range(batch))
    backends = list(args.backends)
    runners = {
        b: PolicyRunner(policy, mode, capacity=batch, recurrent_step="fused" if b == "fused" else "torch")
        for b in backends
    }
    for runner in runners.values():
        runner.reset(slots)
    rng = np.random.default_rng(args.seed)
    total = args.warmup + args.steps
    states = rng.normal(size=(total, batch, policy.config.state_dim)).astype(np.float32)
    rtgs = np.linspace(policy.meta.target_return, 0.0, total, dtype=np.float32)
    seconds: dict[str, list[float]] = {backend: [] for backend in runners}
    cpu: dict[str, list[float]] = {backend: [] for backend in runners}
    actions: dict[str, list[np.ndarray]] = {backend: [] for backend in runners}
    for t in range(total):
        for backend, runner in runners.items():
            if backend != "fused":
                policy.network.set_scan_backend(backend)
            start, start_cpu = time.perf_counter(), time.thread_time()
            out = runner.step(slots, states[t], np.full(batch, rtgs[t], dtype=np.float32))
            if t >= args.warmup:
                seconds[backend].append(time.perf_counter() - start)
                cpu[backend].append(time.thread_time() - start_cpu)
            actions[backend].append(out)
    rows = []
    for backend in runners:
        step_s = median(seconds[backend])
        rows.append(
            {
                **{"mode": mode, "batch": batch, "backend": backend, "step_seconds": seconds[backend]},
                "median_step_ms": step_s * 1e3,
                "median_cpu_ms": median(cpu[backend]) * 1e3,
                "us_per_action": step_s * 1e6 / batch,
                "actions_per_second": batch / step_s,
                "actions": np.stack(actions[backend]),
            }
        )
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = parser(__doc__, SCRIPT, threads=1, store=True)
    p.add_argument("--batches", type=int, nargs="+", help="slots per step (default 1 16 64 256; --quick 1 4)")
    p.add_argument("--modes", nargs="+", choices=("window", "recurrent"), default=["recurrent", "window"])
    p.add_argument(
        "--backends",
        nargs="+",
        choices=("torch", "numba", "fused"),
        default=["torch", "numba", "fused"],
        help="torch or numba: the torch step with that scan backend; fused: the fused numba step; "
        "the first is the reference (default: torch numba fused)",
    )
    p.add_argument("--steps", type=int, help="timed steps per row (default 50; 5 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 20; 10 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    defaults = {"batches": ([1, 16, 64, 256], [1, 4]), "steps": (50, 5), "warmup": (20, 10)}
    return parse(p, argv, defaults, positive=("batches", "steps", "threads"), non_negative=("warmup",))


def load(args: argparse.Namespace) -> tuple[Any, str]:
    if args.store is None:
        return fresh_policy("dmm", FRESH_POLICY_ENV, args.seed, "cpu"), "freshly initialized paper-size DMM"
    from dmm.model import load_policy
    from dmm.store import ModelStore

    policy = load_policy(ModelStore(args.store), args.name, args.version)
    return policy, f"{policy.name} v{policy.version} from {args.store}"


def compare(rows: list[dict[str, Any]], reference: str) -> None:
    """Each row's speed-up over the reference backend's row (same mode and B) and its largest action
    difference from it; the actions themselves are dropped (too big for the report)."""
    ref = {(r["mode"], r["batch"]): r for r in rows if r["backend"] == reference}
    for r in rows:
        base = ref[(r["mode"], r["batch"])]
        r["x_reference"] = base["median_step_ms"] / r["median_step_ms"]
        r["x_reference_cpu"] = base["median_cpu_ms"] / r["median_cpu_ms"]
        r["max_action_difference"] = float(np.abs(r["actions"] - base["actions"]).max())
    for r in rows:
        del r["actions"]


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
    reference = args.backends[0]
    compare(rows, reference)
    fig, axes = new_figure()
    ax = axes[0][0]
    for mode in args.modes:
        for backend in args.backends:
            pts = [r for r in rows if r["mode"] == mode and r["backend"] == backend]
            if not pts:
                continue
            style = "-" if backend == args.backends[-1] else "--"
            ax.plot([r["batch"] for r in pts], [r["us_per_action"] for r in pts], style, marker="o")
            ax.lines[-1].set_label(f"{mode}, {backend}")
    ax.set(xscale="log", yscale="log", xlabel="slots per step (B)", ylabel="us per action (median step / B)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    settings = {k: getattr(args, k) for k in ("batches", "modes", "backends", "steps", "warmup", "threads")}
    payload = {**header(SCRIPT, argv), "model": source, "settings": settings, "rows": rows}
    notes = [
        f"policy: {source}; torch threads {args.threads}; {args.warmup} untimed steps, then the median of "
        f"{args.steps} timed steps per row; a step = normalize, forward, read the actions back",
        f"x {reference}: its median step time over this row's, same mode and B, steps interleaved; "
        "cpu: the calling thread's CPU time (time.thread_time; every backend computes on that one "
        "thread), which a shared machine's other processes disturb less than the wall clock",
        "step torch / numba: the eager torch step (PolicyNetwork.step, or in window mode the forward over "
        "the last K steps) with that scan backend; fused: the whole step as one numba kernel "
        "(dmm/model/step_numba.py), the runner's default on the CPU in both modes",
    ]
    table = format_table([(h.format(reference=reference), f) for h, f in COLUMNS], rows)
    write_report(args.out, SCRIPT, "Policy step speed (PolicyRunner.step)", table, payload, fig, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
