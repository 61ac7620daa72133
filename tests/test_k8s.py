"""Static checks of deploy/k8s/ (no cluster, no kubectl, no network needed).

The kustomization and its optional components are rendered here in Python: the base's resources,
each component's resources and RFC 6902 patches, the `images` and `namespace` fields (the only
kustomize features the files may use, so that this rendering is faithful; where `kubectl` or
`kustomize` is installed, a test also compares it with theirs). Every rendered manifest is
validated against the Kubernetes JSON schemas that kubernetes-validate ships in its wheel (strict:
unknown fields are errors), for the oldest Kubernetes these manifests support and the newest it
knows. The ServiceMonitor (a CRD) is checked by hand. Then the pieces must agree with each other
and with the rest of deploy/: selectors and labels, ports and probes, the server's arguments and
deploy/docker-compose.yml's, the drain period, the Dockerfile's user and writable paths.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions, major_minor
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPONENTS = ("gpu", "servicemonitor", "tls", "auth-token")

# gRPC probes are GA (and PDBs' unhealthyPodEvictionPolicy on by default) from Kubernetes 1.27.
OLDEST_KUBERNETES = "1.27"
# The kustomization fields the Python rendering below implements.
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace"}

NAME = "decision-metamamba"
SELECTOR = {"app.kubernetes.io/name": NAME, "app.kubernetes.io/component": "policy-server"}
COMMON_LABELS = {**SELECTOR, "app.kubernetes.io/part-of": NAME}
HEALTH_SERVICE = "dmm.v1.PolicyService"
# Flags the Deployment adds to deploy/docker-compose.yml's server command.
EXTRA_SERVER_FLAGS = {"--grace", "--log-format"}
# deploy/docker-compose.yml's server command may differ from the Deployment's only in these.
DEPLOYMENT_SPECIFIC_FLAGS = {"--store", "--host"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Everything here must work offline: any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------------------------------------
# rendering: resources, components, RFC 6902 patches, images, namespace


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def read_kustomization(folder: Path, kind: str) -> dict:
    path = folder / "kustomization.yaml"
    assert path.is_file(), f"{folder} has no kustomization.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["kind"] == kind, f"{path}: kind {data['kind']}, expected {kind}"
    expected_api = (
        "kustomize.config.k8s.io/v1alpha1" if kind == "Component" else "kustomize.config.k8s.io/v1beta1"
    )
    assert data["apiVersion"] == expected_api, path
    unsupported = set(data) - KUSTOMIZATION_FIELDS
    assert not unsupported, f"{path}: {sorted(unsupported)} not rendered by this test: extend it"
    return data


def build(folder: Path) -> list[dict]:
    """`kustomize build folder`, for the fields of KUSTOMIZATION_FIELDS."""
    kustomization = read_kustomization(folder, "Kustomization")
    docs: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        docs.extend(build(path) if path.is_dir() else load_docs(path))
    for entry in kustomization.get("components", []):
        component = read_kustomization(folder / entry, "Component")
        own = [doc for r in component.get("resources", []) for doc in load_docs(folder / entry / r)]
        docs = transform(folder / entry, component, docs + own)
    return transform(folder, kustomization, docs)


def transform(folder: Path, kustomization: dict, docs: list[dict]) -> list[dict]:
    docs = copy.deepcopy(docs)
    for patch in kustomization.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{folder}: only file patches with a target are rendered"
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        assert isinstance(operations, list), f"{folder / patch['path']}: write patches as RFC 6902 operations"
        targets = [doc for doc in docs if matches(doc, patch["target"])]
        assert targets, f"{folder}: patch {patch['path']} matches no resource"
        for doc in targets:
            for operation in operations:
                apply_operation(doc, operation)
    for image in kustomization.get("images", []):
        for container in containers(docs):
            container["image"] = retag(container["image"], image)
    if "namespace" in kustomization:
        for doc in docs:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    actual = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    unknown = set(target) - set(actual)
    assert not unknown, f"patch target fields {sorted(unknown)} are not rendered by this test"
    return all(actual[key] == value for key, value in target.items())


def pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def apply_operation(doc: dict, operation: dict) -> None:
    """One RFC 6902 operation (add, replace, remove) on ``doc``, in place."""
    op, parts = operation["op"], pointer(operation["path"])
    parent: Any = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    if op == "add":
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(operation["value"]))
        else:
            parent[last] = copy.deepcopy(operation["value"])
    elif op == "replace":
        key: Any = int(last) if isinstance(parent, list) else last
        assert isinstance(parent, list) or last in parent, f"replace of a missing {operation['path']}"
        parent[key] = copy.deepcopy(operation["value"])
    elif op == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise AssertionError(f"operation {op!r} is not rendered by this test")


def split_image(image: str) -> tuple[str, str]:
    """(name, ':tag' or '@digest' or '')."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    name, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        return name, ":" + tag
    return image, ""


