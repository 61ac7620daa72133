"""Client of ``dmm.v1.PolicyService``: remote rollouts over gymnasium envs, model listing.

Torch-free: it needs only grpc, numpy, gymnasium (imported when an env is made) and the stubs.
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    """One Act stream driven step by step from the calling thread."""

    _END = object()

    def __init__(self, stub: policy_pb2_grpc.PolicyServiceStub, timeout: float | None) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = stub.Act(self._iter(), timeout=timeout)

    def _iter(self) -> Iterator[policy_pb2.ActRequest]:
        while (item := self._requests.get()) is not self._END:
            yield item

    def send(self, request: policy_pb2.ActRequest) -> policy_pb2.ActResponse:
        self._requests.put(request)
        try:
            return next(self._call)
        except grpc.RpcError as err:
            raise PolicyServiceError.from_rpc(err) from None
        except StopIteration:
            raise PolicyServiceError(grpc.StatusCode.UNKNOWN, "the server ended the stream early") from None

    def finish(self, last_reward: float | None = None) -> None:
        """Half-close the stream and wait for the server's OK (the session ends as completed); with
        ``last_reward`` the stream first says the episode is over (End), so the server counts it."""
        if last_reward is not None:
            self._requests.put(policy_pb2.ActRequest(end=policy_pb2.End(reward=last_reward)))
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
    ) -> RolloutResult:
        """Run ``episodes`` episodes of ``env``, ``num_envs`` at a time, one Act stream per episode.

        Episode ``i`` resets its env with seed ``seed + i``. ``model`` defaults to the env name;
        ``target_return`` and ``mode`` default to the model's and the server's. ``max_episode_steps``
        cuts episodes short (default: the env's own limit).
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

        from tqdm.auto import tqdm

        bar = tqdm(total=episodes, desc=f"rollout {start.model}", unit="ep", disable=not progress)
        results: list[_Episode | None] = [None] * episodes
        next_episode = iter(range(episodes))
        lock = threading.Lock()

        def worker() -> None:
            gym_env = make_env(env, **({"max_episode_steps": max_episode_steps} if max_episode_steps else {}))
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

        try:
            with ThreadPoolExecutor(min(num_envs, episodes), thread_name_prefix="dmm-rollout") as pool:
                for future in [pool.submit(worker) for _ in range(min(num_envs, episodes))]:
                    future.result()
        finally:
            bar.close()
        done = [r for r in results if r is not None]
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

    def _episode(self, gym_env: Any, start: policy_pb2.Start, seed: int) -> _Episode:
        stream = _Stream(self._stub, timeout=None)
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
        stream.finish(last_reward=float(reward))
        return _Episode(total, length, started.version, MODE_NAME[started.mode], started.target_return)
