"""Per-stream session state: one Act stream is one episode in one slot of one runner."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

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


class SessionTable:
    """Open sessions, for the max-sessions limit and for ending them all at shutdown."""

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._reserved = 0
        self._open: set[Session] = set()

    def __len__(self) -> int:
        return self._reserved

    def reserve(self) -> bool:
        """Claim room for one session before its (slow) start; False when the server is full."""
        if self._reserved >= self.max_sessions:
            return False
        self._reserved += 1
        return True

    def unreserve(self) -> None:
        self._reserved -= 1

    def add(self, session: Session) -> None:
        self._open.add(session)

    def discard(self, session: Session) -> None:
        self._open.discard(session)

    def sessions(self) -> list[Session]:
        return list(self._open)
