"""The ``dmm.v1.PolicyService`` implementation (grpc.aio)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from dmm.envs import normalized_score
from dmm.errors import DMMError
from dmm.model import InferenceMode
from dmm.server import logs, vector
from dmm.server.checks import Abort as _Abort
from dmm.server.checks import check_float32, check_states
from dmm.server.metrics import ServerMetrics
from dmm.server.pool import Lease, ModelPool
from dmm.server.sessions import Session, SessionTable, VectorSession
from dmm.store import CorruptVersionError, ModelNotFoundError, StoreError, VersionNotFoundError
from dmm.v1 import policy_pb2, policy_pb2_grpc
from dmm.v1.modes import MODE_ENUM, MODE_NAME

# How long a handler waits after EOF for grpc to report a client cancellation (end-of-session only).
_CANCEL_WINDOW_S = 0.005
SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name
# One message of a stream, the session so far -> the session and the reply (None: the stream ends).
Handler = Callable[[Any, "Session | None"], Awaitable[tuple[Session, Any]]]


def _store_status(err: Exception, root: Path | str) -> tuple[grpc.StatusCode, str]:
    """gRPC status of an error raised while resolving or loading a model version. Clients learn
    which models and files exist, not where the server keeps its store (``root``)."""
    if isinstance(err, ModelNotFoundError):
        return grpc.StatusCode.NOT_FOUND, err.remote_message()
    inside_store = str(err).replace(f"{root}{os.sep}", "")
    if isinstance(err, VersionNotFoundError):
        return grpc.StatusCode.NOT_FOUND, inside_store
    if isinstance(err, CorruptVersionError):
        return grpc.StatusCode.DATA_LOSS, inside_store
    if isinstance(err, StoreError):
        return grpc.StatusCode.INVALID_ARGUMENT, inside_store
    if isinstance(err, DMMError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(err)
    return grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"


class Unreadable:
    """What a request that cannot be read decodes to: not a valid protobuf message (INVALID_ARGUMENT)
    or larger than ``--max-message-bytes`` (RESOURCE_EXHAUSTED). The handler refuses it like any bad
    input, counted and logged, and a session it ends is recorded with reason "error"."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


