"""The client side of ``bench.serve``: closed-loop Act (or ActVector) streams spread over client processes.

One Python process drives a few thousand round trips per second at most (every gRPC message costs
it ~0.1-0.3 ms of CPU), so a fast server needs several client processes to be measured at all. Each
process runs its share of the sessions as grpc.aio streams on its own event loop. All sessions take
their untimed warm-up steps; when every process has reported ready, the parent releases them at
once with a shared deadline (``time.perf_counter`` is CLOCK_MONOTONIC on Linux, one clock for all
processes), and each process reports its round trips, when its timed phase ended and the CPU it used.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import queue
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SESSIONS_PER_CHANNEL = 64  # streams share an HTTP/2 connection; a few connections spread the load
# grpc shares one connection among a process's channels to the same target unless each has its own
# subchannel pool; own connections also spread over `dmm serve --workers` (balanced per connection)
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
STATE_POOL = 32  # distinct random states each session cycles through (messages built in advance)


@dataclass(frozen=True)
class Load:
    """What every client process is asked to do."""

    target: str
    model: str
    mode: str
    state_dim: int
    warmup: int
    max_steps: int
    startup_timeout_s: float
    duration_s: float
    episodes_per_stream: int = 1  # > 1: each stream is an ActVector stream of that many episodes


@dataclass
class Outcome:
    """All processes' timed round trips and what they cost."""

    latencies_s: np.ndarray
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float
    failed: int
    errors: list[str]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (a server's workers), from /proc."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            children.update(int(c) for c in task.read_text().split())
    return [pid, *(p for c in sorted(children) for p in process_tree(c))]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU so far of all threads of ``pid`` and its live descendants (from /proc)."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):  # gone meanwhile
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def describe_error(err: BaseException) -> str:
    """One line: a gRPC status code and its details, or the exception's type and message."""
    import grpc

    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return f"{type(err).__name__}: {err}"


def _requests(load: Load, seed: int) -> list[Any]:
    """The start, the first step (no reward) and a pool of later steps with random states, built once."""
    from dmm.v1 import policy_pb2
    from dmm.v1.modes import MODE_ENUM

    start = policy_pb2.Start(model=load.model, mode=MODE_ENUM[load.mode])
    n = load.episodes_per_stream
    states = np.random.default_rng(seed).normal(size=(STATE_POOL, n * load.state_dim)).tolist()
    if n == 1:
        first = policy_pb2.ActRequest(step=policy_pb2.Step(state=states[0]))
        later = [policy_pb2.ActRequest(step=policy_pb2.Step(state=s, reward=1.0)) for s in states[1:]]
        return [policy_pb2.ActRequest(start=start), first, *later]
    vector_start = policy_pb2.VectorRequest(start=policy_pb2.VectorStart(start=start, episodes=n))
    first = policy_pb2.VectorRequest(step=policy_pb2.VectorStep(states=states[0]))
    later = [
        policy_pb2.VectorRequest(step=policy_pb2.VectorStep(states=s, rewards=[1.0] * n)) for s in states[1:]
    ]
    return [vector_start, first, *later]


class _Phase:
    """This process's sessions: all warm up, then the timed phase starts together."""

    def __init__(self, sessions: int) -> None:
        self.waiting = sessions
        self.all_ready = asyncio.Event()
        self.go = asyncio.Event()
        self.deadline = math.inf

    def ready(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.all_ready.set()


async def _session(stub: Any, requests: list[Any], load: Load, phase: _Phase) -> tuple[np.ndarray, float]:
    """One closed-loop stream; returns its timed round trips and when its timed phase ended."""
    import grpc

    rpc = stub.Act if load.episodes_per_stream == 1 else stub.ActVector
    call = rpc(timeout=load.startup_timeout_s + load.duration_s + 60.0)
    start, first, later = requests[0], requests[1], requests[2:]
    try:
        await call.write(start)
        await call.read()
        step = 0

        async def round_trip() -> None:
            nonlocal step
            await call.write(first if step == 0 else later[(step - 1) % len(later)])
            if await call.read() is grpc.aio.EOF:
                raise RuntimeError("the server closed the stream")
            step += 1

        for _ in range(load.warmup):
            await round_trip()
    finally:
        phase.ready()  # a failed session must not hold the others back
    await phase.go.wait()
    lat = np.empty(load.max_steps)
    n = 0
    clock = time.perf_counter
    while n < load.max_steps and clock() < phase.deadline:
        t0 = clock()
        await round_trip()
        lat[n] = clock() - t0
        n += 1
    ended = clock()
    await call.done_writing()
    while await call.read() is not grpc.aio.EOF:
        pass
    return lat[:n], ended


async def _drive(
    load: Load, seeds: list[int], ready: Any, go: Any, deadline: Any, signalled: list[bool]
) -> dict[str, Any]:
    import grpc

    from dmm.v1 import policy_pb2_grpc

    channels = [
        grpc.aio.insecure_channel(load.target, options=CHANNEL_OPTIONS)
        for _ in range(math.ceil(len(seeds) / SESSIONS_PER_CHANNEL))
    ]
    phase = _Phase(len(seeds))
    try:
        stubs = [policy_pb2_grpc.PolicyServiceStub(c) for c in channels]
        tasks = [
            asyncio.create_task(
                _session(stubs[i // SESSIONS_PER_CHANNEL], _requests(load, seed), load, phase)
            )
            for i, seed in enumerate(seeds)
        ]
        await phase.all_ready.wait()
        ready.put(None)
        signalled.append(True)
        if not await asyncio.get_running_loop().run_in_executor(None, go.wait, load.startup_timeout_s * 2):
            for task in tasks:
                task.cancel()
        cpu0 = _self_cpu_seconds()
        phase.deadline = deadline.value
        phase.go.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        cpu = _self_cpu_seconds() - cpu0
    finally:
        for c in channels:
            await c.close()
    ok = [d for d in done if not isinstance(d, BaseException)]
    return {
        "latencies": np.concatenate([lat for lat, _ in ok]) if ok else np.empty(0),
        "ended": max((ended for _, ended in ok), default=None),
        "cpu_s": cpu,
        "errors": [describe_error(d) for d in done if isinstance(d, BaseException)],
    }


def _client_process(load: Load, seeds: list[int], ready: Any, go: Any, deadline: Any, results: Any) -> None:
    """A client process's whole life: drive its sessions, report (or report why it could not)."""
    signalled: list[bool] = []
    try:
        results.put(asyncio.run(_drive(load, seeds, ready, go, deadline, signalled)))
    except BaseException as err:
        if not signalled:
            ready.put(None)  # never hold the others back
        results.put({"latencies": np.empty(0), "ended": None, "cpu_s": 0.0, "errors": [describe_error(err)]})


def _report(results: Any, timeout_s: float) -> dict[str, Any]:
    try:
        return results.get(timeout=timeout_s)
    except queue.Empty:
        return {
            "latencies": np.empty(0),
            "ended": None,
            "cpu_s": 0.0,
            "errors": ["a client process never reported"],
        }


def run_sessions(load: Load, sessions: int, processes: int, server_pid: int) -> Outcome:
    """Drive ``sessions`` concurrent streams (Act, or ActVector of ``load.episodes_per_stream``
    episodes each) from ``processes`` client processes."""
    ctx = mp.get_context("spawn")
    ready, results, go, deadline = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", math.inf)
    processes = max(1, min(processes, sessions))
    shares = [list(range(k, sessions, processes)) for k in range(processes)]
    procs = [
        ctx.Process(target=_client_process, args=(load, s, ready, go, deadline, results)) for s in shares
    ]
    for proc in procs:
        proc.start()
    started = True
    try:
        try:
            for _ in procs:
                ready.get(timeout=load.startup_timeout_s)
        except queue.Empty:
            started = False  # released anyway: the processes cancel their sessions and report
        server_cpu0 = process_cpu_seconds(server_pid)
        t0 = time.perf_counter()
        deadline.value = t0 + load.duration_s if started else t0
        go.set()
        reports = [_report(results, load.startup_timeout_s + load.duration_s + 120.0) for _ in procs]
        server_cpu = process_cpu_seconds(server_pid) - server_cpu0
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    if not started:
        message = f"sessions did not all start and warm up within {load.startup_timeout_s:g} s"
        return Outcome(np.empty(0), 0.0, 0.0, 0.0, sessions, [message])
    errors = [e for r in reports for e in r["errors"]]
    ended = [r["ended"] for r in reports if r["ended"] is not None]
    return Outcome(
        latencies_s=np.concatenate([r["latencies"] for r in reports]),
        wall_s=max(ended, default=t0) - t0,
        client_cpu_s=sum(r["cpu_s"] for r in reports),
        server_cpu_s=server_cpu,
        failed=len(errors),
        errors=errors,
    )
