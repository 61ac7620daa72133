"""Scan speed: the selective scan alone, per backend, forward and forward + backward.

Shapes are those the model runs: a training batch (64 windows of 24 tokens), window inference
(256 x 24) and a recurrent step (256 x 3), all with d_inner 128 and d_state 16, float32, one layer.
Backends alternate call by call, so machine noise hits them alike; medians are reported.

    python -m bench.scan_speed
    python -m bench.scan_speed --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    default_out,
    machine,
    markdown_table,
    median,
    new_figure,
    report_header,
    write_report,
)

SCRIPT = "scan_speed"
MODULE = f"bench.{SCRIPT}"
SHAPES = {"training": (64, 24), "window": (256, 24), "recurrent": (256, 3)}  # (batch, tokens)


def inputs(batch: int, tokens: int, d_inner: int, d_state: int, grad: bool) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, tokens, d_inner, generator=g)
    delta = torch.nn.functional.softplus(torch.randn(batch, tokens, d_inner, generator=g) - 2)
    A = -torch.exp(torch.randn(d_inner, d_state, generator=g))
    B, C = (torch.randn(batch, tokens, d_state, generator=g) for _ in range(2))
    D = torch.randn(d_inner, generator=g)
    return [t.requires_grad_(grad) for t in (u, delta, A, B, C, D)]


def call(backend: str, args: list[Any], backward: bool) -> Callable[[], None]:
    import torch

    from dmm.model.scan import selective_scan

    def run() -> None:
        if backward:
            y, h = selective_scan(*args, backend=backend)
            (y.sum() + h.sum()).backward()
        else:
            with torch.no_grad():
                selective_scan(*args, backend=backend)

    return run


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for shape in args.shapes:
        batch, tokens = SHAPES[shape]
        for direction in ("forward", "forward+backward"):
            backward = direction != "forward"
            if backward and shape != "training":
                continue  # inference shapes run without gradients
            tensors = inputs(batch, tokens, args.d_inner, args.d_state, backward)
            runs = {b: call(b, tensors, backward) for b in args.backends}
            seconds: dict[str, list[float]] = {b: [] for b in runs}
            for rep in range(args.warmup + args.reps):
                for backend, run in runs.items():
                    start = time.perf_counter()
                    run()
                    if rep >= args.warmup:
                        seconds[backend].append(time.perf_counter() - start)
            ref = median(seconds[args.backends[0]])
            for backend, times in seconds.items():
                rows.append(
                    {
                        "shape": shape,
                        "batch": batch,
                        "tokens": tokens,
                        "direction": direction,
                        "backend": backend,
                        "median_ms": median(times) * 1e3,
                        "min_ms": min(times) * 1e3,
                        "x_reference": ref / median(times),
                        "ns_per_state_element": median(times)
                        * 1e9
                        / (batch * tokens * args.d_inner * args.d_state),
                    }
                )
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    p.add_argument(
        "--backends",
        nargs="+",
        choices=("torch", "numba"),
        default=["torch", "numba"],
        help="first: reference",
    )
    p.add_argument("--d-inner", type=int, default=128)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--reps", type=int, help="timed calls per backend (default 30; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", type=Path, default=default_out(SCRIPT))
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = p.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 30)
    if args.quick:
        args.d_inner, args.d_state = 16, 4
    if args.reps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--reps and --threads must be positive, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = measure(args)
    ref = args.backends[0]
    table = markdown_table(
        [
            "shape",
            "b x L",
            "direction",
            "scan",
            "ms (median)",
            "ms (min)",
            f"x {ref}",
            "ns per state element",
        ],
        [
            [
                r["shape"],
                f"{r['batch']} x {r['tokens']}",
                r["direction"],
                r["backend"],
                f"{r['median_ms']:.2f}",
                f"{r['min_ms']:.2f}",
                f"{r['x_reference']:.2f}",
                f"{r['ns_per_state_element']:.2f}",
            ]
            for r in rows
        ],
    )
    fig, axes = new_figure(width=7.0)
    ax = axes[0][0]
    labels = [f"{r['shape']}\n{r['direction']}\n{r['backend']}" for r in rows]
    ax.bar(
        labels,
        [r["median_ms"] for r in rows],
        color=["tab:gray" if r["backend"] == ref else "tab:blue" for r in rows],
    )
    ax.set(
        ylabel="ms per call (median)",
        yscale="log",
        title=f"selective scan, d_inner {args.d_inner}, d_state {args.d_state}",
    )
    ax.tick_params(axis="x", labelsize=7)
    payload = {
        **report_header(SCRIPT, argv, machine("cpu")),
        "settings": {
            k: getattr(args, k) for k in ("shapes", "backends", "d_inner", "d_state", "reps", "threads")
        },
        "rows": rows,
    }
    notes = [
        f"one layer, float32, d_inner {args.d_inner}, d_state {args.d_state}, torch threads {args.threads}; "
        f"{args.warmup} untimed then {args.reps} timed calls per backend, backends alternating",
        "forward+backward: the scan, then backward of sum(y) + sum(last state) through all six inputs",
    ]
    write_report(args.out, SCRIPT, "Selective scan speed (one layer)", table, payload, fig, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
