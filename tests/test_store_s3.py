"""S3 model store against a local S3 server (moto): round trip, checksums, a killed writer, racing
writers, errors, ``dmm train`` into S3 and a server that picks up new versions from S3."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from conftest import write_hdf5
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from serving_fixtures import Stream, publish_tiny
from werkzeug.serving import make_server

from dmm.server.testing import ServerProcess
from dmm.store import CorruptVersionError, ModelStore, StoreError, VersionNotFoundError, open_store
from dmm.store.s3 import S3ModelStore
from dmm.v1 import policy_pb2, policy_pb2_grpc


class _OneRequestAtATime:
    """moto checks ``If-None-Match`` and then writes, in two steps; S3 does both atomically. Serving
    one request at a time gives the test server S3's guarantee for racing conditional writes."""

    def __init__(self, app: DomainDispatcherApplication) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict, start_response: object) -> list[bytes]:
        with self.lock:
            return list(self.app(environ, start_response))


class _QuietHandler(MotoRequestHandler):
    def log_request(self, *args: object, **kwargs: object) -> None:
        pass


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A local S3-compatible server (moto) on a free port, for the whole module."""
    app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.fixture
def aws_env(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The standard AWS variables pointing at the test server (and nothing of this machine's own
    AWS configuration); the download cache in ``tmp_path``, which is returned."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cache = tmp_path / "cache"
    monkeypatch.setenv("DMM_STORE_CACHE", str(cache))
    return cache


@pytest.fixture
def url(aws_env: Path) -> str:
    """A store URL in a new, empty bucket of the test server."""
    import s3fs

    bucket = f"models-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/team/policies"


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(8, 4, generator=gen), "steps": torch.arange(5)}


def _publish(store: S3ModelStore, name: str = "hopper", seed: int = 0, **kwargs: object) -> int:
    return store.publish(name, _tensors(seed), {"seed": seed}, **kwargs)


def _keys(store: S3ModelStore, *parts: str | int) -> set[str]:
    """Keys under ``parts``, relative to the store's prefix."""
    start = len(store.key()) + 1
    return {key[start:] for key in store.fs.find(store.key(*parts) + "/")}


def test_publish_list_load_round_trip_and_the_cache(url: str, aws_env: Path) -> None:
    store = open_store(url)
    assert isinstance(store, S3ModelStore) and store.root == url
    assert (store.models(), store.versions("hopper")) == ([], [])
    assert _publish(store, seed=1, metrics={"score": 61.5}, files={"notes.txt": b"hi"}) == 1
    assert _publish(store, seed=2) == 2
    assert _publish(store, "walker", seed=3) == 1
    assert store.models() == ["hopper", "walker"]
    assert (store.versions("hopper"), store.latest("hopper"), store.resolve("hopper", "1")) == ([1, 2], 2, 1)
    assert _keys(store, "hopper", 1) == {
        f"hopper/1/{f}"
        for f in (
            ".claim",
            "model.safetensors",
            "config.json",
            "metrics.json",
            "notes.txt",
            "checksums.sha256",
        )
    }

    ckpt = store.load("hopper", 1)
    assert (ckpt.name, ckpt.version, ckpt.config, ckpt.metrics) == ("hopper", 1, {"seed": 1}, {"score": 61.5})
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in _tensors(1).items())
    cached = aws_env / url.removeprefix("s3://") / "hopper" / "1"
    assert ckpt.path == cached and (cached / "notes.txt").read_bytes() == b"hi"
    assert ModelStore(aws_env / url.removeprefix("s3://")).versions("hopper") == [1]  # a local store
    assert open_store(url).read_config("hopper") == {"seed": 2}

    # A cached version is not downloaded again: it loads with its remote weights gone.
    store.fs.rm(store.key("hopper", 1, "model.safetensors"))
    assert torch.equal(store.load("hopper", 1).tensors["steps"], torch.arange(5))


