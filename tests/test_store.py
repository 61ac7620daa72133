"""Model store: round trip, atomic publish (real killed writers), checksums, concurrency, errors."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from dmm.errors import DMMError
from dmm.store import (
    Checkpoint,
    CorruptVersionError,
    ModelNotFoundError,
    ModelStore,
    StoreError,
    VersionNotFoundError,
)

REQUIRED = ("model.safetensors", "config.json", "metrics.json", "checksums.sha256")


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(8, 4, generator=gen),
        "head.bias": torch.randn(3, generator=gen),
        "steps": torch.arange(5, dtype=torch.int64),
    }


def _publish(store: ModelStore, name: str = "hopper", seed: int = 0, **kwargs) -> int:
    return store.publish(name, _tensors(seed), {"seed": seed, "d_model": 4}, **kwargs)


def test_round_trip_versions_and_latest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    assert store.models() == []
    assert store.versions("hopper") == []
    assert not (tmp_path / "models").exists()  # created on first publish only

    config = {"env": "hopper-medium-v2", "state_mean": [0.5, -1.25], "nested": {"a": [1, 2, None]}}
    metrics = {"normalized_score": 61.5, "steps": 1000}
    assert store.publish("hopper", _tensors(1), config, metrics) == 1
    assert store.publish("hopper", _tensors(2), {"x": 2}) == 2
    assert store.publish("hopper", _tensors(3), {"x": 3}) == 3
    assert store.publish("walker", _tensors(4), {"x": 4}) == 1

    assert store.models() == ["hopper", "walker"]
    assert store.versions("hopper") == [1, 2, 3]
    assert store.latest("hopper") == 3

    ckpt = store.load("hopper", 1)
    assert isinstance(ckpt, Checkpoint)
    assert (ckpt.name, ckpt.version, ckpt.path) == ("hopper", 1, tmp_path / "models" / "hopper" / "1")
    assert ckpt.tensors.keys() == _tensors(1).keys()
    for key, value in _tensors(1).items():
        assert ckpt.tensors[key].dtype == value.dtype
        assert torch.equal(ckpt.tensors[key], value)
    assert ckpt.config == config
    assert ckpt.metrics == metrics
    assert store.load("hopper").version == 3
    assert store.load("hopper").metrics == {}  # metrics default to an empty object
    assert store.read_config("hopper", "2") == {"x": 2}
    assert sorted(os.listdir(ckpt.path)) == sorted(REQUIRED)


def test_resolve_forms(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for seed in range(3):
        _publish(store, seed=seed)
    assert store.resolve("hopper") == 3
    assert store.resolve("hopper", "latest") == 3
    assert store.resolve("hopper", "2") == 2
    assert store.resolve("hopper", " 2 ") == 2
    assert store.resolve("hopper", 1) == 1
    for bad in ("abc", "02", "", 0, -1, True, 1.5, "1.0"):
        with pytest.raises(StoreError, match="invalid version"):
            store.resolve("hopper", bad)  # type: ignore[arg-type]
    assert store.version_path("hopper", 7) == tmp_path / "hopper" / "7"  # pure path arithmetic


def test_non_contiguous_and_tied_tensors_round_trip(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    weight = torch.randn(4, 6)
    tensors = {"w": weight, "tied": weight, "transposed": weight.t(), "row": weight[2], "half": weight.half()}
    store.publish("m", tensors, {})
    loaded = store.load("m").tensors
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value), key
        assert loaded[key].is_contiguous()


def test_extra_files_are_stored_and_checksummed(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n fake image")
    version = _publish(store, files={"learning_curve.png": png, "notes.txt": b"trained on 2 cores\n"})
    path = store.version_path("hopper", version)
    assert (path / "learning_curve.png").read_bytes() == png.read_bytes()
    assert (path / "notes.txt").read_bytes() == b"trained on 2 cores\n"
    listed = (path / "checksums.sha256").read_text().split()
    assert "learning_curve.png" in listed and "notes.txt" in listed
    store.load("hopper")  # verifies

    (path / "learning_curve.png").write_bytes(b"tampered")
    with pytest.raises(CorruptVersionError, match=r"learning_curve\.png"):
        store.load("hopper")
    (path / "notes.txt").unlink()
    (path / "learning_curve.png").write_bytes(png.read_bytes())
    with pytest.raises(CorruptVersionError, match=r"notes\.txt.*missing"):
        store.load("hopper")


@pytest.mark.parametrize(
    "files, message",
    [
        ({"config.json": b"{}"}, "reserved"),
        ({"checksums.sha256": b""}, "reserved"),
        ({"../escape.txt": b"x"}, "invalid extra file name"),
        ({"sub/dir.txt": b"x"}, "invalid extra file name"),
        ({"plot.png": "not bytes"}, "must be bytes or a pathlib.Path"),
        ({"plot.png": Path("/nonexistent/plot.png")}, "is not a file"),
    ],
)
def test_bad_extra_files_rejected(tmp_path: Path, files: dict, message: str) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match=message):
        _publish(store, files=files)
    assert store.versions("hopper") == []
    assert list(tmp_path.iterdir()) == []  # validated before anything is written


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    from dmm.store import ModelStore

    root, marker, stall = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

    def stall_forever():
        marker.write_text(str(os.getpid()))
        time.sleep(600)

    if stall == "after-first-file":
        real_fsync = os.fsync
        def fsync(fd):
            real_fsync(fd)
            stall_forever()
        os.fsync = fsync
    else:  # everything written, killed right before the rename
        os.rename = lambda src, dst: stall_forever()

    ModelStore(root).publish("hopper", {"w": torch.full((256, 256), 7.0)}, {"writer": "killed"})
    """
)


