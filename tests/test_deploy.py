"""Static checks of deploy/ (no Docker engine needed) and behaviour of its two helper scripts.

The compose file, Dockerfile, Prometheus and Grafana files must agree with each other and only
reference files that exist; the dashboard must be valid and query only the contract's metrics.
healthcheck.py and bootstrap.py run in the image; here they run against a real gRPC health
service and a real model store (bootstrap.py's fallback here; its pre-trained path and
train_online.py in test_bootstrap.py).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shutil
import socket
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"

# The metric families of the contract (notes: "Metrics"), with the series names they expose.
SERVER_WIDE = ("dmm_errors_total", "dmm_event_loop_lag_seconds")  # no model label
HISTOGRAMS = (
    "dmm_act_latency_seconds",
    "dmm_act_vector_latency_seconds",
    "dmm_queue_wait_seconds",
    "dmm_batch_size",
    "dmm_event_loop_lag_seconds",
    "dmm_episode_return",
    "dmm_episode_normalized_score",
    "dmm_episode_length",
)
GAUGES = ("dmm_active_sessions", "dmm_model_versions_loaded")
COUNTERS = (
    "dmm_actions_total",
    "dmm_sessions_started_total",
    "dmm_sessions_ended_total",
    "dmm_errors_total",
    "dmm_model_loads_total",
)
SERIES = {f"{h}{s}" for h in HISTOGRAMS for s in ("_bucket", "_count", "_sum")} | set(GAUGES) | set(COUNTERS)


def load_module(name: str) -> ModuleType:
    """Import deploy/<name>.py (deploy/ is not a package: the files are copied into the image)."""
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_VAR = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with an empty environment; a variable without default is an error."""

    def repl(match: re.Match[str]) -> str:
        assert match.group("default") is not None, f"{match.group(0)} has no default in {value!r}"
        return match.group("default")

    return _VAR.sub(repl, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DASHBOARDS / "dmm-serving.json").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#")),
    )
    out = []
    for line in text.splitlines():
        if line.strip():
            instr, _, rest = line.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def serve_ports(command: list[str]) -> tuple[int, int]:
    """(gRPC port, metrics port) given by a `dmm serve` argument list."""
    return int(command[command.index("--port") + 1]), int(command[command.index("--metrics-port") + 1])


def bind_mounts(service: dict) -> list[tuple[str, str]]:
    """(host path, container path) of a service's short-syntax volumes that are bind mounts."""
    out = []
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


# ---------------------------------------------------------------------------------------------
# docker-compose.yml


def test_docker_compose_up_works_from_the_repository_root():
    """`docker compose up` at the root includes the deployment, whose paths stay relative to deploy/."""
    root_file = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert root_file == {"include": [str(COMPOSE.relative_to(ROOT))]}
    assert not (ROOT / "docker-compose.yml").exists()  # one root file: compose would pick either


FALLBACK_V1 = re.compile(
    r"^(?:DOCKER_BUILDKIT=1 )?docker-compose -f deploy/docker-compose\.yml up --build\b", re.MULTILINE
)


def test_compose_files_name_the_minimum_version_and_the_fallback_for_compose_v1():
    """`include` needs Compose 2.20; docker-compose 1.29 (v1) runs deploy/docker-compose.yml by name."""
    header = "\n".join(
        line.removeprefix("#").strip()
        for line in (ROOT / "compose.yaml").read_text().splitlines()
        if line.startswith("#")
    )
    readme = (DEPLOY / "README.md").read_text()
    for text in (header, readme):
        assert re.search(r"Compose 2\.20 or newer", text, re.IGNORECASE)
        assert FALLBACK_V1.search(text), "the fallback for docker-compose 1.29 is `docker-compose -f ...`"
        for line in text.splitlines():
            if "1.29" in line and "-f deploy/docker-compose.yml" in line:
                assert "docker-compose -f" in line, f"Compose v1's command is `docker-compose`: {line!r}"


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose (Compose v1) not installed"
)
def test_deploy_compose_file_is_valid_for_docker_compose_v1():
    """docker-compose 1.29 (Debian's package) accepts the deployment's file; no Docker engine needed."""
    for profile in ([], ["--profile", "train"]):
        proc = subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), *profile, "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr


