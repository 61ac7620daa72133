"""One prepared command for a bare GPU host (``python -m bench.device``): environment, CUDA tests,
training speed, GPU-resident serving and (with the time left) the 100k-update score runs, within one
time budget.

GPU hosts are lent for minutes, bare (Python with torch and triton, no network), so everything this
project wants to know from a GPU is gathered by one rehearsed command. The steps run in the order of
what their results are worth; each writes into ``--out`` (8 files at most: ``device.json``,
``device.md``, ``tests.log``, ``train_speed.json``, ``graph_speed.json``, ``serve.json``,
``scores.json``, ``collect.log``),
prints a one-line summary, and is skipped with its reason (never a crash) when a prerequisite is
missing or the budget is spent. ``device.json`` and ``device.md`` are rewritten after every step, so
a run cut short still leaves what it measured.

1. ``env``: GPU, driver, torch/triton versions; installs the wheels from ``tools/device/wheels.sh``
   (``.whl/``) and the project into ``--site`` and checks that every dependency imports. The score
   data are not carried (82 MB): when absent they are re-collected in the background from the D4RL
   reference policy with the recipe of ../shared/data/README.md and checked against its digest
   (about 250 s on one core), unless ``runs/device-data`` travels with a packed copy
   (``python -m bench.device --pack-data`` here: 44 MB, unpacked on the host in seconds).
2. ``tests``: the CUDA-marked tests (GPU runner = CPU runner, captured CUDA graphs = plain GPU step,
   ``dmm serve --device cuda``, the mamba_ssm backend against the torch scan where mamba_ssm is
   installed).
3. ``train``: ``bench.train_speed`` on the GPU: DMM and DT, eager / compile / CUDA graphs.
4. ``serve``: first the policy step alone, plain against CUDA graphs (``tools.device.graph_speed``:
   B = 1 / 32 / 256 / 1024, window and recurrent), then ``bench.serve --device cuda``: 1024
   recurrent sessions on 1-8 server workers, client processes on half of the cores.
5. ``scores``: ``bench.scores`` for DMM and DT x 3 seeds at 100k updates (``--score-variants``,
   ``--score-seeds``), all runs at once, in resumable run folders (``runs/device-scores``): run the
   command again on the same machine (``--steps scores``) to continue them.

    bash tools/device/wheels.sh                  # here, once: the wheels the host lacks
    python -m bench.device                       # on the GPU host (writes bench/results/device)
    python -m bench.device --dry-run             # every step at tiny sizes on the CPU (into a new
                                                 # temporary folder, printed; --out to choose it)
    python -m bench.device --pack-data           # here: the score data packed to travel
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import SHARED_HOPPER
from bench.harness import (
    REPO_ROOT,
    command_line,
    cpu_model,
    default_out,
    markdown_table,
    now_utc,
    usable_cores,
)
from tools.device.data import data_digest, pack_data, unpack_data

SCRIPT = "device"
MODULE = f"bench.{SCRIPT}"
STEPS = ("env", "tests", "train", "serve", "scores")
WHEELS = REPO_ROOT / ".whl"
SITE = REPO_ROOT / ".device-site"
BEHAVIOUR_POLICY = REPO_ROOT / "deploy" / "policies" / "hopper_online_5.npz"  # D4RL's, bundled
COLLECT_STEPS = 1_000_000  # the shared file's recipe (../shared/data/README.md)
DRY_RUN_COLLECT_STEPS = 3_000
DATA = REPO_ROOT / "runs" / "device-data" / SHARED_HOPPER.name  # ignored, so kept on a warm host
PACKED_DATA = DATA.with_suffix(".packed.npz")  # carried: `--pack-data` here, unpacked there
SCORE_RUNS = REPO_ROOT / "runs" / "device-scores"
# data_digest() of ../shared/data/hopper-medium-sim-v4.hdf5: a re-collected copy has it where the
# rollouts are bit-identical to the ones that made the shared file.
DATA_DIGEST = "52367535eb808b4200e9449ea2c15fb3387f284a4ad10c49d141c9388be1e734"
REQUIRED_MODULES = (
    "torch",
    "numpy",
    "pydantic",
    "gymnasium",
    "mujoco",
    "numba",
    "h5py",
    "safetensors",
    "yaml",
    "tqdm",
    "matplotlib",
)
# What the tests and serve steps need beyond them (`tools/device/wheels.sh --scores-only` leaves it behind)
SERVING_MODULES = (
    "grpc",
    "grpc_health",
    "grpc_reflection",
    "google.protobuf",
    "prometheus_client",
    "dmm.v1.policy_pb2_grpc",
    "dmm.server.app",
)
SERVING_STEPS = {"tests", "serve"}
STEP_SECONDS = {"tests": 180, "train": 240, "serve": 240}  # caps; the scores get what is left
GRAPH_SECONDS = 120  # cap of the graph timing within the serve step (before bench.serve's own cap)
MIN_SECONDS = 45  # a step with less left is skipped
RESERVE_SECONDS = 15  # kept for writing the report


@dataclass
class Step:
    """One step's record in device.json."""

    name: str
    status: str = "pending"  # ok | failed | skipped
    summary: str = ""
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    markdown: str = ""


