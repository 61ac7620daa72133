"""``dmm serve --workers N``: several server processes on one port, one /metrics, one SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_fixtures import STATE_DIM, Stream, publish_tiny, wait_for_metric

from dmm.server.testing import ServerProcess, metric_value

# grpc shares one TCP connection between channels of the same target and arguments; SO_REUSEPORT
# spreads connections, so each channel needs its own.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
ROUNDS = 12  # of 4 connections: all 48 on one worker of 2 has a probability of 2^-47
TINY = {"model": "tiny"}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, "tiny")
    return root


def log_lines(server: ServerProcess, message: str) -> list[dict[str, str]]:
    """The fields of the text log lines of ``message``."""
    return [
        dict(re.findall(r" (\w+)=(\S+)", line.split(f" {message}", 1)[1]))
        for line in server.output
        if f" {message} " in line
    ]


def wait_for_log(
    server: ServerProcess, message: str, timeout_s: float = 60.0, **fields: str
) -> dict[str, str]:
    end = time.monotonic() + timeout_s
    while True:
        for entry in log_lines(server, message):
            if all(entry.get(k) == v for k, v in fields.items()):
                return entry
        if time.monotonic() > end:
            raise AssertionError(f"no log line {message!r} {fields}:\n" + "".join(server.output))
        time.sleep(0.05)


def worker_pids(server: ServerProcess) -> dict[str, int]:
    """Worker index -> pid of its latest process."""
    return {entry["worker"]: int(entry["pid"]) for entry in log_lines(server, "worker ready")}


def run_sessions(server: ServerProcess, streams: int, steps: int = 3) -> None:
    """``streams`` concurrent sessions, each on a channel of its own; all end OK."""
    channels = [grpc.insecure_channel(server.target, options=OWN_CONNECTION) for _ in range(streams)]
    try:
        opened = [Stream(channel) for channel in channels]
        for stream in opened:
            assert stream.start().version == 1
        for t in range(steps):
            for stream in opened:
                assert len(stream.step(np.zeros(STATE_DIM), **({"reward": 1.0} if t else {})).action) == 3
        for stream in opened:
            assert stream.finish() == grpc.StatusCode.OK
    finally:
        for channel in channels:
            channel.close()


def assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_workers_share_the_port_and_add_up_their_metrics(store_root: Path) -> None:
    server = ServerProcess(store_root, ["--workers", "2"]).start()
    try:
        assert any(
            line.rstrip().endswith("workers=2") for line in server.output if "dmm serve: ready" in line
        )
        pids = worker_pids(server)
        assert set(pids) == {"0", "1"} and len(set(pids.values())) == 2

        # Open sessions count once each in the workers' sum.
        with (
            grpc.insecure_channel(server.target, options=OWN_CONNECTION) as a,
            grpc.insecure_channel(server.target, options=OWN_CONNECTION) as b,
        ):
            first, second = Stream(a), Stream(b)
            first.start()
            second.start()
            wait_for_metric(server, "dmm_active_sessions", TINY, 2)
            assert first.finish() == second.finish() == grpc.StatusCode.OK
        sessions = 2
        for _ in range(ROUNDS):
            run_sessions(server, 4)
            sessions += 4
            if {e["worker"] for e in log_lines(server, "session started")} == {"0", "1"}:
                break
        wait_for_log(server, "session ended", worker="0")
        wait_for_log(server, "session ended", worker="1")

        wait_for_metric(server, "dmm_active_sessions", TINY, 0)
        text = server.scrape()
        assert metric_value(text, "dmm_sessions_started_total", TINY) == sessions
        assert metric_value(text, "dmm_sessions_ended_total", {**TINY, "reason": "completed"}) == sessions
        assert metric_value(text, "dmm_model_versions_loaded", {**TINY, "version": "1"}) == 1
        assert metric_value(text, "dmm_model_loads_total", TINY) == 2  # a copy per worker

        assert server.terminate() == 0
        for pid in pids.values():
            assert_gone(pid)
        assert {e["worker"] for e in log_lines(server, "worker stopped")} == {"0", "1"}
        assert all(e["exit_code"] == "0" for e in log_lines(server, "worker stopped"))
    finally:
        server.kill()


def test_a_worker_that_dies_is_replaced(store_root: Path) -> None:
    with ServerProcess(store_root, ["--workers", "2", "--grace", "1"]) as server:
        pids = worker_pids(server)
        os.kill(pids["1"], signal.SIGKILL)
        exited = wait_for_log(server, "worker exited", worker="1")
        assert (exited["pid"], exited["signal"]) == (str(pids["1"]), "SIGKILL")
        assert any(" ERROR worker exited " in line for line in server.output)
        end = time.monotonic() + 60
        while (replacement := worker_pids(server)["1"]) == pids["1"]:
            assert time.monotonic() < end, "".join(server.output)
            time.sleep(0.05)
        assert_gone(pids["1"])
        assert worker_pids(server)["0"] == pids["0"]

        run_sessions(server, 6)
        wait_for_metric(server, "dmm_sessions_started_total", TINY, 6)
        wait_for_metric(server, "dmm_active_sessions", TINY, 0)
    assert server.proc.returncode == 0
    assert_gone(replacement)


def serve(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dmm.cli", "serve", "--store", str(store), "--port", "0"]
    return subprocess.run(
        [*command, "--metrics-port", "0", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--workers", "2", "--max-batch", "0"], "--max-batch must be > 0, got 0"),
        # found by a worker (worker 0, before the others bind): the whole server stops
        (["--workers", "2", "--auth-token-file", "missing.txt"], "cannot read --auth-token-file missing.txt"),
    ],
)
def test_a_bad_option_exits_2_with_one_line(store_root: Path, args: list[str], error: str) -> None:
    refused = serve(store_root, *args)
    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith(f"dmm serve: error: {error}"), line
    assert "ready" not in refused.stdout


LOADED = "dmm_model_versions_loaded"


def test_an_unloaded_version_reads_0_in_the_workers_sum(tmp_path: Path) -> None:
    """A removed series lives on in a worker's metrics file: it must read 0 there, not its last value."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    from dmm.server.metrics import ServerMetrics, multiprocess

    worker = """if True:
        import os, sys
        from dmm.server.metrics import ServerMetrics, multiprocess
        assert multiprocess()
        metrics = ServerMetrics()
        metrics.versions_loaded.labels("tiny", "1").set(1)
        if sys.argv[1] == "unload":
            metrics.versions_loaded.remove("tiny", "1")
        print(os.getpid())
    """

    def run_worker(action: str) -> int:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
        done = subprocess.run([sys.executable, "-c", worker, action], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    def loaded() -> float | None:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(tmp_path))
        return metric_value(generate_latest(registry).decode(), LOADED, {**TINY, "version": "1"})

    holder = run_worker("keep")
    run_worker("unload")
    assert loaded() == 1  # one worker still holds it
    mark_process_dead(holder, str(tmp_path))
    assert loaded() == 0  # the one that is left unloaded it

    assert not multiprocess()  # a single server: the series goes away
    metrics = ServerMetrics()
    metrics.versions_loaded.labels("tiny", "1").set(1)
    metrics.versions_loaded.remove("tiny", "1")
    assert metric_value(generate_latest(metrics.registry).decode(), LOADED, TINY) is None
