"""Prometheus metrics of the policy server (names, labels and buckets are part of the deploy contract).

With ``--workers N`` each worker process writes its metrics to files in ``$PROMETHEUS_MULTIPROC_DIR``
(prometheus_client's multiprocess mode, chosen when it is imported) and the supervisor serves their
sum; every gauge says how its workers' values add up (``multiprocess_mode``).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, values

LATENCY_BUCKETS = (50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0)
RETURN_BUCKETS = (0, 250, 500, 750, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 8000, 10000, 12000)
SCORE_BUCKETS = (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120)
LENGTH_BUCKETS = (10, 25, 50, 100, 200, 300, 500, 750, 1000)
LAG_BUCKETS = (1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
END_REASONS = ("completed", "cancelled", "error", "evicted", "shutdown")


def multiprocess() -> bool:
    """Whether this process's metrics go to the shared files of ``--workers`` (multiprocess mode)."""
    return values.ValueClass is not values.MutexValue


class _FlagGauge(Gauge):
    """A gauge whose removed series reads 0 across workers: in multiprocess mode a removed series
    lives on in the worker's file, so it is set to 0 first (and ``== 1`` queries drop it)."""

    def remove(self, *labelvalues: object) -> None:
        if multiprocess():
            self.labels(*labelvalues).set(0)
        super().remove(*labelvalues)


class ServerMetrics:
    """All server metrics in one registry of their own, so several servers can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._add_step_metrics(self.registry)
        self._add_session_metrics(self.registry)
        self._add_episode_metrics(self.registry)
        self._add_model_metrics(self.registry)

    def _add_step_metrics(self, r: CollectorRegistry) -> None:
        """Latency, actions and batching of steps, and how late the event loop runs."""

        def latency(name: str, text: str, labels: tuple[str, ...] = ("model", "mode")) -> Histogram:
            return Histogram(name, text, labels, buckets=LATENCY_BUCKETS, registry=r)

        self.act_latency = latency(
            "dmm_act_latency_seconds", "Time from a step message's arrival to its reply being written."
        )
        self.act_vector_latency = latency(
            "dmm_act_vector_latency_seconds",
            "Time from an ActVector step message's arrival to its reply (all its episodes' actions) being "
            "written.",
        )
        self.actions = Counter(
            "dmm_actions",
            "Actions sent (one per Act step, one per stepped row of an ActVector step).",
            ("model", "mode"),
            registry=r,
        )
        text = "Time a step waits in the batcher before its forward starts."
        self.queue_wait = latency("dmm_queue_wait_seconds", text, ("model",))
        self.batch_size = Histogram(
            "dmm_batch_size", "Steps per batched forward.", ("model",), buckets=BATCH_BUCKETS, registry=r
        )
        self.loop_lag = Histogram(
            "dmm_event_loop_lag_seconds",
            "How late the server's event loop runs a timer: when it grows, the server is saturated and new "
            "streams and steps wait.",
            buckets=LAG_BUCKETS,
            registry=r,
        )

    def _add_session_metrics(self, r: CollectorRegistry) -> None:
        """Sessions open, started, ended and resumed, and requests refused."""
        self.active_sessions = Gauge(
            "dmm_active_sessions",
            "Open Act sessions.",
            ("model",),
            registry=r,
            multiprocess_mode="livesum",  # the open sessions of the workers that run
        )
        self.sessions_started = Counter(
            "dmm_sessions_started", "Act sessions started.", ("model",), registry=r
        )
        self.sessions_ended = Counter(
            "dmm_sessions_ended", "Act sessions ended, by reason.", ("model", "reason"), registry=r
        )
        self.episodes_resumed = Counter(
            "dmm_episodes_resumed",
            "Episodes resumed from the episode so far (a session started on another server).",
            ("model",),
            registry=r,
        )
        self.errors = Counter("dmm_errors", "Requests answered with an error status.", ("code",), registry=r)

    def _add_episode_metrics(self, r: CollectorRegistry) -> None:
        """Episodes a client completed with End, per model version: live policy quality."""
        per_version = ("model", "version")
        self.episode_return = Histogram(
            "dmm_episode_return",
            "Return of completed episodes.",
            per_version,
            buckets=RETURN_BUCKETS,
            registry=r,
        )
        self.episode_normalized_score = Histogram(
            "dmm_episode_normalized_score",
            "D4RL-normalized score of completed episodes.",
            per_version,
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.episode_length = Histogram(
            "dmm_episode_length",
            "Steps of completed episodes.",
            per_version,
            buckets=LENGTH_BUCKETS,
            registry=r,
        )

    def _add_model_metrics(self, r: CollectorRegistry) -> None:
        """Model versions loaded, and which are held now."""
        self.model_loads = Counter("dmm_model_loads", "Model versions loaded.", ("model",), registry=r)
        self.versions_loaded = _FlagGauge(
            "dmm_model_versions_loaded",
            "1 while a model version is loaded.",
            ("model", "version"),
            registry=r,
            multiprocess_mode="livemax",  # 1 while a running worker holds it
        )

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> tuple[object, int]:
        """Start the /metrics HTTP endpoint in a daemon thread; return (server, bound port)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server, int(server.server_port)
