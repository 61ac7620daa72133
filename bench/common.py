"""Shared pieces of the benchmarks: model variants, machine description, tables, JSON/PNG reports,
and per-row worker subprocesses (so rows never share a process's caches, threads or peak memory).

Run benchmarks from the repository root as modules, e.g. ``python -m bench.train_speed --quick``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from dmm.data import Dataset
    from dmm.model import Policy

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "bench" / "results"
SHARED_HOPPER = REPO_ROOT.parent / "shared" / "data" / "hopper-medium-sim-v4.hdf5"
WORKER_PREFIX = "BENCH-RESULT "
FRESH_POLICY_ENV = "hopper-medium-sim-v4"
STOP_GRACE_S = 60.0  # a timed-out worker's time between SIGTERM and SIGKILL

_live_workers: set[subprocess.Popen[str]] = set()  # what forward_stop_signals passes a signal on to
_live_workers_lock = threading.Lock()


@dataclass(frozen=True)
class Variant:
    """A model to train: an architecture (its bundled YAML applies), DMMSettings overrides and
    TrainConfig overrides (``train``: the optimization levers)."""

    key: str
    label: str
    architecture: str = "dmm"
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("dmm", "DMM (K=8)"),
        Variant("dt", "DT (K=20)", "dt"),
        Variant("dt-k8", "DT (K=8)", "dt", {"context": 8}),
        Variant("conv-local", "DMM, conv local mixer (ablation)", model={"local_mixer": "conv"}),
        Variant(
            "attention-global", "DMM, attention global mixer (ablation)", model={"global_mixer": "attention"}
        ),
        Variant("dmm-k20", "DMM (K=20)", model={"context": 20}),
        # DT's usual width gives it three times DMM's parameters (726k against 236k on hopper):
        # each model at the other's width, for a comparison at equal size.
        Variant("dmm-d128", "DMM (K=8), d=128 as DT", model={"d_model": 128}),
        Variant("dt-d64", "DT (K=20), d=64 as DMM", "dt", {"d_model": 64}),
        # Against a final checkpoint that swings from one evaluation to the next (issue: stable finals)
        Variant("dmm-cosine", "DMM, cosine learning rate", train={"lr_schedule": "cosine"}),
        Variant("dmm-ema", "DMM, weight average (EMA 0.999)", train={"ema_decay": 0.999}),
        Variant(
            "dmm-cosine-ema",
            "DMM, cosine learning rate + EMA 0.999",
            train={"lr_schedule": "cosine", "ema_decay": 0.999},
        ),
        Variant(
            "dt-cosine-ema",
            "DT (K=20), cosine learning rate + EMA 0.999",
            "dt",
            train={"lr_schedule": "cosine", "ema_decay": 0.999},
        ),
        Variant(
            "dmm-stream",
            "DMM, residual stream, no timestep embedding",
            model={"residual": "stream", "timestep_embedding": False},
        ),
        Variant(
            "dmm-timestep",
            "DMM (eq. 3 residual) + timestep embedding",
            model={"residual": "normalized", "timestep_embedding": True},
        ),
        Variant(
            "dmm-stream-timestep",
            "DMM, residual stream + timestep embedding",
            model={"residual": "stream", "timestep_embedding": True},
        ),
        Variant(
            "dt-no-timestep", "DT (K=20) without timestep embedding", "dt", {"timestep_embedding": False}
        ),
        Variant(
            "dmm-paper",
            "DMM as printed (eq. 3 residual, no timestep embedding)",
            model={"residual": "normalized", "timestep_embedding": False},
        ),
        Variant(
            "authors",
            "the authors' DMM class (bench/authors_dmm.py)",
            "authors",
            {"timestep_embedding": False},
        ),
        Variant(
            "authors-timestep",
            "the authors' DMM class + timestep embedding",
            "authors",
            {"timestep_embedding": True},
        ),
    )
}
ABLATIONS = ("conv-local", "attention-global")


def train_config(variant: Variant, dataset: str, overrides: dict[str, Any] | None = None) -> Any:
    """The TrainConfig of ``variant`` on ``dataset`` (paper YAML <- DT YAML <- variant <- overrides)."""
    from dmm.trainer.config import load_train_config

    settings = {**variant.train, **(overrides or {})}
    settings["model"] = {**variant.model, **settings.get("model", {})}
    return load_train_config(dataset, None, settings, architecture=variant.architecture)


def fresh_policy(variant: str, env: str, seed: int, device: str) -> Policy:
    """An untrained policy with the paper's settings for ``env``'s family (identity normalization),
    built by the trainer's own builder so a benchmark measures the model that training starts from."""
    from dmm.envs import env_spec
    from dmm.model import Policy
    from dmm.trainer.train import new_policy

    spec = env_spec(env)
    cfg = train_config(VARIANTS[variant], env, {"seed": seed})
    model, meta = new_policy(cfg, spec, env, ([0.0] * spec.obs_dim, [1.0] * spec.obs_dim))
    return Policy(model.to(device).eval(), meta)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() where that is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    """Cores this process may run on (its affinity), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model, core counts, torch version and the device the numbers were measured on."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def command_line(module: str, argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def report_header(script: str, argv: Sequence[str], machine_info: dict[str, Any]) -> dict[str, Any]:
    """What every benchmark's results.json starts with (and :func:`write_report` needs)."""
    return {
        "script": script,
        "machine": machine_info,
        "date": now_utc(),
        "command": command_line(f"bench.{script}", argv),
    }