@pytest.mark.parametrize("stall", ["after-first-file", "before-rename"])
def test_writer_killed_mid_publish_leaves_no_visible_version(tmp_path: Path, stall: str) -> None:
    store = ModelStore(tmp_path / "store")
    assert _publish(store, seed=1) == 1
    marker = tmp_path / "marker"
    script = tmp_path / "writer.py"
    script.write_text(_KILLED_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(store.root), str(marker), stall])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, "writer exited before reaching the stall point"
            assert time.monotonic() < deadline, "writer never reached the stall point"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert store.versions("hopper") == [1]
    assert store.latest("hopper") == 1
    assert store.models() == ["hopper"]
    assert store.load("hopper").config == {"seed": 1, "d_model": 4}
    # The killed writer really was mid-publish: its temp folder holds some of the files.
    (tmp_dir,) = (store.root / "hopper").glob(".tmp-*")
    assert (tmp_dir / "model.safetensors").exists()
    assert sorted(p.name for p in (store.root / "hopper").iterdir()) == [tmp_dir.name, "1"]

    # The store keeps working; the stale folder is pruned by age only.
    assert _publish(store, seed=2) == 2
    assert store.load("hopper").config["seed"] == 2
    assert store.prune_stale(older_than_s=3600) == []
    assert store.prune_stale(older_than_s=0) == [tmp_dir]
    assert not tmp_dir.exists()
    assert store.versions("hopper") == [1, 2]


def test_corrupt_weights_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, seed=1)
    _publish(store, seed=2)
    weights = store.version_path("hopper", 2) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # flip one bit inside the tensor data
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match=r"model\.safetensors.*checksum"):
        store.load("hopper")
    with pytest.raises(CorruptVersionError, match=r"model\.safetensors"):
        store.load("hopper", 2)
    assert store.load("hopper", 1).version == 1  # other versions unaffected

    config = store.version_path("hopper", 1) / "config.json"
    config.write_text('{"seed": 99, "d_model": 4}\n')
    with pytest.raises(CorruptVersionError, match=r"config\.json"):
        store.read_config("hopper", 1)


def test_incomplete_version_folders_are_invisible(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, seed=1)
    _publish(store, seed=2)
    (store.version_path("hopper", 2) / "checksums.sha256").unlink()
    assert store.versions("hopper") == [1]
    assert store.latest("hopper") == 1
    assert store.load("hopper").version == 1
    with pytest.raises(CorruptVersionError, match=r"checksums\.sha256 is missing"):
        store.load("hopper", 2)

    # A checksum file that does not list every required file is incomplete too.
    _publish(store, seed=3)
    sums = store.version_path("hopper", 3) / "checksums.sha256"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if "metrics" not in line))
    assert store.versions("hopper") == [1]
    with pytest.raises(CorruptVersionError, match=r"does not list metrics\.json"):
        store.load("hopper", 3)

    # Publishing skips the numbers of broken folders instead of colliding with them.
    assert _publish(store, seed=4) == 4

    # A model whose only version is incomplete is not listed at all.
    _publish(store, "walker")
    (store.version_path("walker", 1) / "checksums.sha256").unlink()
    assert store.models() == ["hopper"]
    with pytest.raises(ModelNotFoundError):
        store.latest("walker")