class Device:
    """The run: budget, environment for subprocesses, output folder and the step records."""

    def __init__(self, args: argparse.Namespace, argv: Sequence[str]) -> None:
        self.args = args
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget
        self.work = Path(tempfile.mkdtemp(prefix="dmm-device-"))
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.steps: list[Step] = []
        self.started = now_utc()
        self.command = command_line(MODULE, argv)
        self.collector: subprocess.Popen[bytes] | None = None
        self.data = DATA  # where the collector writes the score data

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_SECONDS

    def run(self, cmd: Sequence[str], timeout_s: float, log: Path | None = None) -> tuple[int, str]:
        """Run ``cmd`` (its own process group) for at most ``timeout_s``; (exit status, output tail).

        On time-out the group gets SIGTERM (resumable training saves its state), then SIGKILL.
        """
        sink = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            list(cmd),
            cwd=REPO_ROOT,
            env=self.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGTERM)
            try:
                out, _ = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                out, _ = proc.communicate()
            out = (out or b"") + f"\n[timed out after {timeout_s:.0f} s]".encode()
            rc = 124
        else:
            rc = proc.returncode
        finally:
            if log:
                sink.close()
        text = log.read_text(errors="replace") if log else (out or b"").decode(errors="replace")
        return rc, text[-4000:]

    def python(self, module: str, *args: str, timeout_s: float, log: Path | None = None) -> tuple[int, str]:
        return self.run([sys.executable, "-m", module, *args], timeout_s, log)

    def write(self) -> None:
        """device.json and device.md as they stand (after every step)."""
        payload = {
            "script": SCRIPT,
            "date": self.started,
            "command": self.command,
            "dry_run": self.args.dry_run,
            "steps": [{k: v for k, v in vars(s).items() if k != "markdown"} for s in self.steps],
        }
        (self.out / "device.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
        env = next((s for s in self.steps if s.name == "env"), None)
        lines = [
            "## Device run" + (" (dry run on the CPU)" if self.args.dry_run else ""),
            "",
            f"- date: {self.started}",
            f"- command: `{self.command}`",
        ]
        if env:
            lines.append(f"- machine: {env.summary}")
        lines += ["", markdown_table(["step", "status", "seconds", "summary"], self._rows()), ""]
        for s in self.steps:
            if s.markdown:
                lines += [f"### {s.name}", "", s.markdown.strip(), ""]
        (self.out / "device.md").write_text("\n".join(lines))

    def _rows(self) -> list[list[Any]]:
        return [[s.name, s.status, f"{s.seconds:.0f}", s.summary.replace("|", "/")] for s in self.steps]


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _cuda(device: Device) -> bool:
    env = next((s for s in device.steps if s.name == "env"), None)
    return bool(env and env.details.get("cuda_available"))


# ---------------------------------------------------------------------------------------- steps


def step_env(device: Device, step: Step) -> None:
    """Versions, GPU, wheels and the project installed into the site folder, every dependency importable."""
    _install(device, step)
    _, out = device.python("bench.device", "--probe", timeout_s=120)
    try:
        probe = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        step.status, step.summary = "failed", f"probe failed: {out[-300:]}"
        return
    step.details.update(probe)
    needed = REQUIRED_MODULES + (SERVING_MODULES if SERVING_STEPS & set(device.args.steps) else ())
    missing = {k: v for k, v in probe["modules"].items() if k in needed and not v.startswith("ok")}
    gpu = probe.get("gpu") or "no CUDA GPU"
    step.summary = (
        f"{gpu}; {probe['cpu']} ({probe['cores']} cores); torch {probe['torch']}, "
        f"triton {probe.get('triton')}, python {probe['python']}"
    )
    if missing:
        step.status = "failed"
        step.summary += "; missing: " + ", ".join(f"{k} ({v})" for k, v in missing.items())
    else:
        step.status = "ok"
    _start_collect(device, step)


def _install(device: Device, step: Step) -> None:
    """pip-install the carried wheels (not in a dry run: they are for the host's Python) and the
    project into a site folder that every later subprocess imports first.

    ``PYTHONSAFEPATH`` keeps the working directory off ``sys.path``: from the repository root, its
    ``dmm/`` folder would otherwise shadow the installed package, which alone has ``dmm.trainer``,
    ``dmm.server`` and ``dmm.client`` mapped in (setuptools ``package-dir``). The repository root
    comes after the site folder, for ``bench`` and ``tests``.
    """
    site = device.work / "site" if device.args.dry_run else SITE
    wheels = [] if device.args.dry_run else sorted(str(p) for p in WHEELS.glob("*.whl"))
    pip = ["pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation", "--no-compile"]
    rc, out = device.python(*pip, "--upgrade", "--target", str(site), *wheels, str(REPO_ROOT), timeout_s=180)
    step.details["install"] = {"site": str(site), "wheels": [Path(w).name for w in wheels], "status": rc}
    if rc != 0:
        step.details["install"]["output"] = out[-1500:]
        return
    path = [str(site), str(REPO_ROOT), device.env.get("PYTHONPATH")]
    device.env.update(PYTHONPATH=os.pathsep.join(filter(None, path)), PYTHONSAFEPATH="1")


def probe() -> dict[str, Any]:
    """What this Python sees (run in a subprocess, with the installed site on its path)."""
    import importlib
    import platform

    modules = {}
    for name in REQUIRED_MODULES + SERVING_MODULES:
        try:
            mod = importlib.import_module(name)
            modules[name] = "ok " + str(getattr(mod, "__version__", ""))
        except Exception as err:  # report, never crash: the step says what is missing
            modules[name] = f"{type(err).__name__}: {err}"[:200]
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "modules": modules,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        info["cuda"] = torch.version.cuda
    from dmm.model.scan import cuda_backend_available

    info["mamba_ssm"] = cuda_backend_available()
    info["dmm_from"] = str(Path(importlib.import_module("dmm").__file__).parent)
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        info["nvidia_smi"] = f"unavailable: {err}"
    return info


def _start_collect(device: Device, step: Step) -> None:
    """Collect the score data in the background when they are not here (the scores step waits).

    A dry run always collects a few thousand steps into its work folder, to rehearse this path.
    """
    if "scores" not in device.args.steps:
        return
    if not device.args.dry_run and not DATA.is_file() and PACKED_DATA.is_file():
        unpack_data(PACKED_DATA, DATA)
    if not device.args.dry_run and (SHARED_HOPPER.is_file() or DATA.is_file()):
        step.details["data"] = str(SHARED_HOPPER if SHARED_HOPPER.is_file() else DATA)
        return
    if not BEHAVIOUR_POLICY.is_file():
        step.details["data"] = f"absent, and no behaviour policy at {BEHAVIOUR_POLICY} to collect them"
        return
    device.data = device.work / DATA.name if device.args.dry_run else DATA
    device.data.parent.mkdir(parents=True, exist_ok=True)
    steps = DRY_RUN_COLLECT_STEPS if device.args.dry_run else COLLECT_STEPS
    cmd = [
        sys.executable,
        "-m",
        "dmm.cli",
        "collect",
        "--env",
        "Hopper-v4",
        "--policy",
        str(BEHAVIOUR_POLICY),
    ]
    cmd += ["--steps", str(steps), "--seed", "0", "--out", str(device.data)]
    log = open(device.out / "collect.log", "w")  # noqa: SIM115 (the collector outlives this function)
    device.collector = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=device.env, stdout=log, stderr=subprocess.STDOUT
    )
    step.details["data"] = f"collecting {steps} steps into {device.data} in the background"


