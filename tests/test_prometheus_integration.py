"""A real Prometheus scrapes a real `dmm serve`; the counts it stores match the traffic sent.

`dmm serve` runs as a subprocess on a tiny model published to a temporary store; Prometheus (the
binary of Debian's `prometheus` package) runs with a rendered copy of deploy/prometheus/prometheus.yml
whose target is that server and whose scrape interval is 1 s. The client drives a known number of
Act steps and one failing session per phase; then Prometheus' HTTP API must report exactly those
numbers, and every query of the Grafana dashboard must return data.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MODEL = "hopper-test"
PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus binary not found (Debian: apt-get install -y prometheus); CI installs it",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@dataclass
class Server:
    process: subprocess.Popen
    grpc_target: str
    metrics_target: str


@dataclass
class Prometheus:
    process: subprocess.Popen
    url: str

    def query(self, expr: str) -> list[dict]:
        """Instant query through /api/v1/query; the result vector (or raises on an error status)."""
        params = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{params}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", f"{expr}: {body}"
        assert body["data"]["resultType"] == "vector", f"{expr}: {body['data']['resultType']}"
        return body["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        """The single value of ``expr``, or None while it has no series."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} has several series: {result}"
        return float(result[0]["value"][1]) if result else None

    def label_values(self, label: str, match: str) -> list[str]:
        params = urllib.parse.urlencode({"match[]": match})
        with urllib.request.urlopen(f"{self.url}/api/v1/label/{label}/values?{params}", timeout=10) as reply:
            body = json.load(reply)
        assert body["status"] == "success", body
        return body["data"]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one tiny Hopper-shaped policy (version 1)."""
    import torch

    from dmm.model import DMMConfig, PolicyMeta, PolicyNetwork, publish_policy
    from dmm.store import ModelStore

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("store")
    model = PolicyNetwork(DMMConfig(state_dim=11, act_dim=3, d_model=16, n_layer=1, context=4))
    meta = PolicyMeta(
        env="hopper-medium-v2",
        env_id="Hopper-v4",
        state_mean=[0.0] * 11,
        state_std=[1.0] * 11,
        rtg_scale=1000.0,
        target_return=3600.0,
    )
    assert publish_policy(ModelStore(root), MODEL, model, meta) == 1
    return root


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`dmm serve` on free ports (port 0: the server reports what it bound in its ready line)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    command = [sys.executable, "-m", "dmm.cli", "serve", "--store", str(store), "--host", "127.0.0.1"]
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [*command, "--port", "0", "--metrics-port", "0", "--max-delay-ms", "1"],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
            cwd=ROOT,
        )
    try:
        ready = process.stdout.readline() if process.stdout else ""
        match = re.search(r"grpc=(\S+):(\d+) metrics=(\S+):(\d+)", ready)
        assert match, f"dmm serve did not report ready: {ready!r}\n{log.read_text()}"
        # Keep reading stdout so that a chatty server never blocks on a full pipe.
        threading.Thread(target=lambda: process.stdout and process.stdout.read(), daemon=True).start()
        yield Server(process, f"127.0.0.1:{match.group(2)}", f"127.0.0.1:{match.group(4)}")
    finally:
        stop(process)


def render_prometheus_config(metrics_target: str, path: Path) -> Path:
    """The repository's prometheus.yml with the compose target replaced and a 1 s scrape interval."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    replaced = 0
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [metrics_target if t == "server:9090" else t for t in static["targets"]]
            replaced += static["targets"].count(metrics_target)
    assert replaced == 1, "deploy/prometheus/prometheus.yml must target server:9090 exactly once"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prometheus(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    config = render_prometheus_config(server.metrics_target, workdir / "prometheus.yml")
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(process, f"http://127.0.0.1:{port}")

    def ready() -> bool:
        assert process.poll() is None, f"prometheus exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    try:
        wait_for(ready, 60, "Prometheus to be ready")
        wait_for(lambda: prom.scalar('up{job="dmm-server"}') == 1.0, 30, "the server target to be up")
        yield prom
    finally:
        stop(process)


# ---------------------------------------------------------------------------------------------
# Traffic


@dataclass
class Traffic:
    act_steps: int  # actions sent on Act streams
    vector_steps: int  # actions sent on ActVector streams
    episodes: int  # on each of the two paths
    errors: int

    @property
    def steps(self) -> int:
        return self.act_steps + self.vector_steps


def run_phase(target: str, episodes: int, seed: int) -> Traffic:
    """``episodes`` short episodes on the tiny model as Act streams, as many again on one ActVector
    stream, and one session on an unknown model (every env step is one action)."""
    import grpc

    from dmm.client import PolicyClient, PolicyServiceError

    lengths = []
    with PolicyClient(target) as client:
        for vectorized in (False, True):
            result = client.rollout(
                env="hopper-medium-v2",
                model=MODEL,
                episodes=episodes,
                num_envs=episodes,
                seed=seed,
                max_episode_steps=25,
                progress=False,
                vectorized=vectorized,
            )
            assert result.versions == [1] * episodes
            assert len(result.lengths) == episodes and all(1 <= n <= 25 for n in result.lengths)
            lengths.append(sum(result.lengths))
        with pytest.raises(PolicyServiceError) as err:
            client.rollout(env="hopper-medium-v2", model="no-such-model", episodes=1, progress=False)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    return Traffic(lengths[0], lengths[1], episodes, 1)


def expected_series(traffic: Traffic) -> dict[str, float]:
    """PromQL -> the value the server's counters must have after ``traffic``."""
    m = f'model="{MODEL}"'
    return {
        f"sum(dmm_act_latency_seconds_count{{{m}}})": traffic.act_steps,
        f'sum(dmm_act_latency_seconds_bucket{{{m},le="+Inf"}})': traffic.act_steps,
        f"sum(dmm_actions_total{{{m}}})": traffic.steps,
        f"sum(dmm_queue_wait_seconds_count{{{m}}})": traffic.steps,
        # Every step is in exactly one batched forward.
        f"sum(dmm_batch_size_sum{{{m}}})": traffic.steps,
        # a vector stream of N episodes counts as N sessions
        f"sum(dmm_sessions_started_total{{{m}}})": 2 * traffic.episodes,
        f'sum(dmm_sessions_ended_total{{{m},reason="completed"}})': 2 * traffic.episodes,
        f"sum(dmm_sessions_ended_total{{{m}}})": 2 * traffic.episodes,
        f"sum(dmm_active_sessions{{{m}}})": 0,
        'sum(dmm_errors_total{code="NOT_FOUND"})': traffic.errors,
        "sum(dmm_errors_total)": traffic.errors,
        f'dmm_model_versions_loaded{{{m},version="1"}}': 1,
        f"sum(dmm_model_loads_total{{{m}}})": 1,
        # every rollout episode ends with End: the live quality metrics count them all
        f"sum(dmm_episode_return_count{{{m}}})": 2 * traffic.episodes,
        f"sum(dmm_episode_length_sum{{{m}}})": traffic.steps,
        f"sum(dmm_episode_normalized_score_count{{{m}}})": 2 * traffic.episodes,
    }


def scraped(prometheus: Prometheus, exprs: dict[str, float]) -> dict[str, float | None]:
    return {expr: prometheus.scalar(expr) for expr in exprs}


@pytest.fixture(scope="module")
def traffic(server: Server, prometheus: Prometheus) -> Traffic:
    """Two phases of traffic, each waited for in Prometheus, so that every rate sees an increase."""
    total = Traffic(0, 0, 0, 0)
    for phase, episodes in enumerate((2, 3)):
        t = run_phase(server.grpc_target, episodes, seed=10 * phase)
        total = Traffic(
            total.act_steps + t.act_steps,
            total.vector_steps + t.vector_steps,
            total.episodes + t.episodes,
            total.errors + t.errors,
        )
        expected = expected_series(total)
        wait_for(lambda e=expected: scraped(prometheus, e) == e, 30, f"phase {phase} in Prometheus")
    return total


# ---------------------------------------------------------------------------------------------
# Tests


def test_healthcheck_script_sees_the_server_serving(server: Server):
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    assert healthcheck.check(server.grpc_target) == (True, f"{server.grpc_target}: SERVING")
    assert healthcheck.check(server.grpc_target, "dmm.v1.PolicyService")[0]


def test_scraped_counters_match_the_traffic(prometheus: Prometheus, traffic: Traffic):
    assert traffic.steps >= traffic.episodes
    expected = expected_series(traffic)
    assert scraped(prometheus, expected) == expected
    forwards = prometheus.scalar(f'sum(dmm_batch_size_count{{model="{MODEL}"}})')
    assert forwards is not None and 1 <= forwards <= traffic.steps
    modes = {s["metric"]["mode"] for s in prometheus.query("dmm_act_latency_seconds_count")}
    assert modes == {"window"}
    # Sub-millisecond buckets are real series, not just the contract's words.
    les = {s["metric"]["le"] for s in prometheus.query(f'dmm_act_latency_seconds_bucket{{model="{MODEL}"}}')}
    assert {"5e-05", "0.0001", "0.0005", "1.0", "+Inf"} <= les


def dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "dmm-serving.json").read_text())
    return [(f"{p['title']} [{t['refId']}]", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def substitute(expr: str, model_regex: str) -> str:
    """Replace the dashboard's variables as Grafana would for a short time range."""
    expr = expr.replace("$__rate_interval", "1m").replace("$model", model_regex)
    assert "$" not in expr, f"unhandled dashboard variable in {expr!r}"
    return expr


@pytest.mark.parametrize("model_regex", [".*", MODEL], ids=["all-models", "one-model"])
def test_every_dashboard_query_returns_data(prometheus: Prometheus, traffic: Traffic, model_regex: str):
    empty, not_finite = [], []
    for title, expr in dashboard_targets():
        result = prometheus.query(substitute(expr, model_regex))
        values = [float(s["value"][1]) for s in result]
        if not values:
            empty.append(title)
        elif not all(math.isfinite(v) for v in values):
            not_finite.append(f"{title}: {values}")
    assert not empty, f"dashboard queries without data: {empty}"
    assert not not_finite, f"dashboard queries with NaN/inf: {not_finite}"


def test_dashboard_model_variable_lists_the_served_model(prometheus: Prometheus, traffic: Traffic):
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "dmm-serving.json").read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["definition"])
    assert match, variable["definition"]
    assert prometheus.label_values(match.group(2), match.group(1)) == [MODEL]
