"""Training speed: updates/s of DMM and the Decision Transformer baseline, eager, torch.compile and
(on a GPU) torch.compile with CUDA graphs (``mode="reduce-overhead"``).

Each row (variant x compile mode x scan backend x torch threads) runs in a fresh subprocess. DMM
rows run once per ``--backends`` entry: a scan backend (torch, numba) or ``floor``, the same model
with the scan replaced by an elementwise op of the same inputs and output shape, so "update time /
floor time" says how much of an update the scan still costs. A row builds the policy as the trainer
does (paper settings from the family's YAML; DT's from dt.yaml), runs the trainer's update
(sample a batch, forward, masked action MSE, backward, clip, AdamW step) for ``--warmup`` untimed
updates (compilation happens there), then ``--chunks`` timed chunks of ``--chunk`` updates, and
reports the median chunk rate. Peak memory: CUDA ``max_memory_allocated``; CPU the process's peak
RSS (``ru_maxrss``), total and the growth during training (the dataset is already loaded before).

    python -m bench.train_speed                     # CPU, eager and compile, shared hopper data
    python -m bench.train_speed --variants dmm --threads 1 2 --backends torch numba floor
    python -m bench.train_speed --device cuda
    python -m bench.train_speed --quick             # tiny smoke run
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from bench import harness
from bench.common import SHARED_HOPPER, VARIANTS, synthetic_dataset, train_config

SCRIPT = "train_speed"
MODULE = f"bench.{SCRIPT}"
DEFAULT_VARIANTS = ("dmm", "dt", "dt-k8")
DEFAULT_BACKENDS = {"cpu": ("torch", "numba", "floor"), "cuda": ("torch", "cuda", "floor")}
COMPILE_MODES = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}


def scan_free(u, delta, A, B, C, D, h0=None, backend=None):
    """The floor's stand-in for the selective scan: elementwise, same inputs (but A) and outputs."""
    y = u * D + delta * u * (B * C).sum(-1, keepdim=True)
    return y, u.new_zeros(u.shape[0], u.shape[2], A.shape[1])


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def time_updates(update: Callable[[], float], spec: dict[str, Any]) -> tuple[float, list[float], float]:
    """(warm-up seconds, updates/s of each timed chunk, the last loss)."""
    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        update()
    warmup_s = time.perf_counter() - start
    rates = []
    for _ in range(spec["chunks"]):
        t0 = time.perf_counter()
        for _ in range(spec["chunk"]):
            loss = update()
        rates.append(spec["chunk"] / (time.perf_counter() - t0))
    return warmup_s, rates, loss


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One row, in this process: build, warm up, time ``chunks`` chunks of ``chunk`` updates."""
    import torch

    from dmm.data import WindowSampler, load_dataset
    from dmm.trainer.train import TrainStep, build_policy

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    variant = VARIANTS[spec["variant"]]
    dataset = load_dataset(spec["dataset"]) if spec["dataset"] else synthetic_dataset()
    device = torch.device(spec["device"])
    overrides = {k: spec[k] for k in ("batch_size", "device")} | {"compile": spec["compile"] is not None}
    cfg = train_config(variant, dataset.env or dataset.name, overrides)
    model, meta = build_policy(cfg, dataset)
    model.to(device).train()
    if spec["backend"] == "floor":
        import dmm.model.mamba

        dmm.model.mamba.selective_scan = scan_free
    elif spec["backend"] != "-":
        model.set_scan_backend(spec["backend"])
    sampler = WindowSampler(dataset, cfg.model.context, cfg.batch_size, meta.rtg_scale, seed=cfg.seed)
    step = TrainStep(model, cfg, device)
    if spec["compile"] is not None:  # the row's mode, not the trainer's choice for the device
        step.forward = torch.compile(model, mode=spec["compile"])

    rss_before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s, rates, loss = time_updates(lambda: step(sampler.sample()), spec)
    result = {"num_parameters": model.num_parameters(), "context": cfg.model.context}
    result |= {"d_model": cfg.model.d_model, "batch_size": cfg.batch_size, "warmup_seconds": warmup_s}
    result |= {"chunk_rates": rates, "updates_per_second": harness.median(rates), "final_loss": loss}
    result["torch_threads"] = torch.get_num_threads()
    result |= {"peak_rss_mib": _rss_mib(), "rss_growth_mib": max(0.0, _rss_mib() - rss_before)}
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = harness.parser(__doc__, SCRIPT, device=True)
    add = p.add_argument
    add("--variants", nargs="+", choices=tuple(VARIANTS), help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    add("--modes", nargs="+", choices=COMPILE_MODES, help="default: eager compile (+cudagraphs on cuda)")
    add(
        "--backends",
        nargs="+",
        choices=("torch", "numba", "cuda", "floor"),
        help="scan backends of DMM rows; floor: no scan (default: torch numba floor; on cuda torch cuda "
        "floor, cuda where mamba_ssm is installed)",
    )
    add("--batch-size", type=int, default=64)
    add("--warmup", type=int, help="untimed updates first (default 50; 5 with --quick)")
    add("--chunk", type=int, help="updates per timed chunk (default 100; 5 with --quick)")
    add("--chunks", type=int, help="timed chunks; the median is reported (default 10; 3 --quick)")
    add(
        "--dataset",
        help="hdf5/pkl file or D4RL name; 'synthetic' for random data "
        "(default: the shared hopper-medium-sim-v4 file if present, else synthetic; synthetic with --quick)",
    )
    add(
        "--threads",
        type=int,
        nargs="+",
        help="torch threads per row, one row per value (default: torch's own choice; 1 with --quick, "
        "where the cores are shared and oversubscribed threads only spin)",
    )
    add("--row-timeout", type=float, default=3600.0, help="seconds per row at most")
    shared = str(SHARED_HOPPER) if SHARED_HOPPER.is_file() else "synthetic"
    defaults = {"variants": (list(DEFAULT_VARIANTS),) * 2, "threads": ([None], [1])}
    defaults |= {"dataset": (shared, "synthetic"), "warmup": (50, 5), "chunk": (100, 5), "chunks": (10, 3)}
    positive = ("threads", "batch_size", "chunk", "chunks")
    args = harness.parse(p, argv, defaults, positive=positive, non_negative=("warmup",))
    cudagraphs = ["cudagraphs"] if args.device == "cuda" and not args.quick else []
    args.modes = args.modes or (["eager"] if args.quick else ["eager", "compile"]) + cudagraphs
    args.backends = args.backends or _default_backends(args.device)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA GPU")
    elif "cudagraphs" in args.modes:
        p.error("--modes cudagraphs needs --device cuda")
    return args


def _default_backends(device: str) -> list[str]:
    from dmm.model.scan import cuda_backend_available

    return [b for b in DEFAULT_BACKENDS[device] if b != "cuda" or cuda_backend_available()]


def run_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (variant, mode, backend, threads) row in its own worker process."""
    rows = []
    shared = {k: getattr(args, k) for k in ("device", "batch_size", "warmup", "chunk", "chunks")}
    shared["dataset"] = None if args.dataset == "synthetic" else args.dataset
    for key in args.variants:
        # the DT baseline has no scan: one row per mode and thread count
        backends = args.backends if VARIANTS[key].architecture == "dmm" else ["-"]
        for mode, backend, threads in itertools.product(args.modes, backends, args.threads):
            row = {"variant": key, "label": VARIANTS[key].label, "mode": mode, "backend": backend}
            print(f"{row['label']}, {mode}, scan {backend}, threads {threads}: running...", file=sys.stderr)
            spec = {**shared, "variant": key, "compile": COMPILE_MODES[mode], "backend": backend}
            rows.append({**row, **harness.run_worker(MODULE, {**spec, "threads": threads}, args.row_timeout)})
    return rows


