"""Scores: train DMM and the Decision Transformer baseline (and the ablations) over seeds, evaluate
the final checkpoints, and tabulate the normalized score (mean ± std over seeds).

Every (model, seed) trains in its own process with ``dmm.trainer.train.train`` (paper settings
from the family's YAML; DT's from dt.yaml), then its final checkpoint is evaluated on
``--episodes`` episodes at the environment's first target return (window mode, batched envs).
The score of a seed is the mean normalized return over its episodes: the final checkpoint, never
the best evaluation. With ``--run-root`` every run keeps a resumable run folder there (see
``dmm train --run-dir``): running the same command again resumes unfinished runs where they
stopped and reuses finished ones.

    python -m bench.scores --seeds 0 1 2                # 100k updates, shared hopper data
    python -m bench.scores --run-root runs/scores       # resumable: run it again to continue
    python -m bench.scores --ablations --updates 100000
    python -m bench.scores --device cuda --jobs 6        # every run at once on one GPU
    python -m bench.scores --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    ABLATIONS,
    SHARED_HOPPER,
    VARIANTS,
    data_label,
    default_out,
    forward_stop_signals,
    machine,
    markdown_table,
    median,
    new_figure,
    report_header,
    run_worker,
    serve_worker,
    train_config,
    write_report,
)

SCRIPT = "scores"
MODULE = f"bench.{SCRIPT}"
DEFAULT_VARIANTS = ("dmm", "dt")
RESULT_FILE = "result.json"  # in a run folder: the finished run's row


def train_and_evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """One (model, seed), in this process: train, publish, evaluate the final checkpoint."""
    import torch

    from dmm.data import load_dataset
    from dmm.store import ModelStore
    from dmm.trainer.run_dir import RunDir
    from dmm.trainer.train import train

    run = None
    if spec["run_root"]:
        run = RunDir(Path(spec["run_root"]) / spec["name"], spec["checkpoint_every"])
        if (run.path / RESULT_FILE).is_file():
            print(f"{spec['name']}: finished before, reusing its result", file=sys.stderr)
            return json.loads((run.path / RESULT_FILE).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dataset = load_dataset(spec["dataset"])
    targets = list(dataset.spec.target_returns)
    cfg = train_config(
        VARIANTS[spec["variant"]],
        dataset.env or dataset.name,
        {
            "updates": spec["updates"],
            "seed": spec["seed"],
            "device": spec["device"],
            "compile": spec["compile"],
            "eval_every": spec["eval_every"],
            "eval_episodes": spec["episodes"],
            "eval_num_envs": spec["num_envs"],
            "eval_mode": spec["mode"],
            "target_returns": targets,
        },
    )
    start = time.perf_counter()
    result = train(
        cfg,
        dataset,
        ModelStore(spec["store"]),
        spec["name"],
        progress=False,
        log=lambda line: print(f"{spec['name']}: {line}", file=sys.stderr, flush=True),
        run=run,
    )
    total = time.perf_counter() - start
    final = result.metrics["final_eval"][0]  # the default target: the honest score
    history = [
        {"update": e["update"], "target_return": e["target_return"], "normalized": e["normalized_mean"]}
        for e in result.metrics["evals"]
    ]
    row = {
        "version": result.version,
        "target_return": targets[0],
        "num_parameters": result.metrics["num_parameters"],
        "train_seconds": result.metrics["train_seconds"],
        "eval_seconds": total - result.metrics["train_seconds"],
        "updates_per_second": result.metrics["updates_per_second_median"],
        "final_loss": result.metrics["final_loss"],
        **{k: final[k] for k in ("episodes", "mean_return", "std_return", "mean_length")},
        "normalized": final["normalized_mean"],
        "normalized_std_over_episodes": final["normalized_std"],
        "eval_history": history,
        # the authors' protocol: the best evaluation over all updates and target returns
        "paper_protocol": max(e["normalized"] for e in history),
    }
    if run is not None:
        (run.path / RESULT_FILE).write_text(json.dumps(row))
    return row


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset", default=str(SHARED_HOPPER), help=f"hdf5/pkl file or D4RL name (default {SHARED_HOPPER})"
    )
    p.add_argument(
        "--variants", nargs="+", choices=tuple(VARIANTS), help=f"default: {' '.join(DEFAULT_VARIANTS)}"
    )
    p.add_argument("--ablations", action="store_true", help=f"also {' and '.join(ABLATIONS)}")
    p.add_argument("--updates", type=int, help="gradient updates per run (default 100000; 20 with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2; 0 with --quick")
    p.add_argument("--episodes", type=int, help="evaluation episodes per run (default 100; 2 with --quick)")
    p.add_argument("--num-envs", type=int, help="vector envs of the evaluation (default: --episodes)")
    p.add_argument("--mode", choices=("window", "recurrent"), default="window", help="evaluation inference")
    p.add_argument(
        "--eval-every",
        type=int,
        help="updates between evaluations at every target return, for the paper-protocol column "
        "(default 10000; 10 with --quick; 0: final checkpoint only)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile (default: on, as dmm train; off --quick)",
    )
    p.add_argument("--threads", type=int, help="torch threads per run (default: torch's; 1 with --quick)")
    p.add_argument(
        "--store",
        type=Path,
        help="keep the checkpoints in this store (default: RUN_ROOT/store, else a temporary one)",
    )
    p.add_argument(
        "--run-root",
        type=Path,
        help="keep a resumable run folder per run here; running again resumes unfinished runs",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=5000, help="updates between saved states with --run-root"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, each in its own process (default 1)"
    )
    p.add_argument("--run-timeout", type=float, default=24 * 3600.0, help="seconds per run at most")
    p.add_argument("--out", type=Path, default=default_out(SCRIPT))
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    args = p.parse_args(argv)
    q = args.quick
    variants = list(args.variants or DEFAULT_VARIANTS) + (list(ABLATIONS) if args.ablations else [])
    args.variants = list(dict.fromkeys(variants))
    args.updates = args.updates or (20 if q else 100_000)
    args.seeds = args.seeds if args.seeds is not None else ([0] if q else [0, 1, 2])
    args.episodes = args.episodes or (2 if q else 100)
    args.num_envs = args.num_envs or args.episodes
    args.eval_every = args.eval_every if args.eval_every is not None else (10 if q else 10_000)
    args.threads = args.threads if args.threads is not None else (1 if q else None)
    args.compile = args.compile if args.compile is not None else not q
    if min(args.updates, args.episodes, args.num_envs, args.jobs) < 1 or (
        args.threads is not None and args.threads < 1
    ):
        p.error("--updates, --episodes, --num-envs, --jobs and --threads must be positive")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    if args.dataset == str(SHARED_HOPPER) and not SHARED_HOPPER.is_file():
        p.error(
            f"{SHARED_HOPPER} is absent; pass --dataset (e.g. a file written by `dmm collect --env Hopper-v4 "
            "--policy hopper_online_5.npz --steps 1000000 --out hopper-medium-sim-v4.hdf5`)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if serve_worker(argv, train_and_evaluate):
        return 0
    args = parse_args(argv)
    from dmm.data import load_dataset

    dataset = load_dataset(args.dataset)  # fail early on bad data, and name it for the table
    spec_env = dataset.spec
    label = data_label(dataset.name, spec_env.env_id)
    with tempfile.TemporaryDirectory(prefix="dmm-bench-scores-") as tmp:
        store = args.store or (args.run_root / "store" if args.run_root else Path(tmp))
        specs = [
            {
                "variant": key,
                "seed": seed,
                "dataset": args.dataset,
                "store": str(store),
                "name": f"{dataset.name}-{key}-seed{seed}",
                **{
                    k: getattr(args, k)
                    for k in ("updates", "episodes", "num_envs", "mode", "device", "eval_every")
                },
                "compile": args.compile,
                "threads": args.threads,
                "run_root": str(args.run_root) if args.run_root else None,
                "checkpoint_every": args.checkpoint_every,
            }
            for key in args.variants
            for seed in args.seeds
        ]

        def run(spec: dict[str, Any]) -> dict[str, Any]:
            print(
                f"{VARIANTS[spec['variant']].label}, seed {spec['seed']}: training...",
                file=sys.stderr,
                flush=True,
            )
            return {
                "variant": spec["variant"],
                "seed": spec["seed"],
                # runs take hours: their status and evaluation lines go straight to the log
                **run_worker(MODULE, spec, args.run_timeout, stream_stderr=True),
            }

        # `kill` of this process stops the workers too, each saving its run's state first
        with forward_stop_signals(), ThreadPoolExecutor(max_workers=args.jobs) as pool:
            runs = list(pool.map(run, specs))

    models = []
    table_rows = []
    for key in args.variants:
        ok = [r for r in runs if r["variant"] == key and "error" not in r]
        failed = [r for r in runs if r["variant"] == key and "error" in r]
        scores = np.array([r["normalized"] for r in ok])
        paper = np.array([r["paper_protocol"] for r in ok])
        model = {
            "variant": key,
            "label": VARIANTS[key].label,
            "seeds": [r["seed"] for r in ok],
            "normalized_per_seed": scores.tolist(),
            "normalized_mean": float(scores.mean()) if ok else None,
            "normalized_std": float(scores.std()) if ok else None,
            "paper_protocol_per_seed": paper.tolist(),
            "paper_protocol_mean": float(paper.mean()) if ok else None,
            "num_parameters": ok[0]["num_parameters"] if ok else None,
            "train_seconds_median": median([r["train_seconds"] for r in ok]) if ok else None,
            "updates_per_second_median": median([r["updates_per_second"] for r in ok]) if ok else None,
            "failed_seeds": {r["seed"]: r["error"] for r in failed},
        }
        models.append(model)
        if not ok:
            table_rows.append(
                [model["label"], "-", "-", "-", "-", "-", "-", f"all seeds failed: {failed[0]['error']}"]
            )
            continue
        table_rows.append(
            [
                model["label"],
                f"{model['num_parameters']:,}",
                f"{model['normalized_mean']:.1f} ± {model['normalized_std']:.1f}",
                ", ".join(f"{s:.1f}" for s in scores),
                f"{model['paper_protocol_mean']:.1f}",
                f"{model['train_seconds_median']:.0f}",
                f"{model['updates_per_second_median']:.1f}",
                "; ".join(f"seed {s}: {e}" for s, e in model["failed_seeds"].items()) or "",
            ]
        )
    seeds_text = " ".join(map(str, args.seeds))
    table = markdown_table(
        [
            "model",
            "params",
            f"normalized score (mean ± std over seeds {seeds_text})",
            "per seed",
            "paper protocol: best evaluation (mean over seeds)",
            "train s (median)",
            "updates/s",
            "failures",
        ],
        table_rows,
    )
    fig, axes = new_figure(width=max(5.0, 1.8 * len(models)))
    ax = axes[0][0]
    shown = [m for m in models if m["normalized_mean"] is not None]
    x = np.arange(len(shown))
    ax.bar(x, [m["normalized_mean"] for m in shown], yerr=[m["normalized_std"] for m in shown], capsize=4)
    for i, m in enumerate(shown):
        ax.plot([i] * len(m["normalized_per_seed"]), m["normalized_per_seed"], "k.", ms=5)
    ax.set_xticks(x, [m["label"] for m in shown], fontsize=7)
    ax.set(ylabel="normalized score (final checkpoint)", title=f"{dataset.name}, {args.updates} updates")
    payload = {
        **report_header(SCRIPT, argv, machine(args.device)),
        "data": label,
        "dataset": args.dataset,
        "target_return": spec_env.target_returns[0],
        "settings": {
            k: getattr(args, k)
            for k in (
                "updates",
                "seeds",
                "episodes",
                "num_envs",
                "mode",
                "device",
                "compile",
                "threads",
                "eval_every",
            )
        },
        "models": models,
        "runs": runs,
    }
    notes = [
        f"data: {label}",
        f"{args.updates} updates per run (paper settings; DT: dt.yaml), final checkpoint evaluated on "
        f"{args.episodes} episodes at target return {spec_env.target_returns[0]:g} ({args.mode} mode); "
        "a seed's score is its mean normalized return; mean ± std over seeds",
        f"paper protocol (the authors' reporting, for comparison only): evaluations every {args.eval_every} "
        f"updates at every target return ({', '.join(f'{t:g}' for t in spec_env.target_returns)}), the "
        "best of them per seed",
    ]
    write_report(args.out, SCRIPT, f"Normalized scores: {label}", table, payload, fig, notes)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
