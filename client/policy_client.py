"""Client of ``dmm.v1.PolicyService``: remote rollouts over gymnasium envs, model listing.

Torch-free: it needs only grpc, numpy, gymnasium (imported when an env is made) and the stubs.
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
from functools import partial
from typing import Any, Literal

import grpc
import numpy as np

from dmm.client.channel import open_channel
from dmm.envs import env_spec, make_env, normalized_score
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


@dataclass
class _Episode:
    ret: float
    length: int
    version: int
    mode: str
    target_return: float


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
        make = partial(
            make_env, env, **({"max_episode_steps": max_episode_steps} if max_episode_steps else {})
        )

        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=f"rollout {start.model}", unit="ep", disable=not progress)
        try:
            if vectorized:
                done = _VectorRollout(self._stub, make, start, episodes, seed, bar).run(
                    min(num_envs, episodes)
                )
            else:
                done = self._threaded_rollout(make, start, episodes, num_envs, seed, bar)
        finally:
            bar.close()
        returns = [r.ret for r in done]
        return RolloutResult(
            env=env,
            model=start.model,
            mode=done[0].mode,
            returns=returns,
            lengths=[r.length for r in done],
            normalized_scores=[float(s) for s in normalized_score(env, np.asarray(returns))],
            versions=[r.version for r in done],
            target_return=done[0].target_return,
        )

    def _threaded_rollout(
        self,
        make: Callable[[], Any],
        start: policy_pb2.Start,
        episodes: int,
        num_envs: int,
        seed: int,
        bar: Any,
    ) -> list[_Episode]:
        """One Act stream per episode, ``num_envs`` threads each with its own env."""
        results: list[_Episode | None] = [None] * episodes
        next_episode = iter(range(episodes))
        lock = threading.Lock()

        def worker() -> None:
            gym_env = make()
            try:
                while True:
                    with lock:
                        index = next(next_episode, None)
                    if index is None:
                        return
                    results[index] = self._episode(gym_env, start, seed + index)
                    with lock:
                        bar.update(1)
            finally:
                gym_env.close()

        with ThreadPoolExecutor(min(num_envs, episodes), thread_name_prefix="dmm-rollout") as pool:
            for future in [pool.submit(worker) for _ in range(min(num_envs, episodes))]:
                future.result()
        return [r for r in results if r is not None]

    def _episode(self, gym_env: Any, start: policy_pb2.Start, seed: int) -> _Episode:
        stream = _Stream(self._stub.Act, timeout=None)
        try:
            started = stream.send(policy_pb2.ActRequest(start=start)).started
            obs, _info = gym_env.reset(seed=seed)
            step = policy_pb2.Step(state=np.asarray(obs, dtype=np.float64).ravel().tolist())
            total, length = 0.0, 0
            while True:
                reply = stream.send(policy_pb2.ActRequest(step=step))
                action = np.asarray(reply.action.action, dtype=np.float32)
                obs, reward, terminated, truncated, _info = gym_env.step(action)
                total += float(reward)
                length += 1
                if terminated or truncated:
                    break
                state = np.asarray(obs, dtype=np.float64).ravel().tolist()
                step = policy_pb2.Step(state=state, reward=float(reward))
        except BaseException:
            stream.cancel()
            raise
        stream.finish(policy_pb2.ActRequest(end=policy_pb2.End(reward=float(reward))))
        return _Episode(total, length, started.version, MODE_NAME[started.mode], started.target_return)


class _VectorRollout:
    """``episodes`` episodes over one ActVector stream and one gymnasium vector env whose rows take
    the next episode as theirs end (the env resets only those rows, with the episode's seed)."""

    def __init__(
        self,
        stub: policy_pb2_grpc.PolicyServiceStub,
        make: Callable[[], Any],
        start: policy_pb2.Start,
        episodes: int,
        seed: int,
        bar: Any,
    ) -> None:
        self.stub, self.make, self.start = stub, make, start
        self.episodes, self.seed, self.bar = episodes, seed, bar
        self.results: list[_Episode | None] = [None] * episodes

    def run(self, n: int) -> list[_Episode]:
        from gymnasium.vector import AutoresetMode, SyncVectorEnv

        venv = SyncVectorEnv([self.make] * n, autoreset_mode=AutoresetMode.DISABLED)
        stream = _Stream(self.stub.ActVector, timeout=None)
        try:
            request = policy_pb2.VectorRequest(start=policy_pb2.VectorStart(start=self.start, episodes=n))
            started = stream.send(request).started.session
            end = self._play(venv, stream, started)
        except BaseException:
            stream.cancel()
            raise
        finally:
            venv.close()
        stream.finish(end)
        return [r for r in self.results if r is not None]

    def _play(
        self, venv: Any, stream: _Stream, started: policy_pb2.SessionStarted
    ) -> policy_pb2.VectorRequest:
        """Step until every episode has ended; returns the VectorEnd of the rows whose last episode
        ended (it records them on the server)."""
        n, act_dim = venv.num_envs, started.act_dim
        episode_of: list[int | None] = list(range(n))  # each row's episode; None once it has none
        next_episode = n
        returns, lengths = np.zeros(n), np.zeros(n, dtype=np.int64)
        last_rewards: dict[
            int, float
        ] = {}  # rows whose last episode is over: its final reward, for VectorEnd
        obs, _ = venv.reset(seed=[self.seed + i for i in range(n)])
        step = policy_pb2.VectorStep(states=np.asarray(obs, dtype=np.float64).ravel().tolist())
        while True:
            reply = stream.send(policy_pb2.VectorRequest(step=step)).actions
            actions = np.zeros((n, act_dim), dtype=np.float32)
            actions[list(reply.rows)] = np.asarray(reply.actions, dtype=np.float32).reshape(-1, act_dim)
            obs, reward, terminated, truncated, _ = venv.step(actions)
            active = np.array([e is not None for e in episode_of])
            returns[active] += reward[active]
            lengths[active] += 1
            done = np.flatnonzero(terminated | truncated)
            restart = []
            for row in done.tolist():
                if episode_of[row] is not None:
                    self._record(row, episode_of[row], started, returns, lengths)
                    if next_episode < self.episodes:
                        episode_of[row], next_episode = next_episode, next_episode + 1
                        restart.append(row)
                    else:
                        episode_of[row] = None
                        last_rewards[row] = float(reward[row])
            if all(e is None for e in episode_of):
                end = policy_pb2.VectorEnd(rows=list(last_rewards), rewards=list(last_rewards.values()))
                return policy_pb2.VectorRequest(end=end)
            if done.size:  # rows with a new episode, and idle rows that a vector env must keep going
                seeds = [
                    self.seed + e if r in restart and e is not None else None
                    for r, e in enumerate(episode_of)
                ]
                mask = np.zeros(n, dtype=bool)
                mask[done] = True
                obs, _ = venv.reset(seed=seeds, options={"reset_mask": mask})
            rows = [r for r, e in enumerate(episode_of) if e is not None]
            step = policy_pb2.VectorStep(
                rows=rows,
                states=np.asarray(obs, dtype=np.float64)[rows].ravel().tolist(),
                rewards=reward[rows].tolist(),
                restart=restart,
            )

    def _record(
        self,
        row: int,
        episode: int,
        started: policy_pb2.SessionStarted,
        returns: np.ndarray,
        lengths: np.ndarray,
    ) -> None:
        self.results[episode] = _Episode(
            float(returns[row]),
            int(lengths[row]),
            started.version,
            MODE_NAME[started.mode],
            started.target_return,
        )
        returns[row], lengths[row] = 0.0, 0
        self.bar.update(1)
