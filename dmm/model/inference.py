"""Batched inference over many independent episodes ("slots"), context kept on the policy's device.

Two modes:

* ``window``: every step re-runs the last K steps, left-padded and masked exactly as in training,
  so the policy sees what it was trained on. Cost O(K) per step.
* ``recurrent``: every step feeds only (a_{t-1}, rtg_t, s_t) through the blocks, carrying each
  layer's scan state and the last k-1 local-mixer inputs. Cost O(1) per step; it equals ``window``
  while t < K and sees the whole episode after that.

A slot is a row in preallocated device buffers; callers own slot numbering (e.g. a server's session
table) and call :meth:`PolicyRunner.reset` when an episode starts in a slot, or
:meth:`PolicyRunner.resume` to continue an episode other slots (or another process) played so far.

On the CPU, a step runs as one fused numba kernel (:mod:`dmm.model.step_numba`) rather than torch
ops, in both modes: in recurrent mode instead of :meth:`PolicyNetwork.step`'s ~90 ops, in window mode
instead of the forward over the window (the kernel runs the network from the initial state over the
slot's last min(t + 1, K) steps, padding masked as the forward masks it). Both read and write the
same slot buffers as the torch step and give the same actions (to 1e-5). The fused step runs where
the numba scan backend would, for batches of up to ``AUTO_FUSED_MAX_ROWS`` rows (now any size;
larger ones would take the torch step); ``recurrent_step="torch"`` (or ``DMM_RECURRENT_STEP=torch``)
keeps the torch step in either mode (one setting for both: the name is historical), which is also
what runs on a GPU and for policies without Mamba mixers. The fused step copies the weights when the
runner is built: a runner serves the weights its policy had then.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch

from dmm.errors import ConfigError
from dmm.model.block import BlockState
from dmm.model.config import InferenceMode
from dmm.model.mamba import ModifiedMamba
from dmm.model.scan import resolve_backend

if TYPE_CHECKING:
    from dmm.model.checkpoint import Policy
    from dmm.model.step_numba import FusedStep

RecurrentStep = Literal["auto", "fused", "torch"]
RECURRENT_STEP_ENV = "DMM_RECURRENT_STEP"


# Above this many rows ``auto`` would step with torch. With its products in BLAS the fused step beat
# the torch step (either scan backend) at every batch size measured, 1 to 1024 rows, in both modes
# (bench/results/step_speed, bench/results/serve-fused-window), so ``auto`` takes it for all of them.
AUTO_FUSED_MAX_ROWS = sys.maxsize


def _fused_max_rows(policy: Policy, mode: InferenceMode, choice: str | None) -> int:
    """How many rows a runner steps at most with the fused CPU kernel (0: never), by ``choice`` (None:
    ``$DMM_RECURRENT_STEP``, else ``auto``). ``auto`` takes it, in either mode, for up to
    :data:`AUTO_FUSED_MAX_ROWS` rows wherever the policy's scans would run the numba backend (on the
    CPU, unless the scan backend is pinned to torch: then the whole torch step runs); ``fused`` takes
    it for every batch on the CPU whatever the scan backend. Only a DMM with Mamba global mixers has
    a fused step (others, and networks of other classes, always take the torch step), and only with
    SciPy installed (numba's ``np.dot``, the kernel's products, calls SciPy's BLAS): without it
    ``auto`` takes the torch step."""
    source = "recurrent_step" if choice is not None else f"${RECURRENT_STEP_ENV}"
    choice = choice if choice is not None else (os.environ.get(RECURRENT_STEP_ENV, "").strip() or "auto")
    if choice not in get_args(RecurrentStep):
        raise ValueError(f"unknown {source} {choice!r}; expected auto, fused or torch")
    if choice == "torch":
        return 0
    mambas = [m for m in policy.network.modules() if isinstance(m, ModifiedMamba)]
    if policy.device.type != "cpu" or not policy.config.supports_recurrent or not mambas:
        if choice == "fused":
            where = f"on {policy.device}" if policy.device.type != "cpu" else policy.label
            raise ValueError(f"the fused step runs on the CPU for a DMM with Mamba mixers, not {where}")
        return 0
    blas = importlib.util.find_spec("scipy") is not None
    if choice == "fused":
        if not blas:
            raise ValueError("the fused step needs SciPy (numba's np.dot calls its BLAS): pip install scipy")
        return sys.maxsize
    if not blas:
        return 0
    try:
        return AUTO_FUSED_MAX_ROWS if resolve_backend(mambas[0].scan_backend, policy.device) == "numba" else 0
    except ConfigError:
        return 0  # a scan backend that cannot run here: the torch step reports it at its first step


class PolicyRunner:
    def __init__(
        self,
        policy: Policy,
        mode: InferenceMode = "window",
        capacity: int = 64,
        recurrent_step: RecurrentStep | None = None,
    ) -> None:
        if mode not in ("window", "recurrent"):
            raise ValueError(f"unknown inference mode {mode!r}; expected 'window' or 'recurrent'")
        if mode == "recurrent" and not policy.config.supports_recurrent:
            cfg = policy.config
            raise ValueError(f"{policy.label} ({cfg.describe_architecture()}) supports window mode only")
        self.policy = policy
        self.mode = mode
        self.network = policy.network
        self.device = policy.device
        cfg = policy.config
        self.state_dim, self.act_dim, self.context = cfg.state_dim, cfg.act_dim, cfg.context
        self._mean = torch.tensor(policy.meta.state_mean, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(policy.meta.state_std, dtype=torch.float32, device=self.device)
        self._rtg_scale = float(policy.meta.rtg_scale)
        self._fused: FusedStep | None = None
        self._fused_max_rows = _fused_max_rows(policy, mode, recurrent_step)
        if self._fused_max_rows:
            from dmm.model import step_numba

            step_numba.warm_up()  # compile (or load) now, not at the first step
            mean, std = self._mean.numpy(), self._std.numpy()
            self._fused = step_numba.FusedStep(self.network, mean, std, self._rtg_scale)
        self.capacity = 0
        self._steps = np.zeros(0, dtype=np.int64)
        self._buffers: dict[str, torch.Tensor] = {}
        self._grow(max(1, capacity))

    @property
    def recurrent_step(self) -> RecurrentStep:
        """Which step runs (in either mode; the name is the setting's): ``fused`` (the CPU kernel) or
        ``torch``."""
        return "fused" if self._fused is not None else "torch"

    def _allocate(self, capacity: int) -> dict[str, torch.Tensor]:
        """Zeroed buffers for ``capacity`` slots (the slot axis is 0). In recurrent mode the local-mixer
        and the scan buffers of all layers are the rows of one [n_layer, S, ...] tensor per kind, which
        the fused step takes whole; each layer's entry is its (contiguous) row."""
        zeros = functools.partial(torch.zeros, dtype=torch.float32, device=self.device)
        cfg = self.policy.config
        if self.mode == "window":
            K = self.context
            obs, act = zeros(capacity, K, self.state_dim), zeros(capacity, K, self.act_dim)
            return {"rtg": zeros(capacity, K, 1), "obs": obs, "act": act}
        self._layer_stacks = {
            "local": zeros(cfg.n_layer, capacity, cfg.dsm_window - 1, cfg.d_model),
            "ssm": zeros(cfg.n_layer, capacity, cfg.d_inner, cfg.d_state),
        }
        stacks = self._layer_stacks.items()
        per_layer = {f"{kind}.{i}": stack[i] for kind, stack in stacks for i in range(cfg.n_layer)}
        return {**per_layer, "prev_action": zeros(capacity, self.act_dim)}

    def _grow(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        fresh = self._allocate(capacity)
        for name, buffer in fresh.items():
            if name in self._buffers:
                buffer[: self.capacity] = self._buffers[name]
        self._buffers = fresh
        self._steps = np.concatenate([self._steps, np.zeros(capacity - self.capacity, dtype=np.int64)])
        self.capacity = capacity
        if self._fused is not None and self.mode == "window":
            self._views = self._fused.window_views(fresh["rtg"], fresh["obs"], fresh["act"])
        elif self._fused is not None:
            stacks = self._layer_stacks
            self._views = self._fused.views(stacks["local"], stacks["ssm"], fresh["prev_action"])

    def reset(self, slots: Sequence[int]) -> None:
        """Start a new episode in each of ``slots`` (capacity grows as needed)."""
        if not len(slots):
            return
        if max(slots) >= self.capacity:
            self._grow(max(max(slots) + 1, 2 * self.capacity))
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        for buf in self._buffers.values():
            buf.index_fill_(0, idx, 0.0)
        self._steps[list(slots)] = 0

    release = reset  # forgetting an episode is the same as zeroing its slot

    def steps_taken(self, slot: int) -> int:
        return int(self._steps[slot])

    @torch.inference_mode()
    def _resume_group(self, rows: Sequence[int], *columns: Sequence[Any]) -> None:
        """:meth:`resume` of the ``rows`` of its arguments (slots, states, actions, rtgs) in one go:
        window mode copies the last K steps (the same values the slot would hold); recurrent mode
        rebuilds the scan and local-mixer state with one forward over all their histories."""
        slots, states, actions, rtgs = ([column[i] for i in rows] for column in columns)
        if not slots:
            return
        self.reset(slots)
        lengths = [len(a) for a in actions]
        T = max(lengths)
        obs = torch.zeros(len(slots), T, self.state_dim, device=self.device)
        act = torch.zeros(len(slots), T, self.act_dim, device=self.device)
        rtg = torch.zeros(len(slots), T, 1, device=self.device)
        for i, (s, a, r, t) in enumerate(zip(states, actions, rtgs, lengths, strict=True)):
            # left-aligned padding, converted exactly as step() converts each step's inputs
            obs[i, T - t :] = (
                torch.from_numpy(np.asarray(s, np.float32)).to(self.device) - self._mean
            ) / self._std
            act[i, T - t :] = torch.from_numpy(np.asarray(a, np.float32)).to(self.device)
            rtg[i, T - t :, 0] = torch.from_numpy(np.asarray(r, np.float32)).to(self.device) / self._rtg_scale
        idx = torch.as_tensor(slots, dtype=torch.long, device=self.device)
        steps = np.asarray(lengths, dtype=np.int64)
        if self.mode == "window":
            K = min(self.context, T)
            b = self._buffers
            b["rtg"][idx, self.context - K :] = rtg[:, T - K :]
            b["obs"][idx, self.context - K :] = obs[:, T - K :]
            b["act"][idx, self.context - K :] = act[:, T - K :]
        else:
            self._rebuild_recurrent(idx, rtg, obs, act, steps)
        self._steps[slots] = steps

    # Rows x steps (the longest history's) of one rebuild forward of :meth:`resume`. Batching pays while
    # the forward's fixed costs dominate: 8 histories of 10 steps rebuilt 4x as fast together as one
    # by one, of 50 steps 1.2x; of 150 or more steps 0.8-0.9x (paper-size DMM, one thread).
    RESUME_BATCH_ROW_STEPS = 512

    def resume(
        self,
        slots: Sequence[int],
        states: Sequence[np.ndarray],
        actions: Sequence[np.ndarray],
        rtgs: Sequence[np.ndarray],
    ) -> None:
        """Put into each of ``slots`` the context of an episode that has taken t >= 1 steps elsewhere:
        its raw states [t, state_dim], the actions it got [t, act_dim] and the raw returns-to-go it was
        conditioned on [t]. The next :meth:`step` of the slot then answers step t as an uninterrupted
        slot would (window mode: exactly; recurrent mode: to 1e-5).

        In recurrent mode the histories (e.g. a server's resumed sessions that arrived together) are
        rebuilt in as few forwards as pay: longest first, each forward taking histories while its rows
        x longest steps stay within :attr:`RESUME_BATCH_ROW_STEPS` (a long history is rebuilt alone)."""
        slots = list(slots)
        lengths = [len(a) for a in actions]
        for slot, s, a, r, t in zip(slots, states, actions, rtgs, lengths, strict=True):
            if t < 1 or np.shape(s) != (t, self.state_dim) or np.shape(a) != (t, self.act_dim) or len(r) != t:
                raise ValueError(
                    f"slot {slot}: a history needs t >= 1 steps of states [t, {self.state_dim}], "
                    f"actions [t, {self.act_dim}] and rtgs [t]; got {np.shape(s)}, {np.shape(a)}, {len(r)}"
                )
        if self.mode == "window":
            self._resume_group(range(len(slots)), slots, states, actions, rtgs)
            return
        group: list[int] = []
        for i in sorted(range(len(slots)), key=lambda i: -lengths[i]):  # longest first
            if group and (len(group) + 1) * lengths[group[0]] > self.RESUME_BATCH_ROW_STEPS:
                self._resume_group(group, slots, states, actions, rtgs)
                group = []
            group.append(i)
        self._resume_group(group, slots, states, actions, rtgs)

    def _rebuild_recurrent(
        self, idx: torch.Tensor, rtg: torch.Tensor, obs: torch.Tensor, act: torch.Tensor, steps: np.ndarray
    ) -> None:
        """The recurrent state after t steps has read the tokens rtg_0, s_0, a_0, ..., rtg_{t-1}, s_{t-1}
        (step t feeds a_{t-1} first): one forward over the left-padded histories less the last action
        (:meth:`PolicyNetwork.state_before_last_action`; padding is exact: zeros into the local mixer, as
        before a sequence starts, and skipped by the scan), with the state carried into the slots."""
        T = obs.shape[1]
        real = torch.arange(T, device=self.device).unsqueeze(0) >= torch.as_tensor(
            T - steps, device=self.device
        ).unsqueeze(1)
        timesteps = None
        if self.policy.config.timestep_embedding:
            timesteps = (
                torch.arange(T, device=self.device).unsqueeze(0)
                - (T - torch.as_tensor(steps, device=self.device)).unsqueeze(1)
            ).clamp(min=0)
        state = self.network.state_before_last_action(rtg, obs, act, real, timesteps)
        b = self._buffers
        for layer, block_state in enumerate(state):
            assert block_state is not None, "recurrent mode has a state in every layer"
            b[f"local.{layer}"][idx] = block_state.local
            b[f"ssm.{layer}"][idx] = block_state.ssm
        b["prev_action"][idx] = act[:, -1]

    def step(self, slots: Sequence[int], states: np.ndarray, rtgs: np.ndarray) -> np.ndarray:
        """Append (rtg, state) to each slot's episode and return the next actions [B, act_dim].

        ``states`` are raw observations [B, state_dim]; ``rtgs`` raw returns-to-go [B].
        """
        idx = np.asarray(slots, dtype=np.int64).reshape(-1)
        states = np.asarray(states, dtype=np.float32)
        rtgs = np.asarray(rtgs, dtype=np.float32).reshape(-1)
        n = idx.size
        if states.shape != (n, self.state_dim) or rtgs.shape != (n,):
            raise ValueError(
                f"expected states ({n}, {self.state_dim}) and rtgs ({n},), "
                f"got {states.shape} and {rtgs.shape}"
            )
        if n > 1 and np.unique(idx).size != n:
            raise ValueError("slots in one step must be distinct")
        if n and (idx.max() >= self.capacity or idx.min() < 0):
            raise IndexError(f"slot {int(idx.max())} was never reset")
        steps = self._steps[idx]
        if self._fused is not None and n <= self._fused_max_rows:
            # the fused CPU kernel: no torch (and no inference-mode switch) on this path
            if self.mode == "window":
                action = self._fused.window(self._views, idx, steps, states, rtgs, check=False)
            else:
                action = self._fused.run(self._views, idx, steps, states, rtgs)
        else:
            action = self._torch_step(idx, states, rtgs, steps)
        self._steps[idx] = steps + 1
        return action

    @torch.inference_mode()
    def _torch_step(
        self, slots: np.ndarray, states: np.ndarray, rtgs: np.ndarray, steps: np.ndarray
    ) -> np.ndarray:
        idx = torch.from_numpy(slots).to(self.device)
        obs = (torch.from_numpy(states).to(self.device) - self._mean) / self._std
        rtg = torch.from_numpy(rtgs).to(self.device).unsqueeze(-1) / self._rtg_scale
        if self.mode == "window":
            action = self._window_step(idx, obs, rtg, steps)
        else:
            action = self._recurrent_step(idx, obs, rtg, steps)
        return action.float().cpu().numpy()

    def _window_step(
        self, idx: torch.Tensor, obs: torch.Tensor, rtg: torch.Tensor, steps: np.ndarray
    ) -> torch.Tensor:
        K = self.context
        b = self._buffers
        hist_rtg = torch.cat([b["rtg"][idx, 1:], rtg.unsqueeze(1)], dim=1)
        hist_obs = torch.cat([b["obs"][idx, 1:], obs.unsqueeze(1)], dim=1)
        hist_act = torch.cat([b["act"][idx, 1:], torch.zeros_like(b["act"][idx, :1])], dim=1)
        lengths = np.minimum(steps + 1, K)
        span = int(lengths.max())  # columns left of every slot's start are all padding: skip them
        mask = None
        if int(lengths.min()) < span:
            first_real = torch.as_tensor(span - lengths, device=self.device)
            mask = torch.arange(span, device=self.device).unsqueeze(0) >= first_real.unsqueeze(1)
        timesteps = None
        if self.policy.config.timestep_embedding:
            first = torch.as_tensor(steps + 1 - span, device=self.device)
            timesteps = (first.unsqueeze(1) + torch.arange(span, device=self.device)).clamp(min=0)
        window = (hist_rtg[:, K - span :], hist_obs[:, K - span :], hist_act[:, K - span :])
        action = self.network(*window, mask, timesteps)[:, -1]
        hist_act[:, -1] = action
        b["rtg"][idx], b["obs"][idx], b["act"][idx] = hist_rtg, hist_obs, hist_act
        return action

    def _recurrent_step(
        self, idx: torch.Tensor, obs: torch.Tensor, rtg: torch.Tensor, steps: np.ndarray
    ) -> torch.Tensor:
        """The blocks update their rows of the slot buffers in place: no per-step state copies."""
        b = self._buffers
        n_layer = self.policy.config.n_layer
        state = [BlockState(b[f"local.{i}"], b[f"ssm.{i}"], slots=idx) for i in range(n_layer)]
        has_prev = torch.as_tensor(steps > 0, device=self.device)
        timesteps = (
            torch.as_tensor(steps, device=self.device) if self.policy.config.timestep_embedding else None
        )
        action, _ = self.network.step(state, rtg, obs, b["prev_action"][idx], has_prev, timesteps)
        b["prev_action"][idx] = action
        return action
