"""Serving latency and throughput: Act round trips against ``dmm serve`` under concurrent sessions.

Starts ``dmm serve`` as a subprocess on free ports (once with dynamic batching as configured, once
with ``--max-batch 1``) and drives 1/16/64/256 concurrent sessions (and 1024 with ``--device
cuda``) in window and recurrent mode. The sessions are grpc.aio streams spread over
``--client-procs`` client processes (``bench/serve_clients.py``): each sends a step, waits for its
action and records the round trip (closed loop). Every session
first takes ``--warmup`` untimed steps; then all are released at once and run until
``--duration`` seconds have passed or ``--steps`` timed steps are done, whichever comes first.

On a machine with 2 or more cores the client is pinned to ``--client-cores`` cores and the server
to the rest, so client load cannot starve the server; the CPU each side used is measured and
reported (cores busy = CPU seconds / wall seconds).

    python -m bench.serve                                      # a fresh paper-size DMM, CPU
    python -m bench.serve --store models --name hopper-medium-sim-v4 --device cuda
    python -m bench.serve --quick
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    FRESH_POLICY_ENV,
    default_out,
    fresh_policy,
    machine,
    markdown_table,
    new_figure,
    report_header,
    write_report,
)
from bench.serve_clients import Load, run_sessions

SCRIPT = "serve"
MODULE = f"bench.{SCRIPT}"
FRESH_NAME = "bench-dmm"


@dataclass
class Row:
    batching: str
    mode: str
    sessions: int
    latencies_s: np.ndarray = field(repr=False)
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    failed: int
    errors: list[str]
    scan: str = "auto"  # the server's --scan-backend
    server_gpu_mib: float | None = None  # the server process's GPU memory after the row (cuda only)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_s
        pct = {f"p{q}_us": float(np.percentile(lat, q) * 1e6) if lat.size else None for q in (50, 95, 99)}
        return {
            "scan": self.scan,
            "batching": self.batching,
            "mode": self.mode,
            "sessions": self.sessions,
            **pct,
            "mean_us": float(lat.mean() * 1e6) if lat.size else None,
            "timed_steps": int(lat.size),
            "wall_seconds": self.wall_s,
            "actions_per_second": lat.size / self.wall_s if self.wall_s > 0 else 0.0,
            "client_cores_busy": self.client_cpu_s / self.wall_s if self.wall_s > 0 else None,
            "server_cores_busy": self.server_cpu_s / self.wall_s if self.wall_s > 0 else None,
            "server_gpu_mib": self.server_gpu_mib,
            "failed_sessions": self.failed,
            "errors": self.errors[:5],
        }


def run_row(
    target: str,
    model: str,
    state_dim: int,
    batching: str,
    mode: str,
    sessions: int,
    args: argparse.Namespace,
    server_pid: int,
) -> Row:
    load = Load(target, model, mode, state_dim, args.warmup, args.steps, args.startup_timeout, args.duration)
    out = run_sessions(load, sessions, args.client_procs, server_pid)
    return Row(
        batching,
        mode,
        sessions,
        out.latencies_s,
        out.wall_s,
        out.client_cpu_s,
        out.server_cpu_s,
        out.failed,
        out.errors,
    )


def gpu_memory_mib(pid: int) -> float | None:
    """GPU memory ``nvidia-smi`` reports for process ``pid`` (its CUDA context included); None if unknown."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return float(fields[1])
    return None


def split_cores(client_cores: int) -> tuple[list[int], list[int]]:
    """(server cores, client cores); both the full set when there is nothing to split."""
    cores = sorted(os.sched_getaffinity(0))
    if client_cores <= 0 or client_cores >= len(cores):
        return cores, cores
    return cores[:-client_cores], cores[-client_cores:]


def prepare_store(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, int, str]:
    """(store, model name, state_dim, description): the given model, or a fresh one published to ``tmp``."""
    from dmm.model import publish_policy
    from dmm.store import ModelStore

    if args.store is not None:
        from dmm.model.checkpoint import policy_from_config

        config, _ = policy_from_config(ModelStore(args.store).read_config(args.name))
        return args.store, args.name, config.state_dim, f"{args.name} (latest) from {args.store}"
    policy = fresh_policy("dmm", FRESH_POLICY_ENV, 0, "cpu")
    publish_policy(ModelStore(tmp), FRESH_NAME, policy.model, policy.meta)
    return tmp, FRESH_NAME, policy.config.state_dim, "freshly initialized paper-size DMM (d=64, K=8)"


