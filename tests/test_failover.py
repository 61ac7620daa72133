"""No episode lost when a server dies or drains: a PolicyClient given two servers resumes its episodes on
the other one, and in window mode the rollout's returns equal an uninterrupted rollout's."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from serving_fixtures import STATE_DIM, Stream, publish_tiny

from dmm.client import PolicyClient, PolicyServiceError
from dmm.server.testing import ServerProcess, metric_value
from dmm.v1 import policy_pb2

ENV = "hopper-medium-v2"
ROLLOUT = {"env": ENV, "episodes": 4, "num_envs": 2, "seed": 3, "max_episode_steps": 80, "progress": False}


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    publish_tiny(root, ENV, seed=0)
    return root


@pytest.fixture
def servers(store_root: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    first = ServerProcess(store_root, ["--mode", "window", "--grace", "20"]).start()
    try:
        with ServerProcess(store_root, ["--mode", "window"]) as second:
            yield first, second
    finally:
        first.kill()


class _Trigger(threading.Thread):
    """Sends ``then`` to the first of ``servers`` that answers ``actions`` more actions than it had
    answered when the trigger started; :attr:`fired` is that server."""

    def __init__(self, servers: list[ServerProcess], actions: int, then: signal.Signals) -> None:
        super().__init__(daemon=True)
        self.servers, self.then = servers, then
        self.limits = [_served(server) + actions for server in servers]
        self.fired: ServerProcess | None = None
        self.start()

    def run(self) -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            for server, limit in zip(self.servers, self.limits, strict=True):
                if _served(server) >= limit:
                    assert server.proc is not None
                    server.proc.send_signal(self.then)
                    self.fired = server
                    return
            time.sleep(0.005)


def _served(server: ServerProcess) -> float:
    return metric_value(server.scrape(), "dmm_actions_total", {"model": ENV}) or 0.0


def _rollout(client: PolicyClient, vectorized: bool):
    """A vector env's rows always share their forwards; per-episode streams run one at a time, as
    concurrent ones would share forwards with varying neighbours (float sums in another order)."""
    return client.rollout(vectorized=vectorized, **{**ROLLOUT, "num_envs": 2 if vectorized else 1})


def _reference(target: str, vectorized: bool) -> list[float]:
    with PolicyClient(target) as client:
        result = _rollout(client, vectorized)
    assert result.failovers == 0
    return result.returns


@pytest.mark.parametrize("vectorized", [True, False], ids=["vector-env", "per-episode-streams"])
@pytest.mark.parametrize("addresses", ["list", "multi-address"])
def test_a_rollout_survives_a_killed_server(servers, vectorized: bool, addresses: str) -> None:
    pytest.importorskip("mujoco")
    first, second = servers
    expected = _reference(second.target, vectorized)
    if addresses == "list":
        target: str | list[str] = [first.target, second.target]
    else:
        target = f"ipv4:{first.target},{second.target}"
    killer = _Trigger([first, second], 15, signal.SIGKILL)
    with PolicyClient(target) as client:
        result = _rollout(client, vectorized)
    killer.join(5)
    assert killer.fired is not None and killer.fired.proc is not None
    assert killer.fired.proc.wait(5) == -signal.SIGKILL
    assert result.failovers >= 1
    assert result.returns == expected  # window mode: the very same actions after the resume
    assert len(result.resume_seconds) <= result.failovers
    assert all(0 < t < 10 for t in result.resume_seconds)
    if vectorized:  # one stream, mid-episode when the server died: it resumed
        assert result.resume_seconds


def test_a_draining_server_hands_its_episodes_over(servers) -> None:
    pytest.importorskip("mujoco")
    first, second = servers
    expected = _reference(second.target, True)
    drain = _Trigger([first], 15, signal.SIGTERM)
    started = time.monotonic()
    with PolicyClient([first.target, second.target]) as client:
        result = client.rollout(**ROLLOUT)
    drain.join(5)
    assert drain.fired is first
    assert result.failovers >= 1 and result.returns == expected
    # Its streams moved at once, so it exits well before its 20 s grace period.
    assert first.proc is not None and first.proc.wait(15) == 0
    assert time.monotonic() - started < 15
    assert any("sessions moved" in line for line in first.output)


def test_a_draining_server_tells_resumable_streams_to_move_and_lets_others_finish(
    store_root: Path,
) -> None:
    ok = np.zeros(STATE_DIM)
    server = ServerProcess(store_root, ["--grace", "5"]).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            old, resumable = Stream(channel), Stream(channel)
            old.start(model=ENV)
            old.step(ok)
            resumable.start(model=ENV, resumable=True)
            resumable.step(ok)
            server.proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as info:
                for _ in range(500):
                    resumable.step(ok, reward=1.0)
                    time.sleep(0.01)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "resume" in info.value.details()
            assert ("dmm-resume", "elsewhere") in tuple(info.value.trailing_metadata() or ())
            # A client that cannot resume keeps its session for the grace period, as before.
            old.step(ok, reward=1.0)
            old.end(1.0)
            assert old.finish() == grpc.StatusCode.OK
            # New sessions are refused: the client goes elsewhere.
            with pytest.raises(grpc.RpcError) as refused:
                Stream(channel).start(model=ENV)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.proc.wait(30) == 0
    finally:
        server.kill()


def test_failover_gives_up_after_its_retries(store_root: Path) -> None:
    """With no server left, the rollout fails with UNAVAILABLE after the bounded retries."""
    pytest.importorskip("mujoco")
    server = ServerProcess(store_root).start()
    killer = _Trigger([server], 5, signal.SIGKILL)
    try:
        with (
            PolicyClient(server.target, failover_retries=2, failover_backoff_s=0.01) as client,
            pytest.raises(PolicyServiceError) as info,
        ):
            client.rollout(**ROLLOUT)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        killer.join(5)
        server.kill()


def test_bad_failover_settings_are_refused() -> None:
    from dmm.errors import DMMError

    with pytest.raises(DMMError, match="target"):
        PolicyClient([])
    with pytest.raises(DMMError, match="failover"):
        PolicyClient("localhost:1", failover_retries=-1)


def test_the_resume_start_pins_version_mode_and_target() -> None:
    """A resumed stream asks for what the first server chose, so a new latest version cannot change
    an episode halfway."""
    from dmm.client.policy_client import _resume_start

    started = policy_pb2.SessionStarted(
        version=3, mode=policy_pb2.INFERENCE_MODE_RECURRENT, target_return=7.0
    )
    resumed = _resume_start(policy_pb2.Start(model=ENV, resumable=True), started)
    assert (resumed.version, resumed.mode, resumed.target_return) == (3, started.mode, 7.0)
    assert resumed.model == ENV and resumed.resumable


def test_rollout_cli_takes_several_targets() -> None:
    """Repeated ``--target`` and comma-separated lists add up; a gRPC multi-address target stays one."""
    from dmm.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["rollout", "--target", "a:1, b:2", "--target", "ipv4:10.0.0.1:5,10.0.0.2:5"])
    assert args.target == [["a:1", "b:2"], ["ipv4:10.0.0.1:5,10.0.0.2:5"]]
    assert parser.parse_args(["rollout"]).target is None  # localhost:50051 then


@pytest.mark.parametrize("bad", ["", "a:1,", ",a:1", "ipv4:"])
def test_rollout_cli_refuses_an_empty_target(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    from dmm.cli import main

    with pytest.raises(SystemExit) as info:
        main(["rollout", "--target", bad])
    assert info.value.code == 2
    assert "--target: must be a server address or a comma-separated list" in capsys.readouterr().err


def test_rollout_cli_fails_over_between_its_targets(servers, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("mujoco")
    from dmm.cli import main

    first, second = servers
    killer = _Trigger([first, second], 15, signal.SIGKILL)
    argv = ["rollout", "--target", f"{first.target},{second.target}", "--env", ENV, "--episodes", "4"]
    argv += ["--num-envs", "2", "--seed", "3", "--max-episode-steps", "80", "--no-progress"]
    assert main(argv) == 0
    killer.join(5)
    assert killer.fired is not None
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "4 episodes" in line
    assert int(line.rsplit("failovers ", 1)[1]) >= 1


# ---------------------------------------------------------------- how a stream picks its next server


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "Socket closed"


class _FakeServer:
    """A stub whose Act streams answer each request with (server, kind) until it is down: a stream
    open when it goes down fails at its next reply, as do new ones. ``replies``: it goes down after
    that many replies (None: never)."""

    def __init__(self, name: str, tries: list[str], up: bool = True, replies: int | None = None) -> None:
        self.name, self.tries, self.up, self.replies = name, tries, up, replies
        self.received: list[policy_pb2.ActRequest] = []

    def Act(self, requests: Iterator[policy_pb2.ActRequest], timeout: float | None = None) -> _FakeCall:
        self.tries.append(self.name)
        return _FakeCall(self, requests)


class _FakeCall:
    def __init__(self, server: _FakeServer, requests: Iterator[policy_pb2.ActRequest]) -> None:
        self.server, self.requests = server, requests

    def __iter__(self) -> _FakeCall:
        return self

    def __next__(self) -> tuple[str, str]:
        server = self.server
        if server.replies == 0:
            server.up = False
        if not server.up:
            raise _Unavailable()
        request = next(self.requests)
        server.received.append(request)
        if server.replies is not None:
            server.replies -= 1
        return server.name, request.WhichOneof("kind")

    def cancel(self) -> None:
        pass


def _stream(servers: list[_FakeServer], retries: int = 6, backoff_s: float = 0.05):
    """A resumable Act stream over ``servers`` whose backoffs are recorded instead of slept (the
    ``sleeps`` list; ``on_sleep`` runs at each)."""
    from dmm.client.policy_client import _ResumableStream, _Servers

    def start_request() -> policy_pb2.ActRequest:
        return policy_pb2.ActRequest(start=policy_pb2.Start(model=ENV, resumable=True))

    stream = _ResumableStream(_Servers(servers, retries, backoff_s), "Act", start_request)
    stream.sleeps, stream.on_sleep = [], lambda: None

    def sleep(seconds: float) -> None:
        stream.sleeps.append(seconds)
        stream.on_sleep()

    stream.sleep = sleep
    return stream


STEP = policy_pb2.ActRequest(step=policy_pb2.Step(state=[0.0] * STATE_DIM))


def test_a_stream_whose_server_died_moves_at_once_and_sends_start_and_step_together() -> None:
    tries: list[str] = []
    a, b = _FakeServer("a", tries, replies=2), _FakeServer("b", tries)
    stream = _stream([a, b])
    assert stream.start() == ("a", "start")
    assert stream.send(STEP) == ("a", "step")
    assert stream.send(STEP) == ("b", "step")  # a died: b answers the start, then the step
    assert tries == ["a", "b"] and stream.sleeps == []
    assert [r.WhichOneof("kind") for r in b.received] == ["start", "step"]
    assert stream.failovers == 1 and len(stream.resume_seconds) == 1
    assert stream.send(STEP) == ("b", "step")  # and stays there
    assert tries == ["a", "b"]


def test_backoff_only_after_a_try_on_every_server_failed() -> None:
    """a dies mid-episode; b and c are down too: b, c and a are each tried once at once, and only then
    does the stream back off (once) before going round again, when b is back."""
    tries: list[str] = []
    a = _FakeServer("a", tries, replies=1)
    b, c = _FakeServer("b", tries, up=False), _FakeServer("c", tries, up=False)
    stream = _stream([a, b, c], backoff_s=0.05)
    stream.start()

    def b_back() -> None:
        b.up = True

    stream.on_sleep = b_back
    assert stream.send(STEP) == ("b", "step")
    assert tries == ["a", "b", "c", "a", "b"]
    assert stream.sleeps == [0.05]
    assert stream.failovers == 4


def test_failover_backs_off_doubling_and_gives_up_when_every_server_stays_down() -> None:
    from dmm.client.policy_client import _Servers

    tries: list[str] = []
    a, b = _FakeServer("a", tries, replies=1), _FakeServer("b", tries, up=False)
    stream = _stream([a, b], retries=2, backoff_s=0.01)
    stream.start()
    with pytest.raises(PolicyServiceError) as info:
        stream.send(STEP)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert stream.sleeps == [0.01, 0.02]  # between rounds only; three rounds of two tries
    assert tries == ["a"] + ["b", "a"] * 3
    assert _Servers([], 0, 1.0).backoff(10) == _Servers.MAX_BACKOFF_S


def test_new_streams_skip_a_server_known_down_until_it_is_seen_ready() -> None:
    from dmm.client.policy_client import _Servers

    servers = _Servers([object(), object(), object()], retries=6, backoff_s=0.05)
    assert [servers.pick() for _ in range(4)] == [0, 1, 2, 0]  # in turn
    servers.failed(2)
    assert [servers.pick() for _ in range(3)] == [1, 0, 1]
    servers.connectivity(2, grpc.ChannelConnectivity.READY)
    assert [servers.pick() for _ in range(3)] == [2, 0, 1]
    servers.connectivity(0, grpc.ChannelConnectivity.TRANSIENT_FAILURE)
    assert [servers.pick() for _ in range(2)] == [2, 1]
    servers.failed(1)
    servers.failed(2)
    assert servers.pick() == 2  # every server down: still in turn
    assert servers.pick(exclude={0}) == 1  # but not one this round tried


def test_the_client_connects_to_every_server_before_its_first_call() -> None:
    """A failover finds the other servers' connections up: the client connects at once, RPC or not."""
    import socket

    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        targets = [f"127.0.0.1:{s.getsockname()[1]}" for s in listeners]
        with PolicyClient(targets):
            for listener in listeners:
                listener.settimeout(30)
                connection, _ = listener.accept()
                connection.close()
    finally:
        for listener in listeners:
            listener.close()
