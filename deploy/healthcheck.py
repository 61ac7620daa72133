"""Container health probe: asks the server's ``grpc.health.v1`` service whether it is SERVING.

Used as the image's HEALTHCHECK, so it needs nothing but grpcio and grpcio-health-checking (no
probe binary to download). Exit status 0 when the service answers SERVING, 1 otherwise (not
serving, unreachable, or no answer within the timeout); one line on stdout says which.

    python healthcheck.py [--target HOST:PORT] [--service NAME] [--timeout SECONDS]

A server started with ``--tls-cert`` is probed over TLS when ``$DMM_HEALTH_TLS_CA`` (or ``--tls-ca``)
names the CA of its certificate; with ``--tls-client-ca`` the probe also needs a client certificate
(``$DMM_HEALTH_TLS_CERT``/``$DMM_HEALTH_TLS_KEY``). Health needs no token.

The target defaults to ``$DMM_HEALTH_TARGET``, else to the ``--port`` of the ``dmm serve`` that is
the container's main process (read from ``/proc/1/cmdline``, so a container started with another
port is probed there), else ``127.0.0.1:50051``. The empty service name asks about the server as a
whole.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50051
TLS_OPTIONS = {  # for a server started with --tls-cert (mutual TLS: also a client certificate)
    "tls_ca": "PEM CA certificate of the server's certificate: probe over TLS",
    "tls_cert": "PEM client certificate, for a server with --tls-client-ca",
    "tls_key": "PEM key of --tls-cert",
    "tls_name": "name the server's certificate is issued for, when it is not the target's host",
}
MAIN_PROCESS_CMDLINE = "/proc/1/cmdline"


def serve_port(cmdline: Sequence[str]) -> int | None:
    """The gRPC port of a ``dmm serve`` command line (its default when not given); None if not one."""
    if "serve" not in cmdline:
        return None
    args = list(cmdline[cmdline.index("serve") + 1 :])
    for i, arg in enumerate(args):
        if arg == "--port" and i + 1 < len(args):
            return int(args[i + 1])
        if arg.startswith("--port="):
            return int(arg.split("=", 1)[1])
    return DEFAULT_PORT


def default_target(cmdline_path: str = MAIN_PROCESS_CMDLINE) -> str:
    if os.environ.get("DMM_HEALTH_TARGET"):
        return os.environ["DMM_HEALTH_TARGET"]
    try:
        with open(cmdline_path, "rb") as f:
            cmdline = [part.decode() for part in f.read().split(b"\0") if part]
        port = serve_port(cmdline)
    except (OSError, UnicodeDecodeError, ValueError):
        port = None
    return f"127.0.0.1:{port or DEFAULT_PORT}"


def _channel(
    target: str, tls_ca: str | None, tls_cert: str | None, tls_key: str | None, tls_name: str | None
):
    """Plaintext, or TLS when a CA is given (mutual with a client certificate and key)."""
    if not tls_ca:
        return grpc.insecure_channel(target)

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    credentials = grpc.ssl_channel_credentials(read(tls_ca), read(tls_key), read(tls_cert))
    options = [("grpc.ssl_target_name_override", tls_name)] if tls_name else []
    return grpc.secure_channel(target, credentials, options=options)


def check(
    target: str,
    service: str = "",
    timeout: float = 3.0,
    tls: dict[str, str | None] | None = None,
) -> tuple[bool, str]:
    """Return (serving, description) for one Check call to ``target``; ``tls`` holds the
    ``tls_ca``/``tls_cert``/``tls_key``/``tls_name`` of a TLS server."""
    tls = tls or {}
    try:
        channel = _channel(target, *(tls.get(k) for k in ("tls_ca", "tls_cert", "tls_key", "tls_name")))
    except OSError as err:
        return False, f"{target}: cannot read a TLS file: {err}"
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as err:
            return False, f"{target}: {err.code().name}: {err.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probe a gRPC server's grpc.health.v1 service.")
    parser.add_argument("--target", default=None, help="HOST:PORT (default: see the module docstring)")
    parser.add_argument("--service", default="", help="service name to ask about ('' = whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    for name, what in TLS_OPTIONS.items():
        env = f"DMM_HEALTH_{name.upper()}"
        parser.add_argument(
            f"--{name.replace('_', '-')}", default=os.environ.get(env), help=f"{what} (${env})"
        )
    args = parser.parse_args(argv)
    tls = {name: getattr(args, name) for name in TLS_OPTIONS}
    serving, description = check(args.target or default_target(), args.service, args.timeout, tls)
    print(description)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
