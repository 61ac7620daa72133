"""Client of ``dmm.v1.PolicyService``: remote rollouts over gymnasium envs, model listing.

Torch-free: it needs only grpc, numpy, gymnasium (imported when an env is made) and the stubs. The
episodes are played by :mod:`dmm.episodes`, the loop ``dmm eval`` plays its own with; this module adds
the actors that ask the server for the actions.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import numpy as np

from dmm.client.channel import open_channel
from dmm.envs import env_spec, normalized_score
from dmm.episodes import Actor, EpisodeEngine, Episodes, Started, Step
from dmm.errors import DMMError
from dmm.v1 import policy_pb2, policy_pb2_grpc
from dmm.v1.modes import MODE_ENUM, MODE_NAME

_MODES = {None: policy_pb2.INFERENCE_MODE_UNSPECIFIED, **MODE_ENUM}
log = logging.getLogger("dmm.client")
# gRPC's own load balancing over the addresses of one target (ipv4:a,b; DNS names with several records)
ROUND_ROBIN = ("grpc.lb_policy_name", "round_robin")
# How soon a channel tries a server that went away again. gRPC's default backoff starts at 1 s and
# grows to 2 min, so in a rolling restart a channel was still waiting to retry the server that had
# come back when the other one drained, and episodes ran out of failover tries (bench/results/chaos:
# 8 of 48 lost; 0 of 32 with 500 ms).
RECONNECT_BACKOFF = (("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 500))


class PolicyServiceError(DMMError):
    """The server answered an RPC with an error status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

    @classmethod
    def from_rpc(cls, err: grpc.RpcError) -> PolicyServiceError:
        return cls(err.code(), err.details() or "")


@dataclass(frozen=True)
class ModelDescription:
    model: str
    version: int
    state_dim: int
    act_dim: int
    config: dict[str, Any]
    meta: dict[str, Any]
    metrics: dict[str, Any]
    versions: list[int]


@dataclass
class RolloutResult:
    """Per-episode results of :meth:`PolicyClient.rollout`, in episode order."""

    env: str
    model: str
    mode: str
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    normalized_scores: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    target_return: float = math.nan
    # Times a stream moved to another server (its server died or drained) and resumed its episodes.
    failovers: int = 0
    # Per resumed request: seconds from the client seeing its stream fail to the answer on another server
    # (backoff and reconnection included), so a benchmark can report resume latency as a client sees it.
    resume_seconds: list[float] = field(default_factory=list)

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std_return(self) -> float:
        return float(np.std(self.returns))

    @property
    def mean_normalized_score(self) -> float:
        return float(np.mean(self.normalized_scores))

    @property
    def std_normalized_score(self) -> float:
        return float(np.std(self.normalized_scores))

    @property
    def version(self) -> int:
        """The model version every episode ran on (DMMError if a new version came mid-rollout)."""
        found = sorted(set(self.versions))
        if len(found) != 1:
            raise DMMError(f"episodes ran on several versions of {self.model}: {found}")
        return found[0]

    def __str__(self) -> str:
        versions = ",".join(str(v) for v in sorted(set(self.versions)))
        return (
            f"{self.env}: {len(self.returns)} episodes of {self.model} v{versions} ({self.mode}), "
            f"return {self.mean_return:.1f} ± {self.std_return:.1f}, "
            f"normalized score {self.mean_normalized_score:.1f} ± {self.std_normalized_score:.1f}"
        )