def _ratios(r: dict[str, Any], rate: dict[tuple, float]) -> list[float | None]:
    """x DMM-torch (same mode, threads), x own eager, x torch scan, update time / floor update time."""
    ups, mode, threads = r["updates_per_second"], r["mode"], r["torch_threads"]
    refs = [
        rate.get(("dmm", mode, "torch", threads)),
        rate.get((r["variant"], "eager", r["backend"], threads)),
        rate.get((r["variant"], mode, "torch", threads)) if r["backend"] != "-" else None,
    ]
    ratios = [ups / ref if ref else None for ref in refs]
    floor = rate.get((r["variant"], mode, "floor", threads)) if r["backend"] != "-" else None
    return [*ratios, floor / ups if floor else None]


def table(rows: list[dict[str, Any]], device: str) -> str:
    """The table; each row also gets its ratios (``x_dmm_torch``, ..., ``time_vs_floor``)."""
    mem_key = "peak_cuda_mib" if device == "cuda" else "peak_rss_mib"
    ok = [r for r in rows if "error" not in r]
    rate = {(r["variant"], r["mode"], r["backend"], r["torch_threads"]): r["updates_per_second"] for r in ok}
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r["label"], r["mode"], r["backend"], *["-"] * 11, f"error: {r['error']}"])
            continue
        ratios = _ratios(r, rate)
        r.update(zip(("x_dmm_torch", "x_own_eager", "x_torch_scan", "time_vs_floor"), ratios, strict=True))
        mem = f"{r[mem_key]:.0f}" + ("" if device == "cuda" else f" (+{r['rss_growth_mib']:.0f})")
        ups, chunks = r["updates_per_second"], r["chunk_rates"]
        row = [r[k] for k in ("label", "mode", "backend", "torch_threads", "context")]
        row += [f"{r['num_parameters']:,}", f"{ups:.1f}", f"{1e3 / ups:.0f}"]
        row += [f"{min(chunks):.1f}-{max(chunks):.1f}", *(f"{x:.2f}" if x else "-" for x in ratios)]
        cells.append([*row, mem, f"{r['warmup_seconds']:.1f}"])
    mem_header = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB (+training)"
    headers = ["model", "mode", "scan", "threads", "K", "params", "updates/s (median)", "ms/update"]
    headers += ["chunk range", "x DMM torch-scan", "x own eager", "x torch scan", "time / floor"]
    return harness.markdown_table([*headers, mem_header, "warm-up s"], cells)