def run_all(
    args: argparse.Namespace, server_cores: list[int], client_cores: list[int]
) -> tuple[list[Row], dict[str, list[str]]]:
    """Every row: one server per scan backend and batching setting, each driven through all modes and
    session counts."""
    from dmm.server.testing import ServerProcess

    home = os.sched_getaffinity(0)
    rows: list[Row] = []
    server_args: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="dmm-bench-serve-") as tmp:
        store, model, state_dim, args.source = prepare_store(args, Path(tmp))
        common = ["--device", args.device, "--max-sessions", str(max(args.sessions) + 8)]
        if args.max_delay_ms is not None:
            common += ["--max-delay-ms", str(args.max_delay_ms)]
        for scan, batching in itertools.product(args.scan_backends, args.batching):
            extra = ["--max-batch", str(args.max_batch)] if args.max_batch else []
            config = f"{scan} scan, batching {batching}"
            server_args[config] = [*common, "--scan-backend", scan]
            server_args[config] += extra if batching == "on" else ["--max-batch", "1"]
            server = ServerProcess(
                store,
                server_args[config],
                startup_timeout_s=args.startup_timeout,
                # one torch thread per core it may use: more would spin against each other
                env={"OMP_NUM_THREADS": str(len(server_cores))},
            )
            os.sched_setaffinity(0, server_cores)  # the server process inherits this
            try:
                server.start()
            except RuntimeError as err:
                raise SystemExit(f"{MODULE}: {err}") from err
            finally:
                os.sched_setaffinity(0, client_cores)
            try:
                assert server.proc is not None
                for mode in args.modes:
                    for n in args.sessions:
                        print(f"{config}, {mode}, {n} sessions...", file=sys.stderr, flush=True)
                        row = run_row(
                            server.target, model, state_dim, batching, mode, n, args, server.proc.pid
                        )
                        row.scan = scan
                        if args.device == "cuda":
                            row.server_gpu_mib = gpu_memory_mib(server.proc.pid)
                        rows.append(row)
            finally:
                server.terminate()
                os.sched_setaffinity(0, home)
    return rows, server_args


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, help="model store (default: a fresh policy in a temporary store)")
    p.add_argument("--name", help="model name in the store (with --store)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="the server's device")
    p.add_argument("--sessions", type=int, nargs="+", help="default 1 16 64 256 (+1024 on cuda); --quick 1 4")
    p.add_argument("--modes", nargs="+", choices=("window", "recurrent"), default=["window", "recurrent"])
    p.add_argument("--batching", nargs="+", choices=("on", "off"), default=["on", "off"])
    p.add_argument(
        "--scan-backends",
        nargs="+",
        choices=("auto", "torch", "numba", "cuda"),
        default=["auto"],
        help="one server per scan backend; with torch among them, the others are compared to it "
        "(default: auto)",
    )
    p.add_argument(
        "--max-batch", type=int, help="--max-batch of the batching server (default: dmm serve's own)"
    )
    p.add_argument("--max-delay-ms", type=float, help="--max-delay-ms of the server (default: dmm serve's)")
    p.add_argument("--duration", type=float, help="timed seconds per row at most (default 10; 1 --quick)")
    p.add_argument("--steps", type=int, help="timed steps per session at most (default 5000; 200 --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps per session first (default 20; 3 --quick)")
    p.add_argument(
        "--client-cores",
        type=int,
        default=1,
        help="cores reserved for this client; the server gets the others (0: share all; default 1)",
    )
    p.add_argument(
        "--client-procs",
        type=int,
        help="client processes the sessions are spread over (default: one per client core)",
    )
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds for server start / warm-up")
    p.add_argument("--out", type=Path, default=default_out(SCRIPT))
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = p.parse_args(argv)
    q = args.quick
    if (args.store is None) != (args.name is None):
        p.error("--store and --name go together")
    args.sessions = args.sessions or (
        [1, 4] if q else [1, 16, 64, 256] + ([1024] if args.device == "cuda" else [])
    )
    args.duration = args.duration or (1.0 if q else 10.0)
    args.steps = args.steps or (200 if q else 5000)
    args.warmup = args.warmup if args.warmup is not None else (3 if q else 20)
    if min(args.sessions) < 1 or args.steps < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--sessions, --steps and --duration must be positive, --warmup >= 0")
    if args.max_batch is not None and args.max_batch < 1:
        p.error("--max-batch must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    info = machine(args.device)
    server_cores, client_cores = split_cores(args.client_cores)
    args.client_procs = args.client_procs or (1 if server_cores == client_cores else len(client_cores))
    rows, server_args = run_all(args, server_cores, client_cores)
    summaries = [r.summary() for r in rows]
    by_key = {(s["scan"], s["batching"], s["mode"], s["sessions"]): s for s in summaries}
    table_rows = []
    on_gpu = args.device == "cuda"
    for s in summaries:
        off = by_key.get((s["scan"], "off", s["mode"], s["sessions"]))
        ratio = "-"
        if s["batching"] == "on" and off and off["actions_per_second"]:
            s["throughput_vs_off"] = s["actions_per_second"] / off["actions_per_second"]
            ratio = f"{s['throughput_vs_off']:.2f}"
        torch_row = by_key.get(("torch", s["batching"], s["mode"], s["sessions"]))
        vs_torch = "-"
        if torch_row and torch_row["actions_per_second"]:
            s["throughput_vs_torch_scan"] = s["actions_per_second"] / torch_row["actions_per_second"]
            vs_torch = f"{s['throughput_vs_torch_scan']:.2f}"
        pct = [f"{s[k]:.0f}" if s[k] is not None else "-" for k in ("p50_us", "p95_us", "p99_us")]
        table_rows.append(
            [
                s["scan"],
                s["batching"],
                s["mode"],
                s["sessions"],
                *pct,
                f"{s['actions_per_second']:.0f}",
                ratio,
                vs_torch,
                f"{s['client_cores_busy']:.2f}" if s["client_cores_busy"] is not None else "-",
                f"{s['server_cores_busy']:.2f}" if s["server_cores_busy"] is not None else "-",
                *([f"{s['server_gpu_mib']:.0f}" if s["server_gpu_mib"] else "-"] if on_gpu else []),
                s["failed_sessions"],
            ]
        )
    table = markdown_table(
        [
            "scan",
            "batching",
            "mode",
            "sessions",
            "p50 us",
            "p95 us",
            "p99 us",
            "actions/s",
            "x batching off",
            "x torch scan",
            "client cores busy",
            "server cores busy",
            *(["server GPU MiB"] if on_gpu else []),
            "failed",
        ],
        table_rows,
    )
    fig, axes = new_figure(ncols=2, width=5.5)
    for scan, batching, mode in itertools.product(args.scan_backends, args.batching, args.modes):
        pts = [
            s
            for s in summaries
            if (s["scan"], s["batching"], s["mode"]) == (scan, batching, mode) and s["timed_steps"]
        ]
        label = f"{scan} scan, batching {batching}, {mode}"
        style = "-" if batching == "on" else "--"
        axes[0][0].plot(
            [s["sessions"] for s in pts],
            [s["actions_per_second"] for s in pts],
            style,
            marker="o",
            label=label,
        )
        axes[0][1].plot(
            [s["sessions"] for s in pts], [s["p99_us"] / 1e3 for s in pts], style, marker="o", label=label
        )
    for ax, ylabel in ((axes[0][0], "actions/s"), (axes[0][1], "p99 Act latency (ms)")):
        ax.set(xscale="log", xlabel="concurrent sessions", ylabel=ylabel)
        ax.set_xticks(args.sessions, [str(n) for n in args.sessions])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    payload = {
        **report_header(SCRIPT, argv, info),
        "model": args.source,
        "server_cores": server_cores,
        "client_cores": client_cores,
        "server_args": server_args,
        "settings": {
            k: getattr(args, k) for k in ("duration", "steps", "warmup", "sessions", "modes", "client_procs")
        },
        "rows": summaries,
    }
    shared = server_cores == client_cores
    notes = [
        f"model: {args.source}; server device {args.device}; server args: "
        + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in server_args.items()),
        f"cores: server {server_cores}, client {client_cores}"
        + (" (shared)" if shared else " (disjoint, pinned)")
        + f"; client = {args.client_procs} process(es), each an asyncio loop driving its share of the "
        "sessions as grpc.aio streams",
        f"latency = client-side round trip of one step (send state, receive action); {args.warmup} untimed "
        f"steps per session, then up to {args.duration:g} s or {args.steps} steps; percentiles over all "
        "timed steps of all sessions; actions/s = timed steps / wall time",
    ]
    notes += [
        f"{s['scan']} scan, batching {s['batching']}, {s['mode']}, {s['sessions']} sessions: "
        f"{s['failed_sessions']} failed, "
        f"e.g. {s['errors'][0]}"
        for s in summaries
        if s["failed_sessions"]
    ]
    write_report(args.out, SCRIPT, "Serving: Act latency and throughput", table, payload, fig, notes)
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