class _Stream:
    """One Act or ActVector stream (``rpc``, a stub method) driven step by step from the calling
    thread."""

    _END = object()

    def __init__(self, rpc: Callable[..., Any], timeout: float | None) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = rpc(self._iter(), timeout=timeout)

    def _iter(self) -> Iterator[Any]:
        while (item := self._requests.get()) is not self._END:
            yield item

    def post(self, request: Any) -> None:
        """Queue ``request`` without waiting for its reply (a resume sends its start and its step
        together: no round trip between them)."""
        self._requests.put(request)

    def receive(self) -> Any:
        """The next reply."""
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise PolicyServiceError.from_rpc(err) from None
        except StopIteration:
            raise PolicyServiceError(grpc.StatusCode.UNKNOWN, "the server ended the stream early") from None

    def send(self, request: Any) -> Any:
        self.post(request)
        return self.receive()

    def finish(self, end: Any = None) -> None:
        """Half-close the stream and wait for the server's OK (the session ends as completed); an
        ``end`` message (End, VectorEnd) first says which episodes are over, so the server counts them."""
        if end is not None:
            self._requests.put(end)
        self._requests.put(self._END)
        try:
            for _ in self._call:
                pass
        except grpc.RpcError as err:
            raise PolicyServiceError.from_rpc(err) from None

    def cancel(self) -> None:
        self._call.cancel()  # before the half-close, which the server would take as a normal end
        self._requests.put(self._END)


def _moves(err: PolicyServiceError) -> bool:
    """Whether a stream that failed with ``err`` should resume on another server: its server is gone
    or draining (UNAVAILABLE, which a draining server says with ``dmm-resume: elsewhere``), or the
    connection reset the stream under it."""
    if err.code == grpc.StatusCode.UNAVAILABLE:
        return True
    return err.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and "RST_STREAM" in err.details


class _Servers:
    """The servers a client's streams run on: one stub per address given (each a channel, which for a
    multi-address target balances round-robin itself). Each new stream takes the next server in turn
    that is not known to be down: one whose stream failed and that has not been seen READY (its
    channel's connectivity, :meth:`connectivity`) or starting a stream since. ``retries`` bounds how
    often one request goes round the servers again after a try on every one failed, each time after a
    backoff that doubles from ``backoff_s`` (at most 2 s)."""

    MAX_BACKOFF_S = 2.0

    def __init__(
        self, stubs: list[policy_pb2_grpc.PolicyServiceStub], retries: int, backoff_s: float
    ) -> None:
        self.stubs, self.retries, self.backoff_s = stubs, retries, backoff_s
        self._next = 0
        self._down = [False] * len(stubs)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.stubs)

    def pick(self, exclude: Collection[int] = ()) -> int:
        """The index of the server a new stream goes to: the next in turn that is neither in
        ``exclude`` (tried already) nor down; else the next not in ``exclude``; else the next."""
        with self._lock:
            order = [(self._next + k) % len(self.stubs) for k in range(len(self.stubs))]
            untried = [i for i in order if i not in exclude] or order
            index = next((i for i in untried if not self._down[i]), untried[0])
            self._next = index + 1
        return index

    def failed(self, index: int) -> None:
        """A stream on server ``index`` failed: new streams go elsewhere until it is seen serving."""
        self._down[index] = True

    def serving(self, index: int) -> None:
        self._down[index] = False

    def connectivity(self, index: int, state: grpc.ChannelConnectivity) -> None:
        """Channel ``index`` changed ``state`` (a ``grpc.Channel.subscribe`` callback)."""
        if state == grpc.ChannelConnectivity.READY:
            self.serving(index)
        elif state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE, grpc.ChannelConnectivity.SHUTDOWN):
            self.failed(index)

    def backoff(self, rounds: int) -> float:
        """The wait before going round the servers again after ``rounds`` failed rounds."""
        return min(self.MAX_BACKOFF_S, self.backoff_s * 2 ** (rounds - 1))


