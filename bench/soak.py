"""Soak: many concurrent sessions against ``dmm serve`` for minutes, episode after episode, with
clients that cancel or vanish mid-episode; does the server stay correct, flat and responsive?

Starts ``dmm serve`` (a fresh paper-size DMM, or ``--store``/``--name``) and ``--sessions``
concurrent session loops spread over client processes. Each loop plays episodes back to back: a
random length (``--min-steps``..``--max-steps``), then a half-close; with probability ``--cancel``
an episode is cancelled at a random step instead, and with probability ``--vanish`` the client stops
sending mid-episode and leaves the stream open, which the server must evict after ``--idle-timeout``
(ABORTED). Every other status is an unexpected error (target: 0). The server's RSS is sampled every
few seconds (target: flat between the first and the last minute), and after the run
``dmm_active_sessions`` must be back to 0.

    python -m bench.soak                       # 1000 sessions, 10 minutes
    python -m bench.soak --quick               # 40 sessions, 15 s
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import header, markdown_table, new_figure, parse, parser, write_report
from bench.serve import prepare_store
from bench.serve_clients import collect, describe_error, session_stubs, spawn_clients

SCRIPT = "soak"
MODULE = f"bench.{SCRIPT}"
RSS_EVERY_S = 5.0
SETTINGS = (
    "sessions",
    "duration",
    "min_steps",
    "max_steps",
    "cancel",
    "vanish",
    "idle_timeout",
    "client_procs",
)


@dataclass
class Latencies:
    """A client process's round trips: each step's, and each session start's (Start to Started)."""

    step: list[float] = field(default_factory=list)
    start: list[float] = field(default_factory=list)


def _ms(seconds: np.ndarray, q: float) -> float | None:
    return float(np.percentile(seconds, q) * 1e3) if seconds.size else None


@dataclass(frozen=True)
class Plan:
    """What every client process runs."""

    target: str
    model: str
    state_dim: int
    duration_s: float
    min_steps: int
    max_steps: int
    cancel: float
    vanish: float
    idle_timeout_s: float


async def _episode(stub: Any, plan: Plan, rng: random.Random, tally: Counter, latencies: Latencies) -> None:
    """One episode; counts its ending as expected (by kind) or as an unexpected error."""
    import grpc

    from dmm.v1 import policy_pb2

    length = rng.randint(plan.min_steps, plan.max_steps)
    fate = rng.random()
    kind = (
        "cancelled" if fate < plan.cancel else "vanished" if fate < plan.cancel + plan.vanish else "completed"
    )
    stop_at = rng.randint(1, length) if kind != "completed" else length
    call = stub.Act(timeout=plan.idle_timeout_s * 3 + plan.max_steps)
    phase = "at start"
    try:
        t0 = time.perf_counter()
        await call.write(policy_pb2.ActRequest(start=policy_pb2.Start(model=plan.model)))
        await call.read()
        latencies.start.append(time.perf_counter() - t0)
        phase = "mid-episode"
        for t in range(stop_at):
            state = [rng.gauss(0.0, 1.0) for _ in range(plan.state_dim)]
            step = policy_pb2.Step(state=state, **({"reward": 1.0} if t else {}))
            t0 = time.perf_counter()
            await call.write(policy_pb2.ActRequest(step=step))
            if await call.read() is grpc.aio.EOF:
                raise RuntimeError("the server closed the stream mid-episode")
            latencies.step.append(time.perf_counter() - t0)
        phase = "at the end"
        if kind == "cancelled":
            call.cancel()
        elif kind == "vanished":
            await call.read()  # silent until the server evicts the session (ABORTED)
        else:
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
        tally[kind] += 1
    except asyncio.CancelledError:
        raise
    except grpc.aio.AioRpcError as err:
        expected = kind == "vanished" and err.code() == grpc.StatusCode.ABORTED
        tally["vanished" if expected else f"unexpected {phase}: {describe_error(err)}"] += 1
    except Exception as err:
        tally[f"unexpected {phase}: {describe_error(err)}"] += 1


