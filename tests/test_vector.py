"""ActVector: N episodes on one stream give the actions N Act streams give, restart independently, are
checked row by row, count against --max-sessions and record their episodes."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from serving_fixtures import STATE_DIM, TARGET_RETURN, Stream, episode_metrics, expect_status, publish_tiny

from dmm.server.testing import ServerProcess, metric_value
from dmm.v1 import policy_pb2
from dmm.v1.modes import MODE_ENUM

ROWS, STEPS, RESTART_AT = 3, 12, 7  # row 1's first episode ends after step RESTART_AT - 1


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, "tiny", seed=0)
    with ServerProcess(root, ["--max-sessions", "8"]) as srv:
        yield srv


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def vector_start(episodes: int = ROWS, **start: object) -> policy_pb2.VectorRequest:
    return policy_pb2.VectorRequest(
        start=policy_pb2.VectorStart(start=policy_pb2.Start(model="tiny", **start), episodes=episodes)
    )


def vector_step(states: np.ndarray, rewards=(), rows=(), restart=()) -> policy_pb2.VectorRequest:
    step = policy_pb2.VectorStep(
        rows=list(rows),
        states=np.asarray(states).ravel().tolist(),
        rewards=list(rewards),
        restart=list(restart),
    )
    return policy_pb2.VectorRequest(step=step)


def act_episode(channel: grpc.Channel, mode: str, states: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """One Act stream: its actions [len(states), act_dim]; the reward of step t-1 comes with step t."""
    stream = Stream(channel)
    stream.start(mode=MODE_ENUM[mode], target_return=TARGET_RETURN)
    actions = [stream.step(states[0]).action]
    actions += [stream.step(s, reward=r).action for s, r in zip(states[1:], rewards, strict=False)]
    assert stream.finish() == grpc.StatusCode.OK
    return np.asarray(actions)


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_vector_actions_equal_act_actions_and_a_row_restarts_alone(channel: grpc.Channel, mode: str) -> None:
    rng = np.random.default_rng(0)
    states = rng.normal(size=(STEPS, ROWS, STATE_DIM))
    rewards = rng.uniform(0, 3, size=(STEPS, ROWS))
    stream = Stream(channel, rpc="ActVector")
    started = stream.send(vector_start(mode=MODE_ENUM[mode], target_return=TARGET_RETURN)).started
    assert (started.episodes, started.session.model, started.session.version) == (ROWS, "tiny", 1)
    replies = [stream.send(vector_step(states[0])).actions]
    for t in range(1, STEPS):
        restart = [1] if t == RESTART_AT else []
        replies.append(stream.send(vector_step(states[t], rewards[t - 1], restart=restart)).actions)
    assert stream.finish() == grpc.StatusCode.OK
    got = np.array([np.reshape(r.actions, (ROWS, -1)) for r in replies])  # [steps, rows, act_dim]
    assert [list(r.rows) for r in replies] == [list(range(ROWS))] * STEPS
    assert [r.steps[1] for r in replies] == list(range(RESTART_AT)) + list(range(STEPS - RESTART_AT))
    assert replies[RESTART_AT].rtgs[1] == TARGET_RETURN
    for row in range(ROWS):
        if row == 1:  # two episodes, the second one starting from the target return again
            want = np.concatenate(
                [
                    act_episode(channel, mode, states[:RESTART_AT, row], rewards[: RESTART_AT - 1, row]),
                    act_episode(channel, mode, states[RESTART_AT:, row], rewards[RESTART_AT:-1, row]),
                ]
            )
        else:
            want = act_episode(channel, mode, states[:, row], rewards[:-1, row])
        np.testing.assert_allclose(got[:, row], want, atol=1e-5)


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_an_act_stream_and_a_one_episode_vector_stream_answer_alike(
    server: ServerProcess, channel: grpc.Channel, mode: str
) -> None:
    """An Act stream is served as a vector stream of one row: same actions, steps, rtgs and episode."""
    rng = np.random.default_rng(1)
    states, rewards = rng.normal(size=(STEPS, STATE_DIM)), rng.uniform(0, 3, size=STEPS)
    count, total = episode_metrics(server)
    act = Stream(channel)
    act.start(mode=MODE_ENUM[mode], target_return=TARGET_RETURN)
    by_act = [act.step(states[0])] + [
        act.step(s, reward=r) for s, r in zip(states[1:], rewards, strict=False)
    ]
    act.end(float(rewards[-1]))
    assert act.finish() == grpc.StatusCode.OK
    vec = Stream(channel, rpc="ActVector")
    vec.send(vector_start(episodes=1, mode=MODE_ENUM[mode], target_return=TARGET_RETURN))
    by_vec = [vec.send(vector_step(states[:1])).actions]
    by_vec += [vec.send(vector_step(s[None], [r])).actions for s, r in zip(states[1:], rewards, strict=False)]
    vec.put(policy_pb2.VectorRequest(end=policy_pb2.VectorEnd(rows=[0], rewards=[float(rewards[-1])])))
    assert vec.finish() == grpc.StatusCode.OK
    np.testing.assert_allclose([a.action for a in by_act], [v.actions for v in by_vec], atol=1e-6)
    assert [(a.step, a.rtg) for a in by_act] == [(v.steps[0], v.rtgs[0]) for v in by_vec]
    new_count, new_total = episode_metrics(server)
    assert new_count - count == 2 and new_total - total == pytest.approx(2 * float(np.sum(rewards)))


def test_a_step_of_some_rows_answers_only_them(channel: grpc.Channel) -> None:
    stream = Stream(channel, rpc="ActVector")
    stream.send(vector_start())
    stream.send(vector_step(np.zeros((ROWS, STATE_DIM))))
    reply = stream.send(vector_step(np.ones((1, STATE_DIM)), rewards=[2.0], rows=[2])).actions
    assert list(reply.rows) == [2] and list(reply.steps) == [1] and len(reply.actions) == 3
    assert list(reply.rtgs) == [TARGET_RETURN - 2.0]
    assert stream.finish() == grpc.StatusCode.OK


def test_restarted_and_ended_episodes_are_recorded_with_their_returns(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    count, total = episode_metrics(server)
    stream = Stream(channel, rpc="ActVector")
    stream.send(vector_start(episodes=2))
    zeros = np.zeros((2, STATE_DIM))
    stream.send(vector_step(zeros))
    stream.send(vector_step(zeros, rewards=[1.0, 2.0]))
    stream.send(vector_step(zeros, rewards=[10.0, 3.0], restart=[0]))  # row 0: 1 + 10 in 2 steps
    stream.send(vector_step(zeros[:1], rewards=[4.0], rows=[1]))
    stream.put(policy_pb2.VectorRequest(end=policy_pb2.VectorEnd(rows=[1], rewards=[5.0])))  # 2+3+4+5
    assert stream.finish() == grpc.StatusCode.OK
    new_count, new_total = episode_metrics(server)
    assert new_count - count == 2 and new_total - total == pytest.approx(25.0)


BAD_STEPS = [
    ([vector_start(episodes=0)], grpc.StatusCode.INVALID_ARGUMENT, "episodes must be at least 1"),
    ([vector_step(np.zeros((ROWS, STATE_DIM)))], grpc.StatusCode.FAILED_PRECONDITION, "step before start"),
    ([vector_start(), vector_step(np.zeros((1, STATE_DIM)), rows=[0])], None, "must step every row"),
    ([vector_start(), vector_step(np.zeros((ROWS, STATE_DIM - 1)))], None, "3 rows x state_dim=11"),
    ([vector_start(), vector_step(np.zeros((ROWS, STATE_DIM)), rewards=[1.0] * ROWS)], None, "no previous"),
    (
        [vector_start(), vector_step(np.zeros((4, STATE_DIM)), rows=[0, 1, 2, 7])],
        None,
        "row 7 is out of range",
    ),
    (
        [vector_start(), vector_step(np.zeros((ROWS, STATE_DIM)), rows=[0, 1, 1])],
        None,
        "row 1 is listed twice",
    ),
]


@pytest.mark.parametrize(("messages", "code", "words"), BAD_STEPS)
def test_a_bad_message_fails_the_stream_naming_what(
    channel: grpc.Channel, messages: list, code: grpc.StatusCode | None, words: str
) -> None:
    stream = Stream(channel, rpc="ActVector")
    for message in messages[:-1]:
        stream.send(message)
    err = expect_status(stream, messages[-1])
    assert err.code() == (code or grpc.StatusCode.INVALID_ARGUMENT) and words in err.details(), err.details()


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda s: s.__setitem__((1, 2, 4), np.nan), "non-finite values at indices [4] (row 2, step 1)"),
        (lambda s: None, "rewards has 2 values for 3 stepped rows"),
    ],
)
def test_a_bad_row_is_named(channel: grpc.Channel, build, words: str) -> None:
    states = np.zeros((2, ROWS, STATE_DIM))
    build(states)
    stream = Stream(channel, rpc="ActVector")
    stream.send(vector_start())
    stream.send(vector_step(states[0]))
    rewards = [1.0] * ROWS if "rewards" not in words else [1.0, 1.0]
    err = expect_status(stream, vector_step(states[1], rewards=rewards))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err.details()


def test_restart_of_a_row_not_stepped_and_an_early_end_are_refused(channel: grpc.Channel) -> None:
    stream = Stream(channel, rpc="ActVector")
    stream.send(vector_start())
    stream.send(vector_step(np.zeros((ROWS, STATE_DIM))))
    err = expect_status(stream, vector_step(np.zeros((1, STATE_DIM)), rewards=[1.0], rows=[0], restart=[2]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "row 2 is not stepped" in err.details()
    stream = Stream(channel, rpc="ActVector")
    stream.send(vector_start())
    stream.put(policy_pb2.VectorRequest(end=policy_pb2.VectorEnd(rows=[0], rewards=[1.0])))
    with pytest.raises(grpc.RpcError) as info:
        stream.finish()
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "row 0 has taken no step" in info.value.details()


def test_a_vector_stream_counts_its_episodes_against_max_sessions(
    server: ServerProcess, channel: grpc.Channel
) -> None:
    stream = Stream(channel, rpc="ActVector")
    err = expect_status(stream, vector_start(episodes=9))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(9 asked for)" in err.details()
    held = Stream(channel, rpc="ActVector")
    held.send(vector_start(episodes=8))
    assert metric_value(server.scrape(), "dmm_active_sessions", {"model": "tiny"}) == 8
    refused = expect_status(Stream(channel), policy_pb2.ActRequest(start=policy_pb2.Start(model="tiny")))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert held.finish() == grpc.StatusCode.OK
    assert metric_value(server.scrape(), "dmm_active_sessions", {"model": "tiny"}) == 0