def test_checksum_file_cannot_point_outside_the_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store)
    sums = store.version_path("hopper", 1) / "checksums.sha256"
    sums.write_text(sums.read_text() + f"{'0' * 64}  ../../secret\n")
    with pytest.raises(CorruptVersionError, match="bad file name"):
        store.load("hopper", 1)


def test_stale_tmp_folders_are_ignored(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store)
    stale = tmp_path / "hopper" / ".tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".tmp-x").mkdir()  # not a valid model name either
    assert store.models() == ["hopper"]
    assert store.versions("hopper") == [1]
    old = time.time() - 7200
    os.utime(stale / "model.safetensors", (old, old))
    os.utime(stale, (old, old))
    assert store.prune_stale(older_than_s=3600) == [stale]
    assert store.versions("hopper") == [1]


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    n = 8
    barrier = threading.Barrier(n)
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            barrier.wait()
            results[i] = store.publish("hopper", _tensors(i), {"writer": i})
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert sorted(results.values()) == list(range(1, n + 1))
    assert store.versions("hopper") == list(range(1, n + 1))
    for i, version in results.items():
        assert store.load("hopper", version).config == {"writer": i}
    assert list((tmp_path / "hopper").glob(".tmp-*")) == []


def test_lost_rename_race_retries_with_next_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another writer claims our number between choosing it and renaming: we take the next one."""
    store = ModelStore(tmp_path)
    _publish(store, seed=1)
    real_rename = os.rename
    raced = []

    def rename(src, dst):
        if not raced:
            raced.append(dst)
            competitor = store.publish("hopper", _tensors(9), {"writer": "competitor"})
            assert competitor == 2
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    assert store.publish("hopper", _tensors(2), {"writer": "us"}) == 3
    assert Path(raced[0]).name == "2"
    assert store.read_config("hopper", 2) == {"writer": "competitor"}
    assert store.read_config("hopper", 3) == {"writer": "us"}


@pytest.mark.parametrize(
    "name", ["", "latest", "../evil", "a/b", "a\\b", ".hidden", "-dash", "sp ace", "ü", "x" * 201, 5]
)
def test_bad_model_names_rejected(tmp_path: Path, name: object) -> None:
    store = ModelStore(tmp_path)
    for call in (
        lambda: store.publish(name, _tensors(), {}),  # type: ignore[arg-type]
        lambda: store.versions(name),  # type: ignore[arg-type]
        lambda: store.load(name),  # type: ignore[arg-type]
    ):
        with pytest.raises(StoreError, match="model name"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_good_model_names_accepted(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for name in ("hopper-medium-v2", "Walker2d_v4.dmm", "0"):
        assert store.publish(name, _tensors(), {}) == 1
    assert store.models() == ["0", "Walker2d_v4.dmm", "hopper-medium-v2"]


@pytest.mark.parametrize(
    "tensors, config, metrics, message",
    [
        ({"w": [1.0, 2.0]}, {}, None, r"tensors\['w'\] is a list, not a torch.Tensor"),
        ({"w": torch.ones(2).numpy()}, {}, None, "not a torch.Tensor"),
        ({}, {}, None, "empty"),
        ([torch.ones(1)], {}, None, "must be a dict"),
        ({"__metadata__": torch.ones(1)}, {}, None, "reserved"),
        ({"w": torch.ones(2).to_sparse()}, {}, None, "only dense tensors"),
        ({"w": torch.ones(1)}, {"lr": float("nan")}, None, r"config\['lr'\] is nan"),
        ({"w": torch.ones(1)}, {"obj": object()}, None, "not JSON"),
        ({"w": torch.ones(1)}, {1: "int key"}, None, "non-string key"),
        ({"w": torch.ones(1)}, {}, {"score": torch.tensor(1.0)}, r"metrics\['score'\] is a Tensor"),
        ({"w": torch.ones(1)}, [("a", 1)], None, "config must be a dict"),
    ],
)
def test_bad_publish_inputs_rejected_without_writing(
    tmp_path: Path, tensors: object, config: object, metrics: object, message: str
) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(StoreError, match=message):
        store.publish("hopper", tensors, config, metrics)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_and_version_errors_list_what_exists(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(ModelNotFoundError, match="available models: none"):
        store.load("hopper")
    _publish(store, "hopper")
    _publish(store, "hopper")
    _publish(store, "walker")
    with pytest.raises(
        ModelNotFoundError, match=r"unknown model 'cheetah'.*available models: hopper, walker"
    ):
        store.load("cheetah")
    with pytest.raises(ModelNotFoundError, match="hopper, walker"):
        store.resolve("cheetah", 1)
    with pytest.raises(VersionNotFoundError, match="no version 5; available versions: 1, 2"):
        store.load("hopper", 5)
    with pytest.raises(VersionNotFoundError, match="available versions: 1, 2"):
        store.read_config("hopper", "3")
    assert issubclass(VersionNotFoundError, DMMError) and issubclass(ModelNotFoundError, StoreError)


def test_no_pickle_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path)
    _publish(store, files={"extra.bin": b"\x00\x01"})
    path = store.version_path("hopper", 1)
    weights = (path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(weights[:8], "little")
    header = json.loads(weights[8 : 8 + header_len])  # safetensors: u64 length + JSON header
    assert set(header) == {"__metadata__", *_tensors().keys()}
    for fname in ("model.safetensors", "config.json", "metrics.json", "checksums.sha256"):
        data = (path / fname).read_bytes()
        assert not data.startswith(b"\x80"), f"{fname} starts with a pickle protocol header"
        assert not data.startswith(b"PK\x03\x04"), f"{fname} is a zip (torch.save) archive"
    json.loads((path / "config.json").read_text())
    json.loads((path / "metrics.json").read_text())

    def forbidden(*args, **kwargs):
        raise AssertionError("the store must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert torch.equal(store.load("hopper").tensors["embed.weight"], _tensors()["embed.weight"])


def test_root_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = ModelStore("~/models")
    assert store.root == tmp_path / "models"
    _publish(store)
    assert ModelStore(str(tmp_path / "models")).versions("hopper") == [1]
    with pytest.raises(StoreError, match="only local folders"):
        ModelStore("s3://bucket/models")
    with pytest.raises(StoreError, match="must be a path"):
        ModelStore(42)  # type: ignore[arg-type]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        ModelStore(tmp_path / "afile").models()


def test_load_rejects_bad_device(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store)
    with pytest.raises(StoreError, match="invalid device"):
        store.load("hopper", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(StoreError, match="cannot load tensors onto device cuda"):
            store.load("hopper", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store)
    ckpt = store.load("hopper", device="cuda")
    assert all(t.device.type == "cuda" for t in ckpt.tensors.values())
    assert torch.equal(ckpt.tensors["head.bias"].cpu(), _tensors()["head.bias"])


def test_failed_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path)
    _publish(store, seed=1)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(StoreError, match="No space left on device"):
        _publish(store, seed=2)
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "hopper").iterdir()) == ["1"]
    assert store.versions("hopper") == [1]
    assert _publish(store, seed=3) == 2


_RACING_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from dmm.store import ModelStore

    root, go, ident = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    go.with_name(f"ready-{ident}").touch()
    while not go.exists():
        time.sleep(0.005)
    print(ModelStore(root).publish("hopper", {"w": torch.full((64,), float(ident))}, {"writer": ident}))
    """
)


