"""Reading and answering the messages of an ``ActVector`` stream (one stream, N episodes).

The checks are Act's, row by row, and a bad row fails the whole stream with a message naming it: a
vector env steps its episodes together, so there is no partial answer a client could use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from dmm.server.checks import Abort, check_float32_rows, check_states, invalid
from dmm.server.sessions import VectorSession
from dmm.v1 import policy_pb2


@dataclass
class VectorInput:
    """One VectorStep, checked: the rows it steps, their states [m, state_dim], the rewards of their
    last actions [m] (None on the first step) and which of them (a mask over the m) start over."""

    rows: np.ndarray
    states: np.ndarray
    rewards: np.ndarray | None
    restart: np.ndarray


def _rows(field: str, values: list[int], episodes: int) -> np.ndarray:
    rows = np.asarray(values, dtype=np.int64)
    if rows.size and rows.max() >= episodes:
        raise invalid(f"{field}: row {int(rows.max())} is out of range for a stream of {episodes} episodes")
    values, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        raise invalid(f"{field}: row {int(values[counts > 1][0])} is listed twice")
    return rows


def _rewards(session: VectorSession, rows: np.ndarray, values: list[float]) -> np.ndarray:
    rewards = np.asarray(values, dtype=np.float64)
    if rewards.size != rows.size:
        raise invalid(f"rewards has {rewards.size} values for {rows.size} stepped rows: one per row")
    check_float32_rows("reward", rewards, _where(session, rows))
    return rewards


def _where(session: VectorSession, rows: np.ndarray) -> Callable[[int], str]:
    """Names the i-th of ``rows`` in an error message."""
    return lambda i: f" (row {rows[i]}, step {session.row_steps[rows[i]]})"


def read_step(session: VectorSession, step: policy_pb2.VectorStep) -> VectorInput:
    """The step's rows, states, rewards and restarts, or an Abort naming the first bad value."""
    first = session.steps == 0
    rows = _rows("rows", list(step.rows), session.episodes) if step.rows else np.arange(session.episodes)
    if first and rows.size != session.episodes:
        raise invalid(f"the first step steps {rows.size} of {session.episodes} rows: it must step every row")
    restart = _rows("restart", list(step.restart), session.episodes)
    if not np.isin(restart, rows).all():
        raise invalid(
            f"restart: row {int(restart[~np.isin(restart, rows)][0])} is not stepped by this message"
        )
    meta = session.lease.policy.meta
    dim = session.lease.policy.config.state_dim
    if len(step.states) != rows.size * dim:
        raise invalid(
            f"states has {len(step.states)} values; {rows.size} rows x state_dim={dim} "
            f"(model {session.model} version {session.version}) expected"
        )
    states = np.asarray(step.states, dtype=np.float64).reshape(rows.size, dim)
    check_states(states, np.asarray(meta.state_mean), np.asarray(meta.state_std), _where(session, rows))
    if first:
        if step.rewards or step.restart:
            raise invalid("the first step has no previous actions: send states only (no rewards, no restart)")
        return VectorInput(rows, states, None, np.zeros(rows.size, dtype=bool))
    rewards = _rewards(session, rows, list(step.rewards))
    restart_mask = np.isin(rows, restart)
    going = rows[~restart_mask]
    after = session.row_rtg[going] - rewards[~restart_mask]
    check_float32_rows("the return-to-go after this reward", after, _where(session, going))
    return VectorInput(rows, states, rewards, restart_mask)


def read_end(session: VectorSession, end: policy_pb2.VectorEnd) -> tuple[np.ndarray, np.ndarray]:
    """The ended rows and their last rewards."""
    rows = _rows("end.rows", list(end.rows), session.episodes)
    rewards = _rewards(session, rows, list(end.rewards))
    for row in rows.tolist():
        if session.row_steps[row] == 0:
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"end: row {row} has taken no step in its episode"
            )
    return rows, rewards


def actions_reply(session: VectorSession, rows: np.ndarray, actions: np.ndarray) -> policy_pb2.VectorResponse:
    """The actions of ``rows`` (their step counts are advanced), or an Abort for a non-finite action."""
    if not np.isfinite(actions).all():
        row = int(rows[np.flatnonzero(~np.isfinite(actions).all(axis=1))[0]])
        raise Abort(
            grpc.StatusCode.INTERNAL,
            f"the model produced a non-finite action for row {row} at step {session.row_steps[row]} "
            "(inputs far outside the training data?); the stream is ended",
        )
    steps = session.row_steps[rows].copy()
    session.row_steps[rows] += 1
    session.steps += rows.size
    return policy_pb2.VectorResponse(
        actions=policy_pb2.VectorActions(
            rows=rows.tolist(),
            actions=actions.ravel().tolist(),
            steps=steps.tolist(),
            rtgs=session.row_rtg[rows].tolist(),
        )
    )
