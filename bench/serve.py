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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import FRESH_POLICY_ENV, fresh_policy
from bench.harness import header, markdown_table, new_figure, parse, parser, write_report
from bench.serve_clients import EchoServer, Load, Outcome, process_tree, run_sessions

SCRIPT = "serve"
MODULE = f"bench.{SCRIPT}"
FRESH_NAME = "bench-dmm"
SETTINGS = (
    "duration",
    "steps",
    "warmup",
    "sessions",
    "modes",
    "client_procs",
    "episodes_per_stream",
    "workers",
)
KEY = ("scan", "batching", "workers", "mode", "sessions", "episodes_per_stream")  # a row's settings
HEADERS = ("scan", "batching", "workers", "mode", "episodes", "per stream", "p50 us", "p95 us", "p99 us")
HEADERS += ("x echo p50", "actions/s", "x batching off", "x torch scan", "x 1 per stream", "x 1 worker")
HEADERS += ("client cores busy", "server cores busy")
RATIOS = (  # (key, the setting that differs, its value in the row compared against)
    ("throughput_vs_off", "batching", "off"),
    ("throughput_vs_torch_scan", "scan", "torch"),
    ("throughput_vs_one_per_stream", "episodes_per_stream", 1),
    ("throughput_vs_one_worker", "workers", 1),
)


@dataclass
class Row:
    """One measured row: its server's and load's settings (scan, batching, workers, mode, sessions,
    episodes_per_stream) and what the clients saw."""

    settings: dict[str, Any]
    out: Outcome
    server_gpu_mib: float | None = None  # the server process's GPU memory after the row (cuda only)

    def summary(self) -> dict[str, Any]:
        lat, wall, per = self.out.latencies_s, self.out.wall_s, self.settings["episodes_per_stream"]
        pct = {f"p{q}_us": float(np.percentile(lat, q) * 1e6) if lat.size else None for q in (50, 95, 99)}
        return {
            **self.settings,
            **pct,
            "mean_us": float(lat.mean() * 1e6) if lat.size else None,
            "timed_steps": int(lat.size),
            "wall_seconds": wall,
            "actions_per_second": lat.size * per / wall if wall > 0 else 0.0,
            "client_cores_busy": self.out.client_cpu_s / wall if wall > 0 else None,
            "server_cores_busy": self.out.server_cpu_s / wall if wall > 0 else None,
            "server_gpu_mib": self.server_gpu_mib,
            "failed_sessions": self.out.failed,
            "errors": self.out.errors[:5],
        }


