"""The policy server as a real process: exact actions, batching, bad input, hot reload, metrics, health."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from serving_fixtures import (
    STATE_DIM,
    TARGET_RETURN,
    Stream,
    episode_inputs,
    episode_metrics,
    expect_status,
    publish_tiny,
    wait_for_metric,
)

from dmm.server.testing import ServerProcess, metric_value
from dmm.store import ModelStore
from dmm.v1 import policy_pb2
from dmm.v1.modes import MODE_ENUM

MODES = MODE_ENUM
STEPS = 20  # > context K=8, so window and recurrent differ


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, "tiny", seed=0)
    publish_tiny(root, "tiny-recurrent", seed=2, inference_mode="recurrent")
    publish_tiny(root, "broken", seed=1)
    weights = root / "broken" / "1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    return root


@pytest.fixture(scope="module")
def server(store_root: Path) -> Iterator[ServerProcess]:
    with ServerProcess(store_root, ["--max-delay-ms", "50", "--max-message-bytes", "4096"]) as srv:
        yield srv


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def expected_actions(store_root: Path, mode: str, states: np.ndarray, rtgs: np.ndarray, name: str = "tiny"):
    from dmm.model import PolicyRunner, load_policy

    runner = PolicyRunner(load_policy(ModelStore(store_root), name), mode)
    runner.reset([0])
    return np.stack([runner.step([0], s[None], np.array([g]))[0] for s, g in zip(states, rtgs, strict=True)])


def run_episode(channel: grpc.Channel, mode: str, states: np.ndarray, rewards: np.ndarray, **start):
    """Stream an episode (reward of step t-1 sent with step t); returns (actions, rtgs, replies)."""
    stream = Stream(channel)
    started = stream.start(mode=MODES[mode], target_return=TARGET_RETURN, **start)
    replies = [stream.step(states[0])]
    replies += [stream.step(s, reward=r) for s, r in zip(states[1:], rewards[:-1], strict=True)]
    assert stream.finish() == grpc.StatusCode.OK
    return started, replies


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_streamed_actions_equal_in_process_runner(store_root: Path, channel: grpc.Channel, mode: str) -> None:
    states, rewards = episode_inputs(STEPS, seed=3)
    started, replies = run_episode(channel, mode, states, rewards)
    assert (started.model, started.version, started.mode) == ("tiny", 1, MODES[mode])
    assert (started.state_dim, started.act_dim) == (STATE_DIM, 3)
    rtgs = TARGET_RETURN - np.concatenate([[0.0], np.cumsum(rewards[:-1])])
    np.testing.assert_allclose([r.rtg for r in replies], rtgs)
    assert [r.step for r in replies] == list(range(STEPS))
    assert {(r.model, r.version) for r in replies} == {("tiny", 1)}
    got = np.array([r.action for r in replies])
    np.testing.assert_allclose(got, expected_actions(store_root, mode, states, rtgs), atol=1e-5)


@pytest.mark.parametrize(("name", "mode"), [("tiny", "window"), ("tiny-recurrent", "recurrent")])
def test_a_session_asking_no_mode_gets_the_one_its_policy_was_trained_for(
    store_root: Path, channel: grpc.Channel, name: str, mode: str
) -> None:
    """The server's default --mode auto: each policy's meta names the mode it is served in."""
    states, rewards = episode_inputs(STEPS, seed=4)
    stream = Stream(channel)
    started = stream.start(model=name, target_return=TARGET_RETURN)
    assert started.mode == MODES[mode]
    replies = [stream.step(states[0])]
    replies += [stream.step(s, reward=r) for s, r in zip(states[1:], rewards[:-1], strict=True)]
    assert stream.finish() == grpc.StatusCode.OK
    rtgs = TARGET_RETURN - np.concatenate([[0.0], np.cumsum(rewards[:-1])])
    got = np.array([r.action for r in replies])
    np.testing.assert_allclose(got, expected_actions(store_root, mode, states, rtgs, name), atol=1e-5)


def test_explicit_rtg_and_default_target_return(store_root: Path, channel: grpc.Channel) -> None:
    states, _ = episode_inputs(3, seed=4)
    stream = Stream(channel)
    assert stream.start().target_return == TARGET_RETURN  # from the model's meta
    replies = [
        stream.step(states[0]),
        stream.step(states[1], rtg=1234.5),
        stream.step(states[2], reward=34.5),
    ]
    assert stream.finish() == grpc.StatusCode.OK
    rtgs = np.array([TARGET_RETURN, 1234.5, 1200.0])
    np.testing.assert_allclose([r.rtg for r in replies], rtgs)
    got = np.array([r.action for r in replies])
    np.testing.assert_allclose(got, expected_actions(store_root, "window", states, rtgs), atol=1e-5)


def test_concurrent_sessions_are_batched_and_exact(
    store_root: Path, server: ServerProcess, channel: grpc.Channel
) -> None:
    n = 6
    before = metric_value(server.scrape(), "dmm_batch_size_bucket", {"model": "tiny", "le": "1.0"}) or 0.0
    barrier = threading.Barrier(n)
    inputs = [episode_inputs(STEPS, seed=100 + i) for i in range(n)]
    results: list[object] = [None] * n

    def session(i: int) -> None:
        try:
            states, rewards = inputs[i]
            stream = Stream(channel)
            stream.start(mode=MODES["recurrent"], target_return=TARGET_RETURN)
            replies = []
            for t in range(STEPS):
                barrier.wait(timeout=10)  # all sessions send step t together
                replies.append(stream.step(states[t], **({"reward": rewards[t - 1]} if t else {})))
            assert stream.finish() == grpc.StatusCode.OK
            results[i] = np.array([r.action for r in replies])
        except Exception as err:
            results[i] = err
            barrier.abort()

    threads = [threading.Thread(target=session, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (states, rewards) in enumerate(inputs):
        assert isinstance(results[i], np.ndarray), results[i]
        rtgs = TARGET_RETURN - np.concatenate([[0.0], np.cumsum(rewards[:-1])])
        np.testing.assert_allclose(
            results[i], expected_actions(store_root, "recurrent", states, rtgs), atol=1e-5
        )
    text = server.scrape()
    batches = metric_value(text, "dmm_batch_size_count", {"model": "tiny"})
    singles = metric_value(text, "dmm_batch_size_bucket", {"model": "tiny", "le": "1.0"}) - before
    steps_sum = metric_value(text, "dmm_batch_size_sum", {"model": "tiny"})
    assert steps_sum / batches > 1.0
    assert singles < n * STEPS / 2, "most of the lock-step sessions' steps should have been batched"


@pytest.mark.parametrize(
    ("case", "code", "words"),
    [
        ("step before start", grpc.StatusCode.FAILED_PRECONDITION, ["step before start"]),
        ("unknown model", grpc.StatusCode.NOT_FOUND, ["unknown model 'nope'; available models: broken,"]),
        ("unknown version", grpc.StatusCode.NOT_FOUND, ["no version 7", "available versions: 1"]),
        ("corrupt version", grpc.StatusCode.DATA_LOSS, ["broken/1/model.safetensors", "checksum"]),
        ("empty request", grpc.StatusCode.INVALID_ARGUMENT, ["empty ActRequest"]),
        ("wrong state length", grpc.StatusCode.INVALID_ARGUMENT, ["state_dim=11", "has 5 values"]),
        ("NaN state", grpc.StatusCode.INVALID_ARGUMENT, ["non-finite", "[2]"]),
        ("inf reward", grpc.StatusCode.INVALID_ARGUMENT, ["reward is inf"]),
        ("state beyond float32", grpc.StatusCode.INVALID_ARGUMENT, ["state[3] = 1e+39", "float32"]),
        ("reward beyond float32", grpc.StatusCode.INVALID_ARGUMENT, ["reward is 1e+308", "float32"]),
        ("target beyond float32", grpc.StatusCode.INVALID_ARGUMENT, ["target_return is 1e+308"]),
        ("state the model turns into NaN", grpc.StatusCode.INTERNAL, ["non-finite action", "ended"]),
        ("missing reward", grpc.StatusCode.INVALID_ARGUMENT, ["neither the reward"]),
        ("reward on step 0", grpc.StatusCode.INVALID_ARGUMENT, ["no previous action"]),
        ("second start", grpc.StatusCode.FAILED_PRECONDITION, ["second start"]),
        ("wrong env dims", grpc.StatusCode.INVALID_ARGUMENT, ["start.state_dim=17", "state_dim=11"]),
        (
            "oversized message",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            ["ActRequest of", "over the server's limit of 4096"],
        ),
    ],
)
def test_bad_input_gets_precise_status_and_others_continue(
    store_root: Path, server: ServerProcess, channel: grpc.Channel, case: str, code: grpc.StatusCode, words
) -> None:
    states, rewards = episode_inputs(STEPS, seed=7)
    healthy = Stream(channel)
    healthy.start(mode=MODES["window"], target_return=TARGET_RETURN)
    replies = [healthy.step(states[0]), healthy.step(states[1], reward=rewards[0])]

    ok = np.zeros(STATE_DIM)
    start, step = policy_pb2.Start, policy_pb2.Step
    bad = Stream(channel)
    if case == "step before start":
        err = expect_status(bad, policy_pb2.ActRequest(step=step(state=ok)))
    elif case == "unknown model":
        err = expect_status(bad, policy_pb2.ActRequest(start=start(model="nope")))
    elif case == "unknown version":
        err = expect_status(bad, policy_pb2.ActRequest(start=start(model="tiny", version=7)))
    elif case == "corrupt version":
        err = expect_status(bad, policy_pb2.ActRequest(start=start(model="broken")))
    elif case == "empty request":
        err = expect_status(bad, policy_pb2.ActRequest())
    elif case == "wrong env dims":
        err = expect_status(bad, policy_pb2.ActRequest(start=start(model="tiny", state_dim=17, act_dim=3)))
    elif case == "target beyond float32":
        err = expect_status(bad, policy_pb2.ActRequest(start=start(model="tiny", target_return=1e308)))
    else:
        bad.start()
        if case == "second start":
            err = expect_status(bad, policy_pb2.ActRequest(start=start(model="tiny")))
        elif case == "reward on step 0":
            err = expect_status(bad, policy_pb2.ActRequest(step=step(state=ok, reward=1.0)))
        else:
            bad.step(ok)
            requests = {
                "wrong state length": step(state=[0.0] * 5, reward=0.0),
                "NaN state": step(state=[0.0, 0.0, float("nan"), *[0.0] * 8], reward=0.0),
                "inf reward": step(state=ok, reward=float("inf")),
                "missing reward": step(state=ok),
                "oversized message": step(state=np.zeros(STATE_DIM * 100), reward=0.0),
                "state beyond float32": step(state=[0.0] * 3 + [1e39] + [0.0] * 7, reward=0.0),
                "reward beyond float32": step(state=ok, reward=1e308),
                "state the model turns into NaN": step(state=[1e30] * STATE_DIM, reward=0.0),
            }
            err = expect_status(bad, policy_pb2.ActRequest(step=requests[case]))
    assert err.code() == code, err.details()
    for word in words:
        assert word in err.details(), err.details()
    assert str(store_root) not in err.details()  # remote clients are not told where the store is

    replies += [healthy.step(s, reward=r) for s, r in zip(states[2:], rewards[1:-1], strict=True)]
    assert healthy.finish() == grpc.StatusCode.OK
    rtgs = TARGET_RETURN - np.concatenate([[0.0], np.cumsum(rewards[:-1])])
    got = np.array([r.action for r in replies])
    np.testing.assert_allclose(got, expected_actions(store_root, "window", states, rtgs), atol=1e-5)
    assert metric_value(server.scrape(), "dmm_errors_total", {"code": code.name}) >= 1


def test_new_version_serves_new_sessions_only(
    store_root: Path, server: ServerProcess, channel: grpc.Channel
) -> None:
    publish_tiny(store_root, "reload", seed=10)
    states, rewards = episode_inputs(STEPS, seed=11)
    old = Stream(channel)
    assert old.start(model="reload").version == 1
    assert old.step(states[0]).version == 1
    assert publish_tiny(store_root, "reload", seed=12) == 2

    new = Stream(channel)
    assert new.start(model="reload").version == 2
    assert new.step(states[0]).version == 2
    assert new.finish() == grpc.StatusCode.OK
    text = server.scrape()
    assert metric_value(text, "dmm_model_versions_loaded", {"model": "reload", "version": "1"}) == 1
    assert metric_value(text, "dmm_model_versions_loaded", {"model": "reload", "version": "2"}) == 1

    replies = [old.step(s, reward=r) for s, r in zip(states[1:], rewards[:-1], strict=True)]
    assert {r.version for r in replies} == {1}
    assert old.finish() == grpc.StatusCode.OK
    # v1 is unused and no longer the latest: unloaded. v2 stays for the next sessions.
    text = server.scrape()
    assert metric_value(text, "dmm_model_versions_loaded", {"model": "reload", "version": "1"}) is None
    assert metric_value(text, "dmm_model_versions_loaded", {"model": "reload", "version": "2"}) == 1
    assert metric_value(text, "dmm_model_loads_total", {"model": "reload"}) == 2


def test_list_describe_health_reflection(server: ServerProcess, channel: grpc.Channel) -> None:
    from dmm.v1 import policy_pb2_grpc

    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    models = {m.name: list(m.versions) for m in stub.ListModels(policy_pb2.ListModelsRequest()).models}
    assert models["tiny"] == [1]
    described = stub.Describe(policy_pb2.DescribeRequest(model="tiny"))
    assert (described.version, described.state_dim, described.act_dim) == (1, STATE_DIM, 3)
    assert '"d_model": 16' in described.config_json and '"seed": 0' in described.metrics_json
    with pytest.raises(grpc.RpcError) as info:
        stub.Describe(policy_pb2.DescribeRequest(model="tiny", version=9))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "dmm.v1.PolicyService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"dmm.v1.PolicyService", "grpc.health.v1.Health"} <= names


def test_metrics_after_traffic(server: ServerProcess, channel: grpc.Channel) -> None:
    states, rewards = episode_inputs(4, seed=5)
    run_episode(channel, "window", states, rewards)
    text = server.scrape()
    assert metric_value(text, "dmm_act_latency_seconds_count", {"model": "tiny", "mode": "window"}) >= 4
    assert metric_value(text, "dmm_act_latency_seconds_bucket", {"model": "tiny", "le": "5e-05"}) is not None
    assert metric_value(text, "dmm_queue_wait_seconds_count", {"model": "tiny"}) >= 4
    assert metric_value(text, "dmm_batch_size_bucket", {"model": "tiny", "le": "1024.0"}) >= 1
    assert metric_value(text, "dmm_sessions_started_total", {"model": "tiny"}) >= 1
    assert metric_value(text, "dmm_sessions_ended_total", {"model": "tiny", "reason": "completed"}) >= 1
    assert metric_value(text, "dmm_active_sessions", {"model": "tiny"}) == 0
    assert metric_value(text, "dmm_event_loop_lag_seconds_count") >= 1  # probed twice a second


def _raw_act(channel: grpc.Channel, messages: list[bytes]) -> tuple[list[bytes], grpc.RpcError]:
    """Send raw bytes on an Act stream; returns the responses before the error and the error."""
    call = channel.stream_stream("/dmm.v1.PolicyService/Act")(iter(messages), timeout=30)
    replies = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in call:
            replies.append(reply)
    return replies, info.value


@pytest.mark.parametrize("where", ["first message", "mid-session", "invalid UTF-8 model name"])
def test_undecodable_requests_are_invalid_argument_and_counted(
    server: ServerProcess, channel: grpc.Channel, where: str
) -> None:
    start = policy_pb2.ActRequest(start=policy_pb2.Start(model="tiny")).SerializeToString()
    step = policy_pb2.ActRequest(step=policy_pb2.Step(state=[0.0] * STATE_DIM)).SerializeToString()
    garbage = b"\xff\xff\xff\xff\x0f"
    messages = {
        "first message": [garbage],
        "mid-session": [start, step, garbage],
        "invalid UTF-8 model name": [start.replace(b"tiny", b"\xff\xfeny")],
    }[where]
    text = server.scrape()
    errors_before = metric_value(text, "dmm_errors_total", {"code": "INVALID_ARGUMENT"}) or 0.0
    ended_before = metric_value(text, "dmm_sessions_ended_total", {"model": "tiny", "reason": "error"}) or 0.0
    replies, err = _raw_act(channel, messages)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("undecodable ActRequest"), err.details()
    assert "<class" not in err.details()
    assert len(replies) == len(messages) - 1
    text = server.scrape()
    assert metric_value(text, "dmm_errors_total", {"code": "INVALID_ARGUMENT"}) == errors_before + 1
    if where == "mid-session":
        # The session is counted as it is torn down, which can come just after the client has the error.
        labels = {"model": "tiny", "reason": "error"}
        wait_for_metric(server, "dmm_sessions_ended_total", labels, ended_before + 1, timeout_s=5.0)


def test_an_oversized_message_ends_the_session_as_an_error_and_far_oversized_ones_still_fail(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    """Over --max-message-bytes (4096 here): RESOURCE_EXHAUSTED from the service, counted, reason
    "error". Over 4x that, the transport drops the message before it is read: still RESOURCE_EXHAUSTED."""
    start = policy_pb2.ActRequest(start=policy_pb2.Start(model="tiny")).SerializeToString()
    step = policy_pb2.ActRequest(step=policy_pb2.Step(state=[0.0] * STATE_DIM)).SerializeToString()
    text = server.scrape()
    ended_before = metric_value(text, "dmm_sessions_ended_total", {"model": "tiny", "reason": "error"}) or 0.0
    for size, words in ((5000, "over the server's limit of 4096"), (20000, "larger than max")):
        big = policy_pb2.ActRequest(step=policy_pb2.Step(state=[0.5] * (size // 9), reward=1.0))
        replies, err = _raw_act(channel, [start, step, big.SerializeToString()])
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and words in err.details(), err.details()
        assert len(replies) == 2
    ended = metric_value(server.scrape(), "dmm_sessions_ended_total", {"model": "tiny", "reason": "error"})
    assert ended == ended_before + 1


def test_an_undecodable_describe_is_invalid_argument(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/dmm.v1.PolicyService/Describe")(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("undecodable DescribeRequest")


def test_end_completes_the_episode_and_records_its_return(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    count, total = episode_metrics(server)
    states, rewards = episode_inputs(4, seed=3)
    stream = Stream(channel)
    stream.start()
    stream.step(states[0])
    for state, reward in zip(states[1:], rewards[:-1], strict=True):
        stream.step(state, reward=reward)
    stream.end(float(rewards[-1]))
    assert stream.finish() == grpc.StatusCode.OK
    new_count, new_total = episode_metrics(server)
    assert new_count == count + 1 and new_total == pytest.approx(total + float(np.sum(rewards)), abs=1e-9)


@pytest.mark.parametrize(
    ("before", "words"), [([], "end before start"), (["start"], "end before the first step")]
)
def test_an_end_too_early_is_refused(channel: grpc.Channel, before: list[str], words: str) -> None:
    messages = (
        [policy_pb2.ActRequest(start=policy_pb2.Start(model="tiny")).SerializeToString()] if before else []
    )
    messages.append(policy_pb2.ActRequest(end=policy_pb2.End(reward=1.0)).SerializeToString())
    _, err = _raw_act(channel, messages)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and words in err.details(), err.details()


def test_an_episode_with_explicit_rtgs_is_not_counted(server: ServerProcess, channel: grpc.Channel) -> None:
    count, _ = episode_metrics(server)
    stream = Stream(channel)
    stream.start()
    stream.step(np.zeros(STATE_DIM))
    stream.step(np.zeros(STATE_DIM), rtg=100.0)  # the last action's reward is unknown to the server
    stream.end(1.0)
    assert stream.finish() == grpc.StatusCode.OK
    assert episode_metrics(server)[0] == count
