"""Loaded model versions, their runners and batchers, shared by all sessions.

A session leases one slot of one version in one mode for its whole life, so it stays pinned to the
version it started with. Versions are loaded on first use and cached; ``latest`` is resolved at
every session start (an S3 store answers from a listing at most ``--store-refresh`` seconds old), so a
version published while the server runs serves new sessions without a restart. A version no session
uses any more is unloaded once a newer version of its model is known.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from dmm.model import InferenceMode, PolicyVersion, load_policy, make_runner
from dmm.server import logs
from dmm.server.batcher import Batcher
from dmm.server.metrics import ServerMetrics
from dmm.server.routes import Router
from dmm.store import Store


@dataclass
class _Served:
    policy: PolicyVersion
    batchers: dict[str, Batcher] = field(default_factory=dict)
    sessions: int = 0


@dataclass
class Lease:
    """One session's slots in one runner (one, or one per episode of a vector stream); hand them back
    with :meth:`ModelPool.release`."""

    policy: PolicyVersion
    mode: InferenceMode
    batcher: Batcher
    slots: list[int]
    latency: Histogram  # dmm_act_latency_seconds or dmm_act_vector_latency_seconds, of (model, mode)
    actions: Counter  # dmm_actions_total of (model, mode)
    released: bool = False


class ModelPool:
    def __init__(
        self,
        store: Store,
        metrics: ServerMetrics,
        *,
        device: str,
        max_batch: int,
        max_delay_s: float,
        router: Router | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.store = store
        self.cuda_graphs = cuda_graphs
        self.router = router
        self.metrics = metrics
        self.device = device
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self._loaded: dict[tuple[str, int], _Served] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._newest: dict[str, int] = {}  # newest complete version seen per model

    async def resolve(self, name: str, version: int | None) -> int:
        """The version a new session of ``name`` gets: the one it names, else its route's draw, else the
        latest (StoreError subclasses if there is none). A version it names that is loaded is that
        version, without a look at the store (a resumed start names the version its episode ran on)."""
        if version is not None and (name, version) in self._loaded:
            return version

        def _resolve() -> tuple[int, int]:
            routed = version if version is not None or self.router is None else self.router.pick(name)
            return self.store.resolve(name, routed), self.store.latest(name)

        number, newest = await asyncio.get_running_loop().run_in_executor(None, _resolve)
        if newest > self._newest.get(name, 0):
            self._newest[name] = newest
            self._unload_stale(name)
        return number

    async def _reserve(self, name: str, version: int) -> _Served:
        """The loaded version, counted as used by one more session (so it cannot be unloaded)."""
        key = (name, version)
        served = self._loaded.get(key)
        if served is not None:
            served.sessions += 1
            return served
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            served = self._loaded.get(key)
            if served is None:
                started = time.perf_counter()
                policy = await asyncio.get_running_loop().run_in_executor(
                    None, load_policy, self.store, name, version, self.device
                )
                seconds = round(time.perf_counter() - started, 3)
                logs.event(
                    logging.INFO,
                    "model loaded",
                    model=name,
                    version=version,
                    device=self.device,
                    seconds=seconds,
                )
                served = _Served(policy)
                self._loaded[key] = served
                self.metrics.model_loads.labels(name).inc()
                self.metrics.versions_loaded.labels(name, str(version)).set(1)
            served.sessions += 1
        return served

    async def acquire(
        self, name: str, version: int, mode: InferenceMode | None, episodes: int | None = None
    ) -> Lease:
        """Load ``name`` ``version`` if needed and open fresh episode slots in its ``mode`` runner (None:
        the mode the policy was trained to be served in): one for an Act session (``episodes`` None),
        ``episodes`` for a vector stream.

        Raises the store's errors (unknown, corrupt) and ValueError if the model cannot run ``mode``.
        """
        served = await self._reserve(name, version)
        mode = mode or served.policy.meta.inference_mode
        batcher = served.batchers.get(mode)
        if batcher is None:
            try:
                capacity = min(self.max_batch, 64)
                runner = make_runner(served.policy, mode, capacity=capacity, cuda_graphs=self.cuda_graphs)
            except ValueError:
                served.sessions -= 1
                self._unload_stale(name)
                raise
            batcher = Batcher(
                runner,
                max_batch=self.max_batch,
                max_delay_s=self.max_delay_s,
                queue_wait=self.metrics.queue_wait.labels(name),
                batch_size=self.metrics.batch_size.labels(name),
            )
            served.batchers[mode] = batcher
        slots = batcher.open_slots(episodes or 1)
        latency = self.metrics.act_latency if episodes is None else self.metrics.act_vector_latency
        actions = self.metrics.actions.labels(name, mode)
        return Lease(served.policy, mode, batcher, slots, latency.labels(name, mode), actions)

    def release(self, lease: Lease) -> None:
        """Free the lease's slot at once; unload its version if unused and no longer the newest."""
        if lease.released:
            return
        lease.released = True
        lease.batcher.close_slots(lease.slots)
        key = (lease.policy.name, lease.policy.version)
        served = self._loaded.get(key)
        if served is not None:
            served.sessions -= 1
            self._unload_stale(lease.policy.name)

    def _unload_stale(self, name: str) -> None:
        newest = self._newest.get(name, 0)
        for key in [k for k, s in self._loaded.items() if k[0] == name and k[1] < newest and s.sessions == 0]:
            self._unload(key)

    def _unload(self, key: tuple[str, int]) -> None:
        logs.event(logging.INFO, "model unloaded", model=key[0], version=key[1])
        served = self._loaded.pop(key)
        self._locks.pop(key, None)
        for batcher in served.batchers.values():
            batcher.close()
        self.metrics.versions_loaded.remove(key[0], str(key[1]))

    def close(self) -> None:
        """Unload everything (server shutdown)."""
        for key in list(self._loaded):
            self._unload(key)

    async def describe(self, name: str, version: int | None) -> PolicyVersion:
        """The policy of ``name`` ``version`` (latest if None): the served one, or read from the store."""
        number = await self.resolve(name, version)
        served = self._loaded.get((name, number))
        if served is not None:
            return served.policy
        return await asyncio.get_running_loop().run_in_executor(
            None, load_policy, self.store, name, number, "cpu"
        )
