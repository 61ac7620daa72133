"""Smoke tests of the benchmarks: each runs end to end at tiny scale and writes its table, JSON and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, random_sac_policy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_bench(
    script: str,
    out: Path,
    *args: str,
    timeout: float = 300,
    stderr: list[str] | None = None,
    figure: str | None = None,
) -> tuple[int, dict, str]:
    """Run ``python -m bench.<script> --quick --out OUT ARGS``; returns (exit code, JSON, markdown).

    ``stderr``, when given, receives what the script wrote there (its progress and log lines);
    ``figure`` names the PNG when it is not ``<script>.png``.
    """
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", "--quick", "--out", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert (out / "results.json").is_file(), proc.stdout + proc.stderr
    if stderr is not None:
        stderr.append(proc.stderr)
    payload = json.loads((out / "results.json").read_text())
    md = (out / "results.md").read_text()
    assert (out / f"{figure or script}.png").read_bytes().startswith(PNG_MAGIC)
    assert md in proc.stdout  # the table is printed too
    assert payload["command"].startswith(f"python -m bench.{script} --quick --out ")
    assert payload["machine"]["cpu"] and payload["machine"]["torch"] and payload["date"].endswith("UTC")
    assert not list(out.glob("*.tmp"))
    return proc.returncode, payload, md


def test_train_speed_rows_in_separate_processes(tmp_path):
    code, payload, md = run_bench("train_speed", tmp_path, "--variants", "dmm", "dt-k8", "--chunks", "2")
    assert code == 0
    rows = {(r["variant"], r["backend"]): r for r in payload["rows"]}
    assert set(rows) == {("dmm", "torch"), ("dmm", "numba"), ("dmm", "floor"), ("dt-k8", "-")}
    assert all(r["mode"] == "eager" for r in rows.values())
    dmm, dt = rows[("dmm", "torch")], rows[("dt-k8", "-")]
    assert dmm["context"] == dt["context"] == 8
    assert dt["d_model"] == 128 and dmm["d_model"] == 64  # DT's usual width, paper's DMM
    for r in rows.values():
        assert len(r["chunk_rates"]) == 2 and r["updates_per_second"] > 0 and r["peak_rss_mib"] > 0
        assert r["torch_threads"] == 1 and r["batch_size"] == 64
    assert dmm["x_dmm_torch"] == 1.0 and dmm["x_torch_scan"] == 1.0
    numba, floor = rows[("dmm", "numba")], rows[("dmm", "floor")]
    assert numba["x_torch_scan"] == pytest.approx(numba["updates_per_second"] / dmm["updates_per_second"])
    assert numba["time_vs_floor"] == pytest.approx(floor["updates_per_second"] / numba["updates_per_second"])
    assert floor["time_vs_floor"] == 1.0 and dt["x_torch_scan"] is None
    assert "| DMM (K=8) | eager | numba | 1 | 8 |" in md and "| DT (K=8) | eager | - | 1 | 8 |" in md


def test_train_speed_reports_a_failing_row(tmp_path):
    code, payload, md = run_bench(
        "train_speed", tmp_path, "--variants", "dmm", "--dataset", str(tmp_path / "missing.hdf5")
    )
    assert code == 1
    assert "missing.hdf5" in payload["rows"][0]["error"] and "error: DatasetError" in md


@pytest.mark.slow
def test_train_speed_quick_default_and_compiled(tmp_path):
    code, payload, _ = run_bench("train_speed", tmp_path, "--modes", "eager", "compile", timeout=900)
    assert code == 0
    keys = {(r["variant"], r["mode"]) for r in payload["rows"]}
    assert keys == {(v, m) for v in ("dmm", "dt", "dt-k8") for m in ("eager", "compile")}
    assert all("error" not in r for r in payload["rows"])
    assert {r["context"] for r in payload["rows"] if r["variant"] == "dt"} == {20}


def test_eval_speed_batched_matches_sequential(tmp_path):
    code, payload, md = run_bench("eval_speed", tmp_path, "--episodes", "3")
    assert code == 0
    batched, sequential = payload["results"]["batched"], payload["results"]["sequential"]
    assert len(batched["returns"]) == len(sequential["returns"]) == 3
    assert payload["agreement"]["paired_episodes"] == 3
    assert payload["agreement"]["max_abs_return_difference"] < 1.0  # same seeds, same policy
    assert batched["env_steps"] == sum(batched["lengths"]) > 0
    assert payload["speedup"] == pytest.approx(sequential["wall_seconds"] / batched["wall_seconds"])
    torch_scan = payload["results"]["batched-torch"]
    assert (batched["scan_backend"], torch_scan["scan_backend"]) == ("numba", "torch")
    assert torch_scan["returns"] == pytest.approx(batched["returns"], abs=1.0)
    ratio = torch_scan["wall_seconds"] / batched["wall_seconds"]
    assert payload["speedup_vs_torch_scan"] == pytest.approx(ratio)
    assert "speed-up" in md and "| batched | numba | 3 |" in md and "| batched-torch | torch | 3 |" in md


def test_serve_drives_sessions_with_and_without_batching(tmp_path):
    code, payload, md = run_bench("serve", tmp_path, "--sessions", "1", "3", "--duration", "0.5")
    assert code == 0
    rows = payload["rows"]
    assert {(r["scan"], r["batching"], r["mode"], r["sessions"]) for r in rows} == {
        ("auto", b, m, n) for b in ("on", "off") for m in ("window", "recurrent") for n in (1, 3)
    }
    for r in rows:
        assert r["failed_sessions"] == 0 and r["timed_steps"] > 0
        assert 0 < r["p50_us"] <= r["p95_us"] <= r["p99_us"]
        assert r["timed_steps"] <= r["sessions"] * 200  # --quick caps each session at 200 timed steps
    assert payload["server_args"]["auto scan, batching off, 1 worker(s)"][-2:] == ["--max-batch", "1"]
    assert "--max-batch" not in payload["server_args"]["auto scan, batching on, 1 worker(s)"]
    assert "x batching off" in md


def test_serve_compares_vector_streams_with_single_episode_streams(tmp_path):
    code, payload, md = run_bench(
        "serve", tmp_path, "--sessions", "4", "--duration", "0.5", "--batching", "on",
        "--modes", "recurrent", "--episodes-per-stream", "1", "2",
    )  # fmt: skip
    assert code == 0
    rows = {r["episodes_per_stream"]: r for r in payload["rows"]}
    assert set(rows) == {1, 2} and all(r["failed_sessions"] == 0 for r in rows.values())
    vector = rows[2]
    assert vector["timed_steps"] <= 2 * 200  # two streams, each capped at 200 steps by --quick
    assert vector["actions_per_second"] == pytest.approx(2 * vector["timed_steps"] / vector["wall_seconds"])
    ratio = vector["actions_per_second"] / rows[1]["actions_per_second"]
    assert vector["throughput_vs_one_per_stream"] == pytest.approx(ratio)
    assert "| auto | on | 1 | recurrent | 4 | 2 |" in md


def test_serve_compares_scan_backends_on_one_machine(tmp_path):
    code, payload, md = run_bench(
        "serve", tmp_path, "--sessions", "2", "--duration", "0.3", "--batching", "on",
        "--modes", "recurrent", "--scan-backends", "torch", "numba",
    )  # fmt: skip
    assert code == 0
    rows = {r["scan"]: r for r in payload["rows"]}
    assert set(rows) == {"torch", "numba"} and all(r["failed_sessions"] == 0 for r in rows.values())
    ratio = rows["numba"]["actions_per_second"] / rows["torch"]["actions_per_second"]
    assert rows["numba"]["throughput_vs_torch_scan"] == pytest.approx(ratio)
    assert "--scan-backend" in payload["server_args"]["numba scan, batching on, 1 worker(s)"]
    assert "| numba | on | 1 | recurrent | 2 | 1 |" in md


def test_scores_train_and_evaluate_final_checkpoints(tmp_path):
    from dmm.trainer.collect import collect

    policy = random_sac_policy(tmp_path / "policy.npz", 11, 3)
    data = collect("Hopper-v4", policy, 400, tmp_path / "hopper-tiny.hdf5", seed=0)
    log: list[str] = []
    args = ("--dataset", str(data), "--variants", "dmm", "--updates", "5", "--eval-every", "3")
    code, payload, md = run_bench("scores", tmp_path / "out", *args, stderr=log)
    assert code == 0
    assert "hopper-tiny-dmm-seed0: update 3: target 3600:" in log[0]  # the run's own lines reach the log
    (model,) = payload["models"]
    assert model["variant"] == "dmm" and model["seeds"] == [0] and model["failed_seeds"] == {}
    assert model["num_parameters"] > 0 and model["normalized_mean"] == model["normalized_per_seed"][0]
    (run,) = payload["runs"]
    assert run["episodes"] == 2 and run["target_return"] == 3600.0
    history = {(e["update"], e["target_return"]) for e in run["eval_history"]}
    assert history == {(u, t) for u in (3, 5) for t in (3600.0, 1800.0)}  # --eval-every 3, both targets
    assert run["paper_protocol"] == max(e["normalized"] for e in run["eval_history"]) >= run["normalized"]
    assert "| DMM (K=8) |" in md and "normalized score" in md and "paper protocol" in md


def test_scores_keep_resumable_runs_and_reuse_finished_ones(tmp_path):
    from dmm.store import ModelStore
    from dmm.trainer.collect import collect

    policy = random_sac_policy(tmp_path / "policy.npz", 11, 3)
    data = collect("Hopper-v4", policy, 400, tmp_path / "hopper-tiny.hdf5", seed=0)
    args = (
        "--dataset",
        str(data),
        "--variants",
        "dmm",
        "--updates",
        "6",
        "--run-root",
        str(tmp_path / "runs"),
    )
    code, first, _ = run_bench("scores", tmp_path / "out1", *args, "--checkpoint-every", "4")
    assert code == 0
    run_dir = tmp_path / "runs" / "hopper-tiny-dmm-seed0"
    assert {p.name for p in run_dir.iterdir()} == {"state.pt", "result.json"}
    code, again, _ = run_bench("scores", tmp_path / "out2", *args)
    assert code == 0
    assert again["runs"] == first["runs"]  # reused, not retrained
    assert ModelStore(tmp_path / "runs" / "store").versions("hopper-tiny-dmm-seed0") == [1]


def test_a_signal_to_the_benchmark_stops_its_workers_after_they_save(tmp_path):
    """``kill`` of a benchmark passes SIGTERM on to its workers and waits for them to save."""
    import os
    import signal
    import time

    parent_code = (
        "import sys\n"
        "from bench.harness import forward_stop_signals, run_worker\n"
        "with forward_stop_signals():\n"
        "    run_worker('tests.stoppable_worker', {'folder': sys.argv[1], 'timeout_s': 60}, 120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(tmp_path)], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    ready = tmp_path / "ready"
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker_pid = int(ready.read_text())
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=30)
    assert parent.returncode == 128 + signal.SIGTERM
    assert "SIGTERM: stopping 1 worker(s)" in err
    assert (tmp_path / "saved").read_text() == "on SIGTERM"  # saved before the parent exited
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)  # and reaped, not left running


def test_scores_study_measures_variants_and_resumes(tmp_path):
    """``--study``: the DMM-vs-DT study (the authors' class among the variants), resumable."""
    from dmm.trainer.collect import collect

    policy = random_sac_policy(tmp_path / "policy.npz", 11, 3)
    data = collect("Hopper-v4", policy, 400, tmp_path / "hopper-tiny.hdf5", seed=0)
    args = ("--study", "--dataset", str(data), "--variants", "authors", "dmm-timestep", "--seeds", "0")
    code, payload, md = run_bench("scores", tmp_path / "out", *args, figure="dmm_vs_dt")
    assert code == 0
    runs = {r["variant"]: r for r in payload["runs"]}
    assert set(runs) == {"authors", "dmm-timestep"}
    for run in runs.values():
        assert run["updates"] == 20 and len(run["evals"]) == 1 and run["evals"][0]["episodes"] == 2
        assert 0.0 <= run["evals"][0]["fell"] <= 1.0 and run["sensitivity"]["action_change"] >= 0.0
    assert "| the authors' DMM class" in md and "RTG sens." in md
    assert "`python -m bench.scores --study --variants dmm-timestep authors --seeds 0 --updates 20`" in md
    weights = sorted(p.name for p in (tmp_path / "out" / "runs").glob("*.pt"))
    assert weights == ["authors-s0.pt", "dmm-timestep-s0.pt"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scores", "--quick", "--out", str(tmp_path / "out"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.count("done, skipped") == 2
    report = [sys.executable, "-m", "bench.scores", "--report", "--out", str(tmp_path / "out")]
    proc = subprocess.run(report, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--targets and --report belong to --study" in proc.stderr


def test_step_speed_times_backends_that_act_alike(tmp_path):
    code, payload, md = run_bench("step_speed", tmp_path)
    assert code == 0
    rows = {(r["mode"], r["batch"], r["backend"]): r for r in payload["rows"]}
    assert set(rows) == {
        (m, b, s) for m in ("recurrent", "window") for b in (1, 4) for s in ("torch", "numba", "fused")
    }
    for r in rows.values():
        assert len(r["step_seconds"]) == 5 and r["median_step_ms"] > 0
        assert r["us_per_action"] == pytest.approx(r["median_step_ms"] * 1e3 / r["batch"])
        assert r["max_action_difference"] < 1e-5  # same inputs, same policy
    torch_row, numba_row = rows[("recurrent", 4, "torch")], rows[("recurrent", 4, "numba")]
    assert torch_row["x_reference"] == 1.0
    assert numba_row["x_reference"] == pytest.approx(
        torch_row["median_step_ms"] / numba_row["median_step_ms"]
    )
    assert "| recurrent | 4 | numba |" in md


def test_scan_speed_times_each_backend_on_the_model_shapes(tmp_path):
    code, payload, md = run_bench("scan_speed", tmp_path)
    assert code == 0
    keys = {(r["shape"], r["direction"], r["backend"]) for r in payload["rows"]}
    directions = [("training", "forward"), ("training", "forward+backward")]
    directions += [("window", "forward"), ("recurrent", "forward")]
    assert keys == {(s, d, b) for s, d in directions for b in ("torch", "numba")}
    assert all(r["median_ms"] >= r["min_ms"] > 0 for r in payload["rows"])
    assert "| training | 64 x 24 | forward+backward | numba |" in md


def test_device_dry_run_rehearses_every_step(tmp_path):
    """The GPU host's one command, every step at tiny sizes on the CPU: it must not rot."""
    out = tmp_path / "device"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.device", "--dry-run", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "device.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "tests", "train", "serve", "scores"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    env = steps["env"]["details"]
    assert all(v.startswith("ok") for v in env["modules"].values())
    assert env["dmm_from"].startswith(env["install"]["site"])  # the installed project, as on the host
    assert steps["scores"]["details"]["data"]["digest"]  # collected in the background, then used
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"device.md", "train_speed.json", "serve.json", "scores.json"} <= set(files)
    assert "### serve" in (out / "device.md").read_text()


def test_device_dry_run_without_out_leaves_the_committed_results_alone(tmp_path, monkeypatch):
    """A rehearsal on the CPU must not overwrite the GPU host's results in bench/results/device."""
    import tempfile

    from bench.harness import default_out
    from tools.device.host import Device, parse_args

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the temporary folders land here
    committed = default_out("device")
    assert parse_args([]).out == committed  # a real run writes the results to commit
    assert parse_args(["--dry-run", "--out", str(tmp_path / "d")]).out == tmp_path / "d"
    before = {p: p.stat().st_mtime_ns for p in committed.rglob("*")} if committed.exists() else {}
    args = parse_args(["--dry-run", "--steps", "env"])
    assert args.out.parent == tmp_path and args.out.is_dir() and not any(args.out.iterdir())
    assert committed.resolve() not in args.out.resolve().parents
    assert parse_args(["--dry-run"]).out != args.out  # a fresh folder each time
    device = Device(args, ["--dry-run", "--steps", "env"])
    device.write()
    assert {p.name for p in args.out.iterdir()} == {"device.json", "device.md"}
    assert json.loads((args.out / "device.json").read_text())["dry_run"] is True
    after = {p: p.stat().st_mtime_ns for p in committed.rglob("*")} if committed.exists() else {}
    assert after == before


def test_soak_counts_every_episode_ending_and_frees_every_slot(tmp_path):
    code, payload, md = run_bench(
        "soak", tmp_path, "--sessions", "12", "--duration", "4", "--max-steps", "40",
        "--cancel", "0.2", "--vanish", "0.1", "--idle-timeout", "1",
    )  # fmt: skip
    assert code == 0, md
    summary = payload["summary"]
    assert summary["unexpected_errors"] == 0 and summary["active_sessions_after"] == 0
    assert summary["server_agrees"] and summary["completed"] > 0 and summary["steps"] > 0
    assert summary["episodes"] == summary["completed"] + summary["cancelled"] + summary["vanished"]


@pytest.mark.slow  # about 40 s: three server starts and a reference run
def test_chaos_loses_no_episode_to_a_killed_server(tmp_path):
    """One server SIGKILLed mid-run: every episode completes, streams fail over and resume, and each
    episode equals its uninterrupted reference (window mode)."""
    pytest.importorskip("mujoco")
    code, payload, md = run_bench(
        "chaos", tmp_path, "--duration", "6", "--kill-every", "4", "--max-episode-steps", "1000"
    )
    assert code == 0, md
    summary = payload["summary"]
    assert summary["events"] == 1 and payload["events"][0]["signal"] == "SIGKILL"
    assert summary["lost"] == 0 and summary["completed"] == summary["episodes"] > 0
    assert summary["failovers"] >= 1 and summary["resumes"] >= 1 and summary["resume_p99_ms"] > 0
    assert summary["equal_to_reference"] == summary["compared"] == summary["completed"]
    assert summary["resumed_equal_to_reference"] >= 1


def test_scores_report_joins_runs_from_several_roots(tmp_path):
    import torch

    from bench.scores_report import main as report
    from dmm.trainer.collect import collect

    policy = random_sac_policy(tmp_path / "policy.npz", 11, 3)
    data = collect("Hopper-v4", policy, 400, tmp_path / "hopper-tiny.hdf5", seed=0)
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    args = ("--dataset", str(data), "--variants", "dmm", "--updates", "6", "--eval-every", "3")
    code, scores, _ = run_bench("scores", tmp_path / "out1", *args, "--run-root", str(cpu))
    assert code == 0
    finished = cpu / "hopper-tiny-dmm-seed0"
    state = torch.load(finished / "state.pt", weights_only=False)
    # an unfinished DT run on another machine, evaluated once so far, and a stale copy of the DMM run
    for name, update in (("hopper-tiny-dt-seed0", 4), ("hopper-tiny-dmm-seed0", 2)):
        evals = [e for e in state["metrics"]["evals"] if e["update"] <= update]
        (gpu / name).mkdir(parents=True)
        torch.save({**state, "update": update, "metrics": {"evals": evals}}, gpu / name / "state.pt")
    recurrent = tmp_path / "recurrent.json"
    rec = {"name": finished.name, "episodes": 2, "target_return": 3600.0, "normalized_mean": 1.5}
    recurrent.write_text(json.dumps({**rec, "normalized_std": 0.5}))

    out = tmp_path / "report"
    assert report([f"{cpu}:cpu", f"{gpu}:gpu", "--recurrent", str(recurrent), "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in payload["runs"]}
    assert set(runs) == {"hopper-tiny-dmm-seed0", "hopper-tiny-dt-seed0"}
    dmm, dt = runs["hopper-tiny-dmm-seed0"], runs["hopper-tiny-dt-seed0"]
    assert dmm["trained_on"] == "cpu" and dmm["finished"] and dmm["updates"] == 6  # not the stale copy
    assert dmm["final"]["window"]["normalized_mean"] == scores["runs"][0]["normalized"]
    assert dmm["final"]["recurrent"]["normalized_mean"] == 1.5
    first = [e["normalized_mean"] for e in dmm["eval_history"] if e["target_return"] == 3600.0]
    assert len(first) == 2 and dmm["second_half"] == pytest.approx(sum(first) / 2)  # updates 3 and 6 of 6
    assert dmm["swing"] == pytest.approx(abs(first[0] - first[1]) / 2)  # std of the last (two) evaluations
    assert dt["trained_on"] == "gpu" and not dt["finished"] and dt["final"] == {}
    assert {e["update"] for e in dt["eval_history"]} == {3} and len(dmm["eval_history"]) == 4
    md = (out / "results.md").read_text()
    assert "| DT (K=20) | - |" in md and "seed 0 at 4" in md  # unfinished: no final score
    window = dmm["final"]["window"]["normalized_mean"]
    assert f"| DMM (K=8) | 0 | {window:.1f} | {window:.1f} |" in md and "± 0.0" not in md  # one seed: no ±
    assert "best evaluation up to 3 (seeds)" in md and "best evaluation up to 6 (seeds)" in md
    assert "swing (std of the last 5 evaluations)" in md
    assert (out / "scores.png").read_bytes().startswith(PNG_MAGIC)

    # the run folders are gone (another machine): the committed report keeps their rows, a folder
    # that got further on replaces its row, and a variant with a hyphen in its key is recognised
    later = tmp_path / "later"
    for name in (dt["name"], "hopper-tiny-attention-global-seed0", "hopper-tiny-dt-d64-seed0"):
        (later / name).mkdir(parents=True)
        torch.save({**state, "update": 5}, later / name / "state.pt")
    again = tmp_path / "again"
    assert report([f"{later}:later", "--previous", str(out / "results.json"), "--out", str(again)]) == 0
    rows = {r["name"]: r for r in json.loads((again / "results.json").read_text())["runs"]}
    assert rows["hopper-tiny-dmm-seed0"] == dmm
    assert rows["hopper-tiny-attention-global-seed0"]["variant"] == "attention-global"
    assert rows["hopper-tiny-dt-d64-seed0"]["variant"] == "dt-d64"  # not "dt"
    assert (
        rows["hopper-tiny-dt-seed0"]["trained_on"] == "later" and rows["hopper-tiny-dt-seed0"]["updates"] == 5
    )
    assert report(["--previous", str(again / "results.json"), "--out", str(tmp_path / "alone")]) == 0
    with pytest.raises(SystemExit, match="is not a folder of runs"):
        report([str(tmp_path / "lost"), "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match=r"not a results\.json"):
        report(["--previous", str(recurrent), "--out", str(tmp_path / "none")])


def test_width_matched_variants_have_the_other_models_size():
    from bench.common import fresh_policy

    size = {
        v: fresh_policy(v, "hopper-medium-v2", 0, "cpu").network.num_parameters()
        for v in ("dmm", "dt", "dmm-d128", "dt-d64")
    }
    assert size["dt"] > 3 * size["dmm"]  # the two models at their usual settings
    assert size["dmm-d128"] == pytest.approx(size["dt"], rel=0.1)
    assert size["dt-d64"] == pytest.approx(size["dmm"], rel=0.1)


def test_device_score_data_travel_packed_and_unpack_identical(tmp_path):
    import h5py
    import numpy as np

    from dmm.trainer.collect import collect
    from tools.device.data import DATA_KEYS, data_digest, pack_data, unpack_data

    policy = random_sac_policy(tmp_path / "policy.npz", 11, 3)
    data = collect("Hopper-v4", policy, 300, tmp_path / "hopper-tiny.hdf5", seed=0)
    pack_data(data, tmp_path / "packed.npz")
    unpack_data(tmp_path / "packed.npz", tmp_path / "unpacked.hdf5")
    assert data_digest(tmp_path / "unpacked.hdf5") == data_digest(data)
    with h5py.File(data) as a, h5py.File(tmp_path / "unpacked.hdf5") as b:
        for key in DATA_KEYS:
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key][:], b[key][:])
        assert dict(b.attrs) == dict(a.attrs)
    packed = dict(np.load(tmp_path / "packed.npz"))
    packed["digest"] = np.array("0" * 64)  # a pack that does not restore what it claims
    np.savez(tmp_path / "bad.npz", **packed)
    with pytest.raises(ValueError, match="does not unpack"):
        unpack_data(tmp_path / "bad.npz", tmp_path / "bad.hdf5")
    assert not (tmp_path / "bad.hdf5").exists() and not (tmp_path / "bad.partial").exists()
