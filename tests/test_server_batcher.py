"""The batcher in-process, on a stand-in runner: a lone step runs at once, steps of several sessions
share one forward, and a block of rows counts one queue wait per row."""

from __future__ import annotations

import asyncio

import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from dmm.server.batcher import Batcher, _observe_many


class _Runner:
    """Records each step's slots; the action of a slot is its number."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def step(self, slots, states, rtgs) -> np.ndarray:
        self.calls.append(list(slots))
        return np.asarray(slots, dtype=np.float32)[:, None]

    def reset(self, slots) -> None:
        pass

    release = reset


def _histograms() -> tuple[Histogram, Histogram]:
    registry = CollectorRegistry()
    return Histogram("wait", "", registry=registry), Histogram("size", "", registry=registry)


def _counts(histogram: Histogram) -> tuple[float, list[float]]:
    samples = histogram.collect()[0].samples
    return (
        next(s.value for s in samples if s.name.endswith("_sum")),
        [s.value for s in samples if s.name.endswith("_bucket")],
    )


def test_observe_many_counts_like_one_observe_per_value() -> None:
    for value, n in ((0.0, 7), (0.003, 5), (0.7, 3), (100.0, 2), (0.01, 1)):
        many, one = _histograms()
        _observe_many(many, value, n)
        for _ in range(n):
            one.observe(value)
        assert _counts(many) == _counts(one)


def _batcher(runner: _Runner, max_batch: int = 8) -> tuple[Batcher, Histogram, Histogram]:
    wait, size = _histograms()
    batcher = Batcher(runner, max_batch=max_batch, max_delay_s=5.0, queue_wait=wait, batch_size=size)  # type: ignore[arg-type]
    return batcher, wait, size


def test_a_lone_step_runs_at_once_and_is_counted() -> None:
    async def run() -> None:
        runner = _Runner()
        batcher, wait, size = _batcher(runner)
        slots = batcher.open_slots(1)
        actions = await batcher.step_rows(slots, np.zeros((1, 2)), np.zeros(1))
        assert actions.tolist() == [[slots[0]]] and runner.calls == [slots]
        assert _counts(wait)[1][0] == 1 and _counts(size)[0] == 1.0
        batcher.close()

    asyncio.run(run())


def test_steps_of_two_sessions_share_one_forward_and_a_block_counts_each_row() -> None:
    async def run() -> None:
        runner = _Runner()
        batcher, wait, size = _batcher(runner)
        one, block = batcher.open_slots(1), batcher.open_slots(3)
        first = asyncio.ensure_future(batcher.step_rows(one, np.zeros((1, 2)), np.zeros(1)))
        await asyncio.sleep(0)
        assert not first.done()  # another session is open: it waits for its step
        rest = await batcher.step_rows(block, np.zeros((3, 2)), np.zeros(3))
        assert (await first).tolist() == [one] and rest.ravel().tolist() == block
        assert runner.calls == [one + block]
        samples = wait.collect()[0].samples
        assert next(s.value for s in samples if s.name.endswith("_count")) == 4  # one per row
        assert _counts(size)[0] == 4.0
        batcher.close()

    asyncio.run(run())
