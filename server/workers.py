"""``dmm serve --workers N``: N server processes on one gRPC port, run by a light supervisor.

The supervisor (the ``dmm serve`` process itself; it imports no torch) starts N
workers, each a whole :func:`dmm.server.app.serve` with its own copy of the models, all bound to the
same port with SO_REUSEPORT: the kernel spreads new TCP connections over them, so one client
channel stays on one worker. Metrics: prometheus_client's multiprocess mode, which it picks when it
is imported, from ``$PROMETHEUS_MULTIPROC_DIR``; the supervisor points that at a fresh folder before
it starts any worker, and serves the sum of the workers' files on ``--metrics-port``.

Start: worker 0 binds the requested port (0: a free one) and reports it; the others import torch
meanwhile, then bind that port. The ready line comes once every worker is ready. A worker that
fails before then stops the whole server with its error; one that dies later is logged and
replaced. SIGTERM or SIGINT: every worker drains as a single server does (``--grace``), then the
supervisor exits 0 (1 if it had to kill a worker that did not stop). Workers whose supervisor is
gone (SIGKILL) drain and exit too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from dmm.errors import DMMError
from dmm.server import logs
from dmm.server.options import ServeOptions

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STABLE_S = 30.0  # a worker that ran this long before it died is replaced at once, else after a backoff
RESTART_BACKOFF_MAX_S = 30.0
STOP_MARGIN_S = 15.0  # after --grace, a worker that has not exited is killed


class WorkerLink:
    """A worker's end of its pipe to the supervisor."""

    def __init__(self, index: int, conn: Connection) -> None:
        self.index = index
        self.conn = conn

    def ready(self, port: int, fields: dict[str, str]) -> None:
        """The worker serves on ``port``; ``fields`` go on the supervisor's ready line."""
        self.conn.send(("ready", port, fields))

    def stop_with_supervisor(self, stop: asyncio.Event) -> None:
        """Set ``stop`` when the supervisor is gone (its end of the pipe closes), so that no worker
        outlives it holding the port."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                self.conn.recv()  # the supervisor sends nothing more
            except (EOFError, OSError):
                loop.remove_reader(self.conn.fileno())
                logs.event(logging.WARNING, "supervisor gone, shutting down")
                stop.set()

        loop.add_reader(self.conn.fileno(), readable)


def _worker_main(options: ServeOptions, index: int, conn: Connection, port_known: bool) -> None:
    """A worker process: wait for the port if it is not known yet, then serve."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the supervisor, which stops it
    from dmm.server.app import serve  # torch and grpc, while worker 0 binds the port

    try:
        if not port_known:
            kind, port = conn.recv()
            assert kind == "port"
            options = replace(options, port=port)
        code = asyncio.run(serve(options, WorkerLink(index, conn)))
    except DMMError as err:
        try:
            conn.send(("error", str(err)))  # the supervisor prints it
        except OSError:
            print(f"dmm serve: error: {err}", file=sys.stderr)
        code = 2
    except EOFError:  # the supervisor is gone before the worker started
        code = 1
    sys.exit(code)


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection | None
    started: float
    failures: int  # deaths in a row, each within STABLE_S of its start
    waits_for_port: bool
    ready: bool = False
    error: str | None = None


