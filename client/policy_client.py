"""Client of ``dmm.v1.PolicyService``: remote rollouts over gymnasium envs, model listing.

Torch-free: it needs only grpc, numpy, gymnasium (imported when an env is made) and the stubs. The
episodes are played by :mod:`dmm.episodes`, the loop ``dmm eval`` plays its own with; this module adds
the actors that ask the server for the actions.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
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


class PolicyClient:
    """``with PolicyClient("localhost:50051") as client: client.rollout(env="hopper-medium-v2")``.

    ``tls_ca`` (the CA of the server's certificate) makes the channel TLS, ``tls_cert``/``tls_key``
    add the client's certificate for a server that wants mutual TLS, and ``token`` is sent as
    ``authorization: Bearer <token>`` on every call.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 30.0,
        options: list[tuple[str, Any]] | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        token: str | None = None,
    ):
        self.target = target
        self.timeout = timeout
        self._channel = open_channel(
            target, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token, options=options or []
        )
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

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
                    played = [engine.play(_VectorActor(self._stub, start), episodes, seed, bar.update)]
            else:
                played = self._threaded_rollout(env, make_kwargs, start, episodes, num_envs, seed, bar)
        finally:
            bar.close()
        return _rollout_result(env, start.model, played)

    def _threaded_rollout(
        self,
        env: str,
        make_kwargs: dict[str, Any],
        start: policy_pb2.Start,
        episodes: int,
        num_envs: int,
        seed: int,
        bar: Any,
    ) -> list[Episodes]:
        """One Act stream per episode, ``num_envs`` threads each with its own env; episode ``i`` is
        the engine's only episode, seeded ``seed + i``."""
        results: list[Episodes | None] = [None] * episodes
        next_episode = iter(range(episodes))
        lock = threading.Lock()

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
                    results[index] = engine.play(_ActActor(self._stub, start), 1, seed + index, update)

        with ThreadPoolExecutor(min(num_envs, episodes), thread_name_prefix="dmm-rollout") as pool:
            for future in [pool.submit(worker) for _ in range(min(num_envs, episodes))]:
                future.result()
        return [r for r in results if r is not None]


def _rollout_result(env: str, model: str, played: list[Episodes]) -> RolloutResult:
    """One :class:`RolloutResult` of the engine's results (one per stream), in episode order."""
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
    )


class _VectorActor(Actor):
    """The server's actor over one ActVector stream: a row per env, the server's slots and RTGs."""

    def __init__(self, stub: policy_pb2_grpc.PolicyServiceStub, start: policy_pb2.Start) -> None:
        self.stub, self.start_message = stub, start
        self.stream: _Stream | None = None
        self.act_dim = 0

    def start(self, rows: int) -> Started:
        self.stream = _Stream(self.stub.ActVector, timeout=None)
        request = policy_pb2.VectorRequest(
            start=policy_pb2.VectorStart(start=self.start_message, episodes=rows)
        )
        started = self.stream.send(request).started.session
        self.act_dim = started.act_dim
        return Started(started.target_return, MODE_NAME[started.mode], started.version)

    def act(self, step: Step) -> np.ndarray:
        message = policy_pb2.VectorStep(states=step.states.ravel().tolist())
        if step.rewards is not None:  # the first step steps every row and names none
            message.rows.extend(step.rows.tolist())
            message.rewards.extend(step.rewards.tolist())
            message.restart.extend(step.rows[step.restart].tolist())
        assert self.stream is not None, "start() first"
        reply = self.stream.send(policy_pb2.VectorRequest(step=message)).actions
        if list(reply.rows) != step.rows.tolist():
            raise PolicyServiceError(
                grpc.StatusCode.INTERNAL,
                f"the server answered rows {list(reply.rows)} to a step of rows {step.rows.tolist()}",
            )
        return np.asarray(reply.actions, dtype=np.float32).reshape(-1, self.act_dim)

    def finish(self, rows: np.ndarray, rewards: np.ndarray) -> None:
        """VectorEnd records the rows' last episodes on the server; then the stream ends with OK."""
        assert self.stream is not None, "start() first"
        end = policy_pb2.VectorEnd(rows=rows.tolist(), rewards=rewards.tolist())
        self.stream.finish(policy_pb2.VectorRequest(end=end))

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()


class _ActActor(Actor):
    """The server's actor over one Act stream: one row, one episode (what a robot runs)."""

    def __init__(self, stub: policy_pb2_grpc.PolicyServiceStub, start: policy_pb2.Start) -> None:
        self.stub, self.start_message = stub, start
        self.stream: _Stream | None = None

    def start(self, rows: int) -> Started:
        if rows != 1:
            raise DMMError(f"an Act stream plays one episode in one env, not {rows}")
        self.stream = _Stream(self.stub.Act, timeout=None)
        started = self.stream.send(policy_pb2.ActRequest(start=self.start_message)).started
        return Started(started.target_return, MODE_NAME[started.mode], started.version)

    def act(self, step: Step) -> np.ndarray:
        if step.restart.any():
            raise DMMError("an Act stream is one episode: it cannot restart")
        message = policy_pb2.Step(state=step.states[0].tolist())
        if step.rewards is not None:
            message.reward = float(step.rewards[0])
        assert self.stream is not None, "start() first"
        reply = self.stream.send(policy_pb2.ActRequest(step=message))
        return np.asarray(reply.action.action, dtype=np.float32)[None]

    def finish(self, rows: np.ndarray, rewards: np.ndarray) -> None:
        """End records the episode on the server; then the stream ends with OK."""
        assert self.stream is not None, "start() first"
        self.stream.finish(policy_pb2.ActRequest(end=policy_pb2.End(reward=float(rewards[0]))))

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel()
