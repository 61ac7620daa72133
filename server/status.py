"""How the service's failures become gRPC statuses: store errors, requests that cannot be read, and the
refusal itself (counted in dmm_errors_total and logged), shared by the streams and the unary calls."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError

from dmm.errors import DMMError
from dmm.server import logs
from dmm.server.metrics import ServerMetrics
from dmm.store import CorruptVersionError, ModelNotFoundError, StoreError, VersionNotFoundError


def store_status(err: Exception, root: Path | str) -> tuple[grpc.StatusCode, str]:
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


def lenient(message_type: type, max_bytes: int) -> Callable[[bytes], object]:
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


async def refuse(
    metrics: ServerMetrics,
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    details: str,
    model: str | None = None,
) -> NoReturn:
    """End the RPC with ``code``: counted in dmm_errors_total and logged."""
    metrics.errors.labels(code.name).inc()
    logs.event(logging.WARNING, "request refused", code=code.name, model=model, details=details)
    await context.abort(code, details)
