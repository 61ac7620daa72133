"""Dynamic batching of the steps of many sessions into one forward of a :class:`PolicyRunner`.

Everything here runs on the server's asyncio event loop: stream handlers call :meth:`Batcher.step`
and await a future; one batcher task per runner collects the pending steps and runs them as one
``PolicyRunner.step`` call. A batch closes when it holds ``max_batch`` steps, when every session
on this runner has a step pending (waiting longer cannot make it bigger), or ``max_delay`` after
its first step arrived, whichever comes first. A lone session therefore never waits, and the
handler whose step completes a batch runs the forward itself, skipping a hand-off to the task.

The forward runs inline on the loop, so no thread hand-off sits on the latency path; while it runs,
gRPC keeps receiving the next messages, which then form the next batch (the SEED RL pattern).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram

from dmm.model import PolicyRunner


@dataclass
class _Pending:
    slot: int
    state: np.ndarray
    rtg: float
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Slot allocation and batched stepping for one runner (one model version in one mode)."""

    def __init__(
        self,
        runner: PolicyRunner,
        *,
        max_batch: int,
        max_delay_s: float,
        queue_wait: Histogram,
        batch_size: Histogram,
    ) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._queue_wait = queue_wait
        self._batch_size = batch_size
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._free: list[int] = []
        self._next_slot = 0
        self._sessions = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dmm-batcher")

    @property
    def sessions(self) -> int:
        return self._sessions

    def open_slot(self) -> int:
        """A fresh episode slot for a new session."""
        if self._free:
            slot = min(self._free)
            self._free.remove(slot)
        else:
            slot = self._next_slot
            self._next_slot += 1
        self.runner.reset([slot])
        self._sessions += 1
        return slot

    def close_slot(self, slot: int) -> None:
        """Forget the episode in ``slot`` and drop its pending step, if any (its waiter is gone)."""
        kept = [p for p in self._pending if p.slot != slot]
        for p in self._pending:
            if p.slot == slot and not p.future.done():
                p.future.cancel()
        self._pending = kept
        self.runner.release([slot])
        self._free.append(slot)
        self._sessions -= 1

    async def step(self, slot: int, state: np.ndarray, rtg: float) -> np.ndarray:
        """Queue one step of the session in ``slot``; returns its action once its batch has run."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(slot, state, rtg, future))
        if self._batch_ready():
            # Nothing to wait for (a lone session, or the last of a batch): run it in this task
            # and skip a hand-off to the batcher task.
            self._forward(self._take())
        else:
            self._wakeup.set()
        return await future

    def close(self) -> None:
        """Stop the batcher task; steps still pending fail with CancelledError."""
        self._task.cancel()
        for p in self._pending:
            p.future.cancel()
        self._pending.clear()

    def _batch_ready(self) -> bool:
        n = len(self._pending)
        return n >= self.max_batch or n >= self._sessions

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._pending:
                continue
            deadline = self._pending[0].arrived + self.max_delay_s
            while self._pending and not self._batch_ready():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
            if not self._pending:
                continue
            self._forward(self._take())

    def _take(self) -> list[_Pending]:
        batch = self._pending[: self.max_batch]
        del self._pending[: self.max_batch]
        if self._pending:
            self._wakeup.set()
        return batch

    def _forward(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        for p in batch:
            self._queue_wait.observe(start - p.arrived)
        self._batch_size.observe(len(batch))
        try:
            actions = self.runner.step(
                [p.slot for p in batch],
                np.stack([p.state for p in batch]),
                np.array([p.rtg for p in batch], dtype=np.float64),
            )
        except Exception as err:  # a failed forward fails its steps, never the batcher
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        for p, action in zip(batch, actions, strict=True):
            if not p.future.done():
                p.future.set_result(action)
