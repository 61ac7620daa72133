"""Subcommands of the server: ``dmm serve``."""

from __future__ import annotations

import argparse

from dmm.cli import add_scan_backend_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this application's subcommands to ``dmm``."""
    p = subparsers.add_parser(
        "serve",
        help="serve policies from a model store over gRPC",
        description="Serve the policies of a model store over gRPC (dmm.v1.PolicyService), with health, "
        "reflection and Prometheus metrics. New versions in the store serve new sessions without a restart.",
    )
    p.add_argument("--store", required=True, help="model store folder")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: 50051)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (default: 9090)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when there is one), cpu, cuda or cuda:N (default: auto)",
    )
    p.add_argument(
        "--mode",
        choices=("window", "recurrent"),
        default="window",
        help="inference mode of sessions that do not ask for one (default: window)",
    )
    p.add_argument("--max-sessions", type=int, default=1024, help="open sessions at most (default: 1024)")
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        help="seconds before an idle session is evicted (default: 120)",
    )
    p.add_argument(
        "--max-batch", type=int, default=64, help="steps per batched forward at most (default: 64)"
    )
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=2.0,
        help="longest wait for a batch to fill, in ms (default: 2; a batch that holds a step of every "
        "session runs at once)",
    )
    p.add_argument(
        "--max-message-bytes", type=int, default=1 << 20, help="largest gRPC message (default: 1 MiB)"
    )
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds sessions get to finish on SIGTERM (default: 10)"
    )
    add_scan_backend_option(p)
    p.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"), help="default: info"
    )
    p.add_argument(
        "--log-format", default="text", choices=("text", "json"), help="stderr log lines (default: text)"
    )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from dmm.server.app import ServeOptions, serve

    options = ServeOptions(
        store=Path(args.store),
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
    )
    return asyncio.run(serve(options))
