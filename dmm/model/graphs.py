"""The runner's torch step over static slot buffers, captured as CUDA graphs on a GPU.

On a GPU, :class:`~dmm.model.inference.PolicyRunner`'s torch step is a chain of ~90 small kernels
whose launches, plus one synchronizing copy of the actions, cost milliseconds a step while the GPU
idles. A CUDA graph replays the whole chain with one launch; it needs every tensor the step touches
at a fixed address and every shape fixed when it is captured. :class:`GraphedRunner` therefore:

* pads a batch of n rows to a power-of-two bucket (1, 2, 4, ..., ``max_bucket``) and keeps one graph
  per bucket, captured lazily at the bucket's first step (or all at once: :meth:`capture_buckets`);
  a batch over ``max_bucket`` rows runs as chunks of ``max_bucket``;
* stages each step's inputs (slot, episode step, state, return-to-go) in two pinned host buffers,
  copies them into static device buffers (two asynchronous copies), replays the bucket's graph and
  copies the actions back into a pinned buffer: one host sync per batch (per chunk);
* points the padding lanes of a bucket at a reserved pad slot, the last row of every slot buffer:
  its state is garbage, never read back, and each lane reads and writes only its own slot's rows,
  so a pad lane never changes a real slot. The pad row is one of ``capacity``'s rows; a runner
  built for ``capacity`` slots has ``capacity + 1``, and slot numbers stop at ``capacity - 2``
  before the buffers grow;
* computes what the plain step derives from the batch on the host (has_prev, the timestep
  embedding's steps, window mode's mask) on the device from the staged episode steps. Window mode
  cannot skip the padding columns left of every slot's start as the plain step does (by a
  data-dependent span): it always runs the full K columns with a mask, which padding makes exact
  (zeros into the local mixer, no scan update, no attention to them).

The step is the plain step's own ops (the network's ``step``/``forward`` on the slot buffers), and
the same code runs eagerly where nothing is captured (on the CPU, or ``capture=False``), which is
how CI checks it against the plain step: equal to 1e-6 over changing slot sets, batch sizes, resets
and resumes (tests/test_graphs.py).

Capture follows PyTorch's documented pattern: a few warm-up runs on a side stream (every lane on the
pad slot, so they write only the pad row), then ``torch.cuda.graph`` on the same stream. All buckets
share one memory pool, so the graphs together hold about what the largest bucket needs; sharing is
safe because graphs never run concurrently and each replay's actions are copied out before the next
replay. The capacity can grow (``reset`` of a new slot past it): the slot buffers are then
reallocated, so the graphs, which hold their addresses, are dropped and captured again at their next
use. A server that knows its number of sessions builds its runners with that capacity and never
re-captures. A graph also holds the policy's parameters by address: weights changed in place are
served, replaced parameter tensors are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from dmm.model.block import BlockState
from dmm.model.config import InferenceMode
from dmm.model.inference import PolicyRunner, RecurrentStep

if TYPE_CHECKING:
    from dmm.model.checkpoint import Policy

MAX_BUCKET = 1024  # rows of the largest graph; a bigger batch runs in chunks of it
WARMUP_RUNS = 3  # eager runs on the capture stream before a capture (PyTorch's pattern)


def bucket_size(n: int) -> int:
    """The smallest power of two >= ``n`` (n >= 1): the rows a batch of ``n`` runs with."""
    return 1 << (n - 1).bit_length()


def make_runner(
    policy: Policy,
    mode: InferenceMode = "window",
    capacity: int = 64,
    *,
    cuda_graphs: bool | None = None,
    max_bucket: int = MAX_BUCKET,
    recurrent_step: RecurrentStep | None = None,
) -> PolicyRunner:
    """A runner for ``policy``: a :class:`GraphedRunner` when ``cuda_graphs`` (None: on for a policy on
    a CUDA device, off elsewhere), else a plain :class:`PolicyRunner` (``recurrent_step`` chooses its
    recurrent step on the CPU). CUDA graphs on another device are a ValueError."""
    if cuda_graphs is None:
        cuda_graphs = policy.device.type == "cuda"
    if not cuda_graphs:
        return PolicyRunner(policy, mode, capacity=capacity, recurrent_step=recurrent_step)
    if policy.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a policy on a CUDA device, not on {policy.device}")
    return GraphedRunner(policy, mode, capacity=capacity, max_bucket=max_bucket)


@dataclass
class _Graph:
    """One bucket's captured step and the action tensor its replays write."""

    graph: torch.cuda.CUDAGraph
    action: torch.Tensor  # [bucket, act_dim], in the graph's memory pool


