"""Per-stream session state. There is one kind of session: N episodes (rows), each in its own slot of
one runner, with its own return-to-go and step count. An ``ActVector`` stream holds the N its start
asks for; an ``Act`` stream is a session of one row."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from dmm.server.pool import Lease
from dmm.server.resume import History
from dmm.server.rtg import ReturnsToGo


@dataclass(eq=False)  # identity semantics: sessions live in a set
class Session:
    """What a stream handler keeps between messages; each row's model context lives in its runner slot."""

    lease: Lease
    rtg: ReturnsToGo
    task: asyncio.Task | None
    # The step index of each row in its current episode (the number of actions it has taken).
    row_steps: np.ndarray
    steps: int = 0  # the actions of all rows (a resumed session counts those of its histories)
    episodes_recorded: int = 0
    started_at: float = field(default_factory=time.monotonic)
    # Why the session ended when another party (shutdown) ended it; None while it runs.
    end_reason: str | None = field(default=None)

    # The client can resume its episodes elsewhere: a drain ends the session at once (Start.resumable).
    resumable: bool = False
    # The model's state_dim and its state normalization (mean, std) as arrays, read once per session.
    state_dim: int = field(init=False)
    norm: tuple[np.ndarray, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        policy = self.lease.policy
        self.state_dim = policy.config.state_dim
        self.norm = (np.asarray(policy.meta.state_mean), np.asarray(policy.meta.state_std))

    @classmethod
    def open(
        cls,
        lease: Lease,
        target: float,
        task: asyncio.Task | None,
        histories: list[History] | None = None,
        resumable: bool = False,
    ) -> Session:
        """A session of one row per slot of ``lease``, every row at ``target`` and step 0, or, resumed,
        each row where its history left it (one history per row, already rebuilt into its slot:
        :class:`dmm.server.resume.Rebuilds`)."""
        rows = len(lease.slots)
        session = cls(
            lease, ReturnsToGo(target, rows), task, np.zeros(rows, dtype=np.int64), resumable=resumable
        )
        if histories:
            for row, history in enumerate(histories):
                session.rtg.values[row] = history.rtgs[-1]
                session.rtg.returns[row] = history.episode_return
                session.row_steps[row] = history.steps
            session.steps = int(session.row_steps.sum())
        return session

    @property
    def model(self) -> str:
        return self.lease.policy.name

    @property
    def version(self) -> int:
        return self.lease.policy.version

    @property
    def episodes(self) -> int:
        """The rows (episodes at once) of the session."""
        return len(self.lease.slots)

    def advance(self, rows: np.ndarray) -> np.ndarray:
        """The rows took an action: the step indices it answers."""
        steps = self.row_steps[rows].copy()
        self.row_steps[rows] += 1
        self.steps += rows.size
        return steps

    def restart(self, rows: np.ndarray) -> None:
        """New episodes in ``rows`` (their old ones were recorded)."""
        self.rtg.restart(rows)
        self.row_steps[rows] = 0
        self.lease.batcher.restart([self.lease.slots[r] for r in rows])


class SessionTable:
    """Open sessions, for the max-sessions limit and for ending them all at shutdown."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._reserved = 0
        self._open: set[Session] = set()

    def __len__(self) -> int:
        return self._reserved

    def reserve(self, n: int = 1) -> bool:
        """Claim room for ``n`` sessions (a vector stream's episodes) before the (slow) start; False
        when the server is full."""
        if self._reserved + n > self.max_sessions:
            return False
        self._reserved += n
        return True

    def unreserve(self, n: int = 1) -> None:
        self._reserved -= n

    def add(self, session: Session) -> None:
        self._open.add(session)

    def discard(self, session: Session) -> None:
        self._open.discard(session)

    def sessions(self) -> list[Session]:
        return list(self._open)