class _ResumableStream:
    """An Act or ActVector stream (``rpc``, a stub method's name) that outlives its server: when a
    request fails because the server died, drained or reset the stream, it opens a stream on another
    server with the start ``start_request()`` builds (carrying the episodes so far) and sends the
    request right behind it. The first move goes at once to a server not known to be down; a try that
    fails on a new stream moves on at once to a server not yet tried; only once a try on every server
    has failed does it back off (:meth:`_Servers.backoff`) and go round again, at most
    ``servers.retries`` times. Each move is logged and counted in :attr:`failovers`;
    :attr:`resume_seconds` holds how long each resumed request took from the failure to its answer."""

    def __init__(self, servers: _Servers, rpc: str, start_request: Callable[[], Any]) -> None:
        self.servers, self.rpc, self.start_request = servers, rpc, start_request
        self.stream: _Stream | None = None
        self.server = -1  # the index of the stream's server
        self.failovers = 0
        self.resume_seconds: list[float] = []
        self.sleep = time.sleep  # how backoffs wait (tests replace it)

    def start(self) -> Any:
        """Open the stream; the reply to its start."""
        return self._call(None)

    def send(self, request: Any) -> Any:
        return self._call(request)

    def finish(self, end: Any) -> None:
        self._call(end, finishing=True)

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()

    def _call(self, request: Any, finishing: bool = False) -> Any:
        """``request`` (None: the start) answered, on another server if its server goes."""
        tried: set[int] = set()  # servers whose new stream failed in this round
        rounds, failed_at = 0, 0.0
        while True:
            fresh = self.stream is None
            try:
                if fresh:
                    self._open(tried)
                result = self._exchange(request, fresh, finishing)
                if failed_at and request is not None:
                    self.resume_seconds.append(time.perf_counter() - failed_at)
                return result
            except PolicyServiceError as err:
                if not _moves(err):
                    raise
                failed_at = failed_at or time.perf_counter()
                self.servers.failed(self.server)
                if fresh:  # a stream that died under a request moves at once; a failed new one counts
                    tried.add(self.server)
                delay = 0.0
                if len(tried) >= len(self.servers):  # every server failed a try: back off, go round again
                    rounds += 1
                    tried.clear()
                    if rounds > self.servers.retries:
                        raise
                    delay = self.servers.backoff(rounds)
                self._moved(err, delay, rounds)
                if delay:
                    self.sleep(delay)

    def _open(self, tried: set[int]) -> None:
        self.server = self.servers.pick(exclude=tried)
        self.stream = _Stream(getattr(self.servers.stubs[self.server], self.rpc), timeout=None)
        self.stream.post(self.start_request())

    def _exchange(self, request: Any, fresh: bool, finishing: bool) -> Any:
        """Send ``request`` on the stream and return its answer; on a ``fresh`` stream (whose start is
        queued) the start's reply comes first: it is the answer to a start (``request`` None), and
        read past otherwise."""
        stream = self.stream
        assert stream is not None
        if request is None:
            reply = stream.receive()
        elif finishing:
            stream.finish(request)  # reads every reply the stream still has, the start's too
            reply = None
        else:
            stream.post(request)
            if fresh:
                stream.receive()
            reply = stream.receive()
        if fresh:
            self.servers.serving(self.server)
        return reply

    def _moved(self, err: PolicyServiceError, delay: float, rounds: int) -> None:
        self.failovers += 1
        log.warning(
            "%s stream failed (%s); resuming on another server%s",
            self.rpc,
            err,
            f" in {delay:.2f} s (round {rounds} of {self.servers.retries})" if delay else "",
        )
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None


