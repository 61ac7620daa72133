"""Container health probe: asks the server's ``grpc.health.v1`` service whether it is SERVING.

Used as the image's HEALTHCHECK, so it needs nothing but grpcio and grpcio-health-checking (no
probe binary to download). Exit status 0 when the service answers SERVING, 1 otherwise (not
serving, unreachable, or no answer within the timeout); one line on stdout says which.

    python healthcheck.py [--target HOST:PORT] [--service NAME] [--timeout SECONDS]

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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_PORT = 50051
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


def check(target: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """Return (serving, description) for one Check call to ``target``."""
    with grpc.insecure_channel(target) as channel:
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
    args = parser.parse_args(argv)
    serving, description = check(args.target or default_target(), args.service, args.timeout)
    print(description)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
