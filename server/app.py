"""Assemble and run the policy server: gRPC (aio), health, reflection, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dmm.errors import ConfigError
from dmm.model.scan import default_backend, set_default_backend
from dmm.server import logs
from dmm.server.dispatch import Dispatcher
from dmm.server.metrics import ServerMetrics
from dmm.server.options import ServeOptions
from dmm.server.pool import ModelPool
from dmm.server.routes import Router
from dmm.server.security import TokenAuth, load_tokens, server_credentials
from dmm.server.service import SERVICE_NAME, PolicyService, add_to_server
from dmm.store import ModelStore, open_store

if TYPE_CHECKING:
    from dmm.server.workers import WorkerLink

READY_PREFIX = logs.READY_PREFIX
TRANSPORT_LIMIT_FACTOR = 4  # grpc's own receive limit, in --max-message-bytes
UNACCEPTED_STREAM_MAX_S = 24 * 3600
LOOP_PROBE_S = 0.5  # how often the event loop's lag is measured
LOOP_LAG_WARNING_S = 1.0  # a lag above this is logged (at most once a minute)


class PolicyServer:
    """A started server; :meth:`shutdown` drains it.

    A ``worker`` of ``--workers`` binds its port with SO_REUSEPORT, beside the other workers, and
    serves no /metrics: the supervisor serves the sum of the workers'."""

    def __init__(self, options: ServeOptions, worker: bool = False) -> None:
        self.options = options
        self.worker = worker
        self.metrics = ServerMetrics()
        self.store = open_store(options.store, options.store_refresh_s)
        self.pool: ModelPool | None = None
        self.service: PolicyService | None = None
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_http = None
        self._lag_watch: asyncio.Task | None = None

    async def start(self) -> None:
        o = self.options
        self.pool = ModelPool(
            self.store,
            self.metrics,
            device=o.resolved_device,
            max_batch=o.resolved_max_batch,
            max_delay_s=o.max_delay_ms / 1e3,
            cuda_graphs=o.cuda_graphs,
            # routes.json is read from a local store only; with an S3 store, routes come from --route
            router=Router(self.store.root if isinstance(self.store, ModelStore) else None, o.parsed_routes()),
        )
        self.service = PolicyService(
            Dispatcher(
                self.pool,
                self.metrics,
                default_mode=o.mode,
                max_sessions=o.max_sessions,
                idle_timeout_s=o.idle_timeout_s,
            )
        )
        self.server = self._grpc_server()
        self._listen()
        await self.server.start()
        self._lag_watch = asyncio.create_task(self._watch_event_loop())
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def _grpc_server(self) -> grpc.aio.Server:
        """The gRPC server with the policy, health and reflection services, before it listens."""
        o = self.options
        interceptors = []
        if o.auth_token_file is not None:
            interceptors.append(TokenAuth(load_tokens(o.auth_token_file), self.metrics))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                # the service refuses what is over the limit (counted, logged); the transport only
                # drops what is far over it, before it is read into memory
                ("grpc.max_receive_message_length", o.max_message_bytes * TRANSPORT_LIMIT_FACTOR),
                ("grpc.max_send_message_length", o.max_message_bytes),
                # one process per port unless the workers of --workers share it
                ("grpc.so_reuseport", 1 if self.worker else 0),
                # a new stream waits in grpc's queue until the event loop accepts it; grpc's default
                # (30 s) cancels it silently when the server is saturated, so it is left to the
                # client's deadline instead
                ("grpc.server_max_unrequested_time_in_server", UNACCEPTED_STREAM_MAX_S),
            ],
        )
        add_to_server(self.service, server, o.max_message_bytes)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        return server

    def _listen(self) -> None:
        """Bind the gRPC port (TLS when asked) and, outside ``--workers``, the metrics endpoint."""
        o = self.options
        address = f"[{o.host}]:{o.port}" if ":" in o.host else f"{o.host}:{o.port}"
        try:
            if o.tls:
                credentials = server_credentials(o.tls_cert, o.tls_key, o.tls_client_ca)
                self.port = self.server.add_secure_port(address, credentials)
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as err:
            raise ConfigError(f"cannot listen on {address}: {err}") from None
        if self.worker:
            self.metrics_port = o.metrics_port  # the supervisor's
            return
        try:
            self._metrics_http, self.metrics_port = self.metrics.serve_http(o.metrics_port, o.host)
        except OSError as err:
            raise ConfigError(f"cannot serve metrics on {o.host}:{o.metrics_port}: {err}") from None

    async def _watch_event_loop(self) -> None:
        """Measure how late the event loop runs (dmm_event_loop_lag_seconds) and say when it is
        saturated: every step, and every new stream before it reaches the service, waits on it."""
        loop = asyncio.get_running_loop()
        warned = -math.inf
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_PROBE_S)
            lag = loop.time() - before - LOOP_PROBE_S
            self.metrics.loop_lag.observe(lag)
            if lag > LOOP_LAG_WARNING_S and loop.time() - warned > 60.0:
                warned = loop.time()
                sessions = len(self.service.sessions) if self.service else 0
                logs.event(
                    logging.WARNING, "server saturated", event_loop_lag_s=round(lag, 2), sessions=sessions
                )

    async def shutdown(self) -> None:
        """Drain: health NOT_SERVING, refuse new RPCs, tell the streams of clients that can resume to
        move to another server at once, let the other sessions finish for the grace period, end the rest."""
        assert self.server is not None and self.service is not None and self.pool is not None
        await self.health.enter_graceful_shutdown()
        self.service.shutting_down = True
        stop = asyncio.ensure_future(self.server.stop(self.options.grace_s))
        moved = self.service.move_resumable_sessions()
        if moved:
            logs.event(logging.INFO, "sessions moved", sessions=moved, reason="draining")
        deadline = asyncio.get_running_loop().time() + self.options.grace_s * 0.9
        while len(self.service.sessions) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self.service.end_all_sessions():
            await asyncio.sleep(0.05)  # let the handlers send their UNAVAILABLE status
        await stop
        if self._lag_watch is not None:
            self._lag_watch.cancel()
        self.pool.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()