class PolicyClient:
    """``with PolicyClient("localhost:50051") as client: client.rollout(env="hopper-medium-v2")``.

    ``target`` is one gRPC target, which may name several servers (``ipv4:10.0.0.1:5001,10.0.0.2:5001``,
    a DNS name with several records: balanced round-robin), or a list of targets. A rollout's streams
    survive a server that dies or drains: they resume their episodes on another server, at once on the
    first live one; only when a try on every server has failed do they back off (from
    ``failover_backoff_s``, doubling) and go round again, at most ``failover_retries`` times per
    request. The moves are counted in :attr:`RolloutResult.failovers`.

    ``tls_ca`` (the CA of the server's certificate) makes the channels TLS, ``tls_cert``/``tls_key``
    add the client's certificate for a server that wants mutual TLS, and ``token`` is sent as
    ``authorization: Bearer <token>`` on every call.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = 30.0,
        options: list[tuple[str, Any]] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        token: str | None = None,
        failover_retries: int = 6,
        failover_backoff_s: float = 0.05,
    ):
        targets = [target] if isinstance(target, str) else list(target)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise DMMError(f"target must be a server address or a list of them, got {target!r}")
        if failover_retries < 0 or not failover_backoff_s >= 0:
            raise DMMError("failover_retries and failover_backoff_s must be >= 0")
        self.target = target
        self.timeout = timeout
        options = list(options or [])
        options += [
            default for default in (ROUND_ROBIN, *RECONNECT_BACKOFF) if default[0] not in dict(options)
        ]
        tls = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
        self._channels = [open_channel(t, token=token, options=options, **tls) for t in targets]
        stubs = [policy_pb2_grpc.PolicyServiceStub(channel) for channel in self._channels]
        self._stub = stubs[0]
        self._servers = _Servers(stubs, failover_retries, failover_backoff_s)
        # Every channel connects now and follows its server (round_robin reconnects on its own), so a
        # failover finds the other servers' connections up and skips a server whose channel is down.
        self._watchers = [functools.partial(self._servers.connectivity, i) for i in range(len(stubs))]
        for channel, watcher in zip(self._channels, self._watchers, strict=True):
            channel.subscribe(watcher, try_to_connect=True)

    def close(self) -> None:
        for channel, watcher in zip(self._channels, self._watchers, strict=True):
            channel.unsubscribe(watcher)
            channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ unary

    def list_models(self) -> dict[str, list[int]]:
        """Model name -> complete versions (ascending)."""
        try:
            reply = self._stub.ListModels(policy_pb2.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as err:
            raise PolicyServiceError.from_rpc(err) from None
        return {m.name: list(m.versions) for m in reply.models}

    def describe(self, model: str, version: int | None = None) -> ModelDescription:
        request = policy_pb2.DescribeRequest(model=model)
        if version is not None:
            request.version = version
        try:
            r = self._stub.Describe(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise PolicyServiceError.from_rpc(err) from None
        return ModelDescription(
            model=r.model,
            version=r.version,
            state_dim=r.state_dim,
            act_dim=r.act_dim,
            config=json.loads(r.config_json),
            meta=json.loads(r.meta_json),
            metrics=json.loads(r.metrics_json),
            versions=list(r.versions),
        )

    # ------------------------------------------------------------------ rollouts

    def rollout(
        self,
        env: str = "hopper-medium-v2",
        episodes: int = 10,
        target_return: float | None = None,
        num_envs: int = 4,
        seed: int = 0,
        model: str | None = None,
        version: int | None = None,
        mode: Literal["window", "recurrent"] | None = None,
        progress: bool = True,
        max_episode_steps: int | None = None,
        vectorized: bool = True,
    ) -> RolloutResult:
        """Run ``episodes`` episodes of ``env``, ``num_envs`` at a time.

        ``vectorized`` (the default) steps a gymnasium vector env of ``num_envs`` envs over one
        ActVector stream: one message per step of all of them. Otherwise each episode is its own Act
        stream, ``num_envs`` of them in threads (what a robot does). Episode ``i`` resets its env with
        seed ``seed + i`` either way. ``model`` defaults to the env name; ``target_return`` and
        ``mode`` default to the model's and the server's. ``max_episode_steps`` cuts episodes short
        (default: the env's own limit).
        """
        if episodes < 1:
            raise DMMError(f"episodes must be >= 1, got {episodes}")
        if num_envs < 1:
            raise DMMError(f"num_envs must be >= 1, got {num_envs}")
        if mode not in _MODES:
            raise DMMError(f"unknown mode {mode!r}: use 'window' or 'recurrent'")
        if target_return is not None and not math.isfinite(target_return):
            raise DMMError(f"target_return must be finite, got {target_return}")
        spec = env_spec(env)
        start = policy_pb2.Start(
            model=model or env, mode=_MODES[mode], state_dim=spec.obs_dim, act_dim=spec.act_dim
        )
        if version is not None:
            start.version = version
        if target_return is not None:
            start.target_return = target_return
        make_kwargs = {"max_episode_steps": max_episode_steps} if max_episode_steps else {}

        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=f"rollout {start.model}", unit="ep", disable=not progress)
        try:
            if vectorized:
                with EpisodeEngine(env, min(num_envs, episodes), **make_kwargs) as engine:
                    actor = _VectorActor(self._servers, start)
                    played = [engine.play(actor, episodes, seed, bar.update)]
                    moves = [actor.resumable]
            else:
                played, moves = self._threaded_rollout(env, make_kwargs, start, episodes, num_envs, seed, bar)
        finally:
            bar.close()
        return _rollout_result(env, start.model, played, moves)

    def _threaded_rollout(
        self,
        env: str,
        make_kwargs: dict[str, Any],
        start: policy_pb2.Start,
        episodes: int,
        num_envs: int,
        seed: int,
        bar: Any,
    ) -> tuple[list[Episodes], list[_ResumableStream]]:
        """One Act stream per episode, ``num_envs`` threads each with its own env; episode ``i`` is
        the engine's only episode, seeded ``seed + i``. Also returns the streams (their failovers)."""
        results: list[Episodes | None] = [None] * episodes
        next_episode = iter(range(episodes))
        lock = threading.Lock()
        streams: list[_ResumableStream] = []

        def update() -> None:
            with lock:
                bar.update(1)

        def worker() -> None:
            with EpisodeEngine(env, 1, **make_kwargs) as engine:
                while True:
                    with lock:
                        index = next(next_episode, None)
                    if index is None:
                        return
                    actor = _ActActor(self._servers, start)
                    with lock:
                        streams.append(actor.resumable)
                    results[index] = engine.play(actor, 1, seed + index, update)

        with ThreadPoolExecutor(min(num_envs, episodes), thread_name_prefix="dmm-rollout") as pool:
            for future in [pool.submit(worker) for _ in range(min(num_envs, episodes))]:
                future.result()
        return [r for r in results if r is not None], streams


def _rollout_result(
    env: str, model: str, played: list[Episodes], streams: list[_ResumableStream]
) -> RolloutResult:
    """One :class:`RolloutResult` of the engine's results (one per stream), in episode order, with the
    failovers of ``streams``."""
    returns = np.concatenate([p.returns for p in played])
    return RolloutResult(
        env=env,
        model=model,
        mode=played[0].started.mode,
        returns=[float(r) for r in returns],
        lengths=[int(n) for p in played for n in p.lengths],
        normalized_scores=[float(s) for s in normalized_score(env, returns)],
        versions=[int(p.started.version) for p in played for _ in p.lengths],
        target_return=played[0].started.target_return,
        failovers=sum(s.failovers for s in streams),
        resume_seconds=[t for s in streams for t in s.resume_seconds],
    )


def _resume_start(start: policy_pb2.Start, started: Any) -> policy_pb2.Start:
    """The Start of a stream that resumes the episodes of one that ``started``: the same version,
    mode and target return on whatever server it reaches, and resumable."""
    resumed = policy_pb2.Start()
    resumed.CopyFrom(start)
    resumed.version, resumed.mode, resumed.target_return = (
        started.version,
        started.mode,
        started.target_return,
    )
    return resumed


class _EpisodeSoFar:
    """What a resume needs of one episode: its states, the actions it got and the rewards so far, kept
    as the message a resume sends (built step by step, so a failover does not build it)."""

    def __init__(self) -> None:
        self._message = policy_pb2.EpisodeSoFar()

    @property
    def steps(self) -> int:
        return self._message.steps

    def took(self, state: np.ndarray, action: np.ndarray, reward: float | None) -> None:
        """The server answered ``state`` (which came with the last action's ``reward``) with ``action``."""
        if reward is not None:
            self._message.rewards.append(reward)
        self._message.states.extend(state.tolist())
        self._message.actions.extend(action.tolist())
        self._message.steps += 1

    def message(self) -> policy_pb2.EpisodeSoFar:
        return self._message


class _VectorActor(Actor):
    """The server's actor over one ActVector stream: a row per env, the server's slots and RTGs; the
    stream resumes every row's episode on another server if its server goes."""

    def __init__(self, servers: _Servers, start: policy_pb2.Start) -> None:
        self.start_message = policy_pb2.Start()
        self.start_message.CopyFrom(start)
        self.start_message.resumable = True
        self.resumable = _ResumableStream(servers, "ActVector", self._start_request)
        self.rows = 0
        self.so_far: list[_EpisodeSoFar] = []
        self.act_dim = 0

    def _start_request(self) -> policy_pb2.VectorRequest:
        start = policy_pb2.VectorStart(start=self.start_message, episodes=self.rows)
        if self.so_far and self.so_far[0].steps:  # after the first step every row has taken one
            start.resume.extend(episode.message() for episode in self.so_far)
        return policy_pb2.VectorRequest(start=start)

    def start(self, rows: int) -> Started:
        self.rows, self.so_far = rows, [_EpisodeSoFar() for _ in range(rows)]
        started = self.resumable.start().started.session
        self.start_message = _resume_start(self.start_message, started)
        self.act_dim = started.act_dim
        return Started(started.target_return, MODE_NAME[started.mode], started.version)

    def act(self, step: Step) -> np.ndarray:
        message = policy_pb2.VectorStep(states=step.states.ravel().tolist())
        if step.rewards is not None:  # the first step steps every row and names none
            message.rows.extend(step.rows.tolist())
            message.rewards.extend(step.rewards.tolist())
            message.restart.extend(step.rows[step.restart].tolist())
        reply = self.resumable.send(policy_pb2.VectorRequest(step=message)).actions
        if list(reply.rows) != step.rows.tolist():
            raise PolicyServiceError(
                grpc.StatusCode.INTERNAL,
                f"the server answered rows {list(reply.rows)} to a step of rows {step.rows.tolist()}",
            )
        actions = np.asarray(reply.actions, dtype=np.float32).reshape(-1, self.act_dim)
        for i, row in enumerate(step.rows.tolist()):
            if step.restart[i]:
                self.so_far[row] = _EpisodeSoFar()
            reward = None if step.rewards is None or step.restart[i] else float(step.rewards[i])
            self.so_far[row].took(step.states[i], actions[i], reward)
        return actions

    def finish(self, rows: np.ndarray, rewards: np.ndarray) -> None:
        """VectorEnd records the rows' last episodes on the server; then the stream ends with OK."""
        end = policy_pb2.VectorEnd(rows=rows.tolist(), rewards=rewards.tolist())
        self.resumable.finish(policy_pb2.VectorRequest(end=end))

    def cancel(self) -> None:
        self.resumable.cancel()


class _ActActor(Actor):
    """The server's actor over one Act stream: one row, one episode (what a robot runs), resumed on
    another server if its server goes."""

    def __init__(self, servers: _Servers, start: policy_pb2.Start) -> None:
        self.start_message = policy_pb2.Start()
        self.start_message.CopyFrom(start)
        self.start_message.resumable = True
        self.resumable = _ResumableStream(servers, "Act", self._start_request)
        self.so_far = _EpisodeSoFar()

    def _start_request(self) -> policy_pb2.ActRequest:
        start = policy_pb2.Start()
        start.CopyFrom(self.start_message)
        if self.so_far.steps:
            start.resume.CopyFrom(self.so_far.message())
        return policy_pb2.ActRequest(start=start)

    def start(self, rows: int) -> Started:
        if rows != 1:
            raise DMMError(f"an Act stream plays one episode in one env, not {rows}")
        started = self.resumable.start().started
        self.start_message = _resume_start(self.start_message, started)
        return Started(started.target_return, MODE_NAME[started.mode], started.version)

    def act(self, step: Step) -> np.ndarray:
        if step.restart.any():
            raise DMMError("an Act stream is one episode: it cannot restart")
        message = policy_pb2.Step(state=step.states[0].tolist())
        if step.rewards is not None:
            message.reward = float(step.rewards[0])
        reply = self.resumable.send(policy_pb2.ActRequest(step=message))
        action = np.asarray(reply.action.action, dtype=np.float32)
        self.so_far.took(step.states[0], action, None if step.rewards is None else float(step.rewards[0]))
        return action[None]

    def finish(self, rows: np.ndarray, rewards: np.ndarray) -> None:
        """End records the episode on the server; then the stream ends with OK."""
        self.resumable.finish(policy_pb2.ActRequest(end=policy_pb2.End(reward=float(rewards[0]))))

    def cancel(self) -> None:
        self.resumable.cancel()