def test_compose_has_the_services_and_profiles(compose):
    services = compose["services"]
    assert {"bootstrap", "server", "prometheus", "grafana", "trainer", "train-online"} <= set(services)
    assert services["trainer"]["profiles"] == ["train"], "trainer must not start with a plain `up`"
    for name in ("bootstrap", "server", "prometheus", "grafana", "train-online"):
        assert "profiles" not in services[name], f"{name} must start with a plain `docker compose up`"
    assert services["server"]["depends_on"] == {"bootstrap": {"condition": "service_completed_successfully"}}


def test_compose_trains_online_in_the_background(compose):
    """train-online runs beside the server (which never waits for it), after the bootstrap, with the
    D4RL cache and the store, and records in the store's marker where its progress is shown."""
    online = compose["services"]["train-online"]
    assert online["entrypoint"] == ["python", "/opt/dmm/train_online.py"]
    assert online["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    assert online["restart"] == "no"
    assert set(online["volumes"]) == {"models:/models", "d4rl-cache:/home/dmm/.d4rl"}
    env = {k: interpolate(str(v)) for k, v in online["environment"].items()}
    assert env["DMM_STORE"] == "/models" and env["DMM_TRAIN_ONLINE_UPDATES"] == "20000"
    assert env["DMM_TRAIN_ONLINE_DATASET"] == "hopper-medium-v2"
    assert env["DMM_TRAIN_ONLINE_LOG"] == "docker compose logs -f train-online"
    for name, service in compose["services"].items():
        assert "train-online" not in service.get("depends_on", {}), f"{name} must not wait for train-online"


def compose_seconds(duration: str) -> float:
    """A compose duration ("30s", "1m30s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def server_grace_s(command: list[str]) -> float:
    """The --grace a `dmm serve` argument list gives, else the server's default."""
    import dataclasses

    from dmm.server.options import ServeOptions

    if "--grace" in command:
        return float(command[command.index("--grace") + 1])
    return next(f.default for f in dataclasses.fields(ServeOptions) if f.name == "grace_s")


# What a drain takes beyond --grace: the server ends the streams left and exits. Measured in the image
# on a loaded 2-core machine: 3 s from its last log line to the process' end (the interpreter's exit
# after torch and numba).
EXIT_MARGIN_S = 10.0


def test_compose_lets_the_server_drain_before_it_kills_it(compose):
    """`docker compose stop`/`down` send SIGTERM, then SIGKILL after stop_grace_period (10 s unless
    set). The server gives non-resumable streams --grace (10 s) and then exits: with the default, it
    was killed (exit 137) before its drain ended."""
    server = compose["services"]["server"]
    grace = server_grace_s(server["command"])
    assert grace + EXIT_MARGIN_S <= compose_seconds(server.get("stop_grace_period", "10s"))


def test_readme_docker_run_gives_the_server_time_to_drain(compose):
    """`docker run`'s own default is also 10 s: the README's `docker run` of the image says more."""
    grace = server_grace_s(compose["services"]["server"]["command"])
    runs = [line for line in (DEPLOY / "README.md").read_text().splitlines() if line.startswith("docker run")]
    assert runs
    for line in runs:
        match = re.search(r"--stop-timeout (\d+)", line)
        assert match and grace + EXIT_MARGIN_S <= int(match.group(1)), line


def test_every_extra_with_numba_installs_scipy():
    """numba's np.dot, which the fused step kernel's products call, needs SciPy's BLAS: without it the
    image's build-time warm-up stops (ModuleNotFoundError: scipy) and a server cannot compile the
    kernel. The dev extra pulls SciPy in through jax, so the tests alone would never miss it."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    with_numba = {name: reqs for name, reqs in extras.items() if any(re.match(r"numba\b", r) for r in reqs)}
    assert set(with_numba) >= {"serve", "train"}
    for name, reqs in with_numba.items():
        assert any(re.match(r"scipy\b", req) for req in reqs), name


def test_kubernetes_pods_start_from_the_kernels_the_image_compiled():
    """The pod's root filesystem is read-only and numba cannot use a cache folder it cannot write (the
    image's /opt/numba-cache there: the server stops, "no locator available"), so the server's
    NUMBA_CACHE_DIR is on the /tmp emptyDir. Empty, it cost every pod a compile of the scan kernels at
    start and of the fused step kernels at its first session (a first rollout of 16.9 s instead of
    1.3 s in Docker): an init container of the same image copies the image's cache there first."""
    image_cache = re.search(r"^ENV NUMBA_CACHE_DIR=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "server")
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    cache = {e["name"]: e.get("value") for e in server["env"]}["NUMBA_CACHE_DIR"]
    assert not Path(cache).is_relative_to(image_cache)

    def mount_of(container: dict, path: str) -> dict:
        mounts = [m for m in container.get("volumeMounts", []) if Path(path).is_relative_to(m["mountPath"])]
        assert mounts, f"{container['name']} has no volume at {path}"
        return max(mounts, key=lambda m: len(m["mountPath"]))

    server_mount = mount_of(server, cache)
    assert not server_mount.get("readOnly")
    copiers = [c for c in pod.get("initContainers", []) if image_cache in " ".join(c.get("command", []))]
    assert len(copiers) == 1, "no init container copies the image's numba cache"
    copier = copiers[0]
    assert copier["image"] == server["image"], "the cache is only valid for the same image's package"
    script = " ".join(copier["command"])
    assert re.search(rf"cp -a {re.escape(image_cache)}/\. {re.escape(cache)}/?(\s|$)", script), script
    assert f"mkdir -p {cache}" in script
    copier_mount = mount_of(copier, cache)
    assert copier_mount["name"] == server_mount["name"]
    assert copier_mount["mountPath"] == server_mount["mountPath"] and not copier_mount.get("readOnly")
    assert copier["securityContext"]["readOnlyRootFilesystem"] is True
    assert copier["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_the_image_holds_the_pretrained_store_where_bootstrap_looks():
    """deploy/pretrained is copied beside bootstrap.py, which is where its default --pretrained points
    and what compose passes; no dockerignore pattern drops a file of it."""
    import fnmatch

    copies = {
        rest.split()[-1]: rest.split()[:-1] for instr, rest in dockerfile_instructions() if instr == "COPY"
    }
    assert copies["/opt/dmm/pretrained"] == ["deploy/pretrained"]
    assert "deploy/bootstrap.py" in copies["/opt/dmm/"] and "deploy/train_online.py" in copies["/opt/dmm/"]
    assert load_module("bootstrap").DEFAULT_PRETRAINED == DEPLOY / "pretrained"
    env = yaml.safe_load(COMPOSE.read_text())["services"]["bootstrap"]["environment"]
    assert env["DMM_BOOTSTRAP_PRETRAINED"] == "/opt/dmm/pretrained"
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    probes = ["deploy/pretrained/README.md"] + [
        f"deploy/pretrained/hopper-medium-sim-v4/1/{f}"
        for f in ("model.safetensors", "config.json", "metrics.json", "checksums.sha256", "curve.png")
    ]
    for probe in probes:
        parts = probe.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # a pattern drops a folder too
        for pattern in patterns:
            anchored = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
            anywhere = pattern.startswith("**/") and any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
            assert not (anchored or anywhere), f"{pattern!r} in Dockerfile.dockerignore excludes {probe}"


def test_compose_build_context_and_dockerfile_exist(compose):
    built = [name for name, svc in compose["services"].items() if "build" in svc]
    assert {"bootstrap", "server", "trainer", "train-online"} <= set(built)
    for name in built:
        build = compose["services"][name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context must be the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        args = {k: interpolate(v) for k, v in build["args"].items()}
        assert args["BASE_IMAGE"] == "python:3.11-slim"
    images = {interpolate(compose["services"][name]["image"]) for name in built}
    assert len(images) == 1, f"bootstrap, server, trainer and train-online must share one image, got {images}"


def test_compose_volumes_and_bind_mounts_exist(compose):
    declared = set(compose["volumes"])
    used = set()
    for name, service in compose["services"].items():
        for spec in service.get("volumes", []):
            parts = spec.split(":")
            assert len(parts) in (2, 3), f"{name}: bad volume {spec!r}"
            source, target = parts[:2]
            assert target.startswith("/"), f"{name}: container path {target!r} must be absolute"
            if len(parts) == 3:
                assert parts[2] in ("ro", "rw"), f"{name}: bad mode in {spec!r}"
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: bind mount source {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"
    store_mounts = {
        name: [v for v in svc.get("volumes", []) if v.split(":")[1] == "/models"]
        for name, svc in compose["services"].items()
    }
    for name in ("bootstrap", "server", "trainer", "train-online"):
        assert store_mounts[name] == ["models:/models"], f"{name} must mount the shared store volume"


def test_compose_ports_match_the_server_command_and_do_not_clash(compose):
    services = compose["services"]
    grpc_port, metrics_port = serve_ports(services["server"]["command"])
    assert services["server"]["command"][services["server"]["command"].index("--store") + 1] == "/models"
    published = {}
    for name, service in services.items():
        for spec in service.get("ports", []):
            host, container = (int(p) for p in spec.split(":"))
            assert host not in published, f"host port {host} published by {published.get(host)} and {name}"
            published[host] = name
            if name == "server":
                assert container in (grpc_port, metrics_port)
    assert published[50051] == "server" and published[9090] == "server"
    assert published[3000] == "grafana"


def test_grafana_is_provisioned_with_anonymous_read_only_viewer(compose):
    grafana = compose["services"]["grafana"]
    env = {k: interpolate(str(v)) for k, v in grafana["environment"].items()}
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounts = dict(bind_mounts(grafana))
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_target = mounts["./grafana/dashboards"]
    home = Path(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home.parent == Path(dashboards_target)
    assert (DASHBOARDS / home.name).is_file()

    provider = yaml.safe_load((PROVISIONING / "dashboards" / "dmm.yml").read_text())["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == dashboards_target, "provider must read the mounted dashboards"


def test_grafana_datasource_points_at_the_compose_prometheus(compose, dashboard):
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][
        0
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    command = compose["services"]["prometheus"]["command"]
    assert not any(a.startswith("--web.listen-address") for a in command), "Prometheus must listen on 9090"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == datasource["uid"]


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_is_multi_stage_with_a_base_image_argument():
    instructions = dockerfile_instructions()
    args = {rest.split("=")[0]: rest.partition("=")[2] for instr, rest in instructions if instr == "ARG"}
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    stages = [rest for instr, rest in instructions if instr == "FROM"]
    assert len(stages) >= 2
    assert stages[-1].startswith("${BASE_IMAGE}"), "the runtime stage must use the BASE_IMAGE argument"
    assert any("--from=build" in rest for instr, rest in instructions if instr == "COPY")


def test_dockerfile_pins_torch_and_runs_dmm_serve_as_non_root():
    instructions = dockerfile_instructions()
    runs = " ".join(rest for instr, rest in instructions if instr == "RUN")
    installs = re.findall(r"pip install ([^;&|]*)", runs)
    torch_installs = [arg for cmd in installs for arg in cmd.split() if arg.startswith("torch")]
    assert torch_installs == ["torch==2.13.0"]
    torch_install = next(cmd for cmd in installs if "torch==" in cmd)
    assert "--index-url" in torch_install and "--extra-index-url" not in runs  # never PyPI's CUDA torch
    assert "torch.version.cuda" in runs  # the build checks which torch it got


def test_dockerfile_warms_the_numba_cache_for_the_installed_package():
    """numba keys its cache by source path: the warm-up must import site-packages, not /src/dmm."""
    instructions = dockerfile_instructions()
    stages = [i for i, (instr, _) in enumerate(instructions) if instr == "FROM"]
    build = instructions[stages[0] : stages[1]]
    workdir = [rest for instr, rest in build if instr == "WORKDIR"][-1]
    warm_up = next(rest for instr, rest in build if instr == "RUN" and "warm_up" in rest)
    assert workdir == "/" and "/opt/venv/" in warm_up
    users = [rest for instr, rest in instructions if instr == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert json.loads(dict(instructions)["ENTRYPOINT"]) == ["dmm", "serve"]
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd[cmd.index("--store") + 1] == "/models"
    assert json.loads(dict(instructions)["VOLUME"]) == ["/models"]
    exposed = {int(p) for p in dict(instructions)["EXPOSE"].split()}
    assert exposed == set(serve_ports(cmd))


def test_dockerfile_healthcheck_uses_the_grpc_health_service():
    instructions = dockerfile_instructions()
    healthcheck = dict(instructions)["HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[0] == "python" and command[1] == "/opt/dmm/healthcheck.py"
    assert "DMM_HEALTH_TARGET" not in dict(instructions)["ENV"]  # it follows the server's --port


def test_healthcheck_follows_the_port_the_server_was_started_with(tmp_path, monkeypatch):
    healthcheck = load_module("healthcheck")
    monkeypatch.delenv("DMM_HEALTH_TARGET", raising=False)
    cmdline = tmp_path / "cmdline"
    entry = ["/opt/venv/bin/python", "/opt/venv/bin/dmm", "serve", "--store", "/models"]
    for extra, port in ((["--port", "6000"], 6000), (["--port=7000"], 7000), ([], 50051)):
        cmdline.write_bytes(b"\0".join(a.encode() for a in entry + extra) + b"\0")
        assert healthcheck.default_target(str(cmdline)) == f"127.0.0.1:{port}"
    cmdline.write_bytes(b"bash\0-c\0sleep 1\0")
    assert healthcheck.default_target(str(cmdline)) == "127.0.0.1:50051"  # not a server: the default
    assert healthcheck.default_target(str(tmp_path / "missing")) == "127.0.0.1:50051"
    monkeypatch.setenv("DMM_HEALTH_TARGET", "10.0.0.1:1234")
    assert healthcheck.default_target(str(cmdline)) == "10.0.0.1:1234"


def test_dockerfile_copies_only_files_that_exist_and_are_not_ignored():
    ignored = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [rest for instr, rest in dockerfile_instructions() if instr == "COPY" and "--from" not in rest]
    assert copies
    for rest in copies:
        *sources, _dest = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"
            top = source.split("/")[0]
            assert top not in ignored, f"COPY source {source} is excluded by the dockerignore file"


# ---------------------------------------------------------------------------------------------
# Prometheus


def test_prometheus_scrapes_the_server_metrics_port(compose):
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    _, metrics_port = serve_ports(compose["services"]["server"]["command"])
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"server:{metrics_port}"]
    mounts = dict(bind_mounts(compose["services"]["prometheus"]))
    config_arg = next(
        a for a in compose["services"]["prometheus"]["command"] if a.startswith("--config.file=")
    )
    assert mounts["./prometheus/prometheus.yml"] == config_arg.split("=", 1)[1]


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_prometheus_config_passes_promtool():
    result = subprocess.run(
        ["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Dashboard


def dashboard_exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_versioned_and_every_panel_has_a_query(dashboard):
    assert dashboard["uid"] == "dmm-serving" and isinstance(dashboard["version"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
    refs = [(p["id"], t["refId"]) for p in dashboard["panels"] for t in p["targets"]]
    assert len(refs) == len(set(refs))


def test_dashboard_queries_only_contract_metrics_and_covers_them_all(dashboard):
    used = set()
    for expr in dashboard_exprs(dashboard):
        names = set(re.findall(r"\bdmm_\w+", expr))
        assert names <= SERIES, f"unknown metric in {expr!r}: {names - SERIES}"
        used |= names
    families = {re.sub(r"_(bucket|count|sum)$", "", n) if n.startswith(HISTOGRAMS) else n for n in used}
    assert families == set(HISTOGRAMS) | set(GAUGES) | set(COUNTERS)


def test_dashboard_has_the_required_panels(dashboard):
    exprs = dashboard_exprs(dashboard)
    for quantile, histogram in itertools.product(
        ("0.5", "0.95", "0.99"), ("dmm_act_latency_seconds", "dmm_act_vector_latency_seconds")
    ):
        assert any(
            e.startswith(f"histogram_quantile({quantile},") and f"{histogram}_bucket" in e for e in exprs
        ), f"no {histogram} p{quantile}"
    assert any(re.search(r"rate\(dmm_actions_total\{", e) for e in exprs), "no actions/s panel"
    heatmaps = [p for p in dashboard["panels"] if p["type"] == "heatmap"]
    assert [t["format"] for p in heatmaps for t in p["targets"]] == ["heatmap"]
    assert "dmm_batch_size_bucket" in heatmaps[0]["targets"][0]["expr"]
    assert any("by (code)" in e and "dmm_errors_total" in e for e in exprs), "no errors-by-code panel"


def test_dashboard_model_variable_filters_every_model_labelled_query(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["model"]["allValue"] == ".*" and variables["model"]["includeAll"]
    for expr in dashboard_exprs(dashboard):
        for selector in re.findall(r"\b(dmm_\w+)(\{[^}]*\})?", expr):
            if not selector[0].startswith(SERVER_WIDE):
                assert 'model=~"$model"' in selector[1], f"{selector[0]} not filtered by $model in {expr!r}"


# ---------------------------------------------------------------------------------------------
# healthcheck.py against a real grpc.health.v1 service


@pytest.fixture()
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_healthcheck_reports_serving_and_not_serving(health_server, capsys):
    healthcheck = load_module("healthcheck")
    servicer, target = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main(["--target", target]) == 0
    assert capsys.readouterr().out.strip() == f"{target}: SERVING"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main(["--target", target]) == 1
    assert "NOT_SERVING" in capsys.readouterr().out
    assert healthcheck.main(["--target", target, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().out


def test_healthcheck_fails_for_an_unreachable_server(monkeypatch):
    with socket.socket() as bound_not_listening:  # connections to it are refused
        bound_not_listening.bind(("127.0.0.1", 0))
        monkeypatch.setenv("DMM_HEALTH_TARGET", f"127.0.0.1:{bound_not_listening.getsockname()[1]}")
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "healthcheck.py"), "--timeout", "0.5"],
            capture_output=True,
            text=True,
        )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout or "DEADLINE_EXCEEDED" in result.stdout


# ---------------------------------------------------------------------------------------------
# bootstrap.py's fallback without pre-trained models, against a real store (collect and train
# replaced by recording fakes)


def publish_tiny(store: Path, name: str) -> None:
    import torch

    from dmm.store import ModelStore

    ModelStore(store).publish(name, {"w": torch.zeros(2)}, {"note": "test"})


@pytest.fixture()
def recorded_cli(monkeypatch, tmp_path):
    """Replace dmm.cli.main: record each command; `train` publishes a version like the real one.

    There is no pre-trained store, so the bootstrap takes its fallback: collect, then train.
    """
    monkeypatch.setenv("DMM_BOOTSTRAP_PRETRAINED", str(tmp_path / "no-pretrained"))
    calls: list[list[str]] = []
    behaviour = {"collect": 0, "train": 0, "train_publishes": True}

    def fake_main(argv):
        calls.append(list(argv))
        command = argv[0]
        if command == "collect":
            Path(argv[argv.index("--out") + 1]).write_bytes(b"dataset")
        elif command == "train" and behaviour["train"] == 0 and behaviour["train_publishes"]:
            assert Path(argv[argv.index("--dataset") + 1]).read_bytes() == b"dataset"
            publish_tiny(Path(argv[argv.index("--store") + 1]), argv[argv.index("--name") + 1])
        return behaviour[command]

    import dmm.cli

    monkeypatch.setattr(dmm.cli, "main", fake_main)
    return calls, behaviour


def test_bootstrap_skips_a_store_that_has_a_model(tmp_path, recorded_cli, capsys):
    calls, _ = recorded_cli
    publish_tiny(tmp_path, "existing")
    assert load_module("bootstrap").main(["--store", str(tmp_path)]) == 0
    assert calls == []
    assert "already has existing" in capsys.readouterr().out


def test_bootstrap_collects_then_trains_into_an_empty_store(tmp_path, recorded_cli, monkeypatch):
    calls, _ = recorded_cli
    store = tmp_path / "store"
    monkeypatch.setenv("DMM_BOOTSTRAP_STEPS", "1234")
    monkeypatch.setenv("DMM_BOOTSTRAP_COMPILE", "0")
    bootstrap = load_module("bootstrap")
    argv = [
        "--store",
        str(store),
        "--name",
        "hopper-demo",
        "--updates",
        "7",
        "--seed",
        "3",
        "--eval-episodes",
        "0",
    ]
    assert bootstrap.main(argv) == 0
    assert [c[0] for c in calls] == ["collect", "train"]
    collect, train = calls
    assert collect[collect.index("--env") + 1] == "Hopper-v4"
    assert collect[collect.index("--steps") + 1] == "1234"
    assert collect[collect.index("--seed") + 1] == "3"
    assert Path(collect[collect.index("--policy") + 1]) == DEPLOY / "policies" / "hopper_online_5.npz"
    assert Path(collect[collect.index("--out") + 1]).name == "hopper-demo.hdf5"
    assert train[train.index("--dataset") + 1] == collect[collect.index("--out") + 1]
    assert train[train.index("--name") + 1] == "hopper-demo"
    assert train[train.index("--updates") + 1] == "7"
    assert train[train.index("--eval-episodes") + 1] == "0"
    assert "--no-compile" in train
    assert not Path(collect[collect.index("--out") + 1]).exists(), "the temporary dataset must be removed"
    from dmm.store import ModelStore

    assert ModelStore(store).models() == ["hopper-demo"]


def test_bootstrap_rejects_a_name_the_trainer_cannot_tell_the_env_from(tmp_path, recorded_cli, capsys):
    calls, _ = recorded_cli
    bootstrap = load_module("bootstrap")
    assert bootstrap.main(["--store", str(tmp_path), "--name", "demo"]) == 2
    assert "unknown environment or dataset 'demo'" in capsys.readouterr().err
    assert bootstrap.main(["--store", str(tmp_path), "--name", "walker2d-medium-v2"]) == 2
    assert "Walker2d-v4 dataset name, but the data is collected in Hopper-v4" in capsys.readouterr().err
    assert calls == []


def test_bootstrap_propagates_failures(tmp_path, recorded_cli):
    calls, behaviour = recorded_cli
    bootstrap = load_module("bootstrap")
    behaviour["collect"] = 2
    assert bootstrap.main(["--store", str(tmp_path / "a")]) == 2
    assert [c[0] for c in calls] == ["collect"]
    behaviour["collect"] = 0
    behaviour["train_publishes"] = False
    assert bootstrap.main(["--store", str(tmp_path / "b")]) == 1, "train without a published model must fail"
    assert bootstrap.main(["--store", str(tmp_path / "c"), "--policy", str(tmp_path / "missing.npz")]) == 2


def test_bundled_policy_is_a_d4rl_hopper_reference_policy():
    import numpy as np

    with np.load(DEPLOY / "policies" / "hopper_online_5.npz") as policy:
        assert policy["fc0.weight"].shape == (256, 11)
        assert policy["last_fc.weight"].shape == (3, 256)
        assert policy["last_fc_log_std.weight"].shape == (3, 256)


def test_bootstrap_for_real_serves_a_trained_model(tmp_path):
    """The real collect and train, tiny: the store then has a model that loads as a policy."""
    from dmm.model import load_policy
    from dmm.store import ModelStore

    store = tmp_path / "store"
    argv = ["--store", str(store), "--steps", "300", "--updates", "2", "--eval-episodes", "0", "--no-compile"]
    command = [sys.executable, str(DEPLOY / "bootstrap.py"), *argv, "--pretrained", str(tmp_path / "none")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "now serves hopper-medium-sim-v4" in result.stdout
    policy = load_policy(ModelStore(store), "hopper-medium-sim-v4")
    assert (policy.config.state_dim, policy.config.act_dim) == (11, 3)
    assert policy.meta.env_id == "Hopper-v4"
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert ModelStore(store).versions("hopper-medium-sim-v4") == [1]


def test_bootstrap_without_pretrained_models_prints_the_rollout_that_works(tmp_path, recorded_cli, capsys):
    calls, _ = recorded_cli
    assert load_module("bootstrap").main(["--store", str(tmp_path / "store"), "--eval-episodes", "0"]) == 0
    assert [c[0] for c in calls] == ["collect", "train"]
    out = capsys.readouterr().out
    assert "no pre-trained models in" in out and "training a demonstration model instead" in out
    assert "dmm rollout --target localhost:50051 --env hopper-medium-sim-v4" in out
    assert 'rollout(env="hopper-medium-sim-v4")' in out


def test_bootstrap_prints_the_rollout_the_shipped_score_is_measured_on(tmp_path, monkeypatch, capsys):
    """The printed rollout plays the episodes the pre-trained README's score is a mean over (100): the
    client's default 10 (seeds 0-9) played 67 where the README says 71.4 (measured in the image)."""
    bootstrap = load_module("bootstrap")
    episodes = bootstrap.PRETRAINED_EPISODES
    assert f"--episodes {episodes}" in (DEPLOY / "pretrained" / "README.md").read_text()
    monkeypatch.delenv("DMM_BOOTSTRAP_PRETRAINED", raising=False)
    assert bootstrap.main(["--store", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    command = "dmm rollout --target localhost:50051 --env hopper-medium-sim-v4 --mode recurrent"
    assert f"{command} --episodes {episodes}\n" in out


def test_healthcheck_probes_a_tls_server_with_its_ca_and_a_client_certificate(tmp_path):
    from pki import make_pki

    from dmm.server.testing import ServerProcess

    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    publish_tiny(tmp_path / "store", "tiny")
    tls = ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    client = {"tls_cert": pki / "client.pem", "tls_key": pki / "client.key"}
    args = [*tls, "--tls-client-ca", str(pki / "ca.pem"), "--auth-token-file", str(_tokens(tmp_path))]
    with ServerProcess(tmp_path / "store", args, channel={"tls_ca": pki / "ca.pem", **client}) as server:
        healthcheck = load_module("healthcheck")
        target = f"127.0.0.1:{server.port}"
        probe = ["--target", target, "--tls-ca", str(pki / "ca.pem")]
        assert (
            healthcheck.main(
                [*probe, "--tls-cert", str(client["tls_cert"]), "--tls-key", str(client["tls_key"])]
            )
            == 0
        )
        assert healthcheck.main(probe) == 1  # mutual TLS: no client certificate, no answer
        assert healthcheck.main(["--target", target]) == 1  # plaintext against TLS


def _tokens(folder: Path) -> Path:
    path = folder / "tokens"
    path.write_text("a-token\n")
    return path