def _lenient(message_type: type, max_bytes: int) -> Callable[[bytes], object]:
    """A request deserializer that turns a decode error or an over-size message into
    :class:`Unreadable` instead of raising, which grpc would answer with UNKNOWN and an internal class
    name, uncounted, or (over-size, caught by the transport) leave the server to see a cancellation."""

    def parse(data: bytes) -> object:
        if len(data) > max_bytes:
            return Unreadable(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{message_type.__name__} of {len(data)} bytes is over the server's limit of {max_bytes}",
            )
        try:
            return message_type.FromString(data)
        except DecodeError as err:
            return Unreadable(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable {message_type.__name__}: {err}")

    return parse


def add_to_server(service: PolicyService, server: grpc.aio.Server, max_message_bytes: int) -> None:
    """Register ``service`` like the generated ``add_PolicyServiceServicer_to_server``, but with
    lenient request deserializers that enforce ``max_message_bytes``."""
    pb = policy_pb2

    def parse(message_type: type) -> Callable[[bytes], object]:
        return _lenient(message_type, max_message_bytes)

    handlers = {
        "Act": grpc.stream_stream_rpc_method_handler(
            service.Act, parse(pb.ActRequest), pb.ActResponse.SerializeToString
        ),
        "ActVector": grpc.stream_stream_rpc_method_handler(
            service.ActVector, parse(pb.VectorRequest), pb.VectorResponse.SerializeToString
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            service.ListModels, parse(pb.ListModelsRequest), pb.ListModelsResponse.SerializeToString
        ),
        "Describe": grpc.unary_unary_rpc_method_handler(
            service.Describe, parse(pb.DescribeRequest), pb.DescribeResponse.SerializeToString
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class PolicyService(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(
        self,
        pool: ModelPool,
        metrics: ServerMetrics,
        *,
        default_mode: InferenceMode,
        max_sessions: int,
        idle_timeout_s: float,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.default_mode = default_mode
        self.idle_timeout_s = idle_timeout_s
        self.sessions = SessionTable(max_sessions)
        self.shutting_down = False

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str, model: str | None = None
    ) -> NoReturn:
        """End the RPC with ``code``: counted in dmm_errors_total and logged."""
        self.metrics.errors.labels(code.name).inc()
        logs.event(logging.WARNING, "request refused", code=code.name, model=model, details=details)
        await context.abort(code, details)

    # ------------------------------------------------------------------ streams

    async def Act(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self._run_stream(context, self._act_message)

    async def ActVector(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        await self._run_stream(context, self._vector_message)

    async def _run_stream(self, context: grpc.aio.ServicerContext, handle: Handler) -> None:
        """Read a stream's messages and answer each with ``handle`` until the stream, the session or
        the server ends; every way out ends the session and is counted."""
        session: Session | None = None
        reason = "completed"
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        request = await context.read()
                except TimeoutError:
                    raise _Abort(
                        grpc.StatusCode.ABORTED,
                        f"session evicted: no message for {self.idle_timeout_s:g} s (idle timeout)",
                        "evicted",
                    ) from None
                if isinstance(request, Unreadable):
                    raise _Abort(request.code, request.details)
                if request is grpc.aio.EOF:
                    # A half-close ends the episode normally. A client that cancels also ends the
                    # read with EOF, and grpc cancels this task shortly after: free the slot now,
                    # then wait a moment so that a cancellation is counted as one (CancelledError).
                    if session is not None:
                        self.pool.release(session.lease)
                    await asyncio.sleep(_CANCEL_WINDOW_S)
                    break
                arrived = time.perf_counter()
                session, reply = await handle(request, session)
                if reply is None:
                    break  # the client's End
                await context.write(reply)
                if reply.WhichOneof("kind") != "started":
                    session.lease.latency.observe(time.perf_counter() - arrived)
        except _Abort as abort:
            reason = abort.reason
            await self._refuse(context, abort.code, abort.details, session.model if session else None)
        except asyncio.CancelledError:
            # The client went away (or its deadline passed), or shutdown ended the session.
            reason = session.end_reason if session and session.end_reason else "cancelled"
            if reason == "shutdown":
                self.metrics.errors.labels(grpc.StatusCode.UNAVAILABLE.name).inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down; the session ended")
            raise
        finally:
            if session is not None:
                self._end(session, reason)

    async def _act_message(
        self, request: policy_pb2.ActRequest, session: Session | None
    ) -> tuple[Session, policy_pb2.ActResponse | None]:
        """One message of an Act stream: the session and the reply (None after End)."""
        kind = request.WhichOneof("kind")
        if kind == "start":
            if session is not None:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"second start in one stream (session on {session.model} version "
                    f"{session.version} already running): one stream is one episode",
                )
            session = await self._start(request.start)
            return session, self._started(session)
        if kind not in ("step", "end"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty ActRequest: set start or step")
        if session is None:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{kind} before start: the first message of an Act stream must be a start",
            )
        if kind == "end":
            self._record_episode(session, request.end.reward)
            return session, None
        return session, await self._step(session, request.step)

    async def _vector_message(
        self, request: policy_pb2.VectorRequest, session: Session | None
    ) -> tuple[Session, policy_pb2.VectorResponse | None]:
        """One message of an ActVector stream: the session and the reply (None after VectorEnd)."""
        kind = request.WhichOneof("kind")
        if kind == "start":
            if session is not None:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "second start in one ActVector stream")
            if request.start.episodes < 1:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "start.episodes must be at least 1")
            session = await self._start(request.start.start, episodes=request.start.episodes)
            started = self._started(session).started
            return session, policy_pb2.VectorResponse(
                started=policy_pb2.VectorStarted(session=started, episodes=request.start.episodes)
            )
        if kind not in ("step", "end"):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "empty VectorRequest: set start or step")
        if session is None:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{kind} before start: the first message of an ActVector stream must be a start",
            )
        assert isinstance(session, VectorSession)
        if kind == "end":
            for row, reward in zip(*vector.read_end(session, request.end), strict=True):
                self._observe_episode(session, session.row_return[row] + reward, int(session.row_steps[row]))
            return session, None
        return session, await self._vector_step(session, request.step)

    async def _vector_step(
        self, session: VectorSession, step: policy_pb2.VectorStep
    ) -> policy_pb2.VectorResponse:
        """Record the episodes that ended, update every stepped row's rtg, run the rows as one block."""
        given = vector.read_step(session, step)
        if given.rewards is not None:
            ended = given.rows[given.restart]
            for row, reward in zip(ended.tolist(), given.rewards[given.restart].tolist(), strict=True):
                self._observe_episode(session, session.row_return[row] + reward, int(session.row_steps[row]))
            if ended.size:
                session.restart(ended)
            going = given.rows[~given.restart]
            session.row_rtg[going] -= given.rewards[~given.restart]
            session.row_return[going] += given.rewards[~given.restart]
        slots = [session.lease.slots[r] for r in given.rows.tolist()]
        try:
            actions = await session.lease.batcher.step_rows(slots, given.states, session.row_rtg[given.rows])
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise _Abort(grpc.StatusCode.INTERNAL, f"inference failed: {type(err).__name__}: {err}") from None
        reply = vector.actions_reply(session, given.rows, actions)
        session.lease.actions.inc(given.rows.size)
        return reply

    async def _start(self, start: policy_pb2.Start, episodes: int | None = None) -> Session:
        """A new session: an Act session (``episodes`` None) or a vector stream of ``episodes``."""
        if self.shutting_down:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "server shutting down; no new sessions")
        if not start.model:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "start.model is empty: name the model to run")
        if start.mode != policy_pb2.INFERENCE_MODE_UNSPECIFIED and start.mode not in MODE_NAME:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown inference mode {start.mode}")
        mode = cast(InferenceMode, MODE_NAME.get(start.mode, self.default_mode))
        if start.HasField("target_return"):
            check_float32("target_return", start.target_return)
        slots = episodes or 1
        if not self.sessions.reserve(slots):
            asked = f" ({slots} asked for)" if episodes else ""
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.sessions.max_sessions} sessions{asked}; retry later",
            )
        try:
            try:
                version = await self.pool.resolve(
                    start.model, start.version if start.HasField("version") else None
                )
                lease = await self.pool.acquire(start.model, version, mode, episodes)
            except ValueError as err:  # the model cannot run this mode
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(err)) from None
            except Exception as err:
                code, details = _store_status(err, self.pool.store.root)
                raise _Abort(code, details) from None
            self._check_dims(start, lease)
        except BaseException:
            self.sessions.unreserve(slots)
            raise
        meta = lease.policy.meta
        target = start.target_return if start.HasField("target_return") else meta.target_return
        task = asyncio.current_task()
        if episodes is None:
            session = Session(lease, target, task, target_return=target)
        else:
            session = VectorSession.open(lease, target, task)
        self.sessions.add(session)
        logs.event(
            logging.INFO,
            "session started",
            model=session.model,
            version=session.version,
            mode=lease.mode,
            target_return=target,
            **({"episodes": episodes} if episodes else {}),
            sessions=len(self.sessions),
        )
        self.metrics.sessions_started.labels(session.model).inc(slots)
        self.metrics.active_sessions.labels(session.model).inc(slots)
        return session

    def _check_dims(self, start: policy_pb2.Start, lease: Lease) -> None:
        """The client's env dimensions, when given, must be the model's; else the lease goes back."""
        cfg = lease.policy.config
        for field, expected in (("state_dim", cfg.state_dim), ("act_dim", cfg.act_dim)):
            if start.HasField(field) and getattr(start, field) != expected:
                self.pool.release(lease)
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"start.{field}={getattr(start, field)} but model {lease.policy.name} version "
                    f"{lease.policy.version} has {field}={expected}",
                )

    def _started(self, session: Session) -> policy_pb2.ActResponse:
        cfg = session.lease.policy.config
        return policy_pb2.ActResponse(
            started=policy_pb2.SessionStarted(
                model=session.model,
                version=session.version,
                mode=MODE_ENUM[session.lease.mode],
                target_return=session.rtg,
                state_dim=cfg.state_dim,
                act_dim=cfg.act_dim,
            )
        )

    async def _step(self, session: Session, step: policy_pb2.Step) -> policy_pb2.ActResponse:
        expected = session.lease.policy.config.state_dim
        if len(step.state) != expected:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"state has {len(step.state)} values; model {session.model} version {session.version} "
                f"expects state_dim={expected}",
            )
        state = np.array(step.state, dtype=np.float64)
        meta = session.lease.policy.meta
        where = f" (step {session.steps})"
        check_states(state[None], np.asarray(meta.state_mean), np.asarray(meta.state_std), lambda _: where)
        which = step.WhichOneof("return_to_go")
        if which == "rtg":
            check_float32("rtg", step.rtg, where)
            session.rtg = step.rtg
            if session.steps > 0:  # the last action's reward is not known
                session.episode_return = None
        elif which == "reward":
            if session.steps == 0:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "step 0 carries a reward, but there is no previous action: send only the state "
                    "(or an explicit rtg)",
                )
            check_float32("reward", step.reward, where)
            check_float32("the return-to-go after this reward", session.rtg - step.reward, where)
            session.rtg -= step.reward
            if session.episode_return is not None:
                session.episode_return += step.reward
        elif session.steps > 0:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"step {session.steps} has neither the reward of the last action nor an explicit rtg",
            )
        try:
            action = await session.lease.batcher.step(session.lease.slot, state, session.rtg)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            raise _Abort(grpc.StatusCode.INTERNAL, f"inference failed: {type(err).__name__}: {err}") from None
        if not np.isfinite(action).all():  # never an action outside [-1, 1] with OK
            raise _Abort(
                grpc.StatusCode.INTERNAL,
                f"the model produced a non-finite action at step {session.steps} of this session "
                "(inputs far outside the training data?); the session is ended",
            )
        index = session.steps
        session.steps += 1
        session.lease.actions.inc()
        return policy_pb2.ActResponse(
            action=policy_pb2.Action(
                action=action.tolist(),
                step=index,
                model=session.model,
                version=session.version,
                rtg=session.rtg,
            )
        )

    def _record_episode(self, session: Session, reward: float) -> None:
        """The client's End: the episode is complete; its return, length and score go to the metrics."""
        if session.steps == 0:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION, "end before the first step: no action was taken"
            )
        check_float32("end.reward", reward, f" (step {session.steps})")
        if session.episode_return is None:
            return  # explicit rtgs: the return is not known
        session.episode_return += reward
        self._observe_episode(session, session.episode_return, session.steps)

    def _observe_episode(self, session: Session, episode_return: float, length: int) -> None:
        """A completed episode's return, length and normalized score, per model version."""
        if isinstance(session, VectorSession):
            session.episodes_recorded += 1
        labels = (session.model, str(session.version))
        self.metrics.episode_return.labels(*labels).observe(episode_return)
        self.metrics.episode_length.labels(*labels).observe(length)
        try:
            score = normalized_score(session.lease.policy.meta.env, episode_return)
        except DMMError:  # an environment without D4RL reference scores
            return
        self.metrics.episode_normalized_score.labels(*labels).observe(score)

    def _end(self, session: Session, reason: str) -> None:
        if isinstance(session, VectorSession):
            episodes = {"episodes": session.episodes, "episodes_recorded": session.episodes_recorded}
        else:
            ret = session.episode_return
            episodes = {"episode_return": "unknown" if ret is None else round(ret, 6)}
        logs.event(
            logging.INFO,
            "session ended",
            model=session.model,
            version=session.version,
            mode=session.lease.mode,
            steps=session.steps,
            **episodes,
            reason=reason,
            seconds=round(time.monotonic() - session.started_at, 3),
        )
        slots = len(session.lease.slots)
        self.pool.release(session.lease)
        self.sessions.discard(session)
        self.sessions.unreserve(slots)
        self.metrics.active_sessions.labels(session.model).dec(slots)
        self.metrics.sessions_ended.labels(session.model, reason).inc(slots)

    def end_all_sessions(self) -> int:
        """Shutdown: end every open session with UNAVAILABLE; returns how many were open."""
        open_sessions = self.sessions.sessions()
        for session in open_sessions:
            session.end_reason = "shutdown"
            if session.task is not None:
                session.task.cancel()
        return len(open_sessions)

    # ------------------------------------------------------------------ unary

    async def ListModels(self, request, context: grpc.aio.ServicerContext) -> policy_pb2.ListModelsResponse:
        if isinstance(request, Unreadable):
            await self._refuse(context, request.code, request.details)
        store = self.pool.store

        def _list() -> list[policy_pb2.ModelVersions]:
            out = []
            for name in store.models():
                versions = store.versions(name)
                if versions:
                    out.append(policy_pb2.ModelVersions(name=name, versions=versions, latest=versions[-1]))
            return out

        try:
            models = await asyncio.get_running_loop().run_in_executor(None, _list)
        except Exception as err:
            await self._refuse(context, *_store_status(err, self.pool.store.root))
        return policy_pb2.ListModelsResponse(models=models)

    async def Describe(self, request, context: grpc.aio.ServicerContext) -> policy_pb2.DescribeResponse:
        if isinstance(request, Unreadable):
            await self._refuse(context, request.code, request.details)
        if not request.model:
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "model is empty: name the model to describe"
            )
        try:
            policy = await self.pool.describe(
                request.model, request.version if request.HasField("version") else None
            )
            versions = await asyncio.get_running_loop().run_in_executor(
                None, self.pool.store.versions, request.model
            )
        except Exception as err:
            await self._refuse(context, *_store_status(err, self.pool.store.root), request.model)
        return policy_pb2.DescribeResponse(
            model=policy.name,
            version=policy.version,
            state_dim=policy.config.state_dim,
            act_dim=policy.config.act_dim,
            config_json=json.dumps(policy.config.model_dump(), sort_keys=True),
            meta_json=json.dumps(policy.meta.model_dump(), sort_keys=True),
            metrics_json=json.dumps(policy.metrics, sort_keys=True),
            versions=versions,
        )
