"""Dynamic batching of the steps of many sessions into one forward of a :class:`PolicyRunner`.

Everything here runs on the server's asyncio event loop: stream handlers call :meth:`Batcher.step_rows`
with the slots of the rows a message steps (one for an Act stream, several for a vector stream) and
await a future; one batcher task per runner collects the pending steps and runs them as one
``PolicyRunner.step`` call. A batch closes when it holds ``max_batch`` steps, when every open slot
on this runner has a step pending (waiting longer cannot make it bigger), or ``max_delay`` after
its first step arrived, whichever comes first. A lone session therefore never waits, and the
handler whose step completes a batch runs the forward itself, skipping a hand-off to the task. A
vector stream's steps are never split: a batch holds at least one request, even one of more than
``max_batch`` rows.

The forward runs inline on the loop, so no thread hand-off sits on the latency path; while it runs,
gRPC keeps receiving the next messages, which then form the next batch (the SEED RL pattern).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Histogram

from dmm.model import PolicyRunner


@dataclass
class _Pending:
    """One request's steps: ``slots`` [n], ``states`` [n, state_dim], ``rtgs`` [n]."""

    slots: list[int]
    states: np.ndarray
    rtgs: np.ndarray
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
        self._pending_rows = 0
        self._wakeup = asyncio.Event()
        self._free: list[int] = []
        self._next_slot = 0
        self._sessions = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dmm-batcher")

    @property
    def sessions(self) -> int:
        """Open slots (a vector stream holds one per episode)."""
        return self._sessions

    def open_slots(self, n: int = 1) -> list[int]:
        """``n`` fresh episode slots for a new session (the lowest free ones first)."""
        self._free.sort()
        slots = self._free[:n]
        del self._free[:n]
        slots += range(self._next_slot, self._next_slot + n - len(slots))
        self._next_slot = max(self._next_slot, slots[-1] + 1)
        self.runner.reset(slots)
        self._sessions += n
        return slots

    def restart(self, slots: list[int]) -> None:
        """Start a new episode in each of ``slots`` (a vector stream's rows whose episode ended)."""
        self.runner.reset(slots)

    def close_slots(self, slots: list[int]) -> None:
        """Forget the episodes in ``slots`` and drop their pending steps (their waiters are gone)."""
        closing = set(slots)
        for p in self._pending:
            if closing.intersection(p.slots) and not p.future.done():
                p.future.cancel()
        self._pending = [p for p in self._pending if not closing.intersection(p.slots)]
        self._pending_rows = sum(len(p.slots) for p in self._pending)
        self.runner.release(slots)
        self._free.extend(slots)
        self._sessions -= len(slots)

    async def step_rows(self, slots: list[int], states: np.ndarray, rtgs: np.ndarray) -> np.ndarray:
        """Queue one step of each of ``slots`` (never split over batches); their actions [n, act_dim]."""
        n = len(slots)
        if not self._pending and (n >= self.max_batch or n >= self._sessions):
            # Nothing queued and nothing to wait for (a lone session, or a block that fills a batch):
            # step it at once, with no queue entry and no future.
            self._observe(0.0, n)
            return self.runner.step(slots, states, rtgs)
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(slots, states, rtgs, future))
        self._pending_rows += len(slots)
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
        self._pending_rows = 0

    def _batch_ready(self) -> bool:
        n = self._pending_rows
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
        """The oldest requests that fit in ``max_batch`` rows (at least one)."""
        rows, n = 0, 0
        for p in self._pending:
            if n and rows + len(p.slots) > self.max_batch:
                break
            rows += len(p.slots)
            n += 1
        batch = self._pending[:n]
        del self._pending[:n]
        self._pending_rows -= rows
        if self._pending:
            self._wakeup.set()
        return batch

    def _observe(self, waited_s: float, steps: int, batch: int | None = None) -> None:
        """Count ``steps`` steps that waited ``waited_s`` in the queue (each step, whether it came alone
        or in a vector stream's block) and, once per batch, the batch's size (default ``steps``)."""
        _observe_many(self._queue_wait, waited_s, steps)
        self._batch_size.observe(steps if batch is None else batch)

    def _forward(self, batch: list[_Pending]) -> None:
        start = time.perf_counter()
        for p in batch:
            _observe_many(self._queue_wait, start - p.arrived, len(p.slots))
        slots = [slot for p in batch for slot in p.slots]
        self._batch_size.observe(len(slots))
        try:
            if len(batch) == 1:
                actions = self.runner.step(slots, batch[0].states, batch[0].rtgs)
            else:
                states = np.concatenate([p.states for p in batch])
                actions = self.runner.step(slots, states, np.concatenate([p.rtgs for p in batch]))
        except Exception as err:  # a failed forward fails its steps, never the batcher
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(err)
            return
        start = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result(actions[start : start + len(p.slots)])
            start += len(p.slots)


def _observe_many(histogram: Histogram, value: float, n: int) -> None:
    """``histogram.observe(value)`` ``n`` times, in one update where the client library's histogram
    exposes its buckets (a vector stream's block counts each of its rows)."""
    buckets = getattr(histogram, "_buckets", None)
    bounds = getattr(histogram, "_upper_bounds", None)
    total = getattr(histogram, "_sum", None)
    if n == 1 or buckets is None or bounds is None or total is None:
        for _ in range(n):
            histogram.observe(value)
        return
    total.inc(value * n)
    buckets[bisect.bisect_left(bounds, value)].inc(n)