def figure(rows: list[dict[str, Any]], args: argparse.Namespace, cores: int) -> Any:
    """Updates/s per row (bars), each timed chunk a dot."""
    fig, axes = harness.new_figure(width=max(6.0, 1.3 * len(rows)))
    ax = axes[0][0]
    ok = [r for r in rows if "error" not in r]
    ax.bar(
        [f"{r['label']}\n{r['mode']}\n{r['backend']} x{r['torch_threads']}" for r in ok],
        [r["updates_per_second"] for r in ok],
        color=["tab:blue" if r["mode"] == "eager" else "tab:orange" for r in ok],
    )
    for i, r in enumerate(ok):
        ax.plot([i] * len(r["chunk_rates"]), r["chunk_rates"], "k.", ms=3)
    title = f"training speed, batch {args.batch_size}, {args.device} ({cores} cores)"
    ax.set(ylabel="updates/s (median; dots: chunks)", title=title)
    ax.tick_params(axis="x", labelsize=7)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    if (argv := harness.command_or_worker(argv, measure)) is None:
        return 0
    args = parse_args(argv)
    rows = run_rows(args)
    report = table(rows, args.device)
    settings = ("device", "batch_size", "warmup", "chunk", "chunks", "dataset", "threads", "backends")
    payload = harness.header(SCRIPT, argv, args.device)
    payload |= {"settings": {k: getattr(args, k) for k in settings}, "rows": rows}
    notes = [
        f"data: {args.dataset}; batch {args.batch_size}; {args.warmup} warm-up updates, then the median "
        f"of {args.chunks} chunks of {args.chunk} updates; every row in its own process",
        "an update = sample a batch, forward, masked action MSE, backward, clip 0.25, AdamW step, read loss",
        "ratios compare rows of one run at the same thread count; x DMM torch-scan: against DMM with the "
        "torch scan in the same mode; time / floor: this row's update time over the scan-free floor's",
    ]
    fig = figure(rows, args, payload["machine"]["usable_cores"])
    harness.write_report(args.out, SCRIPT, "Training speed (updates/s)", report, payload, fig, notes)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