def test_checksums_are_verified_and_a_damaged_cache_is_fetched_again(url: str, aws_env: Path) -> None:
    store = open_store(url)
    _publish(store, seed=1)
    _publish(store, seed=2)
    weights = store.key("hopper", 2, "model.safetensors")
    data = bytearray(store.fs.cat_file(weights))
    data[-1] ^= 0xFF
    store.fs.pipe_file(weights, bytes(data))
    with pytest.raises(CorruptVersionError, match=f"{url}/hopper/2/model.safetensors fails its sha256"):
        store.load("hopper", 2)
    assert not (aws_env / url.removeprefix("s3://") / "hopper" / "2").exists()  # never cached

    cached = store.load("hopper", 1).path / "config.json"
    cached.write_text('{"seed": 666}')  # damage on disk after the download
    assert store.load("hopper", 1).config == {"seed": 1}

    store.fs.pipe_file(store.key("hopper", 3, "checksums.sha256"), b"not a manifest\n")
    assert store.versions("hopper") == [1, 2]
    with pytest.raises(CorruptVersionError, match=r"hopper/3/checksums\.sha256 line 1 is malformed"):
        store.resolve("hopper", 3)


_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from dmm.store import open_store

    store = open_store(sys.argv[1])
    put_file = store.fs.put_file

    def put_or_die(local, remote, **kwargs):
        if remote.endswith("/checksums.sha256"):  # every other file is uploaded: die before the manifest
            os.kill(os.getpid(), signal.SIGKILL)
        return put_file(local, remote, **kwargs)

    store.fs.put_file = put_or_die
    store.publish("hopper", {"w": torch.ones(3)}, {"killed": True})
    """
)


def test_a_writer_killed_mid_upload_leaves_nothing_listed(url: str) -> None:
    store = open_store(url)
    _publish(store, seed=1)
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, url], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert {"hopper/2/.claim", "hopper/2/model.safetensors"} <= _keys(store, "hopper", 2)

    assert (store.versions("hopper"), store.latest("hopper")) == ([1], 1)
    with pytest.raises(VersionNotFoundError, match="has no version 2; available versions: 1"):
        store.load("hopper", 2)
    assert _publish(store, seed=3) == 3  # the killed writer's number is never reused
    assert store.versions("hopper") == [1, 3]
    assert store.prune_stale(older_than_s=3600) == []
    assert store.prune_stale(older_than_s=0) == [f"{url}/hopper/2"]
    assert _keys(store, "hopper", 2) == set()
    assert store.load("hopper").config == {"seed": 3}


def test_racing_writers_get_distinct_complete_versions(url: str) -> None:
    """Every writer lists the store before any claims a number, so all of them race for version 1."""
    writers = 4
    listed = threading.Barrier(writers)
    got: dict[int, int] = {}

    def write(seed: int) -> None:
        store = open_store(url)
        scan = store.scan

        def scan_then_wait(name: str) -> dict:
            found = scan(name)
            listed.wait(timeout=30)
            return found

        store.scan = scan_then_wait
        got[seed] = _publish(store, seed=seed)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got.values()) == [1, 2, 3, 4]
    store = open_store(url)
    assert store.versions("hopper") == [1, 2, 3, 4]
    for seed, version in got.items():
        ckpt = store.load("hopper", version)
        assert ckpt.config == {"seed": seed}
        assert torch.equal(ckpt.tensors["embed.weight"], _tensors(seed)["embed.weight"])


def test_a_service_that_ignores_conditional_writes_takes_no_versions(url: str) -> None:
    store = open_store(url)
    pipe_file = store.fs.pipe_file

    def unconditional(path: str, data: bytes, mode: str = "overwrite", **kwargs: object) -> None:
        pipe_file(path, data, **kwargs)

    store.fs.pipe_file = unconditional
    with pytest.raises(StoreError, match=r"ignores conditional writes \(If-None-Match\)"):
        _publish(store)
    assert _keys(store, "hopper") == set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unusable_store_is_one_clear_error(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for bad, words in (
        ("s3://", "is not an S3 bucket name"),
        ("s3://Bad_Bucket/x", "'Bad_Bucket' is not an S3 bucket name"),
        ("s3://bucket/a//b", "prefix part '' is not allowed"),
        ("s3://bucket/../b", "prefix part '..' is not allowed"),
        ("gs://bucket/x", "unsupported URL; use a local folder or s3://bucket/prefix"),
    ):
        with pytest.raises(StoreError, match=words):
            open_store(bad)
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' of store s3://no-such-bucket/x does not"):
        open_store("s3://no-such-bucket/x")
    with monkeypatch.context() as env:
        env.delenv("AWS_ACCESS_KEY_ID")
        env.delenv("AWS_SECRET_ACCESS_KEY")
        with pytest.raises(StoreError, match="no AWS credentials for store s3://"):
            open_store(url)
    with monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        env.setenv("AWS_MAX_ATTEMPTS", "1")
        with pytest.raises(StoreError, match=r"cannot reach http://127\.0\.0\.1:\d+ for store s3://"):
            open_store(url)


def _dmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dmm.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_the_cli_and_the_server_refuse_a_missing_bucket(aws_env: Path) -> None:
    for command in (["eval", "--name", "hopper"], ["serve", "--port", "0", "--metrics-port", "0"]):
        result = _dmm(*command, "--store", "s3://no-such-bucket/models")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1] == (
            f"dmm {command[0]}: error: bucket 'no-such-bucket' of store s3://no-such-bucket/models does "
            "not exist"
        )


def test_dmm_train_publishes_into_s3_and_dmm_eval_loads_from_it(url: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 200
    terminals = np.zeros(n, dtype=bool)
    terminals[99] = True
    dataset = write_hdf5(
        tmp_path / "hopper-random.hdf5",
        {
            "observations": rng.normal(size=(n, 11)).astype(np.float32),
            "actions": rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
            "rewards": rng.uniform(0, 3, size=n).astype(np.float32),
            "terminals": terminals,
            "timeouts": np.zeros(n, dtype=bool),
        },
    )
    config = tmp_path / "tiny.yaml"
    settings = {"model": {"d_model": 16, "n_layer": 2}, "batch_size": 8, "warmup_updates": 2}
    config.write_text(json.dumps({**settings, "eval_episodes": 0, "compile": False}))
    trained = _dmm(
        *("train", "--dataset", str(dataset), "--store", url, "--config", str(config)),
        *("--updates", "4", "--no-progress"),
    )
    assert trained.returncode == 0, trained.stderr
    assert f"published hopper-random version 1 to {url}" in trained.stdout
    store = open_store(url)
    assert store.versions("hopper-random") == [1]
    assert "hopper-random/1/learning_curve.png" in _keys(store, "hopper-random", 1)
    assert store.load("hopper-random").metrics["updates"] == 4

    evaluated = _dmm(
        *("eval", "--store", url, "--name", "hopper-random", "--episodes", "1", "--num-envs", "1"),
        *("--scan-backend", "torch", "--json", "--no-progress"),  # torch: no numba compilation
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["version"] == 1


def _new_session_version(channel: grpc.Channel) -> int:
    stream = Stream(channel)
    version = stream.start(model="tiny").version
    assert stream.finish() == grpc.StatusCode.OK
    return version


def test_the_server_serves_from_s3_and_picks_up_new_versions(url: str, aws_env: Path) -> None:
    assert publish_tiny(url, seed=0) == 1
    with ServerProcess(url, ["--store-refresh", "0.2"]) as server, grpc.insecure_channel(server.target) as ch:
        running = Stream(ch)
        assert running.start(model="tiny").version == 1
        assert publish_tiny(url, seed=1) == 2
        deadline = time.monotonic() + 20
        while (version := _new_session_version(ch)) == 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert version == 2
        assert running.step(np.zeros(11)).version == 1  # a running session stays on its version
        assert running.finish() == grpc.StatusCode.OK
        listed = policy_pb2_grpc.PolicyServiceStub(ch).ListModels(policy_pb2.ListModelsRequest(), timeout=10)
        assert [(m.name, list(m.versions), m.latest) for m in listed.models] == [("tiny", [1, 2], 2)]
    assert "store=" + url in "".join(server.output)
    cached = aws_env / url.removeprefix("s3://") / "tiny"
    assert sorted(p.name for p in cached.iterdir() if not p.name.startswith(".")) == ["1", "2"]
    assert os.listdir(cached / "2")
