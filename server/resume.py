"""An episode resumed from the episode so far (``EpisodeSoFar``): a client whose server died or drained
starts a session on another server with what its episode has taken, and goes on where it was.

The history is checked as the steps it replays would have been (finite states in the model's float32,
actions in [-1, 1], rewards or rtgs in float32), bounded by the model's max episode length (its
timestep embedding knows no later step, and it bounds what one message may make the server compute).
The returns-to-go are counted down from the session's target by the same float64 subtractions the
session would have made, so the rebuilt context holds the very values an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dmm.model import PolicyVersion
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
