"""Run ``dmm serve`` as a subprocess on free ports and wait until it is healthy (tests, benchmarks).

The server binds port 0 for gRPC and metrics and prints the ports it got on its ready line, so there
is no race between picking a free port and binding it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from dmm.server.app import READY_PREFIX

# The ready line starts its line (log lines start with their time), and names every field at once.
_READY_RE = re.compile(re.escape(READY_PREFIX) + r" grpc=(\S+):(\d+) metrics=(\S+):(\d+)(.*)$")


class ServerProcess:
    """A ``dmm serve`` child process. Use as a context manager; it is SIGTERMed on exit.

    ``startup_timeout_s`` is generous: on a busy 2-core machine importing torch and loading (or, on a
    new machine, compiling) the numba kernels can take a minute before the server says it is ready."""

    def __init__(
        self,
        store: str | os.PathLike[str],
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 180.0,
        env: dict[str, str] | None = None,
        channel: dict[str, Any] | None = None,
    ) -> None:
        self.store = os.fspath(store)  # a folder or an s3:// URL, which Path would mangle
        self.args = list(args)
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.env = env
        self.channel = channel or {}  # open_channel's TLS arguments, for the health probe
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.metrics_port = 0
        self.output: list[str] = []  # every line the server printed (stdout and stderr merged)
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def start(self) -> ServerProcess:
        cmd = [
            sys.executable,
            "-m",
            "dmm.cli",
            "serve",
            "--store",
            self.store,
            "--host",
            self.host,
            "--port",
            "0",
            "--metrics-port",
            "0",
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(self.env or {})},
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        if not self._ready.wait(self.startup_timeout_s) or not self.port:
            self.kill()
            raise RuntimeError("dmm serve did not become ready:\n" + "".join(self.output))
        self.wait_healthy(deadline_s=self.startup_timeout_s)
        return self

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = _READY_RE.match(line.rstrip("\n"))
            if match and self._is_server_ready_line(match.group(5)):
                self.port, self.metrics_port = int(match.group(2)), int(match.group(4))
                self._ready.set()
        self._ready.set()  # the process ended: stop waiting

    def _is_server_ready_line(self, fields: str) -> bool:
        """With ``--workers N`` only the supervisor's ready line (it ends ``workers=N``) says the server
        is ready: a line from one worker that starts the same, or one written through a worker's log
        line under load, must not be taken for it."""
        workers = self._option("--workers")
        return workers is None or fields.split()[-1:] == [f"workers={workers}"]

    def _option(self, flag: str) -> str | None:
        """The value of ``flag`` in the server's arguments (``--flag V`` or ``--flag=V``), None if absent."""
        for i, arg in enumerate(self.args):
            if arg == flag and i + 1 < len(self.args):
                return self.args[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None

    def wait_healthy(self, deadline_s: float = 30.0) -> None:
        """Block until the gRPC health service answers SERVING."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from dmm.client.channel import open_channel

        end = time.monotonic() + deadline_s
        with open_channel(self.target, **self.channel) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > end:
                    raise RuntimeError("dmm serve is not SERVING:\n" + "".join(self.output))
                time.sleep(0.05)

    def scrape(self) -> str:
        """The text of the /metrics endpoint."""
        from urllib.request import urlopen

        with urlopen(self.metrics_url, timeout=5) as response:
            return response.read().decode()

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.terminate()
        finally:
            self.kill()


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Value of one sample in Prometheus text format (None if absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return None