class _StartFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def supervise(options: ServeOptions) -> int:
    """Run ``options.workers`` servers on one port until SIGTERM or SIGINT; returns the exit status."""
    options.validate(probe_device=False)  # the workers check the device: that needs torch
    logs.configure(options.log_level, options.log_format)
    metrics_dir = tempfile.mkdtemp(prefix="dmm-serve-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = metrics_dir  # before prometheus_client is imported, here or in a worker
    try:
        return _Supervisor(options, metrics_dir).run()
    except _StartFailed as err:
        print(f"dmm serve: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_ENV, None)
        else:
            os.environ[MULTIPROC_ENV] = previous
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _exit_description(code: int | None) -> dict[str, Any]:
    if code is not None and code < 0:
        try:
            return {"exit_code": code, "signal": signal.Signals(-code).name}
        except ValueError:
            pass
    return {"exit_code": code}


class _Supervisor:
    def __init__(self, options: ServeOptions, metrics_dir: str) -> None:
        self.options = options
        self.metrics_dir = metrics_dir
        self.context = multiprocessing.get_context("spawn")
        self.workers: dict[int, _Worker] = {}
        self.restarts: dict[int, tuple[float, int]] = {}  # index: (when, failures)
        self.port = options.port  # 0 until worker 0 has bound a free one
        self.ready_fields: dict[str, str] = {}
        self.serving = False  # every worker was ready once: from now on, dead workers are replaced
        self.stop_requested = False
        self.stopping = False
        self.quiet = False  # stopping after a failed start: only the error is printed

    def run(self) -> int:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        o = self.options
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        try:
            http, _thread = start_http_server(o.metrics_port, addr=o.host, registry=registry)
        except OSError as err:
            raise DMMError(f"cannot serve metrics on {o.host}:{o.metrics_port}: {err}") from None
        metrics_port = int(http.server_port)
        self.worker_options = replace(o, metrics_port=metrics_port)  # for the workers' serving line
        self._wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        previous_wakeup = signal.set_wakeup_fd(wake_w)
        previous_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            try:
                for index in range(o.workers):
                    self._spawn(index, failures=0)
                while not self.stop_requested and not all(w.ready for w in self.workers.values()):
                    self._wait()
            except BaseException:
                self._stop(quiet=True)
                raise
            if self.stop_requested:  # before every worker was ready
                return self._stop()
            self.serving = True
            host = o.host
            print(
                logs.ready_line(
                    f"{host}:{self.port}", f"{host}:{metrics_port}", **self.ready_fields, workers=o.workers
                ),
                flush=True,
            )
            logs.event(
                logging.INFO,
                "all workers ready",
                workers=o.workers,
                grpc=f"{host}:{self.port}",
                metrics=f"{host}:{metrics_port}",
                pids=",".join(str(self.workers[i].process.pid) for i in sorted(self.workers)),
            )
            while not self.stop_requested:
                self._wait()
            return self._stop()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            os.close(self._wake_r)
            os.close(wake_w)
            http.shutdown()
            http.server_close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stop_requested = True

    def _spawn(self, index: int, failures: int) -> None:
        """Start worker ``index``; it binds ``self.port``, or waits for worker 0 to pick one."""
        waits = self.port == 0 and index != 0
        options = replace(self.worker_options, port=self.port)
        ours, theirs = self.context.Pipe()
        process = self.context.Process(
            target=_worker_main,
            args=(options, index, theirs, not waits),
            name=f"dmm-serve-worker-{index}",
        )
        process.start()
        theirs.close()
        self.workers[index] = _Worker(index, process, ours, time.monotonic(), failures, waits)
        logs.event(logging.DEBUG, "worker started", worker=index, pid=process.pid)

    def _wait(self, timeout: float | None = None) -> None:
        """Wait for a message, a worker's exit, a signal or a due restart, and handle it."""
        if self.restarts:
            due = min(when for when, _ in self.restarts.values()) - time.monotonic()
            timeout = max(0.0, due if timeout is None else min(timeout, due))
        watched: list[Any] = [self._wake_r]
        for w in self.workers.values():
            watched.append(w.process.sentinel)
            if w.conn is not None:
                watched.append(w.conn)
        got = wait(watched, timeout)
        if self._wake_r in got:
            os.read(self._wake_r, 512)
        for w in list(self.workers.values()):
            if w.conn is not None and w.conn in got:
                self._receive(w)
        for w in list(self.workers.values()):
            if w.process.sentinel in got:
                self._exited(w)
        now = time.monotonic()
        for index, (when, failures) in list(self.restarts.items()):
            if when <= now and not self.stopping:
                del self.restarts[index]
                self._spawn(index, failures)

    def _receive(self, w: _Worker) -> None:
        assert w.conn is not None
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            w.conn.close()
            w.conn = None
            return
        if message[0] == "error":
            w.error = message[1]
        elif message[0] == "ready" and not self.stopping:
            _, port, fields = message
            w.ready = True
            if not self.port:
                self.port = port
                for other in self.workers.values():
                    if other.waits_for_port and other.conn is not None:
                        with contextlib.suppress(OSError):  # it died: its exit is handled next
                            other.conn.send(("port", port))
                        other.waits_for_port = False
            self.ready_fields = self.ready_fields or fields
            logs.event(logging.INFO, "worker ready", worker=w.index, pid=w.process.pid, port=port)

    def _exited(self, w: _Worker) -> None:
        while w.conn is not None and w.conn.poll():  # an error it sent before it exited
            self._receive(w)
        w.process.join()
        code = w.process.exitcode
        if w.conn is not None:
            w.conn.close()
        del self.workers[w.index]
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(w.process.pid, self.metrics_dir)  # its live gauges no longer count
        if self.stopping:
            expected = code in (0, -signal.SIGTERM)
            level = logging.DEBUG if self.quiet else logging.INFO if expected else logging.WARNING
            logs.event(level, "worker stopped", worker=w.index, pid=w.process.pid, **_exit_description(code))
            return
        if not self.serving:
            if w.error is not None:
                raise _StartFailed(w.error, 2)
            how = ", ".join(f"{k} {v}" for k, v in _exit_description(code).items())
            raise _StartFailed(f"worker {w.index} exited before the server was ready ({how})", 1)
        failures = 0 if w.ready and time.monotonic() - w.started >= STABLE_S else w.failures + 1
        delay = 0.0 if failures == 0 else min(RESTART_BACKOFF_MAX_S, 0.5 * 2 ** (failures - 1))
        logs.event(
            logging.ERROR,
            "worker exited",
            worker=w.index,
            pid=w.process.pid,
            **_exit_description(code),
            **({"error": w.error} if w.error else {}),
            restart_in_s=delay,
        )
        self.restarts[w.index] = (time.monotonic() + delay, failures)

    def _stop(self, quiet: bool = False) -> int:
        """SIGTERM every worker, wait for them to drain (``--grace``), kill those that do not; 0 when
        all stopped by themselves."""
        self.stopping = True
        self.quiet = quiet
        self.restarts.clear()
        level = logging.DEBUG if quiet else logging.INFO
        logs.event(level, "shutting down", workers=len(self.workers), grace_s=self.options.grace_s)
        for w in self.workers.values():
            if w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + self.options.grace_s + STOP_MARGIN_S
        while self.workers and (left := deadline - time.monotonic()) > 0:
            self._wait(left)
        killed = list(self.workers.values())
        for w in killed:
            logs.event(logging.ERROR, "worker did not stop, killed", worker=w.index, pid=w.process.pid)
            w.process.kill()
            self._exited(w)
        return 1 if killed else 0
