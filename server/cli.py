"""Subcommands of the server: ``dmm serve``."""

from __future__ import annotations

import argparse
from pathlib import Path

from dmm.cli_common import add_scan_backend_option
from dmm.server.logs import FORMATS, LEVELS
from dmm.server.options import CPU_MAX_BATCH, GPU_MAX_BATCH, ServeOptions, default


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this application's subcommands to ``dmm``."""
    p = subparsers.add_parser(
        "serve",
        help="serve policies from a model store over gRPC",
        description="Serve the policies of a model store over gRPC (dmm.v1.PolicyService), with health, "
        "reflection and Prometheus metrics. New versions in the store serve new sessions without a restart.",
    )
    _add_store_options(p)
    _add_network_options(p)
    _add_model_options(p)
    add_scan_backend_option(p)
    _add_session_options(p)
    _add_security_options(p)
    _add_log_options(p)
    p.set_defaults(handler=_serve)


def _add_store_options(p: argparse.ArgumentParser) -> None:
    """Where the policies come from and how often new versions are looked for."""
    g = p.add_argument_group("model store")
    g.add_argument("--store", required=True, help="model store: a folder or s3://bucket/prefix")
    g.add_argument(
        "--store-refresh",
        dest="store_refresh_s",
        type=float,
        default=default("store_refresh_s"),
        metavar="SECONDS",
        help="how long an S3 store's listing is reused: new versions serve new sessions within this "
        "(default: %(default)s; a folder is read at every session start)",
    )
    g.add_argument(
        "--route",
        dest="routes",
        action="append",
        default=list(default("routes")),
        metavar="NAME=V1:W1,V2:W2",
        help="send new sessions of NAME that ask for no version to these versions with these weights "
        "(repeatable; the store's routes.json overrides it and is read again when it changes)",
    )


def _add_network_options(p: argparse.ArgumentParser) -> None:
    """Where the server listens and how many processes share the port."""
    g = p.add_argument_group("network")
    g.add_argument("--host", default=default("host"), help="address to listen on (default: %(default)s)")
    g.add_argument(
        "--port",
        type=int,
        default=default("port"),
        help="gRPC port; 0 picks a free one (default: %(default)s)",
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=default("metrics_port"),
        help="Prometheus /metrics port (default: %(default)s)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=default("workers"),
        help="server processes sharing the gRPC port (SO_REUSEPORT, which balances per connection), each "
        "with its own copy of the models; /metrics adds them up (default: %(default)s)",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Where and how the models run."""
    g = p.add_argument_group("inference")
    g.add_argument(
        "--device",
        default=default("device"),
        help="auto (the GPU when there is one), cpu, cuda or cuda:N (default: %(default)s)",
    )
    g.add_argument(
        "--mode",
        choices=("window", "recurrent"),
        default=default("mode"),
        help="inference mode of sessions that do not ask for one (default: %(default)s)",
    )


def _add_session_options(p: argparse.ArgumentParser) -> None:
    """How many sessions are kept, and how their steps are batched."""
    g = p.add_argument_group("sessions and batching")
    g.add_argument(
        "--max-sessions",
        type=int,
        default=default("max_sessions"),
        help="open sessions at most (default: %(default)s)",
    )
    g.add_argument(
        "--idle-timeout",
        type=float,
        default=default("idle_timeout_s"),
        help="seconds before an idle session is evicted (default: %(default)s)",
    )
    g.add_argument(
        "--max-batch",
        type=int,
        default=default("max_batch"),
        help=f"steps per batched forward at most (default: {CPU_MAX_BATCH} on the CPU, {GPU_MAX_BATCH} on "
        "a GPU)",
    )
    g.add_argument(
        "--max-delay-ms",
        type=float,
        default=default("max_delay_ms"),
        help="longest wait for a batch to fill, in ms (default: %(default)s; a batch that holds a step "
        "of every session runs at once)",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=default("max_message_bytes"),
        help="largest request message in bytes: larger ones are RESOURCE_EXHAUSTED, and gRPC drops those "
        "over 4x before reading them (default: %(default)s)",
    )
    g.add_argument(
        "--grace",
        type=float,
        default=default("grace_s"),
        help="seconds sessions get to finish on SIGTERM (default: %(default)s)",
    )


def _add_security_options(p: argparse.ArgumentParser) -> None:
    """TLS, mutual TLS and bearer tokens."""
    security = p.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, help="PEM certificate (chain) of the server: serve TLS")
    security.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    security.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA certificate: clients must present a certificate it signed (mutual TLS)",
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        help="bearer tokens, one per line: every call but health must send 'authorization: Bearer <token>'",
    )


def _add_log_options(p: argparse.ArgumentParser) -> None:
    """What the server logs, and in which format."""
    g = p.add_argument_group("logging")
    g.add_argument("--log-level", default=default("log_level"), choices=LEVELS, help="default: %(default)s")
    g.add_argument(
        "--log-format",
        default=default("log_format"),
        choices=FORMATS,
        help="stderr log lines (default: %(default)s)",
    )


def _serve(args: argparse.Namespace) -> int:
    options = ServeOptions(
        store=args.store,
        store_refresh_s=args.store_refresh_s,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        device=args.device,
        mode=args.mode,
        max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        max_message_bytes=args.max_message_bytes,
        grace_s=args.grace,
        scan_backend=args.scan_backend,
        log_level=args.log_level,
        log_format=args.log_format,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token_file=args.auth_token_file,
        routes=tuple(args.routes),
        workers=args.workers,
    )
    if options.workers > 1:
        from dmm.server.workers import supervise  # imports no torch: the workers do

        return supervise(options)

    import asyncio

    from dmm.server.app import serve

    return asyncio.run(serve(options))
