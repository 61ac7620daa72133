"""Resuming an episode from the episode so far: a runner slot (and a server session) rebuilt from the
history acts exactly as one that served every step (window mode: equal on the same backend; recurrent
mode: within 1e-5)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from conftest import policy_of
from serving_fixtures import ACT_DIM, STATE_DIM, TARGET_RETURN, Stream, publish_tiny

from dmm.model import DMMConfig, PolicyNetwork, PolicyRunner, scan
from dmm.v1 import policy_pb2

MODES = [
    ("window", {}),
    ("window", {"architecture": "dt", "n_head": 2}),
    ("recurrent", {}),
    ("recurrent", {"residual": "normalized", "timestep_embedding": False}),
]


def _model(seed: int = 0, **overrides: object) -> PolicyNetwork:
    torch.manual_seed(seed)
    cfg = {"state_dim": 5, "act_dim": 2, "d_model": 16, "n_layer": 2, "context": 4, "dsm_window": 6}
    model = PolicyNetwork(DMMConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _uninterrupted(runner: PolicyRunner, slot: int, states: np.ndarray, rtgs: np.ndarray) -> np.ndarray:
    runner.reset([slot])
    return np.stack([runner.step([slot], states[t : t + 1], rtgs[t : t + 1])[0] for t in range(len(states))])


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize(("mode", "overrides"), MODES)
def test_a_resumed_slot_acts_as_the_uninterrupted_one(mode, overrides, backend, monkeypatch) -> None:
    """Resume after t steps, for t before, at and well past the context, several slots in one call."""
    monkeypatch.setenv(scan.ENV_VAR, backend)
    policy = policy_of(_model(**overrides))
    rng = np.random.default_rng(1)
    T = 15
    states = rng.normal(size=(T, 5))
    rtgs = rng.normal(size=T) * 10
    reference = _uninterrupted(PolicyRunner(policy, mode), 0, states, rtgs)
    cuts = [1, 3, 4, 9, 14]
    runner = PolicyRunner(policy, mode, capacity=1)
    slots = [5, 1, 2, 3, 0]
    runner.resume(slots, [states[:t] for t in cuts], [reference[:t] for t in cuts], [rtgs[:t] for t in cuts])
    assert [runner.steps_taken(s) for s in slots] == cuts
    for slot, t in zip(slots, cuts, strict=True):
        for step in range(t, T):
            action = runner.step([slot], states[step : step + 1], rtgs[step : step + 1])[0]
            if mode == "window":
                np.testing.assert_array_equal(action, reference[step])
            else:
                np.testing.assert_allclose(action, reference[step], atol=1e-5, rtol=0)


@pytest.mark.parametrize("budget", [20, 1024])
@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize(("mode", "overrides"), MODES)
def test_slots_resumed_together_act_as_resumed_singly(mode, overrides, backend, budget, monkeypatch) -> None:
    """resume of several slots (batched rebuilds of at most ``budget`` rows x steps: several forwards, or one)
    leaves every slot acting as resume does one slot at a time, and as the uninterrupted slot."""
    monkeypatch.setenv(scan.ENV_VAR, backend)
    monkeypatch.setattr(PolicyRunner, "RESUME_BATCH_ROW_STEPS", budget)
    policy = policy_of(_model(**overrides))
    rng = np.random.default_rng(2)
    T = 15
    states = rng.normal(size=(T, 5))
    rtgs = rng.normal(size=T) * 10
    reference = _uninterrupted(PolicyRunner(policy, mode), 0, states, rtgs)
    cuts = [3, 14, 1, 9, 4, 14]  # unsorted, with a tie
    slots = [5, 1, 2, 3, 0, 7]
    singly, together = PolicyRunner(policy, mode, capacity=1), PolicyRunner(policy, mode, capacity=1)
    for slot, t in zip(slots, cuts, strict=True):
        singly.resume([slot], [states[:t]], [reference[:t]], [rtgs[:t]])
    together.resume(
        slots, [states[:t] for t in cuts], [reference[:t] for t in cuts], [rtgs[:t] for t in cuts]
    )
    assert [together.steps_taken(s) for s in slots] == cuts
    for slot, t in zip(slots, cuts, strict=True):
        for step in range(t, T):
            inputs = (states[step : step + 1], rtgs[step : step + 1])
            a, b = singly.step([slot], *inputs)[0], together.step([slot], *inputs)[0]
            if mode == "window":
                np.testing.assert_array_equal(b, a)
                np.testing.assert_array_equal(b, reference[step])
            else:
                np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
                np.testing.assert_allclose(b, reference[step], atol=1e-5, rtol=0)


def test_resume_refuses_histories_of_the_wrong_shape() -> None:
    runner = PolicyRunner(policy_of(_model()), "window")
    with pytest.raises(ValueError, match="t >= 1"):
        runner.resume([0], [np.zeros((2, 5))], [np.zeros((3, 2))], [np.zeros(2)])
    with pytest.raises(ValueError, match="t >= 1"):
        runner.resume([0], [np.zeros((0, 5))], [np.zeros((0, 2))], [np.zeros(0)])


# ---------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    from dmm.server.testing import ServerProcess

    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, "tiny")
    publish_tiny(root, "short", max_ep_len=20)
    with ServerProcess(root, ["--mode", "window"]) as server:
        yield server


def _episode(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, STATE_DIM)), rng.uniform(0.5, 3.0, size=n)


def _act_episode(channel: grpc.Channel, states, rewards, mode: str, model: str = "tiny", **start):
    """Actions and rtgs of an uninterrupted Act session over the whole episode."""
    stream = Stream(channel)
    stream.start(model=model, mode=_MODE[mode], **start)
    actions, rtgs = [], []
    for t, state in enumerate(states):
        reply = stream.step(state, **({"reward": float(rewards[t - 1])} if t else {}))
        actions.append(list(reply.action))
        rtgs.append(reply.rtg)
    stream.end(float(rewards[len(states) - 1]))
    assert stream.finish() == grpc.StatusCode.OK
    return np.array(actions, dtype=np.float32), np.array(rtgs)


_MODE = {"window": policy_pb2.INFERENCE_MODE_WINDOW, "recurrent": policy_pb2.INFERENCE_MODE_RECURRENT}


def _so_far(states, actions, rewards, t: int) -> policy_pb2.EpisodeSoFar:
    return policy_pb2.EpisodeSoFar(
        steps=t,
        states=states[:t].ravel().tolist(),
        actions=actions[:t].ravel().tolist(),
        rewards=rewards[: t - 1].tolist(),
    )


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_an_act_session_resumed_on_the_server_goes_on_as_before(served, mode: str) -> None:
    states, rewards = _episode(30)
    with grpc.insecure_channel(served.target) as channel:
        actions, rtgs = _act_episode(channel, states, rewards, mode)
        for t in (1, 7, 29):
            stream = Stream(channel)
            stream.start(mode=_MODE[mode], resume=_so_far(states, actions, rewards, t))
            for step in range(t, 30):
                reply = stream.step(states[step], reward=float(rewards[step - 1]))
                assert reply.step == step and reply.rtg == rtgs[step]
                if mode == "window":
                    assert list(reply.action) == actions[step].tolist()
                else:
                    np.testing.assert_allclose(reply.action, actions[step], atol=1e-5, rtol=0)
            stream.end(1.0)
            assert stream.finish() == grpc.StatusCode.OK


def test_a_resume_with_rtgs_conditions_on_them(served) -> None:
    states, rewards = _episode(10, seed=2)
    with grpc.insecure_channel(served.target) as channel:
        actions, rtgs = _act_episode(channel, states, rewards, "window")
        stream = Stream(channel)
        so_far = policy_pb2.EpisodeSoFar(
            steps=6, states=states[:6].ravel().tolist(), actions=actions[:6].ravel().tolist(), rtgs=rtgs[:6]
        )
        stream.start(mode=_MODE["window"], resume=so_far)
        reply = stream.step(states[6], reward=float(rewards[5]))
        assert list(reply.action) == actions[6].tolist() and reply.rtg == rtgs[6]


def test_a_vector_stream_resumes_every_row(served) -> None:
    states, rewards = _episode(12, seed=3)
    other, other_rewards = _episode(12, seed=4)
    with grpc.insecure_channel(served.target) as channel:
        a, _ = _act_episode(channel, states, rewards, "window")
        b, _ = _act_episode(channel, other, other_rewards, "window")
        stream = Stream(channel, rpc="ActVector")
        start = policy_pb2.VectorStart(
            start=policy_pb2.Start(model="tiny", mode=_MODE["window"]),
            episodes=2,
            resume=[_so_far(states, a, rewards, 5), _so_far(other, b, other_rewards, 9)],
        )
        assert stream.send(policy_pb2.VectorRequest(start=start)).started.episodes == 2
        step = policy_pb2.VectorStep(
            states=np.concatenate([states[5], other[9]]).tolist(), rewards=[rewards[4], other_rewards[8]]
        )
        reply = stream.send(policy_pb2.VectorRequest(step=step)).actions
        assert list(reply.steps) == [5, 9]
        assert list(reply.actions) == np.concatenate([a[5], b[9]]).tolist()


@pytest.fixture(scope="module")
def batching(tmp_path_factory: pytest.TempPathFactory):
    """A server whose batching window (300 ms) holds every resumed start a test sends at once."""
    from dmm.server.testing import ServerProcess

    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, "tiny")
    with ServerProcess(root, ["--mode", "window", "--max-delay-ms", "300"]) as server:
        yield server


def _resumed_steps(streams: list[Stream], episodes, cuts: list[int], steps: int) -> list[np.ndarray]:
    """Each stream's actions for ``steps`` steps after its cut (its resumed start already sent)."""
    actions = []
    for stream, (states, rewards), t in zip(streams, episodes, cuts, strict=True):
        assert next(stream.call).started.model == "tiny"
        replies = []
        for step in range(t, t + steps):
            reply = stream.step(states[step], reward=float(rewards[step - 1]))
            assert reply.step == step
            replies.append(list(reply.action))
        actions.append(np.array(replies, dtype=np.float32))
        stream.end(1.0)
        assert stream.finish() == grpc.StatusCode.OK
    return actions


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_sessions_resumed_at_once_go_on_as_resumed_singly(batching, mode: str) -> None:
    """Resumed starts that arrive together are rebuilt together (recurrent: in one batch, the server
    logs it) and act as the same sessions resumed one at a time, and as the uninterrupted ones."""
    episodes = [_episode(24, seed=10 + i) for i in range(4)]
    cuts, after = [5, 20, 1, 12], 3
    with grpc.insecure_channel(batching.target) as channel:
        played = [_act_episode(channel, states, rewards, mode)[0] for states, rewards in episodes]

        def start(i: int) -> Stream:
            (states, rewards), t = episodes[i], cuts[i]
            stream = Stream(channel)
            so_far = _so_far(states, played[i], rewards, t)
            stream.put(
                policy_pb2.ActRequest(start=policy_pb2.Start(model="tiny", mode=_MODE[mode], resume=so_far))
            )
            return stream

        singly = [_resumed_steps([start(i)], [episodes[i]], [cuts[i]], after)[0] for i in range(4)]
        logged = len(batching.output)
        together = _resumed_steps([start(i) for i in range(4)], episodes, cuts, after)
    rebuilt = [line for line in batching.output[logged:] if "histories rebuilt" in line]
    if mode == "recurrent":  # a window runner's batch is what arrived before the loop's next pass
        assert len(rebuilt) == 1 and "episodes=4" in rebuilt[0], rebuilt
    for i, t in enumerate(cuts):
        if mode == "window":
            np.testing.assert_array_equal(together[i], singly[i])
            np.testing.assert_array_equal(together[i], played[i][t : t + after])
        else:
            np.testing.assert_allclose(together[i], singly[i], atol=1e-5, rtol=0)
            np.testing.assert_allclose(together[i], played[i][t : t + after], atol=1e-5, rtol=0)


