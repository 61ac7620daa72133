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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SESSIONS_PER_CHANNEL = 64  # streams share an HTTP/2 connection; a few connections spread the load
# grpc shares one connection among a process's channels to the same target unless each has its own
# subchannel pool; own connections also spread over `dmm serve --workers` (balanced per connection)
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
STATE_POOL = 32  # distinct random states each session cycles through (messages built in advance)
SPAWN = mp.get_context("spawn")


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


@contextlib.asynccontextmanager
async def session_stubs(target: str, sessions: int) -> AsyncIterator[list[Any]]:
    """A PolicyService stub for each of ``sessions`` streams, SESSIONS_PER_CHANNEL to a connection."""
    import grpc

    from dmm.v1 import policy_pb2_grpc

    count = math.ceil(sessions / SESSIONS_PER_CHANNEL)
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(count)]
    try:
        yield [
            policy_pb2_grpc.PolicyServiceStub(channels[i // SESSIONS_PER_CHANNEL]) for i in range(sessions)
        ]
    finally:
        for channel in channels:
            await channel.close()


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


async def _drive(load: Load, seeds: list[int], sync: tuple[Any, Any, Any], signalled: list[bool]) -> dict:
    ready, go, deadline = sync
    phase = _Phase(len(seeds))
    async with session_stubs(load.target, len(seeds)) as stubs:
        tasks = [
            asyncio.create_task(_session(stub, _requests(load, seed), load, phase))
            for stub, seed in zip(stubs, seeds, strict=True)
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
    ok = [d for d in done if not isinstance(d, BaseException)]
    return {
        "latencies": np.concatenate([lat for lat, _ in ok]) if ok else np.empty(0),
        "ended": max((ended for _, ended in ok), default=None),
        "cpu_s": cpu,
        "errors": [describe_error(d) for d in done if isinstance(d, BaseException)],
    }


def _failed(message: str) -> dict[str, Any]:
    return {"latencies": np.empty(0), "ended": None, "cpu_s": 0.0, "errors": [message]}


def _client_process(load: Load, sync: tuple[Any, Any, Any], seeds: list[int], results: Any) -> None:
    """A client process's whole life: drive its sessions, report (or report why it could not)."""
    signalled: list[bool] = []
    try:
        results.put(asyncio.run(_drive(load, seeds, sync, signalled)))
    except BaseException as err:
        if not signalled:
            sync[0].put(None)  # never hold the others back
        results.put(_failed(describe_error(err)))


def spawn_clients(target: Callable[..., None], sessions: int, processes: int, *args: Any) -> tuple[list, Any]:
    """Client processes, started: process k calls ``target(*args, its session numbers, results)`` and
    puts its report on ``results`` (returned with them)."""
    results = SPAWN.Queue()
    processes = max(1, min(processes, sessions))
    procs = [
        SPAWN.Process(target=target, args=(*args, list(range(k, sessions, processes)), results))
        for k in range(processes)
    ]
    for proc in procs:
        proc.start()
    return procs, results


def collect(procs: list, results: Any, timeout_s: float, missing: dict[str, Any]) -> list[dict[str, Any]]:
    """Every client process's report (``missing`` for one that never reports); then the processes end."""
    reports = []
    try:
        for _ in procs:
            try:
                reports.append(results.get(timeout=timeout_s))
            except queue.Empty:
                reports.append(missing)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    return reports


def run_sessions(load: Load, sessions: int, processes: int, server_pid: int) -> Outcome:
    """Drive ``sessions`` concurrent streams (Act, or ActVector of ``load.episodes_per_stream``
    episodes each) from ``processes`` client processes."""
    sync = (SPAWN.Queue(), SPAWN.Event(), SPAWN.Value("d", math.inf))
    procs, results = spawn_clients(_client_process, sessions, processes, load, sync)
    started = True
    try:
        for _ in procs:
            sync[0].get(timeout=load.startup_timeout_s)
    except queue.Empty:
        started = False  # released anyway: the processes cancel their sessions and report
    server_cpu0 = process_cpu_seconds(server_pid)
    t0 = time.perf_counter()
    sync[2].value = t0 + load.duration_s if started else t0
    sync[1].set()
    timeout_s = load.startup_timeout_s + load.duration_s + 120.0
    reports = collect(procs, results, timeout_s, _failed("a client process never reported"))
    server_cpu = process_cpu_seconds(server_pid) - server_cpu0
    if not started:
        message = f"sessions did not all start and warm up within {load.startup_timeout_s:g} s"
        return Outcome(np.empty(0), 0.0, 0.0, 0.0, sessions, [message])
    errors = [e for r in reports for e in r["errors"]]
    ended = [r["ended"] for r in reports if r["ended"] is not None]
    latencies = np.concatenate([r["latencies"] for r in reports])
    client_cpu = sum(r["cpu_s"] for r in reports)
    return Outcome(latencies, max(ended, default=t0) - t0, client_cpu, server_cpu, len(errors), errors)


# ------------------------------------------------------------------------ the bare echo baseline


def _echo_reply(model: str, act_dim: int, episodes: int | None) -> bytes:
    """A reply of the size ``dmm serve`` sends: an ActResponse with one action, or (``episodes`` rows
    of an ActVector stream) a VectorResponse with one per row."""
    from dmm.v1 import policy_pb2

    action = [0.123456] * act_dim
    if episodes is None:
        one = policy_pb2.Action(action=action, step=1234, model=model, version=1, rtg=3456.789)
        return policy_pb2.ActResponse(action=one).SerializeToString()
    rows, steps, rtgs = list(range(episodes)), [1234] * episodes, [3456.789] * episodes
    vector = policy_pb2.VectorActions(rows=rows, actions=action * episodes, steps=steps, rtgs=rtgs)
    return policy_pb2.VectorResponse(actions=vector).SerializeToString()


async def _echo_serve(model: str, act_dim: int, port: Any) -> None:
    """A grpc.aio server with PolicyService's two streaming methods, each answering every message with
    one reply of the real size, built once (the bytes are not parsed, but for a VectorStart's
    number of episodes)."""
    import grpc

    from dmm.v1 import policy_pb2

    def handler(vector: bool) -> grpc.RpcMethodHandler:
        async def echo(_: Any, context: Any) -> None:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            episodes = policy_pb2.VectorRequest.FromString(message).start.episodes if vector else None
            reply = _echo_reply(model, act_dim, episodes)
            while message is not grpc.aio.EOF:
                await context.write(reply)
                message = await context.read()

        return grpc.stream_stream_rpc_method_handler(echo)

    name = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
    server = grpc.aio.server()
    handlers = {"Act": handler(False), "ActVector": handler(True)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    bound = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port.value = bound
    await server.wait_for_termination()


def _echo_process(model: str, act_dim: int, port: Any) -> None:
    asyncio.run(_echo_serve(model, act_dim, port))


class EchoServer:
    """The bare grpc.aio baseline ``bench.serve`` compares the server with: a process serving echo
    streams, started with this process's CPU affinity."""

    def __init__(self, model: str, act_dim: int, startup_timeout_s: float) -> None:
        port = SPAWN.Value("i", 0)
        self.proc = SPAWN.Process(target=_echo_process, args=(model, act_dim, port), daemon=True)
        self.proc.start()
        deadline = time.monotonic() + startup_timeout_s
        while not port.value and self.proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not port.value:
            self.terminate()
            raise RuntimeError("the echo server did not start")
        self.target = f"127.0.0.1:{port.value}"

    def terminate(self) -> None:
        self.proc.terminate()
        self.proc.join(timeout=10)
