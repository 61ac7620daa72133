"""Channels to a ``dmm serve``: plaintext or TLS (mutual TLS with a client certificate), and an
optional bearer token sent as ``authorization`` metadata on every call.

The token rides on a client interceptor rather than on call credentials, so it also works on a
plaintext channel inside a trusted network (grpc's call credentials require TLS).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from dmm.errors import ConfigError


def read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a PEM file, or a ConfigError that names the file and what it was for."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"the {what} {path} is not a PEM file")
    return data


def read_token(path: str | os.PathLike[str]) -> str:
    """The first non-empty line of a token file."""
    try:
        lines = Path(path).read_text().split()
    except OSError as err:
        raise ConfigError(f"cannot read the token file {path}: {err.strerror or err}") from None
    if not lines:
        raise ConfigError(f"the token file {path} is empty")
    return lines[0]


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._header],
            details.credentials,
            details.wait_for_ready,
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def open_channel(
    target: str,
    *,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``target``: TLS when ``tls_ca`` (the CA that signed the server's certificate) is
    given, with ``tls_cert``/``tls_key`` as the client's own certificate for mutual TLS; ``token`` is
    sent as a bearer token on every call."""
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("a client certificate needs its key, and a key its certificate (tls_cert, tls_key)")
    if tls_cert is not None and tls_ca is None:
        raise ConfigError(
            "a client certificate (mutual TLS) needs tls_ca, the CA of the server's certificate"
        )
    if token is not None and (not token or any(c.isspace() for c in token)):
        raise ConfigError("the token must be one non-empty word")
    if tls_ca is None:
        channel = grpc.insecure_channel(target, options=list(options))
    else:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read_pem(tls_ca, "CA certificate"),
            private_key=read_pem(tls_key, "client key") if tls_key is not None else None,
            certificate_chain=read_pem(tls_cert, "client certificate") if tls_cert is not None else None,
        )
        channel = grpc.secure_channel(target, credentials, options=list(options))
    return grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
