"""The two streaming RPCs' messages, read into one form and answered from it.

``Act`` and ``ActVector`` differ only on the wire: an Act stream is a session of one row whose
messages carry one state, and whose errors name the step; an ActVector stream's messages carry rows
of states, and its errors name the row. Each :class:`StreamFormat` checks a message's shape and
values (a bad row fails the whole stream: a vector env steps its episodes together, so there is no
partial answer a client could use) and turns it into a :class:`StepInput`, which the dispatcher
(:mod:`dmm.server.dispatch`) runs the same way for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from dmm.server.checks import Abort, check_float32, check_states, invalid
from dmm.server.sessions import Session
from dmm.v1 import policy_pb2
from dmm.v1.modes import MODE_ENUM


@dataclass
class StepInput:
    """One step message, checked: the rows it steps [m], their states [m, state_dim], the rewards of
    their last actions [m] (None when it sent none), which of them (a mask over the m) start a new
    episode, and the explicit rtgs it gave instead of rewards [m] (None when it gave none)."""

    rows: np.ndarray
    states: np.ndarray
    rewards: np.ndarray | None
    restart: np.ndarray
    rtgs: np.ndarray | None = None


class StreamFormat(ABC):
    """How one streaming RPC's messages read and its replies are built."""

    rpc: str  # the RPC's name, for error messages

    @abstractmethod
    def read_start(
        self, start: Any, session: Session | None
    ) -> tuple[policy_pb2.Start, int | None, list[policy_pb2.EpisodeSoFar]]:
        """The start's Start, its number of episodes (None: one, as an Act stream has) and the episodes
        so far it resumes (none, or one per row)."""

    @abstractmethod
    def read_step(self, session: Session, step: Any) -> StepInput:
        """The step, checked, or an Abort naming the first bad value."""

    @abstractmethod
    def read_end(self, session: Session, end: Any) -> tuple[np.ndarray, np.ndarray]:
        """The rows whose episodes the end completes, and their last rewards."""

    @abstractmethod
    def started(self, session: Session) -> Any:
        """The reply to the start."""

    @abstractmethod
    def actions(self, session: Session, rows: np.ndarray, steps: np.ndarray, actions: np.ndarray) -> Any:
        """The reply carrying the actions [m, act_dim] of ``rows``, answering their ``steps``."""

    @abstractmethod
    def non_finite(self, session: Session, row: int) -> str:
        """Why the stream ends when ``row``'s action is not finite."""

    @abstractmethod
    def ended(self, session: Session) -> dict[str, object]:
        """What the "session ended" log line says about the session's episodes."""


def session_started(session: Session) -> policy_pb2.SessionStarted:
    cfg = session.lease.policy.config
    return policy_pb2.SessionStarted(
        model=session.model,
        version=session.version,
        mode=MODE_ENUM[session.lease.mode],
        target_return=session.rtg.target,
        state_dim=cfg.state_dim,
        act_dim=cfg.act_dim,
    )


def _non_finite(what: str, ended: str) -> str:
    return (
        f"the model produced a non-finite action {what} (inputs far outside the training data?); "
        f"the {ended} is ended"
    )


class ActFormat(StreamFormat):
    """An Act stream: one episode, one state per step, the rtg counted down by rewards or given."""

    rpc = "Act"
    _ROW = np.zeros(1, dtype=np.int64)
    _NO_RESTART = np.zeros(1, dtype=bool)

    def read_start(
        self, start: policy_pb2.Start, session: Session | None
    ) -> tuple[policy_pb2.Start, None, list[policy_pb2.EpisodeSoFar]]:
        if session is not None:
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"second start in one stream (session on {session.model} version "
                f"{session.version} already running): one stream is one episode",
            )
        return start, None, [start.resume] if start.HasField("resume") else []

    def read_step(self, session: Session, step: policy_pb2.Step) -> StepInput:
        n, expected, state = session.steps, session.state_dim, step.state
        if len(state) != expected:
            raise invalid(
                f"state has {len(state)} values; model {session.model} version {session.version} "
                f"expects state_dim={expected}"
            )
        states = np.fromiter(state, np.float64, expected).reshape(1, expected)

        def where(_: int) -> str:
            return f" (step {n})"

        check_states(states, *session.norm, where)
        which = step.WhichOneof("return_to_go")
        if which == "rtg":
            given = np.array([step.rtg])
            session.rtg.check_given(given, where)
            return StepInput(self._ROW, states, None, self._NO_RESTART, given)
        if which == "reward":
            if n == 0:
                raise invalid(
                    "step 0 carries a reward, but there is no previous action: send only the state "
                    "(or an explicit rtg)"
                )
            rewards = np.array([step.reward])
            session.rtg.check_rewards(self._ROW, rewards, self._NO_RESTART, where)
            return StepInput(self._ROW, states, rewards, self._NO_RESTART)
        if n > 0:
            raise invalid(f"step {n} has neither the reward of the last action nor an explicit rtg")
        return StepInput(self._ROW, states, None, self._NO_RESTART)

    def read_end(self, session: Session, end: policy_pb2.End) -> tuple[np.ndarray, np.ndarray]:
        if session.steps == 0:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, "end before the first step: no action was taken")
        check_float32("end.reward", end.reward, f" (step {session.steps})")
        return self._ROW, np.array([end.reward])

    def started(self, session: Session) -> policy_pb2.ActResponse:
        return policy_pb2.ActResponse(started=session_started(session))

    def actions(
        self, session: Session, rows: np.ndarray, steps: np.ndarray, actions: np.ndarray
    ) -> policy_pb2.ActResponse:
        action = policy_pb2.Action(
            action=actions[0].tolist(),
            step=int(steps[0]),
            model=session.model,
            version=session.version,
            rtg=session.rtg.values[0].item(),
        )
        return policy_pb2.ActResponse(action=action)

    def non_finite(self, session: Session, row: int) -> str:
        return _non_finite(f"at step {session.row_steps[row]} of this session", "session")

    def ended(self, session: Session) -> dict[str, object]:
        known = session.rtg.known_return(0)
        return {"episode_return": "unknown" if known is None else round(known, 6)}