def _refused(channel: grpc.Channel, start: policy_pb2.Start) -> grpc.RpcError:
    stream = Stream(channel)
    with pytest.raises(grpc.RpcError) as info:
        stream.start(**{f.name: v for f, v in start.ListFields()})
    return info.value


@pytest.mark.parametrize(
    ("so_far", "message"),
    [
        (dict(steps=3, states=[0.0] * 3 * STATE_DIM, actions=[0.0] * 3 * ACT_DIM), "rewards"),
        (dict(steps=2, states=[0.0] * STATE_DIM, actions=[0.0] * 2 * ACT_DIM, rewards=[1.0]), "states"),
        (dict(steps=2, states=[0.0] * 2 * STATE_DIM, actions=[0.0] * ACT_DIM, rewards=[1.0]), "actions"),
        (dict(steps=0), "steps"),
        (dict(steps=1, states=[float("nan")] * STATE_DIM, actions=[0.0] * ACT_DIM), "state"),
        (dict(steps=1, states=[0.0] * STATE_DIM, actions=[2.0] * ACT_DIM), "action"),
        (dict(steps=2, states=[0.0] * 2 * STATE_DIM, actions=[0.0] * 2 * ACT_DIM, rewards=[1e39]), "reward"),
    ],
)
def test_a_bad_history_is_refused(served, so_far: dict, message: str) -> None:
    with grpc.insecure_channel(served.target) as channel:
        err = _refused(channel, policy_pb2.Start(model="tiny", resume=policy_pb2.EpisodeSoFar(**so_far)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.details()


def test_a_history_longer_than_the_models_episodes_is_refused(served) -> None:
    t = 21
    so_far = policy_pb2.EpisodeSoFar(
        steps=t, states=[0.0] * t * STATE_DIM, actions=[0.0] * t * ACT_DIM, rewards=[1.0] * (t - 1)
    )
    with grpc.insecure_channel(served.target) as channel:
        err = _refused(channel, policy_pb2.Start(model="short", resume=so_far))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max episode length 20" in err.details()


def test_a_vector_resume_names_every_row_or_none(served) -> None:
    so_far = policy_pb2.EpisodeSoFar(steps=1, states=[0.0] * STATE_DIM, actions=[0.0] * ACT_DIM)
    with grpc.insecure_channel(served.target) as channel:
        stream = Stream(channel, rpc="ActVector")
        start = policy_pb2.VectorStart(start=policy_pb2.Start(model="tiny"), episodes=2, resume=[so_far])
        with pytest.raises(grpc.RpcError) as info:
            stream.send(policy_pb2.VectorRequest(start=start))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one per row" in info.value.details()


def test_an_old_style_start_begins_a_new_episode(served) -> None:
    """A Start without the new fields, as an old client's stubs write it, starts at step 0."""
    old = policy_pb2.ActRequest(start=policy_pb2.Start(model="tiny", target_return=TARGET_RETURN))
    wire = old.SerializeToString()
    assert policy_pb2.ActRequest.FromString(wire) == old  # nothing new on the wire
    with grpc.insecure_channel(served.target) as channel:
        stream = Stream(channel)
        assert stream.send(policy_pb2.ActRequest.FromString(wire)).started.target_return == TARGET_RETURN
        reply = stream.step(np.zeros(STATE_DIM))
        assert reply.step == 0 and reply.rtg == TARGET_RETURN
        with pytest.raises(grpc.RpcError) as info:
            stream.step(np.zeros(STATE_DIM))  # no reward: as before, refused
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
