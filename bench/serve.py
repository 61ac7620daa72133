"""Serving latency and throughput: Act round trips against ``dmm serve`` under concurrent sessions.

Starts ``dmm serve`` as a subprocess on free ports (once with dynamic batching as configured, once
with ``--max-batch 1``, and once per ``--workers`` count) and drives 1/16/64/256 concurrent episodes
(and 1024 with ``--device cuda``) in window and recurrent mode, as single-episode Act streams and,
with ``--episodes-per-stream``, as ActVector streams of that many episodes each. The streams are
grpc.aio streams spread over ``--client-procs`` client processes (``bench/serve_clients.py``), each
on its own connection: each sends a step (of all its episodes), waits for the actions and records
the round trip (closed loop). Every stream first takes ``--warmup`` untimed steps; then all are
released at once and run until ``--duration`` seconds have passed or ``--steps`` timed steps are
done, whichever comes first.

On a machine with 2 or more cores the client is pinned to ``--client-cores`` cores and the server
to the rest, so client load cannot starve the server; the CPU each side used is measured and
reported (cores busy = CPU seconds / wall seconds).

    python -m bench.serve                                      # a fresh paper-size DMM, CPU
    python -m bench.serve --store models --name hopper-medium-sim-v4 --device cuda
    python -m bench.serve --batching on --episodes-per-stream 1 32 --sessions 256
    python -m bench.serve --device cuda --workers 1 2 4 8 --sessions 1024 --batching on
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
from bench.serve_clients import Load, process_tree, run_sessions

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
    workers: int = 1  # the server's --workers
    per_stream: int = 1  # episodes per stream (1: Act streams, more: ActVector streams)
    server_gpu_mib: float | None = None  # the server process's GPU memory after the row (cuda only)

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_s
        actions = lat.size * self.per_stream
        pct = {f"p{q}_us": float(np.percentile(lat, q) * 1e6) if lat.size else None for q in (50, 95, 99)}
        return {
            "scan": self.scan,
            "batching": self.batching,
            "workers": self.workers,
            "mode": self.mode,
            "sessions": self.sessions,
            "episodes_per_stream": self.per_stream,
            **pct,
            "mean_us": float(lat.mean() * 1e6) if lat.size else None,
            "timed_steps": int(lat.size),
            "wall_seconds": self.wall_s,
            "actions_per_second": actions / self.wall_s if self.wall_s > 0 else 0.0,
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
    per_stream: int,
    args: argparse.Namespace,
    server_pid: int,
) -> Row:
    load = Load(
        target,
        model,
        mode,
        state_dim,
        args.warmup,
        args.steps,
        args.startup_timeout,
        args.duration,
        per_stream,
    )
    out = run_sessions(load, max(1, sessions // per_stream), args.client_procs, server_pid)
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
        per_stream=per_stream,
    )


def gpu_memory_mib(pid: int) -> float | None:
    """GPU memory ``nvidia-smi`` reports for process ``pid`` and its children (a server's workers; their
    CUDA contexts included); None if unknown."""
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
    tree = {str(p) for p in process_tree(pid)}
    used = [
        float(fields[1])
        for fields in ([f.strip() for f in line.split(",")] for line in out.splitlines())
        if len(fields) == 2 and fields[0] in tree and fields[1].isdigit()
    ]
    return sum(used) if used else None


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
        for scan, batching, workers in itertools.product(args.scan_backends, args.batching, args.workers):
            extra = ["--max-batch", str(args.max_batch)] if args.max_batch else []
            config = f"{scan} scan, batching {batching}, {workers} worker(s)"
            server_args[config] = [*common, "--scan-backend", scan, "--workers", str(workers)]
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
                for mode, n, per in itertools.product(args.modes, args.sessions, args.episodes_per_stream):
                    if per > n:
                        continue
                    print(f"{config}, {mode}, {n} episodes, {per} per stream...", file=sys.stderr, flush=True)
                    row = run_row(
                        server.target, model, state_dim, batching, mode, n, per, args, server.proc.pid
                    )
                    row.scan, row.workers = scan, workers
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
        "--episodes-per-stream",
        type=int,
        nargs="+",
        default=[1],
        help="1: one Act stream per episode; more: ActVector streams of that many episodes (default 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="one server per dmm serve --workers count (default 1)",
    )
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
    if min(args.episodes_per_stream) < 1 or min(args.workers) < 1:
        p.error("--episodes-per-stream and --workers must be positive")
    if args.max_batch is not None and args.max_batch < 1:
        p.error("--max-batch must be positive")
    return args


def _curve(s: dict[str, Any]) -> tuple:
    return (s["scan"], s["batching"], s["workers"], s["episodes_per_stream"], s["mode"])


def add_ratios(s: dict[str, Any], summaries: list[dict[str, Any]]) -> list[str]:
    """Throughput of row ``s`` over the rows that differ from it in one setting only (batching off, the
    torch scan, one episode per stream, one worker): stored in ``s`` and returned as table cells."""
    key = ("scan", "batching", "workers", "mode", "sessions", "episodes_per_stream")
    by_key = {tuple(r[k] for k in key): r for r in summaries}
    cells = []
    for name, setting, base in (
        ("throughput_vs_off", "batching", "off"),
        ("throughput_vs_torch_scan", "scan", "torch"),
        ("throughput_vs_one_per_stream", "episodes_per_stream", 1),
        ("throughput_vs_one_worker", "workers", 1),
    ):
        other = by_key.get(tuple(base if k == setting else s[k] for k in key))
        if s[setting] == base or not other or not other["actions_per_second"]:
            cells.append("-")
            continue
        s[name] = s["actions_per_second"] / other["actions_per_second"]
        cells.append(f"{s[name]:.2f}")
    return cells


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    info = machine(args.device)
    server_cores, client_cores = split_cores(args.client_cores)
    args.client_procs = args.client_procs or (1 if server_cores == client_cores else len(client_cores))
    rows, server_args = run_all(args, server_cores, client_cores)
    summaries = [r.summary() for r in rows]
    table_rows = []
    on_gpu = args.device == "cuda"
    for s in summaries:
        ratios = add_ratios(s, summaries)
        pct = [f"{s[k]:.0f}" if s[k] is not None else "-" for k in ("p50_us", "p95_us", "p99_us")]
        table_rows.append(
            [
                s["scan"],
                s["batching"],
                s["workers"],
                s["mode"],
                s["sessions"],
                s["episodes_per_stream"],
                *pct,
                f"{s['actions_per_second']:.0f}",
                *ratios,
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
            "workers",
            "mode",
            "episodes",
            "per stream",
            "p50 us",
            "p95 us",
            "p99 us",
            "actions/s",
            "x batching off",
            "x torch scan",
            "x 1 per stream",
            "x 1 worker",
            "client cores busy",
            "server cores busy",
            *(["server GPU MiB"] if on_gpu else []),
            "failed",
        ],
        table_rows,
    )
    fig, axes = new_figure(ncols=2, width=5.5)
    curves = itertools.product(
        args.scan_backends, args.batching, args.workers, args.episodes_per_stream, args.modes
    )
    for scan, batching, workers, per, mode in curves:
        key = (scan, batching, workers, per, mode)
        pts = [s for s in summaries if _curve(s) == key and s["timed_steps"]]
        label = f"{scan} scan, batching {batching}, {workers} worker(s), {per}/stream, {mode}"
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
        ax.set(xscale="log", xlabel="concurrent episodes", ylabel=ylabel)
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
            k: getattr(args, k)
            for k in (
                "duration",
                "steps",
                "warmup",
                "sessions",
                "modes",
                "client_procs",
                "episodes_per_stream",
                "workers",
            )
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
        f"latency = client-side round trip of one step (send the state(s), receive the action(s)); "
        f"{args.warmup} untimed steps per stream, then up to {args.duration:g} s or {args.steps} steps; "
        "percentiles over all timed steps of all streams; actions/s = timed steps x episodes per stream / "
        "wall time; 'per stream' 1 = one Act stream per episode, N = ActVector streams of N episodes",
    ]
    notes += [
        f"{s['scan']} scan, batching {s['batching']}, {s['workers']} worker(s), {s['mode']}, "
        f"{s['sessions']} episodes, {s['episodes_per_stream']} per stream: "
        f"{s['failed_sessions']} failed, "
        f"e.g. {s['errors'][0]}"
        for s in summaries
        if s["failed_sessions"]
    ]
    write_report(args.out, SCRIPT, "Serving: Act latency and throughput", table, payload, fig, notes)
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
