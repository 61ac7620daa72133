"""Closed-loop load generator for a running policy server: Act latency and actions/s.

Each of ``sessions`` threads drives one Act stream with random states for ``steps`` steps and
times every round trip (send a step, receive its action). Reused by benchmarks::

    python -m dmm.server.loadgen --target 127.0.0.1:50051 --model tiny --sessions 1 16 64
    python -m dmm.server.loadgen --store DIR --model tiny ...   # starts its own server
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from dmm.v1 import policy_pb2, policy_pb2_grpc

_MODES = {"window": policy_pb2.INFERENCE_MODE_WINDOW, "recurrent": policy_pb2.INFERENCE_MODE_RECURRENT}


@dataclass(frozen=True)
class LoadResult:
    sessions: int
    mode: str
    latencies_s: np.ndarray  # every round trip of every session
    wall_s: float

    @property
    def actions_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def percentile_us(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e6)

    def row(self) -> str:
        p50, p99 = self.percentile_us(50), self.percentile_us(99)
        return f"{self.mode:>9} {self.sessions:>8} {p50:>9.0f} {p99:>9.0f} {self.actions_per_s:>10.0f}"


HEADER = f"{'mode':>9} {'sessions':>8} {'p50 us':>9} {'p99 us':>9} {'actions/s':>10}"


def _session(
    channel: grpc.Channel, start: policy_pb2.Start, steps: int, seed: int, barrier, out: list
) -> None:
    requests: queue.SimpleQueue = queue.SimpleQueue()

    def it() -> Iterator[policy_pb2.ActRequest]:
        while (item := requests.get()) is not None:
            yield item

    call = policy_pb2_grpc.PolicyServiceStub(channel).Act(it())
    requests.put(policy_pb2.ActRequest(start=start))
    state_dim = next(call).started.state_dim
    states = np.random.default_rng(seed).normal(size=(steps, state_dim)).tolist()
    lat = np.empty(steps)
    barrier.wait()
    for t in range(steps):
        step = policy_pb2.Step(state=states[t], reward=1.0) if t else policy_pb2.Step(state=states[t])
        t0 = time.perf_counter()
        requests.put(policy_pb2.ActRequest(step=step))
        next(call)
        lat[t] = time.perf_counter() - t0
    requests.put(None)
    for _ in call:
        pass
    out.append(lat)


def run_load(target: str, model: str, sessions: int, steps: int, mode: str, warmup: int = 20) -> LoadResult:
    """Run ``sessions`` concurrent streams of ``steps`` steps (after ``warmup`` untimed ones)."""
    start = policy_pb2.Start(model=model, mode=_MODES[mode])
    with grpc.insecure_channel(target) as channel:
        _session(channel, start, warmup, 0, threading.Barrier(1), [])
        barrier = threading.Barrier(sessions + 1)
        out: list[np.ndarray] = []
        threads = [
            threading.Thread(target=_session, args=(channel, start, steps, i, barrier, out), daemon=True)
            for i in range(sessions)
        ]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    if len(out) != sessions:
        raise RuntimeError(f"{sessions - len(out)} sessions failed")
    return LoadResult(sessions, mode, np.concatenate(out), wall)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="address of a running server")
    where.add_argument("--store", help="start a server on this store (127.0.0.1, free ports)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--modes", nargs="+", choices=tuple(_MODES), default=list(_MODES))
    parser.add_argument("--steps", type=int, default=200, help="timed steps per session")
    parser.add_argument("--server-args", default="", help="extra `dmm serve` arguments (with --store)")
    args = parser.parse_args(argv)

    def report(target: str) -> None:
        print(HEADER)
        for mode in args.modes:
            for n in args.sessions:
                print(run_load(target, args.model, n, args.steps, mode).row(), flush=True)

    if args.target:
        report(args.target)
        return 0
    from dmm.server.testing import ServerProcess

    with ServerProcess(args.store, args.server_args.split()) as server:
        report(server.target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