def retag(image: str, rule: dict) -> str:
    name, suffix = split_image(image)
    if name != rule["name"]:
        return image
    if "digest" in rule:
        suffix = "@" + rule["digest"]
    elif "newTag" in rule:
        suffix = ":" + str(rule["newTag"])
    return rule.get("newName", name) + suffix


def containers(docs: list[dict]) -> list[dict]:
    pod_specs = [d["spec"]["template"]["spec"] for d in docs if d["kind"] == "Deployment"]
    return [c for spec in pod_specs for c in spec.get("containers", []) + spec.get("initContainers", [])]


def write_overlay(folder: Path, components: tuple[str, ...], **fields: Any) -> Path:
    """An overlay of deploy/k8s in ``folder`` (kustomize wants relative paths) with ``components``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = os.path.relpath(K8S, folder)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [base],
        "components": [f"{base}/{name}" for name in components],
        **fields,
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return folder


# Each configuration: (components, overlay fields). "base" is deploy/k8s itself.
CONFIGURATIONS: dict[str, tuple[tuple[str, ...], dict]] = {
    "base": ((), {}),
    **{name: ((name,), {}) for name in COMPONENTS},
    "everything": (
        COMPONENTS,
        {
            "namespace": "dmm",
            "images": [
                {"name": NAME, "newName": "registry.example.com/decision-metamamba", "newTag": "0.1.0"}
            ],
        },
    ),
}


@pytest.fixture(scope="module")
def overlays(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("overlays")
    folders = {"base": K8S}
    for name, (components, fields) in CONFIGURATIONS.items():
        if name != "base":
            folders[name] = write_overlay(root / name, components, **fields)
    return folders


@pytest.fixture(scope="module")
def renders(overlays) -> dict[str, list[dict]]:
    return {name: build(folder) for name, folder in overlays.items()}


def one(docs: list[dict], kind: str, name: str = NAME) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def server(docs: list[dict]) -> dict:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["server"]
    return pod["containers"][0]


def flags(args: list[str]) -> dict[str, str]:
    """{--flag: value} of a `dmm serve` argument list (every flag takes a value)."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        assert flag.startswith("--"), f"unexpected argument {flag!r} in {args}"
        if "=" in flag:
            name, value = flag.split("=", 1)
            i += 1
        else:
            name, value = flag, args[i + 1]
            i += 2
        assert name not in out, f"{name} given twice in {args}"
        out[name] = value
    return out


def serve_flags_of_the_cli() -> set[str]:
    """Every long option ``dmm serve`` accepts, read from its parser."""
    import argparse

    from dmm.server.cli import register

    subparsers = argparse.ArgumentParser().add_subparsers()
    register(subparsers)
    serve = subparsers.choices["serve"]
    return {flag for action in serve._actions for flag in action.option_strings if flag.startswith("--")}