def gpu_memory_mib(pid: int) -> float | None:
    """GPU memory ``nvidia-smi`` reports for process ``pid`` and its children (a server's workers; their
    CUDA contexts included); None if unknown."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
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


def prepare_store(args: argparse.Namespace, tmp: Path) -> tuple[Path, str, Any, str]:
    """(store, model name, its DMMConfig, description): the given model, or a fresh one published to
    ``tmp``."""
    from dmm.model import publish_policy
    from dmm.store import ModelStore

    if args.store is not None:
        from dmm.model.checkpoint import policy_from_config

        config, _ = policy_from_config(ModelStore(args.store).read_config(args.name))
        return args.store, args.name, config, f"{args.name} (latest) from {args.store}"
    policy = fresh_policy("dmm", FRESH_POLICY_ENV, 0, "cpu")
    publish_policy(ModelStore(tmp), FRESH_NAME, policy.network, policy.meta)
    return tmp, FRESH_NAME, policy.config, "freshly initialized paper-size DMM (d=64, K=8)"


def pinned(start: Callable[[], Any], cores: tuple[list[int], list[int]]) -> Any:
    """``start()`` a server process pinned to the server cores (it inherits this process's affinity),
    then pin this process to the client cores."""
    os.sched_setaffinity(0, cores[0])
    try:
        return start()
    except RuntimeError as err:
        raise SystemExit(f"{MODULE}: {err}") from err
    finally:
        os.sched_setaffinity(0, cores[1])


def start_server(store: Path, server_args: list[str], args: argparse.Namespace, cores: Any) -> Any:
    """A started ``dmm serve`` on the server cores, with one torch thread per core it may use (more
    would spin against each other)."""
    from dmm.server.testing import ServerProcess

    env = {"OMP_NUM_THREADS": str(len(cores[0]))}
    return pinned(
        ServerProcess(store, server_args, startup_timeout_s=args.startup_timeout, env=env).start, cores
    )


def drive(
    server: Any, model: str, state_dim: int, settings: dict[str, Any], args: argparse.Namespace
) -> list[Row]:
    """Every (mode, sessions, episodes per stream) row against one server (an echo server: one mode)."""
    rows = []
    modes = args.modes if settings["scan"] != "echo" else ["echo"]
    for mode, n, per in itertools.product(modes, args.sessions, args.episodes_per_stream):
        if per > n:
            continue
        row_settings = {**settings, "mode": mode, "sessions": n}
        print(
            ", ".join(f"{k} {v}" for k, v in row_settings.items()) + f", {per} per stream...", file=sys.stderr
        )
        timing = (args.warmup, args.steps, args.startup_timeout, args.duration)
        load = Load(server.target, model, "recurrent" if mode == "echo" else mode, state_dim, *timing, per)
        out = run_sessions(load, max(1, n // per), args.client_procs, server.proc.pid)
        row = Row({**row_settings, "episodes_per_stream": per}, out)
        if args.device == "cuda" and mode != "echo":
            row.server_gpu_mib = gpu_memory_mib(server.proc.pid)
        rows.append(row)
    return rows


def drive_echo(model: str, config: Any, args: argparse.Namespace, cores: Any) -> list[Row]:
    """The baseline rows: the same streams against a bare grpc.aio echo server on the server cores."""
    echo = pinned(lambda: EchoServer(model, config.act_dim, args.startup_timeout), cores)
    try:
        return drive(echo, model, config.state_dim, {"scan": "echo", "batching": "-", "workers": 1}, args)
    finally:
        echo.terminate()


def run_all(
    args: argparse.Namespace, cores: tuple[list[int], list[int]]
) -> tuple[list[Row], list[Row], dict[str, list[str]]]:
    """Every row: one server per scan backend, batching setting and worker count, each driven through
    all modes and session counts; then (unless --no-echo) the echo rows."""
    home = os.sched_getaffinity(0)
    rows: list[Row] = []
    server_args: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="dmm-bench-serve-") as tmp:
        store, model, config, args.source = prepare_store(args, Path(tmp))
        common = ["--device", args.device, "--max-sessions", str(max(args.sessions) + 8)]
        common += ["--max-delay-ms", str(args.max_delay_ms)] if args.max_delay_ms is not None else []
        for scan, batching, workers in itertools.product(args.scan_backends, args.batching, args.workers):
            config_name = f"{scan} scan, batching {batching}, {workers} worker(s)"
            # one worker: dmm serve's own single process (a --workers count makes it a supervisor)
            several = ["--workers", str(workers)] if workers > 1 else []
            server_args[config_name] = [*common, "--scan-backend", scan, *several]
            on = ["--max-batch", str(args.max_batch)] if args.max_batch else []
            server_args[config_name] += on if batching == "on" else ["--max-batch", "1"]
            server = start_server(store, server_args[config_name], args, cores)
            settings = {"scan": scan, "batching": batching, "workers": workers}
            try:
                rows += drive(server, model, config.state_dim, settings, args)
            finally:
                server.terminate()
                os.sched_setaffinity(0, home)
        echo = drive_echo(model, config, args, cores) if args.echo else []
        os.sched_setaffinity(0, home)
    return rows, echo, server_args


def defaults(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """(full, --quick) defaults; on a GPU 1024 sessions too."""
    sessions = [1, 16, 64, 256] + ([1024] if args.device == "cuda" else [])
    return {"sessions": (sessions, [1, 4]), "duration": (10.0, 1.0), "steps": (5000, 200), "warmup": (20, 3)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = parser(__doc__, SCRIPT, device=True)
    p.add_argument("--store", type=Path, help="model store (default: a fresh policy in a temporary store)")
    p.add_argument("--name", help="model name in the store (with --store)")
    p.add_argument("--sessions", type=int, nargs="+", help="default 1 16 64 256 (+1024 on cuda); --quick 1 4")
    p.add_argument("--modes", nargs="+", choices=("window", "recurrent"), default=["window", "recurrent"])
    p.add_argument("--batching", nargs="+", choices=("on", "off"), default=["on", "off"])
    per_stream = "1: one Act stream per episode; more: ActVector streams of that many episodes (default 1)"
    p.add_argument("--episodes-per-stream", type=int, nargs="+", default=[1], help=per_stream)
    p.add_argument(
        "--workers", type=int, nargs="+", default=[1], help="one server per dmm serve --workers count"
    )
    scans = "one server per scan backend; the others are compared to torch where it is one (default: auto)"
    p.add_argument(
        "--scan-backends", nargs="+", choices=("auto", "torch", "numba", "cuda"), default=["auto"], help=scans
    )
    p.add_argument(
        "--max-batch", type=int, help="--max-batch of the batching server (default: dmm serve's own)"
    )
    p.add_argument("--max-delay-ms", type=float, help="--max-delay-ms of the server (default: dmm serve's)")
    p.add_argument("--duration", type=float, help="timed seconds per row at most (default 10; 1 --quick)")
    p.add_argument("--steps", type=int, help="timed steps per session at most (default 5000; 200 --quick)")
    p.add_argument("--warmup", type=int, help="untimed steps per session first (default 20; 3 --quick)")
    cores = "cores reserved for this client; the server gets the others (0: share all; default 1)"
    p.add_argument("--client-cores", type=int, default=1, help=cores)
    procs = "client processes the sessions are spread over (default: one per client core)"
    p.add_argument("--client-procs", type=int, help=procs)
    echo = "also time a bare grpc.aio echo stream (same messages, same cores) as the baseline (default: on)"
    p.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True, help=echo)
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds for server start / warm-up")
    positive = ("sessions", "steps", "episodes_per_stream", "workers", "max_batch")
    args = parse(p, argv, defaults, positive=positive, non_negative=("warmup",))
    if args.duration <= 0:
        p.error("--duration must be positive")
    return args


def add_ratios(s: dict[str, Any], summaries: list[dict[str, Any]]) -> list[str]:
    """Throughput of row ``s`` over the rows that differ from it in one setting only (batching off, the
    torch scan, one episode per stream, one worker): stored in ``s`` and returned as table cells."""
    by_key = {tuple(r[k] for k in KEY): r for r in summaries}
    cells = []
    for name, setting, base in RATIOS:
        other = by_key.get(tuple(base if k == setting else s[k] for k in KEY))
        if s[setting] == base or not other or not other["actions_per_second"]:
            cells.append("-")
            continue
        s[name] = s["actions_per_second"] / other["actions_per_second"]
        cells.append(f"{s[name]:.2f}")
    return cells


def add_echo_ratio(s: dict[str, Any], echo: list[dict[str, Any]]) -> str:
    """Row ``s``'s p50 over the echo stream's at the same episodes and episodes per stream: stored in
    ``s`` and returned as a table cell."""
    key = ("sessions", "episodes_per_stream")
    base = next((e for e in echo if all(e[k] == s[k] for k in key)), None)
    if not base or not base["p50_us"] or s["p50_us"] is None:
        return "-"
    s["p50_vs_echo"] = s["p50_us"] / base["p50_us"]
    return f"{s['p50_vs_echo']:.2f}"


def table(summaries: list[dict[str, Any]], echo: list[dict[str, Any]], on_gpu: bool) -> str:
    def cells(s: dict[str, Any], keys: Sequence[str], spec: str) -> list[str]:
        return [format(s[k], spec) if s[k] is not None else "-" for k in keys]

    rows = []
    for s in [*summaries, *echo]:
        ratios = add_ratios(s, summaries) if s["scan"] != "echo" else ["-"] * len(RATIOS)
        rows.append(
            [s[k] for k in KEY]
            + [*cells(s, ("p50_us", "p95_us", "p99_us"), ".0f"), add_echo_ratio(s, echo)]
            + [f"{s['actions_per_second']:.0f}", *ratios]
            + cells(s, ("client_cores_busy", "server_cores_busy"), ".2f")
            + (cells(s, ("server_gpu_mib",), ".0f") if on_gpu else [])
            + [s["failed_sessions"]]
        )
    return markdown_table([*HEADERS, *(["server GPU MiB"] if on_gpu else []), "failed"], rows)


def figure(summaries: list[dict[str, Any]], args: argparse.Namespace) -> Any:
    """Throughput and p99 latency against concurrent episodes, one curve per server setting and mode."""
    fig, axes = new_figure(ncols=2, width=5.5)
    curves = itertools.product(
        args.scan_backends, args.batching, args.workers, args.episodes_per_stream, args.modes
    )
    for scan, batching, workers, per, mode in curves:
        key = {
            "scan": scan,
            "batching": batching,
            "workers": workers,
            "episodes_per_stream": per,
            "mode": mode,
        }
        pts = [s for s in summaries if all(s[k] == v for k, v in key.items()) and s["timed_steps"]]
        label = f"{scan} scan, batching {batching}, {workers} worker(s), {per}/stream, {mode}"
        style = "-" if batching == "on" else "--"
        x = [s["sessions"] for s in pts]
        axes[0][0].plot(x, [s["actions_per_second"] for s in pts], style, marker="o", label=label)
        axes[0][1].plot(x, [s["p99_us"] / 1e3 for s in pts], style, marker="o", label=label)
    for ax, ylabel in ((axes[0][0], "actions/s"), (axes[0][1], "p99 Act latency (ms)")):
        ax.set(xscale="log", xlabel="concurrent episodes", ylabel=ylabel)
        ax.set_xticks(args.sessions, [str(n) for n in args.sessions])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def notes(
    args: argparse.Namespace, cores: tuple[list[int], list[int]], server_args: dict, summaries: list
) -> list[str]:
    shared = " (shared)" if cores[0] == cores[1] else " (disjoint, pinned)"
    lines = [
        f"model: {args.source}; server device {args.device}; server args: "
        + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in server_args.items()),
        f"cores: server {cores[0]}, client {cores[1]}{shared}; client = {args.client_procs} process(es), "
        "each an asyncio loop driving its share of the sessions as grpc.aio streams",
        f"latency = client-side round trip of one step (send the state(s), receive the action(s)); "
        f"{args.warmup} untimed steps per stream, then up to {args.duration:g} s or {args.steps} steps; "
        "percentiles over all timed steps of all streams; actions/s = timed steps x episodes per stream / "
        "wall time; 'per stream' 1 = one Act stream per episode, N = ActVector streams of N episodes",
        "echo rows: the same client streams against a bare grpc.aio server (on the server cores) that "
        "answers each message with a canned reply of the real reply's size; x echo p50 = the row's p50 "
        "over the echo row's with the same episodes and episodes per stream",
    ]
    return lines + [
        f"{s['scan']} scan, batching {s['batching']}, {s['workers']} worker(s), {s['mode']}, "
        f"{s['sessions']} episodes, {s['episodes_per_stream']} per stream: {s['failed_sessions']} failed, "
        f"e.g. {s['errors'][0]}"
        for s in summaries
        if s["failed_sessions"]
    ]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cores = split_cores(args.client_cores)
    args.client_procs = args.client_procs or (1 if cores[0] == cores[1] else len(cores[1]))
    payload = header(SCRIPT, argv, args.device)
    rows, echo_rows, server_args = run_all(args, cores)
    summaries = [r.summary() for r in rows]
    echo = [r.summary() for r in echo_rows]
    report = table(summaries, echo, args.device == "cuda")
    payload |= {"model": args.source, "server_cores": cores[0], "client_cores": cores[1]}
    payload |= {"server_args": server_args, "settings": {k: getattr(args, k) for k in SETTINGS}}
    payload |= {"rows": summaries, "echo": echo}
    lines = notes(args, cores, server_args, summaries)
    title = "Serving: Act latency and throughput"
    write_report(args.out, SCRIPT, title, report, payload, figure(summaries, args), lines)
    return 1 if any(r.out.failed for r in [*rows, *echo_rows]) else 0


if __name__ == "__main__":
    sys.exit(main())