async def _loop(
    stub: Any, plan: Plan, seed: int, deadline: float, tally: Counter, latencies: Latencies
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        await _episode(stub, plan, rng, tally, latencies)


async def _client(plan: Plan, seeds: list[int]) -> dict[str, Any]:
    tally: Counter = Counter()
    latencies = Latencies()
    deadline = time.monotonic() + plan.duration_s
    async with session_stubs(plan.target, len(seeds)) as stubs:
        loops = (
            _loop(stub, plan, s, deadline, tally, latencies) for stub, s in zip(stubs, seeds, strict=True)
        )
        await asyncio.gather(*loops)
    return {
        "tally": dict(tally),
        "latencies": np.asarray(latencies.step),
        "starts": np.asarray(latencies.start),
    }


def _failed(message: str) -> dict[str, Any]:
    return {"tally": {f"unexpected: {message}": 1}, "latencies": np.empty(0), "starts": np.empty(0)}


def _client_process(plan: Plan, seeds: list[int], results: Any) -> None:
    try:
        results.put(asyncio.run(_client(plan, seeds)))
    except BaseException as err:
        results.put(_failed(f"client failure {describe_error(err)}"))


def _sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    start = time.monotonic()
    while not stop.wait(RSS_EVERY_S):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    samples.append((time.monotonic() - start, int(line.split()[1]) / 1024))
        except OSError:
            return


def soak(args: argparse.Namespace, store: Path, model: str, state_dim: int) -> dict[str, Any]:
    """Run the soak against a fresh server; returns the tallies, latencies and server measurements."""
    from dmm.server.testing import ServerProcess, metric_value

    server_args = ["--max-sessions", str(args.sessions + 64), "--idle-timeout", str(args.idle_timeout)]
    with ServerProcess(store, server_args, startup_timeout_s=120) as server:
        assert server.proc is not None
        plan = Plan(
            server.target, model, state_dim, args.duration, args.min_steps, args.max_steps,
            args.cancel, args.vanish, args.idle_timeout,
        )  # fmt: skip
        rss: list[tuple[float, float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(server.proc.pid, stop, rss), daemon=True)
        sampler.start()
        start = time.monotonic()
        procs, results = spawn_clients(_client_process, args.sessions, args.client_procs, plan)
        timeout_s = args.duration + 3 * args.idle_timeout + 600
        reports = collect(procs, results, timeout_s, _failed("a client process never reported"))
        wall_s = time.monotonic() - start
        time.sleep(1.0)  # the last ends reach the metrics
        text = server.scrape()
        stop.set()
        active = metric_value(text, "dmm_active_sessions", {"model": model}) or 0.0
        ended = {
            reason: metric_value(text, "dmm_sessions_ended_total", {"model": model, "reason": reason}) or 0.0
            for reason in ("completed", "cancelled", "error", "evicted", "shutdown")
        }
    tally: Counter = Counter()
    for r in reports:
        tally.update(r["tally"])
    joined = {k: np.concatenate([r[k] for r in reports]) for k in ("latencies", "starts")}
    counted = {"active_sessions_after": active, "server_sessions_ended": ended}
    return {"tally": dict(tally), **joined, "rss_mib": rss, "wall_s": wall_s, **counted}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = parser(__doc__, SCRIPT)
    p.add_argument("--store", type=Path, help="model store (default: a fresh policy in a temporary store)")
    p.add_argument("--name", help="model name in the store (with --store)")
    p.add_argument("--sessions", type=int, help="concurrent session loops (default 1000; 40 --quick)")
    p.add_argument("--duration", type=float, help="seconds (default 600; 15 --quick)")
    p.add_argument("--min-steps", type=int, default=10, help="shortest episode (default 10)")
    p.add_argument("--max-steps", type=int, default=200, help="longest episode (default 200)")
    p.add_argument("--cancel", type=float, default=0.05, help="share of episodes cancelled (default 0.05)")
    p.add_argument("--vanish", type=float, default=0.02, help="share of episodes abandoned (default 0.02)")
    p.add_argument("--idle-timeout", type=float, default=5.0, help="the server's --idle-timeout (default 5)")
    p.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    defaults = {"sessions": (1000, 40), "duration": (600.0, 15.0)}
    args = parse(p, argv, defaults, positive=("sessions", "client_procs", "min_steps"))
    if args.max_steps < args.min_steps:
        p.error("--max-steps must be >= --min-steps")
    if min(args.cancel, args.vanish) < 0 or args.cancel + args.vanish > 1:
        p.error("--cancel and --vanish are shares: each >= 0, together <= 1")
    return args


def _server_agrees(tally: dict[str, int], ended: dict[str, float]) -> bool:
    """Whether the server's session-end counters tell the same story as the clients."""
    pairs = (("completed", "completed"), ("cancelled", "cancelled"), ("vanished", "evicted"))
    return all(tally.get(client, 0) == ended.get(server, 0) for client, server in pairs) and not ended.get(
        "error"
    )


def _report(args: argparse.Namespace, argv: Sequence[str], result: dict[str, Any], source: str) -> int:
    tally, lat, rss = result["tally"], result["latencies"], result["rss_mib"]
    unexpected = {k: v for k, v in tally.items() if k.startswith("unexpected")}
    first = [m for t, m in rss if t <= 60.0] or [m for _, m in rss[:1]]
    last = [m for t, m in rss if t >= rss[-1][0] - 60.0] if rss else []
    summary = {
        "episodes": sum(tally.values()),
        **{k: tally.get(k, 0) for k in ("completed", "cancelled", "vanished")},
        "unexpected_errors": sum(unexpected.values()),
        "steps": int(lat.size),
        "p50_ms": _ms(lat, 50),
        "p99_ms": _ms(lat, 99),
        "start_p50_ms": _ms(result["starts"], 50),
        "start_p99_ms": _ms(result["starts"], 99),
        "actions_per_second": lat.size / result["wall_s"],
        "rss_first_minute_mib": float(np.median(first)) if first else None,
        "rss_last_minute_mib": float(np.median(last)) if last else None,
        "active_sessions_after": result["active_sessions_after"],
        "server_agrees": _server_agrees(tally, result["server_sessions_ended"]),
    }
    row = [f"{summary[k]:.1f}" if isinstance(summary[k], float) else summary[k] for k in summary]
    table = markdown_table(list(summary), [row])
    fig, axes = new_figure()
    axes[0][0].plot([t for t, _ in rss], [m for _, m in rss], marker=".")
    axes[0][0].set(xlabel="seconds", ylabel="server RSS (MiB)", title=f"soak: {args.sessions} sessions")
    payload = {
        **header(SCRIPT, argv),
        "model": source,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "summary": summary,
        "tally": tally,
        "unexpected": unexpected,
        "server_sessions_ended": result["server_sessions_ended"],
        "rss_mib": rss,
    }
    notes = [
        f"model: {source}; {args.sessions} session loops over {args.client_procs} client processes, new "
        f"episodes for {args.duration:g} s; episodes of {args.min_steps}-{args.max_steps} steps; "
        f"{args.cancel:.0%} cancelled and {args.vanish:.0%} abandoned mid-episode (the server evicts those "
        f"after --idle-timeout {args.idle_timeout:g} s)",
        "unexpected errors: any ending but OK (completed), CANCELLED (cancelled) or ABORTED (abandoned); "
        "RSS: median of the server's samples in the first and the last minute",
        "server-side session ends: "
        + ", ".join(f"{k} {v:.0f}" for k, v in result["server_sessions_ended"].items()),
        *(f"unexpected: {k} x{v}" for k, v in unexpected.items()),
    ]
    write_report(args.out, SCRIPT, "Soak: sessions over time", table, payload, fig, notes)
    return 1 if unexpected or result["active_sessions_after"] or not summary["server_agrees"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dmm-bench-soak-") as tmp:
        store, model, config, source = prepare_store(args, Path(tmp))
        result = soak(args, store, model, config.state_dim)
    return _report(args, argv, result, source)


if __name__ == "__main__":
    sys.exit(main())