def quantity(value: str | int) -> float:
    """A Kubernetes resource quantity as a number (cpu in cores, memory in bytes)."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match and (not match.group(2) or match.group(2) in units), f"quantity {value!r}"
    return float(match.group(1)) * units.get(match.group(2), 1)


# ---------------------------------------------------------------------------------------------
# the files


def test_every_file_is_listed_and_every_listed_file_exists():
    listed: set[Path] = set()
    folders = [K8S, *(K8S / name for name in COMPONENTS)]
    for folder in folders:
        kind = "Kustomization" if folder == K8S else "Component"
        kustomization = read_kustomization(folder, kind)
        listed.add(folder / "kustomization.yaml")
        for entry in kustomization.get("resources", []):
            assert (folder / entry).is_file(), f"{folder}: resource {entry} does not exist"
            listed.add(folder / entry)
        for patch in kustomization.get("patches", []):
            assert (folder / patch["path"]).is_file(), f"{folder}: patch {patch['path']} does not exist"
            listed.add(folder / patch["path"])
    on_disk = {p for p in K8S.rglob("*") if p.is_file()}
    assert on_disk == listed, f"files no kustomization uses: {sorted(map(str, on_disk - listed))}"
    assert {p.name for p in K8S.iterdir() if p.is_dir()} == set(COMPONENTS)
    for path in listed:
        assert load_docs(path), f"{path} is empty"


def test_the_base_needs_no_crd_and_no_component(renders):
    """A plain cluster (no Prometheus Operator) applies `kubectl apply -k deploy/k8s` as it is."""
    assert "components" not in read_kustomization(K8S, "Kustomization")
    assert sorted((d["kind"], d["metadata"]["name"]) for d in renders["base"]) == [
        ("Deployment", NAME),
        ("PersistentVolumeClaim", f"{NAME}-models"),
        ("PodDisruptionBudget", NAME),
        ("Service", NAME),
        ("Service", f"{NAME}-headless"),
    ]
    kinds = {d["kind"] for d in renders["servicemonitor"]}
    assert "ServiceMonitor" in kinds and "ServiceMonitor" not in {d["kind"] for d in renders["base"]}


# ---------------------------------------------------------------------------------------------
# Kubernetes' schemas (bundled in kubernetes-validate: no download)


def schema_versions() -> list[str]:
    """The oldest supported Kubernetes (or the oldest the package knows, if it dropped it) and the newest."""
    known = sorted({major_minor(v) for v in all_versions()}, key=Version)
    oldest = next(v for v in known if Version(v) >= Version(OLDEST_KUBERNETES))
    return sorted({oldest, known[-1]}, key=Version)


@pytest.mark.parametrize("version", schema_versions())
@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_manifests_validate_against_the_kubernetes_schemas(renders, configuration, version):
    docs = [d for d in renders[configuration] if d["kind"] != "ServiceMonitor"]
    assert docs
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            where = ".".join(map(str, err.path))
            pytest.fail(f"{configuration}: {doc['kind']}/{doc['metadata']['name']} at {where}: {err.message}")


def test_the_schema_validation_is_strict(renders):
    """A misspelt field or a wrong type is an error (not silently ignored as an unknown field)."""
    version = schema_versions()[0]
    deployment = copy.deepcopy(one(renders["base"], "Deployment"))
    kubernetes_validate.validate(deployment, version, strict=True)
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["grpc"]["servce"] = probe["grpc"].pop("service")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)
    probe["grpc"] = {"port": "grpc"}  # gRPC probes take a port number, not a name
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, version, strict=True)


DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)


def seconds(duration: str) -> float:
    units = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", duration))


def test_servicemonitor_has_the_crds_required_structure(renders):
    """monitoring.coreos.com/v1 ServiceMonitor (Prometheus Operator): no built-in schema, so by hand."""
    docs = renders["servicemonitor"]
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", monitor["metadata"]["name"])
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "endpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"} and spec["selector"]
    assert all(isinstance(v, str) for v in spec["selector"].get("matchLabels", {}).values())
    assert isinstance(spec["endpoints"], list) and spec["endpoints"]
    endpoint_fields = {"port", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels"}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= endpoint_fields, sorted(set(endpoint) - endpoint_fields)
        assert isinstance(endpoint["port"], str), "port names a Service port"
        assert endpoint["path"].startswith("/")
        assert endpoint["scheme"] in ("http", "https")
        assert DURATION.match(endpoint["interval"]) and DURATION.match(endpoint["scrapeTimeout"])
        assert seconds(endpoint["scrapeTimeout"]) <= seconds(endpoint["interval"])
        # it scrapes exactly one Service (else every pod would be scraped twice), the server's metrics
        selected = [
            d
            for d in docs
            if d["kind"] == "Service"
            and spec["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
            and endpoint["port"] in {p["name"] for p in d["spec"]["ports"]}
        ]
        assert [d["metadata"]["name"] for d in selected] == [NAME]
        port = next(p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"])
        assert port["port"] == int(flags(server(docs)["args"])["--metrics-port"])
        prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        assert endpoint["path"] == prometheus["scrape_configs"][0]["metrics_path"]


# ---------------------------------------------------------------------------------------------
# the pieces agree with each other


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_labels_and_selectors_agree(renders, configuration):
    docs = renders[configuration]
    for doc in docs:
        labels = doc["metadata"].get("labels", {})
        assert COMMON_LABELS.items() <= labels.items(), f"{doc['kind']}/{doc['metadata']['name']}: {labels}"
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert COMMON_LABELS.items() <= pod_labels.items()
    assert deployment["spec"]["selector"] == {"matchLabels": SELECTOR}
    assert SELECTOR.items() <= pod_labels.items()
    for service in (d for d in docs if d["kind"] == "Service"):
        assert service["spec"]["selector"] == SELECTOR, service["metadata"]["name"]
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"] == deployment["spec"]["selector"]
    for constraint in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert constraint["labelSelector"] == deployment["spec"]["selector"]


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_ports_probes_and_arguments_agree(renders, configuration):
    docs = renders[configuration]
    container = server(docs)
    args = flags(container["args"])
    unknown = set(args) - serve_flags_of_the_cli()
    assert not unknown, f"not `dmm serve` options: {unknown}"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": int(args["--port"]), "metrics": int(args["--metrics-port"])}
    for service in (d for d in docs if d["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"
            assert port["port"] == ports[port["targetPort"]] and port["name"] == port["targetPort"]
        assert service["spec"]["ports"][0]["name"] == "grpc"
        assert service["spec"]["ports"][0]["appProtocol"] == "grpc"
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        if "grpc" in probe:
            assert probe["grpc"]["port"] == ports["grpc"], kind
        else:
            assert configuration in ("tls", "everything"), f"{kind}: only TLS replaces the gRPC probes"
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 120


def test_probes_ask_the_health_service_of_the_policy_service_and_of_the_server(renders):
    proto = (ROOT / "proto" / "dmm" / "v1" / "policy.proto").read_text()
    package = re.search(r"^package ([\w.]+);", proto, re.M).group(1)
    service = re.search(r"^service (\w+)", proto, re.M).group(1)
    assert f"{package}.{service}" == HEALTH_SERVICE
    container = server(renders["base"])
    assert container["startupProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    assert container["livenessProbe"]["grpc"]["service"] == ""  # the server as a whole
    # slow to give up on a live server: a saturated one answers late
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60


def compose_server_args() -> list[str]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return compose["services"]["server"]["command"]


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_server_arguments_are_compose_s_apart_from_store_and_host(renders, configuration):
    compose = flags(compose_server_args())
    k8s = flags(server(renders[configuration])["args"])
    added = {
        "base": set(),
        "servicemonitor": set(),
        "gpu": {"--device"},
        "tls": {"--tls-cert", "--tls-key"},
        "auth-token": {"--auth-token-file"},
        "everything": {"--device", "--tls-cert", "--tls-key", "--auth-token-file"},
    }[configuration]
    assert set(k8s) == set(compose) | EXTRA_SERVER_FLAGS | added
    for flag, value in compose.items():
        if flag not in DEPLOYMENT_SPECIFIC_FLAGS:
            assert k8s[flag] == value, f"{flag}: {k8s[flag]} here, {value} in docker-compose.yml"


def test_the_drain_fits_in_the_termination_grace_period(renders):
    """preStop sleep (endpoints removed first), then SIGTERM and --grace of draining, then the exit."""
    pod = one(renders["base"], "Deployment")["spec"]["template"]["spec"]
    container = server(renders["base"])
    grace = float(flags(container["args"])["--grace"])
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and len(sleep) == 2
    assert 0 < grace < pod["terminationGracePeriodSeconds"]
    assert float(sleep[1]) + grace + 5 <= pod["terminationGracePeriodSeconds"]


def dockerfile_text() -> str:
    return re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())


def test_security_context_matches_the_image(renders):
    dockerfile = dockerfile_text()
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)[-1]
    uid = int(re.search(rf"useradd .*--uid (\d+) .*\b{user}\b", dockerfile).group(1))
    pod = one(renders["base"], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsGroup"] == uid
    assert pod["automountServiceAccountToken"] is False
    container = server(renders["base"])
    assert "command" not in container, "the image's ENTRYPOINT is `dmm serve`: give only args"
    assert re.search(r'^ENTRYPOINT \["dmm", "serve"\]', dockerfile, re.M)
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", dockerfile, re.M).group(1).split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_read_only_root_filesystem_leaves_the_server_what_it_writes(renders, configuration):
    """numba's kernel cache, the GPU kernel caches and --workers' metrics folder (tempfile: /tmp)
    must be on writable volumes; everything else the server only reads."""
    docs = renders[configuration]
    container = server(docs)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    writable = [m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")]
    for path in writable:
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
        assert "emptyDir" in volumes[mount["name"]], f"{path} is writable but not scratch space"
    assert "/tmp" in writable
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert "TMPDIR" not in env
    caches = {name: value for name, value in env.items() if name.endswith(("_CACHE_DIR", "_CACHE_PATH"))}
    assert "NUMBA_CACHE_DIR" in caches
    for name, value in caches.items():
        assert any(Path(value).is_relative_to(p) for p in writable), f"{name}={value} is not writable"


def test_store_is_a_read_only_claim_mounted_where_the_server_reads_it(renders):
    docs = renders["base"]
    claim = one(docs, "PersistentVolumeClaim", f"{NAME}-models")
    assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    container = server(docs)
    store = flags(container["args"])["--store"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == store)
    assert mount["readOnly"] is True
    assert re.search(rf'^VOLUME \["{store}"\]', dockerfile_text(), re.M), "the image's store volume"
    volume = next(
        v
        for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mount["name"]
    )
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}


def test_replicas_disruption_budget_and_resources(renders):
    deployment = one(renders["base"], "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert one(renders["base"], "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    for configuration in ("base", "gpu"):
        resources = server(renders[configuration])["resources"]
        for name in ("cpu", "memory"):
            assert quantity(resources["requests"][name]) <= quantity(resources["limits"][name]), name
    threads = next(e for e in server(renders["base"])["env"] if e["name"] == "OMP_NUM_THREADS")
    assert threads["valueFrom"]["resourceFieldRef"] == {
        "containerName": "server",
        "resource": "limits.cpu",
        "divisor": "1",
    }


def test_services_plain_and_headless(renders):
    docs = renders["base"]
    plain, headless = one(docs, "Service"), one(docs, "Service", f"{NAME}-headless")
    assert plain["spec"]["type"] == "ClusterIP" and "clusterIP" not in plain["spec"]
    assert [p["name"] for p in plain["spec"]["ports"]] == ["grpc", "metrics"]
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]  # not scraped a second time


def test_image_is_a_placeholder_that_kustomize_images_overrides(renders):
    assert server(renders["base"])["image"] == f"{NAME}:latest"
    assert load_docs(K8S / "deployment.yaml")[0]["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"{NAME}:latest"
    )
    assert [i["name"] for i in read_kustomization(K8S, "Kustomization")["images"]] == [NAME]
    assert server(renders["everything"])["image"] == "registry.example.com/decision-metamamba:0.1.0"
    assert {d["metadata"]["namespace"] for d in renders["everything"]} == {"dmm"}


# ---------------------------------------------------------------------------------------------
# the components


def test_gpu_component(renders):
    container = server(renders["gpu"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert flags(container["args"])["--device"] == "cuda"
    assert container["image"] == f"{NAME}:cuda"  # deploy/README.md's CUDA image tag
    assert "-t decision-metamamba:cuda" in (DEPLOY / "README.md").read_text()
    pod = one(renders["gpu"], "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nvidia.com/gpu" not in server(renders["base"])["resources"]["limits"]


def secret_mounts(docs: list[dict]) -> dict[str, str]:
    """{mount path: secret name} of the server container."""
    container = server(docs)
    volumes = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
        for m in container["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }


def load_healthcheck():
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DEPLOY / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tls_component_serves_tls_and_probes_over_it(renders):
    docs = renders["tls"]
    container = server(docs)
    mounts = secret_mounts(docs)
    assert mounts == {"/etc/dmm/tls": f"{NAME}-tls"}
    args = flags(container["args"])
    for flag in ("--tls-cert", "--tls-key"):
        assert Path(args[flag]).parent == Path("/etc/dmm/tls"), flag
    assert "--tls-client-ca" not in args
    healthcheck = load_healthcheck()
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    health_env = {f"DMM_HEALTH_{name.upper()}" for name in healthcheck.TLS_OPTIONS}
    assert {name for name in env if name.startswith("DMM_HEALTH_")} <= health_env
    assert Path(env["DMM_HEALTH_TLS_CA"]).parent == Path("/etc/dmm/tls")
    assert re.search(r"^COPY deploy/healthcheck\.py .*/opt/dmm/", dockerfile_text(), re.M)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert "grpc" not in probe, f"{kind}: the kubelet's gRPC probe speaks plaintext only"
        command = probe["exec"]["command"]
        assert command[:2] == ["python", "/opt/dmm/healthcheck.py"]
        options = flags(command[2:])
        assert set(options) <= {"--service", "--timeout"}
        expected = "" if kind == "livenessProbe" else HEALTH_SERVICE
        assert options.get("--service", "") == expected, kind
        assert float(options.get("--timeout", 3.0)) < probe["timeoutSeconds"], kind


def test_auth_token_component(renders):
    docs = renders["auth-token"]
    container = server(docs)
    assert secret_mounts(docs) == {"/etc/dmm/auth": f"{NAME}-tokens"}
    assert Path(flags(container["args"])["--auth-token-file"]).parent == Path("/etc/dmm/auth")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" in container[kind], "health needs no token: the native probes stay"


def test_everything_together(renders):
    docs = renders["everything"]
    assert set(secret_mounts(docs).values()) == {f"{NAME}-tls", f"{NAME}-tokens"}
    mounts = [m["mountPath"] for m in server(docs)["volumeMounts"]]
    assert len(mounts) == len(set(mounts))


# ---------------------------------------------------------------------------------------------
# documentation, and kustomize itself where it is installed


def test_deploy_readme_documents_the_kubernetes_deployment():
    readme = (DEPLOY / "README.md").read_text()
    assert "\n## Kubernetes\n" in readme
    section = readme.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    assert "kubectl apply -k deploy/k8s" in section
    for name in COMPONENTS:
        assert f"deploy/k8s/{name}" in section, name
    for needle in (f"{NAME}-headless", "round_robin", "--workers", f"{NAME}-tls", f"{NAME}-tokens"):
        assert needle in section, needle


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.skipif(kustomize_command() is None, reason="neither kustomize nor kubectl is installed")
@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
def test_rendering_matches_kustomize(overlays, renders, configuration):
    result = subprocess.run(
        [*kustomize_command(), str(overlays[configuration])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in renders[configuration]}
    assert theirs == ours


def test_the_rolling_update_section_matches_the_manifests(renders):
    """What deploy/README.md promises of a rolling update is what the manifests do: readiness follows
    the health the drain turns NOT_SERVING, the preStop sleep, --grace and the termination period it
    names, a surge before any pod goes, and a budget that keeps a replica to resume on."""
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("\n### Rolling updates without losing episodes\n", 1)[1].split("\n## ", 1)[0]
    deployment = one(renders["base"], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = server(renders["base"])
    assert container["readinessProbe"]["grpc"]["service"] == HEALTH_SERVICE
    sleep = container["lifecycle"]["preStop"]["exec"]["command"][1]
    grace = flags(container["args"])["--grace"]
    assert f"sleeps {sleep} s" in section and f"`--grace` ({grace} s)" in section
    assert f"`terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}`" in section
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (1, 0)
    assert "`maxSurge: 1`, `maxUnavailable: 0`" in section
    assert one(renders["base"], "PodDisruptionBudget")["spec"]["minAvailable"] >= 1
    for needle in ("dmm-resume: elsewhere", "Start.resumable", "RolloutResult.failovers", "round_robin"):
        assert needle in section, needle
