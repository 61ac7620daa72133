"""Subcommands of the server: ``dmm serve``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dmm.cli_common import add_mode_option, add_scan_backend_option
from dmm.server.logs import FORMATS, LEVELS
from dmm.server.options import CPU_MAX_BATCH, GPU_MAX_BATCH, ServeOptions, default

SERVE = """Serve the policies of a model store over gRPC (dmm.v1.PolicyService), with health, reflection \
and Prometheus metrics. New versions in the store serve new sessions without a restart."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this application's subcommands to ``dmm``."""
    p = subparsers.add_parser("serve", help="serve policies from a model store over gRPC", description=SERVE)
    store_and_models = (_add_store_options, _add_network_options, _add_model_options, add_scan_backend_option)
    for add_options in (*store_and_models, _add_session_options, _add_security_options, _add_log_options):
        add_options(p)
    p.set_defaults(handler=_serve)


def _option(g: argparse._ArgumentGroup, flag: str, field: str, text: str, **kw) -> None:
    """Add ``flag`` with the ``ServeOptions`` default of ``field``, shown at the end of its help ``text``."""
    g.add_argument(flag, default=default(field), help=f"{text} (default: %(default)s)", **kw)


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
    _option(g, "--host", "host", "address to listen on")
    _option(g, "--port", "port", "gRPC port; 0 picks a free one", type=int)
    _option(g, "--metrics-port", "metrics_port", "Prometheus /metrics port", type=int)
    text = "server processes sharing the gRPC port (SO_REUSEPORT, which balances per connection), each "
    _option(
        g, "--workers", "workers", text + "with its own copy of the models; /metrics adds them up", type=int
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Where and how the models run."""
    g = p.add_argument_group("inference")
    _option(g, "--device", "device", "auto (the GPU when there is one), cpu, cuda or cuda:N")
    auto = "the one each session's policy was trained for; of sessions that ask for none"
    add_mode_option(g, default("mode"), auto)
    g.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=default("cuda_graphs"),
        help="replay each batched step as a captured CUDA graph (default: on for a CUDA device)",
    )


def _add_session_options(p: argparse.ArgumentParser) -> None:
    """How many sessions are kept, and how their steps are batched."""
    g = p.add_argument_group("sessions and batching")
    _option(g, "--max-sessions", "max_sessions", "open sessions at most", type=int)
    _option(g, "--idle-timeout", "idle_timeout_s", "seconds before an idle session is evicted", type=float)
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
    text = "largest request message in bytes: larger ones are RESOURCE_EXHAUSTED, and gRPC drops those "
    _option(g, "--max-message-bytes", "max_message_bytes", text + "over 4x before reading them", type=int)
    _option(g, "--grace", "grace_s", "seconds sessions get to finish on SIGTERM", type=float)


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
    _option(g, "--log-format", "log_format", "stderr log lines", choices=FORMATS)


def _serve(args: argparse.Namespace) -> int:
    # every ServeOptions field is the flag of the same name, but these three
    renamed = {"idle_timeout_s": args.idle_timeout, "grace_s": args.grace, "routes": tuple(args.routes)}
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeOptions) if f.name not in renamed}
    options = ServeOptions(**same, **renamed)
    if options.workers > 1:
        from dmm.server.workers import supervise  # imports no torch: the workers do

        return supervise(options)

    import asyncio

    from dmm.server.app import serve

    return asyncio.run(serve(options))
