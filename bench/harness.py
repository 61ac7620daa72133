"""What every benchmark shares: its command line (common flags, --quick defaults, checks), worker
subprocesses (so rows never share a process's caches, threads or peak memory), the machine
description, and the report (``results.md``, ``results.json`` and a PNG in ``bench/results/<name>/``).

Run benchmarks from the repository root as modules, e.g. ``python -m bench.train_speed --quick``.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "bench" / "results"
WORKER_PREFIX = "BENCH-RESULT "
STOP_GRACE_S = 60.0  # a timed-out worker's time between SIGTERM and SIGKILL
THREADS_HELP = "torch threads (default: torch's own choice; 1 with --quick)"

_live_workers: set[subprocess.Popen[str]] = set()  # what forward_stop_signals passes a signal on to
_live_workers_lock = threading.Lock()


# ------------------------------------------------------------------------------- command line


def parser(
    doc: str, script: str, *, device: bool = False, threads: int | bool | None = False, store: bool = False
) -> argparse.ArgumentParser:
    """A benchmark's parser with the flags they share: ``--out`` (default ``bench/results/<script>``)
    and ``--quick``; with ``device`` ``--device cpu|cuda``; with ``threads`` (its default: an int, or
    None for torch's own choice) ``--threads``; with ``store`` ``--store``/``--name``/``--version``."""
    p = argparse.ArgumentParser(prog=f"bench.{script}", description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, default=default_out(script), help="results folder")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    if device:
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    if threads is not False:
        text = THREADS_HELP if threads is None else f"torch threads (default {threads})"
        p.add_argument("--threads", type=int, default=threads, help=text)
    if store:
        p.add_argument("--store", type=Path, help="model store (default: a freshly initialized policy)")
        p.add_argument("--name", help="model name in the store (with --store)")
        p.add_argument("--version", help="version (default: latest)")
    return p


def parse(
    p: argparse.ArgumentParser,
    argv: Sequence[str],
    defaults: dict[str, tuple[Any, Any]] | Callable[[argparse.Namespace], dict] | None = None,
    positive: Sequence[str] = (),
    non_negative: Sequence[str] = (),
) -> argparse.Namespace:
    """Parse ``argv``; fill each unset flag of ``defaults`` (or of what it returns for the parsed
    flags, where defaults depend on one) with its (full, ``--quick``) value; exit
    with a usage error when a ``positive`` flag is below 1 or a ``non_negative`` one below 0.

    ``--threads`` left unset is 1 with ``--quick`` (the shared cores only spin with more), and
    ``--store`` and ``--name`` go together."""
    args = p.parse_args(argv)
    defaults = defaults(args) if callable(defaults) else defaults
    for name, (full, quick) in (defaults or {}).items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if getattr(args, "threads", 0) is None and args.quick:
        args.threads = 1
    if hasattr(args, "name") and (args.store is None) != (args.name is None):
        p.error("--store and --name go together")
    for names, low, what in ((positive, 1, "positive"), (non_negative, 0, ">= 0")):
        for name in names:
            value = getattr(args, name)
            values = value if isinstance(value, list) else [value]
            if any(v is not None and v < low for v in values):
                p.error(f"--{name.replace('_', '-')} must be {what}")
    return args


def default_out(script: str) -> Path:
    return RESULTS_ROOT / script


def command_line(module: str, argv: Sequence[str]) -> str:
    return shlex.join(["python", "-m", module, *argv])


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------------------------ machine


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
    }
    info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    info |= {"python": platform.python_version(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


# ------------------------------------------------------------------------------------- report


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numeric-looking columns are right-aligned."""

    def numeric(col: int) -> bool:
        cells = [str(r[col]) for r in rows if str(r[col]) not in ("", "-")]
        return bool(cells) and all(c.lstrip("-+").replace(".", "", 1)[:1].isdigit() for c in cells)

    align = ["---:" if numeric(i) else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def format_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (dicts): one column per (header, ``str.format`` template of a row)."""
    return markdown_table([h for h, _ in columns], [[f.format(**r) for _, f in columns] for r in rows])


def new_figure(
    ncols: int = 1, width: float = 6.0, height: float = 4.0, sharey: bool = False
) -> tuple[Figure, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, sharey=sharey)


def header(script: str, argv: Sequence[str], device: str = "cpu") -> dict[str, Any]:
    """What every results.json starts with (and :func:`write_report` needs)."""
    command = command_line(f"bench.{script}", argv)
    return {"script": script, "machine": machine(device), "date": now_utc(), "command": command}


def mean_std(values: Sequence[float]) -> str:
    """Mean ± std over seeds; one seed has no spread to show, so it is the value alone."""
    if len(values) < 2:
        return f"{values[0]:.1f}" if len(values) else "-"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


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

    ``payload`` must hold ``machine``, ``command`` and ``date`` (see :func:`header`). Files are
    written to temporary names and renamed, so an interrupted run leaves the previous results intact.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    head = header_lines(title, payload["machine"], payload["command"], payload["date"])
    md = "\n".join([*head, *(f"- {n}" for n in notes), "", table, ""])
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


# ------------------------------------------------------------------------------------ workers


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
        what = f"stopping {len(workers)} worker(s), each saves its state first"
        print(f"{signal.Signals(signum).name}: {what}", file=sys.stderr, flush=True)
        for proc in workers:
            proc.terminate()
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def command_or_worker(argv: Sequence[str] | None, work: Callable[[dict], dict]) -> list[str] | None:
    """A benchmark's command line (``sys.argv[1:]`` when ``argv`` is None), or None once it was a
    ``--worker JSON`` call and :func:`serve_worker` ran ``work`` for it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return None if serve_worker(argv, work) else argv


def serve_worker(argv: Sequence[str], work: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """If ``argv`` is ``--worker JSON``, run ``work(spec)`` and report its result (or its error, so
    the other rows still run) as one marked JSON line on stdout, and return True; else False."""
    if list(argv[:1]) != ["--worker"]:
        return False
    try:
        result = work(json.loads(argv[1]))
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    print(WORKER_PREFIX + json.dumps(result, default=_jsonable), flush=True)
    return True