def step_tests(device: Device, step: Step) -> None:
    if not _cuda(device) and not device.args.dry_run:
        step.status, step.summary = "skipped", "torch sees no CUDA GPU"
        return
    log = device.out / "tests.log"
    cmd = [
        "pytest",
        "-m",
        "cuda",
        "-rs",
        "-p",
        "no:cacheprovider",
        "tests/test_cuda.py",
        "tests/test_model.py",
        "tests/test_graphs.py",
    ]
    rc, out = device.python(*cmd, timeout_s=min(STEP_SECONDS["tests"], device.left()), log=log)
    last = [line for line in out.splitlines() if line.strip()][-1:] or ["no output"]
    step.status = "ok" if rc == 0 else "failed"
    step.summary = last[0].strip("= ")


def _bench_step(
    device: Device, step: Step, module: str, args: list[str], cap_s: float, summarize: Callable[[dict], str]
) -> None:
    """Run a bench module into the work folder; keep its JSON as <module>.json and its table."""
    step.status, step.summary, step.markdown = _bench(device, module, args, cap_s, summarize)


def _bench(
    device: Device, module: str, args: list[str], cap_s: float, summarize: Callable[[dict], str]
) -> tuple[str, str, str]:
    """Run a module that writes results.json and results.md (``--out``) into the work folder and keep
    its JSON as <module>.json; (status, summary, its table)."""
    name = module.split(".")[-1]
    out = device.work / name
    rc, tail = device.python(module, *args, "--out", str(out), timeout_s=min(cap_s, device.left()))
    results = out / "results.json"
    if not results.is_file():
        return "failed", f"exit {rc}: " + " / ".join(tail.strip().splitlines()[-3:]), ""
    payload = json.loads(results.read_text())
    (device.out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    summary = summarize(payload) + ("" if rc == 0 else f" (exit {rc})")
    return ("ok" if rc == 0 else "failed"), summary, (out / "results.md").read_text()


def step_train(device: Device, step: Step) -> None:
    if device.args.dry_run:
        args = ["--quick", "--variants", "dmm", "dt", "--backends", "torch"]
    elif not _cuda(device):
        step.status, step.summary = "skipped", "torch sees no CUDA GPU"
        return
    else:
        args = ["--device", "cuda", "--variants", "dmm", "dt", "--dataset", "synthetic"]
        args += ["--modes", "eager", "compile", "cudagraphs", "--backends", "torch"]
        args += ["cuda"] if device.steps[0].details.get("mamba_ssm") else []
        args += ["--warmup", "30", "--chunk", "100", "--chunks", "5", "--row-timeout", "90"]
    _bench_step(device, step, "bench.train_speed", args, STEP_SECONDS["train"], _train_summary)


def _train_summary(payload: dict) -> str:
    best: dict[str, tuple[float, str]] = {}
    for r in payload["rows"]:
        if "error" not in r and r["updates_per_second"] > best.get(r["variant"], (0.0, ""))[0]:
            best[r["variant"]] = (r["updates_per_second"], f"{r['mode']}/{r['backend']}")
    return "; ".join(f"{v}: {ups:.0f} updates/s ({how})" for v, (ups, how) in best.items()) or "no rows"


def step_serve(device: Device, step: Step) -> None:
    """The policy step alone, plain against CUDA graphs (:func:`_graph_speed`); then 1024 recurrent
    episodes as Act streams and as ActVector streams of 32, on 1/2/4/8 server workers (the sweep over
    1-1024 sessions is in the first run's results)."""
    if not device.args.dry_run and not _cuda(device):
        step.status, step.summary = "skipped", "torch sees no CUDA GPU"
        return
    graphs = _graph_speed(device)
    _serve(device, step)
    step.summary = f"{graphs[1]}; {step.summary}"
    step.markdown = "\n\n".join(filter(None, [graphs[2], step.markdown]))
    if graphs[0] != "ok":
        step.status = "failed"


def _graph_speed(device: Device) -> tuple[str, str, str]:
    """``tools.device.graph_speed``: PolicyRunner's plain torch step against the GraphedRunner's CUDA
    graphs at B = 1 / 32 / 256 / 1024 in both modes (a dry run: B = 1 / 4 on the CPU, run eagerly)."""
    args = ["--quick"] if device.args.dry_run else ["--device", "cuda"]
    return _bench(device, "tools.device.graph_speed", args, GRAPH_SECONDS, _graph_summary)


def _graph_summary(payload: dict) -> str:
    """Per mode: the median step plain -> graphed at the smallest and the largest B, and actions/s."""
    rows = {(r["mode"], r["batch"], r["step"]): r for r in payload["rows"]}
    parts = []
    for mode in dict.fromkeys(r["mode"] for r in payload["rows"]):
        batches = sorted({b for m, b, _ in rows if m == mode})
        for batch in dict.fromkeys([batches[0], batches[-1]]):
            plain, graphed = rows[(mode, batch, "plain")], rows[(mode, batch, "graphed")]
            parts.append(
                f"{mode} B={batch} {plain['median_step_ms']:.2f} -> {graphed['median_step_ms']:.2f} ms "
                f"({graphed['actions_per_second']:.0f}/s, diff {graphed['max_action_difference']:.0e})"
            )
    return "graphs: " + ", ".join(parts) if parts else "graphs: no rows"


def _serve(device: Device, step: Step) -> None:
    if device.args.dry_run:
        args = [
            "--quick",
            "--batching",
            "on",
            "--client-cores",
            "0",
            "--sessions",
            "4",
            "--modes",
            "recurrent",
        ]
        args += ["--workers", "1", "2", "--episodes-per-stream", "1", "2"]
    else:
        args = ["--device", "cuda", "--sessions", "1024", "--modes", "recurrent", "--batching", "on"]
        args += ["--workers", "1", "2", "4", "8", "--episodes-per-stream", "1", "32"]
        args += ["--client-cores", str(max(1, usable_cores() // 2)), "--duration", "6", "--warmup", "5"]
    _bench_step(device, step, "bench.serve", args, STEP_SECONDS["serve"], _serve_summary)


def _serve_summary(payload: dict) -> str:
    """Actions/s and p99 of each row (workers, episodes per stream); GPU memory of the biggest row."""
    parts = []
    for r in payload["rows"]:
        if r["p99_us"] is not None:
            parts.append(
                f"{r['mode']} x{r['sessions']}, {r['workers']}w, {r['episodes_per_stream']}/stream: "
                f"{r['actions_per_second']:.0f}/s, p99 {r['p99_us'] / 1e3:.1f} ms"
            )
    gpu = [r["server_gpu_mib"] for r in payload["rows"] if r.get("server_gpu_mib")]
    if gpu:
        parts.append(f"server GPU memory up to {max(gpu):.0f} MiB")
    return "; ".join(parts) or "no rows"


def step_scores(device: Device, step: Step) -> None:
    if not _cuda(device) and not device.args.dry_run:
        step.status, step.summary = "skipped", "torch sees no CUDA GPU"
        return
    data = _wait_for_data(device, step)
    if data is None:
        return
    args = ["--dataset", str(data)]
    if device.args.dry_run:
        args += ["--quick", "--variants", "dmm", "--run-root", str(device.work / "runs")]
    else:
        variants, seeds = device.args.score_variants, device.args.score_seeds
        jobs = len(variants) * len(seeds)
        args += ["--device", "cuda", "--variants", *variants, "--seeds", *map(str, seeds)]
        args += ["--jobs", str(jobs), "--threads", str(max(1, usable_cores() // jobs))]
        args += ["--run-root", str(SCORE_RUNS), "--checkpoint-every", "5000"]
        # runs stopped at the time-out save their state (SIGTERM) within the workers' grace period
        args += ["--run-timeout", f"{max(1.0, device.left() - 90):.0f}"]
    _bench_step(device, step, "bench.scores", args, device.left(), _scores_summary)
    if step.status != "ok":
        step.details["runs"] = _run_progress(device.work / "runs" if device.args.dry_run else SCORE_RUNS)
        step.summary += "; progress: " + ", ".join(
            f"{k} {v['update']}" for k, v in step.details["runs"].items()
        )


def _wait_for_data(device: Device, step: Step) -> Path | None:
    """The score data: the shared file, or the collected copy once its collector is done."""
    if device.collector is None:
        for path in (SHARED_HOPPER, DATA):
            if path.is_file():
                return path
        step.status, step.summary = "skipped", "no score data and no collector (see the env step)"
        return None
    try:
        rc = device.collector.wait(timeout=max(1.0, device.left() - 120))
    except subprocess.TimeoutExpired:
        step.status, step.summary = "skipped", "the score data were still being collected"
        return None
    if rc != 0:
        step.status, step.summary = "failed", f"collecting the score data failed (exit {rc}; collect.log)"
        return None
    digest = data_digest(device.data)
    step.details["data"] = {
        "path": str(device.data),
        "digest": digest,
        "same_as_shared": digest == DATA_DIGEST,
    }
    return device.data


def _run_progress(root: Path) -> dict[str, Any]:
    """Update count and evaluations so far of every unfinished run folder under ``root``."""
    import torch

    progress = {}
    for state_file in sorted(root.glob("*/state.pt")):
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        evals = state.get("metrics", {}).get("evals", [])
        progress[state_file.parent.name] = {"update": state["update"], "evals": evals}
    return progress


def _scores_summary(payload: dict) -> str:
    models = [m for m in payload["models"] if m["normalized_mean"] is not None]
    score = "{label}: {normalized_mean:.1f} ± {normalized_std:.1f} (paper protocol {paper_protocol_mean:.1f})"
    return "; ".join(score.format(**m) for m in models) or "no finished runs"


STEP_FUNCTIONS: dict[str, Callable[[Device, Step], None]] = {
    "env": step_env,
    "tests": step_tests,
    "train": step_train,
    "serve": step_serve,
    "scores": step_scores,
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default {default_out(SCRIPT).relative_to(REPO_ROOT)}; with --dry-run a new "
        "temporary folder, so that a rehearsal never overwrites a GPU host's committed results)",
    )
    p.add_argument("--dry-run", action="store_true", help="every step at tiny sizes on the CPU")
    p.add_argument("--budget", type=float, default=540.0, help="wall seconds for all steps (default 540)")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="env always runs first")
    p.add_argument(
        "--score-variants", nargs="+", default=["dmm", "dt"], help="bench.scores variants (default dmm dt)"
    )
    p.add_argument("--score-seeds", nargs="+", type=int, default=[0, 1, 2], help="default 0 1 2")
    args = p.parse_args(argv)
    args.out = resolve_out(args.out, args.dry_run)
    return args


def resolve_out(out: Path | None, dry_run: bool) -> Path:
    """The results folder: ``--out`` when given; else a new temporary folder for a dry run (the
    committed results of a GPU host stay as they are) and ``bench/results/device`` for a real run."""
    if out is not None:
        return out
    if dry_run:
        return Path(tempfile.mkdtemp(prefix="dmm-device-dry-run-"))
    return default_out(SCRIPT)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--probe"]:
        print(json.dumps(probe()))
        return 0
    if argv == ["--pack-data"]:
        pack_data(SHARED_HOPPER, PACKED_DATA)
        print(f"packed {SHARED_HOPPER} into {PACKED_DATA} ({PACKED_DATA.stat().st_size / 1e6:.1f} MB)")
        return 0
    args = parse_args(argv)
    if args.dry_run:
        print(f"dry run: results go to {args.out}", flush=True)
    device = Device(args, argv)
    for name in ["env", *(s for s in STEPS if s in args.steps and s != "env")]:
        step = Step(name)
        device.steps.append(step)
        start = time.monotonic()
        if name != "env" and device.left() < MIN_SECONDS:
            step.status, step.summary = "skipped", f"budget spent ({device.left():.0f} s left)"
        else:
            STEP_FUNCTIONS[name](device, step)
        step.seconds = time.monotonic() - start
        print(f"[{name}] {step.status}: {step.summary}", flush=True)
        device.write()
    if device.collector is not None and device.collector.poll() is None:
        device.collector.terminate()
    shutil.rmtree(device.work, ignore_errors=True)
    print(markdown_table(["step", "status", "seconds", "summary"], device._rows()))
    print(f"wrote {device.out / 'device.json'} and {device.out / 'device.md'}")
    return 0 if all(s.status in ("ok", "skipped") for s in device.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