def default_out(script: str) -> Path:
    return RESULTS_ROOT / script


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numeric-looking columns are right-aligned."""

    def numeric(col: int) -> bool:
        cells = [str(r[col]) for r in rows if str(r[col]) not in ("", "-")]
        return bool(cells) and all(c.lstrip("-+").replace(".", "", 1)[:1].isdigit() for c in cells)

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def header_lines(title: str, info: dict[str, Any], command: str, date: str) -> list[str]:
    where = f"{info['cpu']}, {info['usable_cores']} of {info['logical_cores']} cores usable"
    if "gpu" in info:
        where += f", GPU {info['gpu']}"
    return [
        f"## {title}",
        "",
        f"- machine: {where}; torch {info['torch']} ({info['torch_threads']} threads), "
        f"python {info['python']}; device {info['device']}",
        f"- date: {date}",
        f"- command: `{command}`",
    ]


def write_report(
    out_dir: Path,
    script: str,
    title: str,
    table: str,
    payload: dict[str, Any],
    figure: Figure,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Print the table and write ``results.md``, ``results.json`` and ``<script>.png`` into ``out_dir``.

    ``payload`` must hold ``machine``, ``command`` and ``date``. Files are written to temporary names
    and renamed, so an interrupted run leaves the previous results intact.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    md = "\n".join(
        [
            *header_lines(title, payload["machine"], payload["command"], payload["date"]),
            *(f"- {n}" for n in notes),
            "",
            table,
            "",
        ]
    )
    paths = {"md": out_dir / "results.md", "json": out_dir / "results.json", "png": out_dir / f"{script}.png"}
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    tmp["md"].write_text(md)
    tmp["json"].write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    figure.savefig(tmp["png"], format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    for key, path in paths.items():
        os.replace(tmp[key], path)
    print(md)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def new_figure(
    ncols: int = 1, width: float = 6.0, height: float = 4.0, sharey: bool = False
) -> tuple[Figure, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, sharey=sharey)


def run_worker(
    module: str, spec: dict[str, Any], timeout_s: float, stream_stderr: bool = False
) -> dict[str, Any]:
    """Run ``python -m module --worker JSON`` in a fresh process and return the JSON it reported.

    A worker that fails, times out or reports nothing yields ``{"error": "..."}`` instead of raising,
    so one broken row does not lose the others. A timed-out worker gets SIGTERM first (and SIGKILL
    ``STOP_GRACE_S`` later), so a resumable training run can save where it stopped.
    ``stream_stderr`` passes the worker's progress lines through instead of keeping them for the
    error message.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
    stderr = None if stream_stderr else subprocess.PIPE
    with subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True) as proc:
        with _live_workers_lock:
            _live_workers.add(proc)
        try:
            stdout, err_text = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: a resumable training run saves its state before it exits
            try:
                proc.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
            return {"error": f"timed out after {timeout_s:g} s"}
        finally:
            with _live_workers_lock:
                _live_workers.discard(proc)
    for line in reversed(stdout.splitlines()):
        if line.startswith(WORKER_PREFIX):
            return json.loads(line[len(WORKER_PREFIX) :])
    tail = (err_text or stdout).strip().splitlines()[-5:]
    return {"error": f"worker exited with status {proc.returncode}: " + " / ".join(tail)}


@contextlib.contextmanager
def forward_stop_signals() -> Iterator[None]:
    """While inside, SIGTERM or SIGINT to this process is passed on (as SIGTERM) to every running
    worker, and this process then exits with status 128 + signal once they have.

    Without it, ``kill`` of a benchmark would leave its workers training with no one to read their
    results. With it, a resumable training worker saves its state and stops, and the caller's
    pool waits for that before the exit goes on. Call it from the main thread.
    """

    def stop(signum: int, _frame: Any) -> None:
        with _live_workers_lock:
            workers = list(_live_workers)
        print(
            f"{signal.Signals(signum).name}: stopping {len(workers)} worker(s), each saves its state first",
            file=sys.stderr,
            flush=True,
        )
        for proc in workers:
            proc.terminate()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def report_from_worker(result: dict[str, Any]) -> None:
    """The worker side of :func:`run_worker`: one marked JSON line on stdout."""
    print(WORKER_PREFIX + json.dumps(result, default=_jsonable), flush=True)


def serve_worker(argv: Sequence[str], work: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If ``argv`` is ``--worker JSON``, run ``work(spec)`` and report its result (or its error,
    so the other rows still run) and return True; otherwise return False."""
    if list(argv[:1]) != ["--worker"]:
        return False
    try:
        report_from_worker(work(json.loads(argv[1])))
    except Exception as err:
        report_from_worker({"error": f"{type(err).__name__}: {err}"})
    return True


def synthetic_dataset(env: str = "hopper-medium-sim-v4", transitions: int = 20_000, seed: int = 0) -> Dataset:
    """Random trajectories with ``env``'s dimensions, for timing only (speed does not depend on values)."""
    from dmm.data import Dataset, Trajectory
    from dmm.envs import env_spec

    spec = env_spec(env)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(50, spec.max_episode_steps + 1, size=transitions // 50 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), transitions) + 1]
    trajectories = [
        Trajectory(
            rng.standard_normal((n, spec.obs_dim)).astype(np.float32),
            rng.uniform(-1, 1, (n, spec.act_dim)).astype(np.float32),
            rng.uniform(0, 4, n).astype(np.float32),
            terminal=bool(rng.random() < 0.5),
        )
        for n in lengths
    ]
    return Dataset.from_trajectories(f"{spec.dataset.split('-')[0]}-synthetic", trajectories, env)


def data_label(name: str, env_id: str) -> str:
    """How scores on a dataset may be described: locally collected data are not D4RL results."""
    if "-sim-" in name:
        return f"D4RL-layout data collected in gymnasium {env_id} with D4RL's reference policy ({name})"
    return name


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))
