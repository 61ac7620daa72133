"""Transport security and authentication of ``dmm serve``: TLS (mutual with a client CA) and bearer
tokens.

Tokens come from a file, one per line, and arrive as ``authorization: Bearer <token>`` metadata. A
call without one is UNAUTHENTICATED, one with an unknown token PERMISSION_DENIED; tokens are
compared in constant time and never logged. The health service stays open, so orchestrators can
probe a server whose clients must authenticate.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from dmm.client.channel import read_pem
from dmm.errors import ConfigError
from dmm.server import logs
from dmm.server.metrics import ServerMetrics

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)  # callable without a token
Metadata = tuple[tuple[str, str | bytes], ...]


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS with ``cert``/``key``; with ``client_ca``, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(read_pem(key, "TLS key"), read_pem(cert, "TLS certificate"))],
        root_certificates=read_pem(client_ca, "client CA certificate") if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def load_tokens(path: Path) -> list[bytes]:
    """The tokens of a token file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"cannot read --auth-token-file {path}: {err.strerror or err}") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ConfigError(f"--auth-token-file {path} holds no token")
    if any(len(t.split()) != 1 for t in tokens):
        raise ConfigError(f"--auth-token-file {path}: a token is one word per line")
    return [_digest(t.encode()) for t in tokens]


def _digest(token: bytes) -> bytes:
    """Tokens are kept and compared as digests: equal length, so compare_digest is constant-time."""
    return hashlib.sha256(token).digest()


class TokenAuth(grpc.aio.ServerInterceptor):
    """Refuses every call but the health service's unless it carries one of the server's tokens."""

    def __init__(self, digests: list[bytes], metrics: ServerMetrics) -> None:
        self._digests = digests
        self._metrics = metrics

    def _check(
        self, metadata: tuple[tuple[str, str | bytes], ...] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, "missing authorization metadata (Bearer token)"
        value = values[0] if isinstance(values[0], str) else values[0].decode(errors="replace")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'"
        presented = _digest(token.strip().encode())
        known = False
        for digest in self._digests:  # no early exit: the time does not depend on which one matched
            known |= hmac.compare_digest(presented, digest)
        return None if known else (grpc.StatusCode.PERMISSION_DENIED, "unknown token")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        refusal = self._check(details.invocation_metadata)
        if refusal is None:
            return handler
        code, message = refusal
        self._metrics.errors.labels(code.name).inc()
        logs.event(logging.WARNING, "request refused", code=code.name, method=details.method, details=message)
        return _refusing(handler, code, message)


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with ``code``."""

    async def abort(_request, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
