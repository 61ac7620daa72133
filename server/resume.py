"""An episode resumed from the episode so far (``EpisodeSoFar``): a client whose server died or drained
starts a session on another server with what its episode has taken, and goes on where it was.

The history is checked as the steps it replays would have been (finite states in the model's float32,
actions in [-1, 1], rewards or rtgs in float32), bounded by the model's max episode length (its
timestep embedding knows no later step, and it bounds what one message may make the server compute).
The returns-to-go are counted down from the session's target by the same float64 subtractions the
session would have made, so the rebuilt context holds the very values an uninterrupted one would.

Resumed sessions that arrive together (every stream of a server that died moves at once) are rebuilt
together (:class:`Rebuilds`): in recurrent mode short histories share a forward.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dmm.model import PolicyRunner, PolicyVersion
from dmm.server import logs
from dmm.server.checks import check_float32_rows, check_states, invalid
from dmm.v1 import policy_pb2


@dataclass(frozen=True)
class History:
    """One episode so far, checked: t steps of raw states [t, state_dim], the actions the client got
    [t, act_dim], the rtgs each step was conditioned on [t] (float64, as the session keeps them), and
    the return of the rewards so far (NaN when the client gave rtgs, as with explicit rtgs)."""

    states: np.ndarray
    actions: np.ndarray
    rtgs: np.ndarray
    episode_return: float

    @property
    def steps(self) -> int:
        return len(self.actions)


def read_history(
    so_far: policy_pb2.EpisodeSoFar, policy: PolicyVersion, target: float, row: int | None = None
) -> History:
    """``so_far`` checked against ``policy``, its rtgs counted down from ``target``; an Abort
    (INVALID_ARGUMENT) naming the first bad field (and the vector stream's ``row`` it is for)."""
    cfg, meta = policy.config, policy.meta
    where = "" if row is None else f" (row {row})"
    t = so_far.steps
    if t < 1:
        raise invalid(f"resume.steps is {t}{where}: a resumed episode has taken at least one step")
    if t > cfg.max_ep_len:
        raise invalid(
            f"resume.steps is {t}{where}, over the max episode length {cfg.max_ep_len} of model "
            f"{policy.name} version {policy.version}"
        )
    for field, dim, name in (
        (so_far.states, cfg.state_dim, "state_dim"),
        (so_far.actions, cfg.act_dim, "act_dim"),
    ):
        if len(field) != t * dim:
            what = "states" if name == "state_dim" else "actions"
            raise invalid(f"resume.{what} has {len(field)} values{where}; {t} steps x {name}={dim} expected")
    states = np.asarray(so_far.states, dtype=np.float64).reshape(t, cfg.state_dim)
    check_states(states, np.asarray(meta.state_mean), np.asarray(meta.state_std), _step(row))
    actions = np.asarray(so_far.actions, dtype=np.float32).reshape(t, cfg.act_dim)
    bad = ~(np.abs(actions) <= 1.0).all(axis=1)  # NaN fails too
    if bad.any():
        step = int(np.flatnonzero(bad)[0])
        raise invalid(f"resume.actions: the action of step {step}{where} is outside [-1, 1]")
    rtgs, episode_return = _returns_to_go(so_far, t, target, row)
    return History(states, actions, rtgs, episode_return)


def _returns_to_go(
    so_far: policy_pb2.EpisodeSoFar, t: int, target: float, row: int | None
) -> tuple[np.ndarray, float]:
    """The rtgs of the t steps and the return so far, from the rewards (counted down from ``target``
    one subtraction at a time, as the session does) or as given."""
    where = "" if row is None else f" (row {row})"
    if so_far.rtgs:
        rtgs = np.asarray(so_far.rtgs, dtype=np.float64)
        if rtgs.size != t:
            raise invalid(f"resume.rtgs has {rtgs.size} values{where}; one per step ({t}) expected")
        check_float32_rows("resume.rtg", rtgs, _step(row))
        return rtgs, 0.0 if t == 1 else float("nan")
    rewards = np.asarray(so_far.rewards, dtype=np.float64)
    if rewards.size != t - 1:
        raise invalid(
            f"resume.rewards has {rewards.size} values{where}; the rewards of the first t-1 = {t - 1} "
            "actions (the last one comes with the next step), or rtgs, expected"
        )
    check_float32_rows("resume.reward", rewards, _step(row))
    rtgs = np.subtract.accumulate(np.concatenate([[target], rewards]))
    check_float32_rows("the return-to-go after resume.reward", rtgs, lambda i: _step(row)(i - 1))
    episode_return = float(np.add.accumulate(np.concatenate([[0.0], rewards]))[-1])
    return rtgs, episode_return


def _step(row: int | None) -> Callable[[int], str]:
    """Names step i of the history in an error message."""
    return (
        (lambda i: f" (resumed step {i})") if row is None else (lambda i: f" (row {row}, resumed step {i})")
    )


# The most rows one batched rebuild takes: 64 histories of 1,000 steps are about 50 MB of tokens.
MAX_REBUILD_ROWS = 64


@dataclass
class _Rebuild:
    slots: list[int]
    histories: list[History]
    future: asyncio.Future


@dataclass
class _Batch:
    runner: PolicyRunner
    items: list[_Rebuild] = dataclasses.field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class Rebuilds:
    """The rebuilds of resumed sessions, batched per runner as steps are: those that arrive within
    ``max_delay_s`` of the first (the server's batching window) run as one
    `PolicyRunner.resume` call, which in recurrent mode rebuilds short histories in shared
    forwards (a rebuild's result does not depend on its batch beyond float rounding, so this holds
    whatever ``--max-batch`` is). A batch closes early at ``max_rows`` rows. Where waiting would gain
    nothing, a batch is what arrived before the event loop's next pass: in window mode (a rebuild
    copies each history's last K steps) and when the first history is too long to share a forward
    (``PolicyRunner.RESUME_BATCH_ROW_STEPS``). Like a batch of steps, the rebuild runs on the loop."""

    def __init__(self, max_delay_s: float, max_rows: int = MAX_REBUILD_ROWS) -> None:
        self.max_delay_s = max_delay_s
        self.max_rows = max_rows
        self._pending: dict[PolicyRunner, _Batch] = {}

    async def rebuild(self, runner: PolicyRunner, slots: list[int], histories: list[History]) -> None:
        """Put each history into its slot (one per slot) with the other rebuilds of ``runner`` that
        arrive with it; returns once done (or raises what the rebuild raised)."""
        loop = asyncio.get_running_loop()
        batch = self._pending.get(runner)
        if batch is None:
            batch = self._pending[runner] = _Batch(runner)
            shares = len(slots) * max(h.steps for h in histories) <= runner.RESUME_BATCH_ROW_STEPS
            delay = self.max_delay_s if runner.mode == "recurrent" and shares else 0.0
            batch.timer = loop.call_later(delay, self._run, batch)
        future = loop.create_future()
        batch.items.append(_Rebuild(slots, histories, future))
        batch.rows += len(slots)
        if batch.rows >= self.max_rows:
            self._run(batch)
        await future

    def _run(self, batch: _Batch) -> None:
        if batch.timer is not None:
            batch.timer.cancel()
        if self._pending.get(batch.runner) is batch:
            del self._pending[batch.runner]
        items = [item for item in batch.items if not item.future.done()]  # a cancelled start's slots are gone
        if not items:
            return
        histories = [h for item in items for h in item.histories]
        started = time.perf_counter()
        try:
            batch.runner.resume(
                [slot for item in items for slot in item.slots],
                [h.states for h in histories],
                [h.actions for h in histories],
                [h.rtgs for h in histories],
            )
        except Exception as err:  # a failed rebuild fails its starts, never the server
            for item in items:
                item.future.set_exception(err)
            return
        logs.event(
            logging.INFO,
            "histories rebuilt",
            model=batch.runner.policy.label,
            mode=batch.runner.mode,
            starts=len(items),
            episodes=len(histories),
            steps=sum(h.steps for h in histories),
            seconds=round(time.perf_counter() - started, 4),
        )
        for item in items:
            item.future.set_result(None)
