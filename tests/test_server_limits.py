"""Session limits of the policy server: max sessions, idle eviction, disconnects, SIGTERM draining."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_fixtures import STATE_DIM, Stream, expect_status, publish_tiny, wait_for_metric

from dmm.server.testing import ServerProcess, metric_value
from dmm.v1 import policy_pb2


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, "tiny")
    return root


def test_max_sessions_disconnect_and_idle_eviction(store_root: Path) -> None:
    ok = np.zeros(STATE_DIM)
    with (
        ServerProcess(store_root, ["--max-sessions", "2", "--idle-timeout", "1.5"]) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        first, second, third = Stream(channel), Stream(channel), Stream(channel)
        first.start()
        first.step(ok)
        second.start()
        err = expect_status(third, policy_pb2.ActRequest(start=policy_pb2.Start(model="tiny")))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 sessions" in err.details()
        wait_for_metric(server, "dmm_active_sessions", {"model": "tiny"}, 2)

        first.cancel()  # a client that goes away mid-episode frees its slot at once
        wait_for_metric(server, "dmm_active_sessions", {"model": "tiny"}, 1, timeout_s=1.0)
        fourth = Stream(channel)
        assert fourth.start().version == 1
        fourth.step(ok)

        time.sleep(1.0)
        fourth.step(ok, reward=1.0)  # activity keeps a session alive; `second` stays idle
        wait_for_metric(server, "dmm_sessions_ended_total", {"model": "tiny", "reason": "evicted"}, 1)
        err = expect_status(second, policy_pb2.ActRequest(step=policy_pb2.Step(state=ok)))
        assert err.code() == grpc.StatusCode.ABORTED
        assert "idle" in err.details()
        assert fourth.finish() == grpc.StatusCode.OK

        wait_for_metric(server, "dmm_active_sessions", {"model": "tiny"}, 0)
        text = server.scrape()
        ended = {
            reason: metric_value(text, "dmm_sessions_ended_total", {"model": "tiny", "reason": reason})
            for reason in ("completed", "cancelled", "evicted")
        }
        assert ended == {"completed": 1, "cancelled": 1, "evicted": 1}
        assert metric_value(text, "dmm_errors_total", {"code": "RESOURCE_EXHAUSTED"}) == 1


def test_sigterm_drains_sessions_and_exits_zero(store_root: Path) -> None:
    ok = np.zeros(STATE_DIM)
    server = ServerProcess(store_root, ["--grace", "2"]).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            quick, slow = Stream(channel), Stream(channel)
            quick.start()
            quick.step(ok)
            slow.start()
            slow.step(ok)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            server.proc.terminate()  # SIGTERM
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()

            # A session that finishes within the grace period completes normally.
            quick.step(ok, reward=1.0)
            assert quick.finish() == grpc.StatusCode.OK

            # One that keeps going is ended with UNAVAILABLE when the grace period is over.
            with pytest.raises(grpc.RpcError) as info:
                for _ in range(10_000):
                    slow.step(ok, reward=1.0)
                    time.sleep(0.01)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert server.proc.wait(30) == 0
    finally:
        server.kill()


def test_scan_backend_is_reported_at_start_and_an_unusable_one_is_refused(store_root: Path) -> None:
    import subprocess
    import sys

    with ServerProcess(store_root, env={"DMM_SCAN_BACKEND": "torch"}) as server:
        assert any("scan=torch" in line for line in server.output)
    with ServerProcess(store_root, ["--scan-backend", "numba"], env={"DMM_SCAN_BACKEND": "torch"}) as server:
        assert any("scan=numba" in line for line in server.output)  # the flag wins
        with grpc.insecure_channel(server.target) as channel:
            stream = Stream(channel)
            stream.start(mode=policy_pb2.INFERENCE_MODE_RECURRENT)
            assert len(stream.step(np.zeros(STATE_DIM)).action) == 3
            assert stream.finish() == grpc.StatusCode.OK
    refused = subprocess.run(
        [sys.executable, "-m", "dmm.cli", "serve", "--store", str(store_root), "--scan-backend", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "dmm serve: error: the cuda scan backend needs a CUDA device and mamba_ssm (pip install '.[cuda]')"
    ]


def test_the_json_log_tells_an_operator_what_happened(store_root: Path) -> None:
    import json

    server = ServerProcess(store_root, ["--log-format", "json"]).start()
    with grpc.insecure_channel(server.target) as channel:
        stream = Stream(channel)
        stream.start(target_return=100.0)
        for t in range(3):
            stream.step(np.zeros(STATE_DIM), **({} if t == 0 else {"reward": 2.5}))
        assert stream.finish() == grpc.StatusCode.OK
        expect_status(Stream(channel), policy_pb2.ActRequest(start=policy_pb2.Start(model="nope")))
    assert server.terminate() == 0
    entries = [json.loads(line) for line in server.output if line.startswith("{")]
    by_message = {}
    for entry in entries:
        by_message.setdefault(entry["message"], []).append(entry)
    (serving,) = by_message["serving"]
    assert serving["scan"] == "numba" and serving["models"] == "tiny" and serving["max_sessions"] == 1024
    (loaded,) = by_message["model loaded"]
    assert (loaded["model"], loaded["version"], loaded["device"]) == ("tiny", 1, "cpu")
    (started,) = by_message["session started"]
    assert started["target_return"] == 100.0 and started["mode"] == "window"
    (ended,) = by_message["session ended"]
    assert (ended["steps"], ended["episode_return"], ended["reason"]) == (3, 5.0, "completed")
    (refused,) = by_message["request refused"]
    assert refused["code"] == "NOT_FOUND" and refused["level"] == "warning" and "'nope'" in refused["details"]
    assert "shutting down" in by_message
    assert all(e["level"] != "info" or "step" not in e["message"] for e in entries)  # nothing per step