class GraphedRunner(PolicyRunner):
    """A :class:`PolicyRunner` whose torch step runs over static buffers: captured as one CUDA graph
    per power-of-two bucket when ``capture`` (default: on a CUDA device), eagerly otherwise.

    ``capacity`` slots (0 .. capacity - 1) are usable before the buffers grow; the buffers hold one
    row more, the pad slot (:attr:`pad_slot`). ``max_bucket`` (a power of two) bounds the graphs.
    """

    def __init__(
        self,
        policy: Policy,
        mode: InferenceMode = "window",
        capacity: int = 64,
        max_bucket: int = MAX_BUCKET,
        capture: bool | None = None,
    ) -> None:
        if max_bucket < 1 or bucket_size(max_bucket) != max_bucket:
            raise ValueError(f"max_bucket must be a power of two, not {max_bucket}")
        capture = policy.device.type == "cuda" if capture is None else capture
        if capture and policy.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a policy on a CUDA device, not on {policy.device}")
        # the torch step always: the fused CPU kernel reads no static buffers
        super().__init__(policy, mode, capacity=max(1, capacity) + 1, recurrent_step="torch")
        self.capture = capture
        self.max_bucket = max_bucket
        on_gpu = self.device.type == "cuda"
        S = self.state_dim
        # staged inputs: [state | rtg] as float32, [slot, episode step] as int64
        self._dev_f = torch.zeros(max_bucket, S + 1, dtype=torch.float32, device=self.device)
        self._dev_i = torch.zeros(max_bucket, 2, dtype=torch.int64, device=self.device)
        if on_gpu:
            pinned = {"pin_memory": True}
            self._host_f = torch.zeros(max_bucket, S + 1, dtype=torch.float32, **pinned)
            self._host_i = torch.zeros(max_bucket, 2, dtype=torch.int64, **pinned)
            self._host_action: torch.Tensor | None = torch.zeros(max_bucket, self.act_dim, **pinned)
        else:  # the staging buffers are the device buffers: nothing to copy
            self._host_f, self._host_i, self._host_action = self._dev_f, self._dev_i, None
        self._host_f_np, self._host_i_np = self._host_f.numpy(), self._host_i.numpy()
        self._columns = torch.arange(self.context, device=self.device)  # window mode's K columns
        self._graphs: dict[int, _Graph] = {}
        self._graphed_buffers: tuple[int, ...] = ()  # _buffer_addresses() when the graphs were captured
        self._pool = None  # the graphs' shared memory pool (torch.cuda.graph_pool_handle)
        self._capture_stream = torch.cuda.Stream(self.device) if capture else None

    @property
    def pad_slot(self) -> int:
        """The slot buffers' row that padding lanes read and write (never a caller's slot)."""
        return self.capacity - 1

    @property
    def graphs_captured(self) -> list[int]:
        """The buckets with a captured graph over the current slot buffers."""
        return sorted(self._graphs) if self._graphed_buffers == self._buffer_addresses() else []

    def reset(self, slots: Sequence[int]) -> None:
        """As :meth:`PolicyRunner.reset`; the buffers grow before a slot could reach the pad row."""
        if len(slots) and max(slots) >= self.pad_slot:
            self._grow(max(max(slots) + 2, 2 * self.capacity))
        super().reset(slots)

    release = reset

    def step(self, slots: Sequence[int], states: np.ndarray, rtgs: np.ndarray) -> np.ndarray:
        idx = np.asarray(slots, dtype=np.int64).reshape(-1)
        if idx.size and int(idx.max()) >= self.pad_slot:
            raise IndexError(f"slot {int(idx.max())} was never reset")
        return super().step(idx, states, rtgs)

    def capture_buckets(self, up_to: int | None = None) -> list[int]:
        """Capture now (largest first) every bucket up to ``up_to`` rows (default ``max_bucket``) that
        has no graph yet, instead of at its first step; returns the buckets captured (none without
        ``capture``)."""
        if not self.capture:
            return []
        self._drop_stale_graphs()
        top = bucket_size(min(up_to or self.max_bucket, self.max_bucket))
        sizes = [1 << i for i in range(top.bit_length() - 1, -1, -1) if (1 << i) not in self._graphs]
        with torch.inference_mode():
            for size in sizes:
                self._graphs[size] = self._capture(size)
        return sizes

    @torch.inference_mode()
    def _torch_step(
        self, slots: np.ndarray, states: np.ndarray, rtgs: np.ndarray, steps: np.ndarray
    ) -> np.ndarray:
        n = slots.size
        if n == 0:
            return np.zeros((0, self.act_dim), dtype=np.float32)
        if self.capture:
            self._drop_stale_graphs()
        if n <= self.max_bucket:
            return self._run(slots, states, rtgs, steps)
        parts = []
        for lo in range(0, n, self.max_bucket):
            chunk = slice(lo, lo + self.max_bucket)
            parts.append(self._run(slots[chunk], states[chunk], rtgs[chunk], steps[chunk]))
        return np.concatenate(parts)

    def _run(self, slots: np.ndarray, states: np.ndarray, rtgs: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """One bucket: stage the inputs, run the step (replay its graph), read the actions back."""
        n = slots.size
        size = bucket_size(n)
        graph = None
        if self.capture:
            graph = self._graphs.get(size)
            if graph is None:  # before staging: the warm-up runs use the staging buffers too
                graph = self._graphs[size] = self._capture(size)
        self._stage(size, slots, states, rtgs, steps)
        if graph is None:
            action = self._static_step(size)
        else:
            graph.graph.replay()
            action = graph.action
        if self._host_action is None:
            return action[:n].float().numpy().copy()
        self._host_action[:size].copy_(action, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()  # the one host sync of the batch
        return self._host_action.numpy()[:n].copy()

    def _stage(
        self,
        size: int,
        slots: np.ndarray | None = None,
        states: np.ndarray | None = None,
        rtgs: np.ndarray | None = None,
        steps: np.ndarray | None = None,
    ) -> None:
        """Write a batch's rows into the staging buffers, the pad slot into the rest of the bucket's
        lanes (all of them without a batch), and copy the bucket's rows to the device."""
        n = 0 if slots is None else slots.size
        f, i, S = self._host_f_np, self._host_i_np, self.state_dim
        if n:
            f[:n, :S], f[:n, S] = states, rtgs
            i[:n, 0], i[:n, 1] = slots, steps
        f[n:size] = 0.0
        i[n:size, 0], i[n:size, 1] = self.pad_slot, 0
        if self._host_f is not self._dev_f:
            self._dev_f[:size].copy_(self._host_f[:size], non_blocking=True)
            self._dev_i[:size].copy_(self._host_i[:size], non_blocking=True)

    def _static_step(self, size: int) -> torch.Tensor:
        """The step of the staged bucket of ``size`` lanes, all on the device with no host sync and
        shapes fixed by ``size``: what a graph captures. Returns the actions [size, act_dim]."""
        f, i, S = self._dev_f[:size], self._dev_i[:size], self.state_dim
        idx, steps = i[:, 0], i[:, 1]
        obs = (f[:, :S] - self._mean) / self._std
        rtg = f[:, S:] / self._rtg_scale
        if self.mode == "window":
            return self._static_window_step(idx, obs, rtg, steps)
        return self._static_recurrent_step(idx, obs, rtg, steps)

    def _static_window_step(
        self, idx: torch.Tensor, obs: torch.Tensor, rtg: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`PolicyRunner._window_step` over the full K columns: the columns left of a slot's start
        are masked instead of cut off (the plain step cuts those left of every slot's start)."""
        K = self.context
        b = self._buffers
        hist_rtg = torch.cat([b["rtg"][idx, 1:], rtg.unsqueeze(1)], dim=1)
        hist_obs = torch.cat([b["obs"][idx, 1:], obs.unsqueeze(1)], dim=1)
        hist_act = torch.cat([b["act"][idx, 1:], torch.zeros_like(b["act"][idx, :1])], dim=1)
        lengths = (steps + 1).clamp(max=K)
        mask = self._columns.unsqueeze(0) >= (K - lengths).unsqueeze(1)
        timesteps = None
        if self.policy.config.timestep_embedding:
            timesteps = ((steps + 1 - K).unsqueeze(1) + self._columns).clamp(min=0)
        action = self.network(hist_rtg, hist_obs, hist_act, mask, timesteps)[:, -1]
        hist_act[:, -1] = action
        b["rtg"][idx], b["obs"][idx], b["act"][idx] = hist_rtg, hist_obs, hist_act
        return action

    def _static_recurrent_step(
        self, idx: torch.Tensor, obs: torch.Tensor, rtg: torch.Tensor, steps: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`PolicyRunner._recurrent_step` with has_prev and the timesteps read from the staged
        episode steps on the device."""
        b = self._buffers
        n_layer = self.policy.config.n_layer
        state = [BlockState(b[f"local.{i}"], b[f"ssm.{i}"], slots=idx) for i in range(n_layer)]
        timesteps = steps if self.policy.config.timestep_embedding else None
        action, _ = self.network.step(state, rtg, obs, b["prev_action"][idx], steps > 0, timesteps)
        b["prev_action"][idx] = action
        return action

    def _buffer_addresses(self) -> tuple[int, ...]:
        """What the graphs depend on: the capacity (it only grows) and the slot buffers' addresses."""
        return (self.capacity, *(t.data_ptr() for t in self._buffers.values()))

    def _drop_stale_graphs(self) -> None:
        """Drop the graphs if the slot buffers moved (the capacity grew): they hold the old addresses."""
        addresses = self._buffer_addresses()
        if addresses != self._graphed_buffers:
            self._graphs.clear()
            self._pool = None
            self._graphed_buffers = addresses

    def _capture(self, size: int) -> _Graph:
        """Warm up on the capture stream with every lane on the pad slot, then capture the bucket.

        The capture forbids unsafe CUDA calls (a synchronizing copy, cudaMalloc) in this thread only
        (``thread_local``): a server loads models on other threads while it steps, and those must not
        fail because a capture is underway here."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = self._capture_stream
        self._stage(size)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_RUNS):
                    self._static_step(size)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=stream, capture_error_mode="thread_local"):
                action = self._static_step(size)
        except RuntimeError as err:
            raise RuntimeError(
                f"capturing the {self.mode} step of {size} rows as a CUDA graph failed: {err} "
                "(a runner without CUDA graphs: cuda_graphs=False)"
            ) from err
        # the staged pad lanes must be read before the caller stages its batch into the same buffers
        torch.cuda.synchronize(self.device)
        return _Graph(graph, action)