async def serve(options: ServeOptions, worker: WorkerLink | None = None) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully; returns the exit status.

    Alone, the server prints the ready line; a ``worker`` of ``--workers`` tells its supervisor
    instead, logs with ``worker=N`` and also stops when the supervisor is gone."""
    options.validate()
    logs.configure(
        options.log_level, options.log_format, **({} if worker is None else {"worker": worker.index})
    )
    server = PolicyServer(options, worker=worker is not None)  # opens the store: a bad one fails first
    scan_backend = set_default_backend(options.scan_backend or default_backend(), options.resolved_device)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = {
        "store": server.store.root,
        "device": options.resolved_device,
        "mode": options.mode,
        "scan": scan_backend,
        "tls": "mutual" if options.tls_client_ca else "on" if options.tls else "off",
        "auth": "token" if options.auth_token_file else "none",
    }
    if worker is None:
        grpc_at, metrics_at = f"{options.host}:{server.port}", f"{options.host}:{server.metrics_port}"
        print(logs.ready_line(grpc_at, metrics_at, **ready), flush=True)
    else:
        worker.ready(server.port, {k: str(v) for k, v in ready.items()})
        worker.stop_with_supervisor(stop)
    logs.event(
        logging.INFO,
        "serving",
        grpc=f"{options.host}:{server.port}",
        metrics=f"{options.host}:{server.metrics_port}",
        store=server.store.root,
        models=", ".join(server.store.models()) or "none",
        device=options.resolved_device,
        scan=scan_backend,
        mode=options.mode,
        tls="mutual" if options.tls_client_ca else "on" if options.tls else "off",
        auth="token" if options.auth_token_file else "none",
        routes=server.pool.router.describe(),
        max_sessions=options.max_sessions,
        max_batch=options.resolved_max_batch,
        max_delay_ms=options.max_delay_ms,
        idle_timeout_s=options.idle_timeout_s,
        **({} if worker is None else {"pid": os.getpid()}),
    )
    await stop.wait()
    logs.event(logging.INFO, "shutting down", sessions=len(server.service.sessions), grace_s=options.grace_s)
    await server.shutdown()
    return 0
