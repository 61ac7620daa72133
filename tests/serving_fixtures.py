"""Shared helpers of the server and client tests: a tiny policy store and a step-by-step Act stream."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from dmm.server.testing import ServerProcess, metric_value
from dmm.v1 import policy_pb2, policy_pb2_grpc

STATE_DIM, ACT_DIM = 11, 3  # Hopper's
TARGET_RETURN = 3600.0


def publish_tiny(
    store_root: Path | str, name: str = "tiny", seed: int = 0, inference_mode: str = "window", **config: Any
) -> int:
    """Publish a small random DMM policy with Hopper's dimensions to a store folder or s3:// URL,
    meant to be served in ``inference_mode``; returns its version."""
    import torch

    from dmm.model import DMMConfig, PolicyMeta, PolicyNetwork, publish_policy
    from dmm.store import open_store

    torch.manual_seed(seed)
    model = PolicyNetwork(DMMConfig(state_dim=STATE_DIM, act_dim=ACT_DIM, d_model=16, n_layer=2, **config))
    rng = np.random.default_rng(seed)
    meta = PolicyMeta(
        env="hopper-medium-v2",
        env_id="Hopper-v4",
        state_mean=rng.normal(size=STATE_DIM).tolist(),
        state_std=rng.uniform(0.5, 2.0, size=STATE_DIM).tolist(),
        rtg_scale=1000.0,
        target_return=TARGET_RETURN,
        inference_mode=inference_mode,
    )
    return publish_policy(open_store(store_root), name, model, meta, metrics={"seed": seed})


class Stream:
    """One Act stream (or ActVector, with ``rpc``), driven one request/response at a time."""

    _END = object()

    def __init__(self, channel: grpc.Channel, timeout: float | None = 30.0, rpc: str = "Act") -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = getattr(policy_pb2_grpc.PolicyServiceStub(channel), rpc)(self._iter(), timeout=timeout)

    def _iter(self) -> Iterator[Any]:
        while (item := self._requests.get()) is not self._END:
            yield item

    def send(self, request: Any) -> Any:
        self._requests.put(request)
        return next(self.call)

    def start(self, model: str = "tiny", **fields: object) -> policy_pb2.SessionStarted:
        return self.send(policy_pb2.ActRequest(start=policy_pb2.Start(model=model, **fields))).started

    def step(self, state: np.ndarray | list[float], **fields: float) -> policy_pb2.Action:
        state = np.asarray(state, dtype=np.float64).tolist()
        return self.send(policy_pb2.ActRequest(step=policy_pb2.Step(state=state, **fields))).action

    def end(self, reward: float) -> None:
        """The episode is over (End, no reply); then :meth:`finish`."""
        self.put(policy_pb2.ActRequest(end=policy_pb2.End(reward=reward)))

    def put(self, request: Any) -> None:
        """Send ``request`` without waiting for a reply (e.g. a VectorEnd)."""
        self._requests.put(request)

    def finish(self) -> grpc.StatusCode:
        """Half-close and wait for the final status."""
        self._requests.put(self._END)
        for _ in self.call:
            pass
        return self.call.code()

    def cancel(self) -> None:
        self.call.cancel()  # before the half-close, which the server would take as a normal end
        self._requests.put(self._END)


def play_episode(channel: grpc.Channel, states: np.ndarray, **start: object) -> np.ndarray:
    """A whole episode on a new Act stream: start, one step per state (reward 1 after the first),
    half-close with OK; returns the actions [steps, act_dim]."""
    stream = Stream(channel)
    stream.start(**start)
    actions = [list(stream.step(s, **({"reward": 1.0} if t else {})).action) for t, s in enumerate(states)]
    assert stream.finish() == grpc.StatusCode.OK
    return np.asarray(actions)


def expect_status(stream: Stream, request: policy_pb2.ActRequest) -> grpc.RpcError:
    """Send ``request`` and return the error that ends the stream (AssertionError if none does)."""
    try:
        reply = stream.send(request)
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"expected an error status, got a reply: {reply}")


def episode_inputs(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random states [steps, STATE_DIM] and rewards [steps] of a synthetic episode."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(steps, STATE_DIM)), rng.uniform(0.0, 3.0, size=steps)


def episode_metrics(server: ServerProcess) -> tuple[float, float]:
    """(count, sum) of dmm_episode_return of model "tiny" version 1, as the server reports them now."""
    text = server.scrape()
    labels = {"model": "tiny", "version": "1"}
    return (
        metric_value(text, "dmm_episode_return_count", labels) or 0.0,
        metric_value(text, "dmm_episode_return_sum", labels) or 0.0,
    )


def wait_for_metric(
    server: ServerProcess, name: str, labels: dict[str, str], value: float, timeout_s: float = 10.0
) -> None:
    """Wait until the server reports ``value`` for the metric; counters a session bumps as it is torn
    down can lag the reply the client already has."""
    end = time.monotonic() + timeout_s
    while (got := metric_value(server.scrape(), name, labels)) != value:
        if time.monotonic() > end:
            raise AssertionError(f"{name}{labels} is {got}, expected {value}")
        time.sleep(0.05)