class VectorFormat(StreamFormat):
    """An ActVector stream: N episodes, each step message stepping some or all of them (rows)."""

    rpc = "ActVector"

    def read_start(
        self, start: policy_pb2.VectorStart, session: Session | None
    ) -> tuple[policy_pb2.Start, int, list[policy_pb2.EpisodeSoFar]]:
        if session is not None:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, "second start in one ActVector stream")
        if start.episodes < 1:
            raise invalid("start.episodes must be at least 1")
        if start.start.HasField("resume"):
            raise invalid("start.start.resume is for Act streams: a VectorStart resumes its rows in resume")
        if start.resume and len(start.resume) != start.episodes:
            raise invalid(
                f"resume has {len(start.resume)} episodes for a stream of {start.episodes}: "
                "one per row, or none"
            )
        return start.start, start.episodes, list(start.resume)

    def read_step(self, session: Session, step: policy_pb2.VectorStep) -> StepInput:
        first = session.steps == 0
        rows = _rows("rows", step.rows, session.episodes) if step.rows else np.arange(session.episodes)
        if first and rows.size != session.episodes:
            raise invalid(
                f"the first step steps {rows.size} of {session.episodes} rows: it must step every row"
            )
        restart = _rows("restart", step.restart, session.episodes)
        if restart.size and not np.isin(restart, rows).all():
            raise invalid(
                f"restart: row {int(restart[~np.isin(restart, rows)][0])} is not stepped by this message"
            )
        dim = session.lease.policy.config.state_dim
        if len(step.states) != rows.size * dim:
            raise invalid(
                f"states has {len(step.states)} values; {rows.size} rows x state_dim={dim} "
                f"(model {session.model} version {session.version}) expected"
            )
        states = np.asarray(step.states, dtype=np.float64).reshape(rows.size, dim)
        check_states(states, *session.norm, _where(session, rows))
        if first:
            if step.rewards or step.restart:
                raise invalid(
                    "the first step has no previous actions: send states only (no rewards, no restart)"
                )
            return StepInput(rows, states, None, np.zeros(rows.size, dtype=bool))
        rewards = _rewards(rows, step.rewards)
        restart_mask = np.isin(rows, restart) if restart.size else np.zeros(rows.size, dtype=bool)
        session.rtg.check_rewards(rows, rewards, restart_mask, _where(session, rows))
        return StepInput(rows, states, rewards, restart_mask)

    def read_end(self, session: Session, end: policy_pb2.VectorEnd) -> tuple[np.ndarray, np.ndarray]:
        rows = _rows("end.rows", end.rows, session.episodes)
        rewards = _rewards(rows, end.rewards)
        session.rtg.check_rewards(rows, rewards, np.ones(rows.size, dtype=bool), _where(session, rows))
        for row in rows.tolist():
            if session.row_steps[row] == 0:
                raise Abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"end: row {row} has taken no step in its episode"
                )
        return rows, rewards

    def started(self, session: Session) -> policy_pb2.VectorResponse:
        started = policy_pb2.VectorStarted(session=session_started(session), episodes=session.episodes)
        return policy_pb2.VectorResponse(started=started)

    def actions(
        self, session: Session, rows: np.ndarray, steps: np.ndarray, actions: np.ndarray
    ) -> policy_pb2.VectorResponse:
        return policy_pb2.VectorResponse(
            actions=policy_pb2.VectorActions(
                rows=rows.tolist(),
                actions=actions.ravel().tolist(),
                steps=steps.tolist(),
                rtgs=session.rtg.values[rows].tolist(),
            )
        )

    def non_finite(self, session: Session, row: int) -> str:
        return _non_finite(f"for row {row} at step {session.row_steps[row]}", "stream")

    def ended(self, session: Session) -> dict[str, object]:
        return {"episodes": session.episodes, "episodes_recorded": session.episodes_recorded}


def _rows(field: str, values: Sequence[int], episodes: int) -> np.ndarray:
    rows = np.asarray(values, dtype=np.int64)
    if rows.size and rows.max() >= episodes:
        raise invalid(f"{field}: row {int(rows.max())} is out of range for a stream of {episodes} episodes")
    values, counts = np.unique(rows, return_counts=True)
    if (counts > 1).any():
        raise invalid(f"{field}: row {int(values[counts > 1][0])} is listed twice")
    return rows


def _rewards(rows: np.ndarray, values: Sequence[float]) -> np.ndarray:
    rewards = np.asarray(values, dtype=np.float64)
    if rewards.size != rows.size:
        raise invalid(f"rewards has {rewards.size} values for {rows.size} stepped rows: one per row")
    return rewards


def _where(session: Session, rows: np.ndarray) -> Callable[[int], str]:
    """Names the i-th of ``rows`` in an error message."""
    return lambda i: f" (row {rows[i]}, step {session.row_steps[rows[i]]})"


ACT = ActFormat()
VECTOR = VectorFormat()
