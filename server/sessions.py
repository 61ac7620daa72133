"""Per-stream session state: one Act stream is one episode in one slot of one runner; one ActVector
stream is N episodes in N slots of one runner."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from dmm.server.pool import Lease


@dataclass(eq=False)  # identity semantics: sessions live in a set
class Session:
    """What a stream handler keeps between messages; the context itself lives in the runner slot."""

    lease: Lease
    rtg: float
    task: asyncio.Task | None
    steps: int = 0
    target_return: float = 0.0  # the rtg it started with: target - rtg is the return so far
    started_at: float = field(default_factory=time.monotonic)
    # Why the session ended when another party (shutdown) ended it; None while it runs.
    end_reason: str | None = field(default=None)
    # The sum of the rewards the client reported; None once a step gave an explicit rtg instead.
    episode_return: float | None = 0.0

    @property
    def model(self) -> str:
        return self.lease.policy.name

    @property
    def version(self) -> int:
        return self.lease.policy.version


@dataclass(eq=False)
class VectorSession(Session):
    """An ActVector stream: one slot per row (episode), each with its own return-to-go, step count
    and return so far. ``steps`` counts the actions of all rows; ``rtg`` stays the target return."""

    row_rtg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    row_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    row_return: np.ndarray = field(default_factory=lambda: np.zeros(0))
    episodes_recorded: int = 0

    @classmethod
    def open(cls, lease: Lease, target: float, task: asyncio.Task | None) -> VectorSession:
        n = len(lease.slots)
        return cls(
            lease,
            target,
            task,
            target_return=target,
            row_rtg=np.full(n, target),
            row_steps=np.zeros(n, dtype=np.int64),
            row_return=np.zeros(n),
        )

    @property
    def episodes(self) -> int:
        return len(self.lease.slots)

    def restart(self, rows: np.ndarray) -> None:
        """New episodes in ``rows`` (their old ones were recorded)."""
        self.row_rtg[rows] = self.target_return
        self.row_steps[rows] = 0
        self.row_return[rows] = 0.0
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
