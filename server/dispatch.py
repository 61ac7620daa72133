"""The one code path of both streaming RPCs: it reads a stream's messages, opens its session, turns
each step into one block of rows for the batcher (an Act stream's block has one row) and answers it,
records the episodes that end, and ends the session however the stream ends. What differs between
``Act`` and ``ActVector`` is only how messages read and replies look (:mod:`dmm.server.streams`)."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, cast

import grpc
import numpy as np

from dmm.envs import normalized_score
from dmm.errors import DMMError
from dmm.model import InferenceMode
from dmm.server import logs
from dmm.server.checks import Abort, check_float32, invalid
from dmm.server.metrics import ServerMetrics
from dmm.server.options import ServingMode
from dmm.server.pool import Lease, ModelPool
from dmm.server.resume import Rebuilds, read_history
from dmm.server.sessions import Session, SessionTable
from dmm.server.status import Unreadable, refuse, store_status
from dmm.server.streams import StepInput, StreamFormat
from dmm.v1 import policy_pb2
from dmm.v1.modes import MODE_NAME

# How long a handler waits after EOF for grpc to report a client cancellation (end-of-session only).
CANCEL_WINDOW_S = 0.005
# What a draining server ends a resumable stream with (UNAVAILABLE): the client resumes elsewhere.
DRAIN_DETAILS = "server draining: resume the episodes on another server"
RESUME_TRAILER = ("dmm-resume", "elsewhere")


class _IdleTimer:
    """Ends a stream's task when one read waits ``timeout_s`` for a message: what ``asyncio.timeout``
    around each read would do, but with one timer per stream that re-arms itself when it fires, rather
    than a timer made and cancelled per message (a lone session's steps are ~100 us)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.expired = False
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._since: float | None = None  # when the pending read began; None while none is
        self._handle = self._loop.call_later(timeout_s, self._check)

    def reading(self, waiting: bool) -> None:
        self._since = self._loop.time() if waiting else None

    def _check(self) -> None:
        now = self._loop.time()
        due = now + self.timeout_s if self._since is None else self._since + self.timeout_s
        if due <= now and self._task is not None:
            self.expired = True
            self._task.cancel()
            return
        self._handle = self._loop.call_at(due, self._check)

    def stop(self) -> None:
        self._handle.cancel()


class Dispatcher:
    """Runs the streams of one server: its open sessions, their limits and their metrics."""

    def __init__(
        self,
        pool: ModelPool,
        metrics: ServerMetrics,
        *,
        default_mode: ServingMode,
        max_sessions: int,
        idle_timeout_s: float,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.default_mode = default_mode
        self.idle_timeout_s = idle_timeout_s
        self.sessions = SessionTable(max_sessions)
        self.rebuilds = Rebuilds(pool.max_delay_s)
        self.shutting_down = False

    async def run(self, context: grpc.aio.ServicerContext, stream: StreamFormat) -> None:
        """Read a stream's messages and answer each until the stream, the session or the server ends;
        every way out ends the session and is counted."""
        session: Session | None = None
        reason = "completed"
        idle = _IdleTimer(self.idle_timeout_s)
        try:
            while (request := await self._read(context, session, idle)) is not grpc.aio.EOF:
                arrived = time.perf_counter()
                started = session is None
                session, reply = await self._message(stream, request, session)
                if reply is None:
                    break  # the client's end
                await context.write(reply)
                if not started:
                    session.lease.latency.observe(time.perf_counter() - arrived)
        except Abort as abort:
            reason = abort.reason
            model = session.model if session else None
            await refuse(self.metrics, context, abort.code, abort.details, model)
        except asyncio.CancelledError:
            # The client went away (or its deadline passed), or shutdown ended the session.
            reason = session.end_reason if session and session.end_reason else "cancelled"
            if reason == "shutdown":
                self.metrics.errors.labels(grpc.StatusCode.UNAVAILABLE.name).inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down; the session ended")
            elif reason == "drained":
                self.metrics.errors.labels(grpc.StatusCode.UNAVAILABLE.name).inc()
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, DRAIN_DETAILS, trailing_metadata=(RESUME_TRAILER,)
                )
            raise
        finally:
            idle.stop()
            if session is not None:
                self._close(session, stream, reason)

    async def _read(
        self, context: grpc.aio.ServicerContext, session: Session | None, idle: _IdleTimer
    ) -> Any:
        """The stream's next message, or EOF; an Abort when it is idle too long or unreadable."""
        idle.reading(True)
        try:
            request = await context.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not idle.expired or task is None or task.uncancel() > 0:
                raise  # cancelled by someone else (the client, shutdown) too
            raise Abort(
                grpc.StatusCode.ABORTED,
                f"session evicted: no message for {self.idle_timeout_s:g} s (idle timeout)",
                "evicted",
            ) from None
        finally:
            idle.reading(False)
        if isinstance(request, Unreadable):
            raise Abort(request.code, request.details)
        if request is grpc.aio.EOF:
            # A half-close ends the episode normally. A client that cancels also ends the read with
            # EOF, and grpc cancels this task shortly after: free the slots now, then wait a moment so
            # that a cancellation is counted as one (CancelledError).
            if session is not None:
                self.pool.release(session.lease)
            await asyncio.sleep(CANCEL_WINDOW_S)
        return request

    async def _message(
        self, stream: StreamFormat, request: Any, session: Session | None
    ) -> tuple[Session, Any]:
        """One message of a stream: the session and the reply (None after the client's end)."""
        kind = request.WhichOneof("kind")
        if kind == "start":
            start, episodes, resume = stream.read_start(request.start, session)
            session = await self._open(start, episodes, resume)
            return session, stream.started(session)
        if kind not in ("step", "end"):
            raise invalid(f"empty {type(request).__name__}: set start or step")
        if session is None:
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{kind} before start: the first message of an {stream.rpc} stream must be a start",
            )
        if kind == "end":
            rows, rewards = stream.read_end(session, request.end)
            self._record(session, rows, rewards)
            return session, None
        return session, await self._step(stream, session, stream.read_step(session, request.step))

    async def _step(self, stream: StreamFormat, session: Session, step: StepInput) -> Any:
        """Apply the step's rewards (recording and restarting the episodes that ended) or explicit rtgs,
        run its rows as one block, and answer with their actions."""
        if step.rewards is not None:
            ended = step.restart
            if ended.any():
                self._record(session, step.rows[ended], step.rewards[ended])
                session.restart(step.rows[ended])
                session.rtg.reward(step.rows[~ended], step.rewards[~ended])
            else:
                session.rtg.reward(step.rows, step.rewards)
        elif step.rtgs is not None:
            session.rtg.give(step.rows, step.rtgs, first=session.row_steps[step.rows] == 0)
        lease = session.lease
        slots = (
            lease.slots
            if step.rows.size == len(lease.slots) == 1
            else [lease.slots[r] for r in step.rows.tolist()]
        )
        try:
            actions = await lease.batcher.step_rows(slots, step.states, session.rtg.values[step.rows])
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise Abort(grpc.StatusCode.INTERNAL, f"inference failed: {type(err).__name__}: {err}") from None
        if not np.isfinite(actions).all():  # never an action outside [-1, 1] with OK
            row = int(step.rows[np.flatnonzero(~np.isfinite(actions).all(axis=1))[0]])
            raise Abort(grpc.StatusCode.INTERNAL, stream.non_finite(session, row))
        steps = session.advance(step.rows)
        lease.actions.inc(step.rows.size)
        return stream.actions(session, step.rows, steps, actions)

    def _record(self, session: Session, rows: np.ndarray, rewards: np.ndarray) -> None:
        """The rows' episodes ended with these last rewards: each one whose return is known goes to
        the metrics (return, length and normalized score, per model version)."""
        returns = session.rtg.finish(rows, rewards)
        labels = (session.model, str(session.version))
        for row, episode_return in zip(rows.tolist(), returns.tolist(), strict=True):
            if math.isnan(episode_return):
                continue  # explicit rtgs: the return is not known
            session.episodes_recorded += 1
            self.metrics.episode_return.labels(*labels).observe(episode_return)
            self.metrics.episode_length.labels(*labels).observe(int(session.row_steps[row]))
            try:
                score = normalized_score(session.lease.policy.meta.env, episode_return)
            except DMMError:  # an environment without D4RL reference scores
                continue
            self.metrics.episode_normalized_score.labels(*labels).observe(score)

    async def _open(
        self, start: policy_pb2.Start, episodes: int | None, resume: list[policy_pb2.EpisodeSoFar]
    ) -> Session:
        """A new session of ``episodes`` rows (None: an Act stream's one), counted against the limit,
        its rows resumed from ``resume`` (one per row) if given."""
        if self.shutting_down:
            raise Abort(grpc.StatusCode.UNAVAILABLE, "server shutting down; no new sessions")
        if not start.model:
            raise invalid("start.model is empty: name the model to run")
        if start.mode != policy_pb2.INFERENCE_MODE_UNSPECIFIED and start.mode not in MODE_NAME:
            raise invalid(f"unknown inference mode {start.mode}")
        asked = MODE_NAME.get(start.mode, self.default_mode)
        mode = None if asked == "auto" else cast(InferenceMode, asked)  # auto: the policy's own
        if start.HasField("target_return"):
            check_float32("target_return", start.target_return)
        slots = episodes or 1
        if not self.sessions.reserve(slots):
            asked = f" ({slots} asked for)" if episodes else ""
            raise Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.sessions.max_sessions} sessions{asked}; retry later",
            )
        try:
            lease = await self._lease(start, mode, episodes)
        except BaseException:
            self.sessions.unreserve(slots)
            raise
        target = start.target_return if start.HasField("target_return") else lease.policy.meta.target_return
        try:
            histories = [
                read_history(so_far, lease.policy, target, None if episodes is None else row)
                for row, so_far in enumerate(resume)
            ]
            if histories:  # with the other resumed starts that arrive with this one
                await self.rebuilds.rebuild(lease.batcher.runner, lease.slots, histories)
        except BaseException as err:  # a bad history, a failed rebuild, or the client went away
            self.pool.release(lease)
            self.sessions.unreserve(slots)
            if isinstance(err, Exception) and not isinstance(err, Abort):
                raise Abort(grpc.StatusCode.INTERNAL, f"resume failed: {type(err).__name__}: {err}") from None
            raise
        session = Session.open(lease, target, asyncio.current_task(), histories, start.resumable)
        self.sessions.add(session)
        if histories:
            self.metrics.episodes_resumed.labels(session.model).inc(len(histories))
        logs.event(
            logging.INFO,
            "session started",
            model=session.model,
            version=session.version,
            mode=lease.mode,
            target_return=target,
            **({"episodes": episodes} if episodes else {}),
            **({"resumed_steps": session.steps} if histories else {}),
            sessions=len(self.sessions),
        )
        self.metrics.sessions_started.labels(session.model).inc(slots)
        self.metrics.active_sessions.labels(session.model).inc(slots)
        return session

    async def _lease(
        self, start: policy_pb2.Start, mode: InferenceMode | None, episodes: int | None
    ) -> Lease:
        """Slots for the session in the version it asks for (or is routed to), checked against the
        client's env dimensions; the store's errors become their statuses."""
        try:
            version = await self.pool.resolve(
                start.model, start.version if start.HasField("version") else None
            )
            lease = await self.pool.acquire(start.model, version, mode, episodes)
        except ValueError as err:  # the model cannot run this mode
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
        except Exception as err:
            raise Abort(*store_status(err, self.pool.store.root)) from None
        cfg = lease.policy.config
        for field, expected in (("state_dim", cfg.state_dim), ("act_dim", cfg.act_dim)):
            if start.HasField(field) and getattr(start, field) != expected:
                self.pool.release(lease)
                raise invalid(
                    f"start.{field}={getattr(start, field)} but model {lease.policy.name} version "
                    f"{lease.policy.version} has {field}={expected}"
                )
        return lease

    def _close(self, session: Session, stream: StreamFormat, reason: str) -> None:
        """The session is over: its slots go back, and its end is logged and counted."""
        logs.event(
            logging.INFO,
            "session ended",
            model=session.model,
            version=session.version,
            mode=session.lease.mode,
            steps=session.steps,
            **stream.ended(session),
            reason=reason,
            seconds=round(time.monotonic() - session.started_at, 3),
        )
        slots = session.episodes
        self.pool.release(session.lease)
        self.sessions.discard(session)
        self.sessions.unreserve(slots)
        self.metrics.active_sessions.labels(session.model).dec(slots)
        self.metrics.sessions_ended.labels(session.model, reason).inc(slots)

    def end_all(self) -> int:
        """Shutdown: end every open session with UNAVAILABLE; returns how many were open."""
        return self._end(self.sessions.sessions(), "shutdown")

    def move_resumable(self) -> int:
        """Drain: end every session whose client said it can resume elsewhere (Start.resumable) at once,
        with UNAVAILABLE and the trailer ``dmm-resume: elsewhere``, so its episodes go on on another
        server rather than wait out the grace period here; returns how many."""
        return self._end([s for s in self.sessions.sessions() if s.resumable], "drained")

    @staticmethod
    def _end(sessions: list[Session], reason: str) -> int:
        for session in sessions:
            session.end_reason = reason
            if session.task is not None:
                session.task.cancel()
        return len(sessions)
