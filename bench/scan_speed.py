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
from typing import Any

from bench.harness import format_table, header, median, new_figure, parse, parser, write_report

SCRIPT = "scan_speed"
SHAPES = {"training": (64, 24), "window": (256, 24), "recurrent": (256, 3)}  # (batch, tokens)
COLUMNS = (
    ("shape", "{shape}"),
    ("b x L", "{batch} x {tokens}"),
    ("direction", "{direction}"),
    ("scan", "{backend}"),
    ("ms (median)", "{median_ms:.2f}"),
    ("ms (min)", "{min_ms:.2f}"),
    ("x {reference}", "{x_reference:.2f}"),
    ("ns per state element", "{ns_per_state_element:.2f}"),
)


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


def time_backends(args: argparse.Namespace, shape: str, direction: str) -> list[dict[str, Any]]:
    """One row per backend for one shape and direction, the backends' calls alternating."""
    batch, tokens = SHAPES[shape]
    tensors = inputs(batch, tokens, args.d_inner, args.d_state, direction != "forward")
    runs = {b: call(b, tensors, direction != "forward") for b in args.backends}
    seconds: dict[str, list[float]] = {b: [] for b in runs}
    for rep in range(args.warmup + args.reps):
        for backend, run in runs.items():
            start = time.perf_counter()
            run()
            if rep >= args.warmup:
                seconds[backend].append(time.perf_counter() - start)
    ref, elements, rows = median(seconds[args.backends[0]]), batch * tokens * args.d_inner * args.d_state, []
    for backend, times in seconds.items():
        t = median(times)
        row = {"shape": shape, "batch": batch, "tokens": tokens, "direction": direction, "backend": backend}
        row |= {"median_ms": t * 1e3, "min_ms": min(times) * 1e3, "x_reference": ref / t}
        rows.append(row | {"ns_per_state_element": t * 1e9 / elements})
    return rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = parser(__doc__, SCRIPT, threads=1)
    p.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(SHAPES))
    backends = ("torch", "numba")
    p.add_argument("--backends", nargs="+", choices=backends, default=list(backends), help="first: reference")
    p.add_argument("--d-inner", type=int, default=128)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--reps", type=int, help="timed calls per backend (default 30; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=3)
    args = parse(p, argv, {"reps": (30, 3)}, positive=("reps", "threads"), non_negative=("warmup",))
    if args.quick:
        args.d_inner, args.d_state = 16, 4
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:  # inference shapes run without gradients
        for direction in ("forward", "forward+backward") if shape == "training" else ("forward",):
            rows += time_backends(args, shape, direction)
    ref = args.backends[0]
    fig, axes = new_figure(width=7.0)
    ax = axes[0][0]
    labels = [f"{r['shape']}\n{r['direction']}\n{r['backend']}" for r in rows]
    colors = ["tab:gray" if r["backend"] == ref else "tab:blue" for r in rows]
    ax.bar(labels, [r["median_ms"] for r in rows], color=colors)
    title = f"selective scan, d_inner {args.d_inner}, d_state {args.d_state}"
    ax.set(ylabel="ms per call (median)", yscale="log", title=title)
    ax.tick_params(axis="x", labelsize=7)
    settings = ("shapes", "backends", "d_inner", "d_state", "reps", "threads")
    payload = {**header(SCRIPT, argv), "settings": {k: getattr(args, k) for k in settings}, "rows": rows}
    notes = [
        f"one layer, float32, d_inner {args.d_inner}, d_state {args.d_state}, torch threads {args.threads}; "
        f"{args.warmup} untimed then {args.reps} timed calls per backend, backends alternating",
        "forward+backward: the scan, then backward of sum(y) + sum(last state) through all six inputs",
    ]
    columns = [(h.format(reference=ref), f) for h, f in COLUMNS]
    table = format_table(columns, rows)
    write_report(args.out, SCRIPT, "Selective scan speed (one layer)", table, payload, fig, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
