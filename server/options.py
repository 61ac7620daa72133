"""``dmm serve``'s options: their defaults (which the CLI shows) and their checks, in one place.

Imports nothing heavy, so the CLI can read the defaults without loading torch or grpc.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from dmm.errors import ConfigError
from dmm.server import logs

if TYPE_CHECKING:
    from dmm.server.routes import Route

# The inference mode of sessions that ask for none: a mode, or each policy's own (auto); the
# choices of every command's --mode (dmm.cli_common.MODES)
ServingMode = Literal["auto", "window", "recurrent"]


CPU_MAX_BATCH = 256
GPU_MAX_BATCH = 1024


@dataclass(frozen=True)
class ServeOptions:
    store: str  # a folder or s3://bucket/prefix
    store_refresh_s: float = 5.0  # an S3 store's listing is reused this long (a folder is read afresh)
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9090
    device: str = "auto"
    # auto: the mode each policy was trained to be served in (PolicyMeta.inference_mode)
    mode: ServingMode = "auto"
    max_sessions: int = 1024
    idle_timeout_s: float = 120.0
    max_batch: int | None = None  # None: CPU_MAX_BATCH on the CPU, GPU_MAX_BATCH on a GPU
    max_delay_ms: float = 2.0
    max_message_bytes: int = 1 << 20
    grace_s: float = 10.0
    scan_backend: str | None = None  # None: $DMM_SCAN_BACKEND, else auto
    log_level: str = "info"
    log_format: str = "text"
    tls_cert: Path | None = None  # with tls_key: serve TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS: clients need a certificate this CA signed
    auth_token_file: Path | None = None  # bearer tokens, one per line
    routes: tuple[str, ...] = ()  # NAME=V1:W1,V2:W2: weighted versions for new sessions naming none
    workers: int = 1  # server processes sharing the port (SO_REUSEPORT), each with its own models
    cuda_graphs: bool | None = None  # replay batched steps as CUDA graphs; None: on a CUDA device

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def validate(self, probe_device: bool = True) -> None:
        """Refuse option values the server cannot run with, with a one-line reason.

        ``probe_device=False`` skips the check that needs torch (a CUDA device is there), for the
        supervisor of ``--workers``, which leaves it to its workers."""
        checks = (
            (0 <= self.port <= 65535, f"--port {self.port} is not a TCP port"),
            (0 <= self.metrics_port <= 65535, f"--metrics-port {self.metrics_port} is not a TCP port"),
            (self.mode in get_args(ServingMode), f"--mode {self.mode!r}: use auto, window or recurrent"),
            (self.max_sessions > 0, f"--max-sessions must be > 0, got {self.max_sessions}"),
            (self.idle_timeout_s > 0, f"--idle-timeout must be > 0, got {self.idle_timeout_s}"),
            (self.max_batch is None or self.max_batch > 0, f"--max-batch must be > 0, got {self.max_batch}"),
            (self.max_delay_ms >= 0, f"--max-delay-ms must be >= 0, got {self.max_delay_ms}"),
            (
                self.max_message_bytes >= 1024,
                f"--max-message-bytes must be >= 1024, got {self.max_message_bytes}",
            ),
            (self.grace_s >= 0, f"--grace must be >= 0, got {self.grace_s}"),
            (self.log_level in logs.LEVELS, f"--log-level {self.log_level!r}: use {', '.join(logs.LEVELS)}"),
            (self.log_format in logs.FORMATS, f"--log-format {self.log_format!r}: use text or json"),
            (self.workers >= 1, f"--workers must be >= 1, got {self.workers}"),
            (self.store_refresh_s >= 0, f"--store-refresh must be >= 0, got {self.store_refresh_s}"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and not self.tls:
            raise ConfigError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if probe_device and self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: CUDA is not available on this machine")
        if probe_device and self.cuda_graphs and not self.resolved_device.startswith("cuda"):
            raise ConfigError(f"--cuda-graphs needs a CUDA device; --device {self.device} is the CPU")
        self.parsed_routes()

    def parsed_routes(self) -> dict[str, Route]:
        """``--route`` by model (ConfigError on a malformed one or a model routed twice)."""
        from dmm.server.routes import parse_route

        routes: dict[str, Route] = {}
        for text in self.routes:
            name, route = parse_route(text)
            if name in routes:
                raise ConfigError(f"--route: {name!r} is routed twice")
            routes[name] = route
        return routes

    @property
    def resolved_max_batch(self) -> int:
        """``--max-batch``, else the device's default. A batch only grows past what is pending at once,
        so the cap matters under load: on a 2-core CPU, 256 recurrent episodes gave 5.1k actions/s at
        256 (3.0k at 64) as Act streams and 15.9k (9.3k) as ActVector streams of 32; on an H200, a
        forward of 1024 rows costs about what one of 64 does (16.8k actions/s at 64, 72.9k at 1024)."""
        if self.max_batch is not None:
            return self.max_batch
        return GPU_MAX_BATCH if self.resolved_device.startswith("cuda") else CPU_MAX_BATCH

    @property
    def resolved_device(self) -> str:
        """``auto`` is the GPU when torch sees one, else the CPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


def default(name: str) -> Any:
    """The default of option ``name``."""
    return {f.name: f.default for f in fields(ServeOptions)}[name]