def test_concurrent_processes_get_distinct_versions(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    script = tmp_path / "writer.py"
    script.write_text(_RACING_WRITER)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(store.root), str(go), str(i)], stdout=subprocess.PIPE, text=True
        )
        for i in range(3)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(procs):  # all imported torch and wait together
        assert all(p.poll() is None for p in procs), "a writer exited early"
        assert time.monotonic() < deadline, "writers never became ready"
        time.sleep(0.02)
    go.touch()
    claimed = {}
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        claimed[i] = int(out)
    assert sorted(claimed.values()) == [1, 2, 3]
    for i, version in claimed.items():
        ckpt = store.load("hopper", version)
        assert ckpt.config == {"writer": i}
        assert torch.equal(ckpt.tensors["w"], torch.full((64,), float(i)))


# ----------------------------------------------------------------- training markers


def test_a_model_being_trained_is_named_as_such_until_its_run_ends(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _publish(store, "hopper-medium-sim-v4")
    with store.mark_training("hopper-medium-v2", 20000, "docker compose logs -f train-online") as marker:
        assert (marker.model, marker.updates, marker.pid) == ("hopper-medium-v2", 20000, os.getpid())
        assert store.training("hopper-medium-v2") == marker
        assert store.training("hopper-medium-sim-v4") is None
        for call in (lambda: store.resolve("hopper-medium-v2"), lambda: store.load("hopper-medium-v2", 1)):
            with pytest.raises(ModelNotFoundError) as info:
                call()
            assert info.value.remote_message() == (
                "model 'hopper-medium-v2' is being trained (started 0 s ago); "
                "available models: hopper-medium-sim-v4"
            )
            assert (
                f"being trained into store {tmp_path} (started 0 s ago, 20000 updates, log: docker compose"
                in str(info.value)
            )
        assert store.models() == ["hopper-medium-sim-v4"]  # the marker folder is never a model
        assert (tmp_path / ".training" / "hopper-medium-v2.json").is_file()
    assert not (tmp_path / ".training" / "hopper-medium-v2.json").exists()
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve("hopper-medium-v2")
    assert (
        info.value.remote_message()
        == "unknown model 'hopper-medium-v2'; available models: hopper-medium-sim-v4"
    )


def test_the_marker_goes_when_the_run_fails_and_its_heartbeat_keeps_it_fresh(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with (
        pytest.raises(RuntimeError, match="diverged"),
        store.mark_training("walker", 10, "log", heartbeat_s=0.02) as m,
    ):
        deadline = time.monotonic() + 10
        while (fresh := store.training("walker")) is not None and fresh.heartbeat == m.heartbeat:
            assert time.monotonic() < deadline, "the heartbeat was never refreshed"
            time.sleep(0.01)
        assert fresh is not None and fresh.started == m.started and fresh.heartbeat > m.heartbeat
        raise RuntimeError("diverged")
    assert store.training("walker") is None and list((tmp_path / ".training").iterdir()) == []


def test_stale_and_unreadable_markers_are_ignored(tmp_path: Path) -> None:
    from dataclasses import replace

    from dmm.store.layout import TRAINING_STALE_S, TrainingMarker

    store = ModelStore(tmp_path)
    now = time.time()
    killed = TrainingMarker("hopper", now - 7200, now - TRAINING_STALE_S - 1, 100, "log", "host", 1)
    store.write_training_marker(killed)
    assert store.training("hopper") is None
    with pytest.raises(ModelNotFoundError, match="unknown model 'hopper'"):
        store.resolve("hopper")
    store.write_training_marker(replace(killed, heartbeat=now))
    assert store.training("hopper") == replace(killed, heartbeat=now)
    with pytest.raises(ModelNotFoundError) as info:
        store.latest("hopper")
    assert "is being trained (started 2 h 0 min ago)" in info.value.remote_message()
    for bad in (
        b"{not json",
        b"[1, 2]",
        b'{"model": "hopper"}',
        b"\xff",
        json.dumps({**killed.__dict__, "pid": "x"}).encode(),
    ):
        (tmp_path / ".training" / "hopper.json").write_bytes(bad)
        assert store.training("hopper") is None, bad
    (tmp_path / ".training" / "hopper.json").write_bytes(
        replace(killed, model="other", heartbeat=now).to_bytes()
    )
    assert store.training("hopper") is None, "a marker names the model it is about"
    assert store.models() == [] and not any(
        p.name.startswith(".tmp-") for p in (tmp_path / ".training").iterdir()
    )


def test_started_ago_reads_like_a_person_would_say_it() -> None:
    from dmm.store.errors import started_ago

    assert [started_ago(1000 - s, now=1000) for s in (-5, 0, 59, 60, 179, 3599, 3600, 7325)] == [
        "started 0 s ago",
        "started 0 s ago",
        "started 59 s ago",
        "started 1 min ago",
        "started 2 min ago",
        "started 59 min ago",
        "started 1 h 0 min ago",
        "started 2 h 2 min ago",
    ]
