"""Client of ``dmm.v1.PolicyService``: remote rollouts over gymnasium envs, model listing.

Torch-free: it needs only grpc, numpy, gymnasium (imported when an env is made) and the stubs. The
episodes are played by :mod:`dmm.episodes`, the loop ``dmm eval`` plays its own with; this module adds
the actors that ask the server for the actions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
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

    def send(self, request: Any) -> Any:
        self._requests.put(request)
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise PolicyServiceError.from_rpc(err) from None
        except StopIteration:
            raise PolicyServiceError(grpc.StatusCode.UNKNOWN, "the server ended the stream early") from None

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
    multi-address target balances round-robin itself); each new stream takes the next, so a stream
    that fails over moves to another server. ``retries`` bounds the failovers of one request, each
    after a backoff that doubles from ``backoff_s`` (at most 2 s)."""

    MAX_BACKOFF_S = 2.0

    def __init__(
        self, stubs: list[policy_pb2_grpc.PolicyServiceStub], retries: int, backoff_s: float
    ) -> None:
        self.stubs, self.retries, self.backoff_s = stubs, retries, backoff_s
        self._next = 0
        self._lock = threading.Lock()

    def next_stub(self) -> policy_pb2_grpc.PolicyServiceStub:
        with self._lock:
            stub = self.stubs[self._next % len(self.stubs)]
            self._next += 1
        return stub

    def backoff(self, failures: int) -> float:
        return min(self.MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1))


class _ResumableStream:
    """An Act or ActVector stream (``rpc``, a stub method's name) that outlives its server: when a
    request fails because the server died, drained or reset the stream, it opens a stream on the next
    server with the start ``start_request()`` builds (carrying the episodes so far) and sends the
    request again, up to ``servers.retries`` times per request. Each move is logged and counted in
    :attr:`failovers`; :attr:`resume_seconds` holds how long each took."""

    def __init__(self, servers: _Servers, rpc: str, start_request: Callable[[], Any]) -> None:
        self.servers, self.rpc, self.start_request = servers, rpc, start_request
        self.stream: _Stream | None = None
        self.failovers = 0
        self.resume_seconds: list[float] = []

    def start(self) -> Any:
        """Open the stream; the reply to its start."""
        return self._call(None)

    def send(self, request: Any) -> Any:
        return self._call(lambda stream: stream.send(request))

    def finish(self, end: Any) -> None:
        self._call(lambda stream: stream.finish(end))

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()

    def _call(self, action: Callable[[_Stream], Any] | None) -> Any:
        failures, failed_at = 0, 0.0
        while True:
            try:
                if self.stream is None:
                    stream = _Stream(getattr(self.servers.next_stub(), self.rpc), timeout=None)
                    self.stream = stream
                    started = stream.send(self.start_request())
                    if action is None:
                        return started
                result = action(self.stream)
                if failures:
                    self.resume_seconds.append(time.perf_counter() - failed_at)
                return result
            except PolicyServiceError as err:
                if not _moves(err) or failures >= self.servers.retries:
                    raise
                failures += 1
                failed_at = failed_at or time.perf_counter()
                self.failovers += 1
                delay = self.servers.backoff(failures)
                log.warning(
                    "%s stream failed (%s); resuming on another server in %.2f s (try %d of %d)",
                    self.rpc,
                    err,
                    delay,
                    failures,
                    self.servers.retries,
                )
                if self.stream is not None:
                    self.stream.cancel()
                    self.stream = None
                time.sleep(delay)


class PolicyClient:
    """``with PolicyClient("localhost:50051") as client: client.rollout(env="hopper-medium-v2")``.

    ``target`` is one gRPC target, which may name several servers (``ipv4:10.0.0.1:5001,10.0.0.2:5001``,
    a DNS name with several records: balanced round-robin), or a list of targets. A rollout's streams
    survive a server that dies or drains: they resume their episodes on another server (at most
    ``failover_retries`` tries per request, backing off from ``failover_backoff_s``), and the moves are
    counted in :attr:`RolloutResult.failovers`.

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

    def close(self) -> None:
        for channel in self._channels:
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
    """What a resume needs of one episode: its states, the actions it got and the rewards so far."""

    def __init__(self) -> None:
        self.states: list[np.ndarray] = []
        self.actions: list[np.ndarray] = []
        self.rewards: list[float] = []

    def took(self, state: np.ndarray, action: np.ndarray, reward: float | None) -> None:
        """The server answered ``state`` (which came with the last action's ``reward``) with ``action``."""
        if reward is not None:
            self.rewards.append(reward)
        self.states.append(state)
        self.actions.append(action)

    def message(self) -> policy_pb2.EpisodeSoFar:
        return policy_pb2.EpisodeSoFar(
            steps=len(self.actions),
            states=np.concatenate(self.states).tolist(),
            actions=np.concatenate(self.actions).tolist(),
            rewards=self.rewards,
        )


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
        if self.so_far and self.so_far[0].actions:  # after the first step every row has taken one
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
        if self.so_far.actions:
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
