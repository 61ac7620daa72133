"""Scores: train DMM and the Decision Transformer baseline (and the ablations) over seeds, evaluate
the final checkpoints, and tabulate the normalized score (mean ± std over seeds).

Every (model, seed) trains in its own process with ``dmm.trainer.train.train`` (paper settings
from the family's YAML; DT's from dt.yaml), then its final checkpoint is evaluated on
``--episodes`` episodes at the environment's first target return (window mode, batched envs).
The score of a seed is the mean normalized return over its episodes: the final checkpoint, never
the best evaluation. With ``--run-root`` every run keeps a resumable run folder there (see
``dmm train --run-dir``): running the same command again resumes unfinished runs where they
stopped and reuses finished ones.

``--study`` runs the DMM-vs-DT study instead (why DMM trailed DT; ``bench/results/dmm-vs-dt``):
short runs of any variant, the authors' class included, with the trainer's update step; each final
checkpoint plays every ``--targets`` return, with how its episodes ended, and its RTG sensitivity is
measured. Finished runs are kept in ``--out/runs`` and skipped when the
command runs again; ``--report`` only tabulates what exists.

    python -m bench.scores --seeds 0 1 2                # 100k updates, shared hopper data
    python -m bench.scores --run-root runs/scores       # resumable: run it again to continue
    python -m bench.scores --ablations --updates 100000
    python -m bench.scores --device cuda --jobs 6        # every run at once on one GPU
    python -m bench.scores --study --variants dmm authors --seeds 0 1 --updates 10000
    python -m bench.scores --study --report              # the study's table from its finished runs
    python -m bench.scores --quick
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench import harness
from bench.common import ABLATIONS, SHARED_HOPPER, VARIANTS, data_label, train_config

SCRIPT = "scores"
MODULE = f"bench.{SCRIPT}"
DEFAULT_VARIANTS = ("dmm", "dt")
RESULT_FILE = "result.json"  # in a run folder: the finished run's row
SETTINGS = ("updates", "seeds", "episodes", "num_envs", "mode", "device", "compile", "threads", "eval_every")
STUDY_RESULTS = "dmm-vs-dt"  # the study's folder (its figure keeps the name dmm_vs_dt.png)
RTG_SHIFT = 1000.0
SENSITIVITY_WINDOWS = 2048
STUDY_TARGET = 3600.0  # the study's per-seed, fell and length columns
HEADERS = ("model", "params", "normalized score (mean ± std over seeds {seeds})", "per seed")
HEADERS += ("paper protocol: best evaluation (mean over seeds)", "train s (median)", "updates/s", "failures")


def train_and_evaluate(spec: dict[str, Any]) -> dict[str, Any]:
    """One (model, seed), in this process: train, publish, evaluate the final checkpoint."""
    import torch

    from dmm.data import load_dataset
    from dmm.store import ModelStore
    from dmm.trainer.run_dir import RunDir
    from dmm.trainer.train import train

    if spec.get("study"):
        return study_run(spec)
    root = spec["run_root"]
    run = RunDir(Path(root) / spec["name"], spec["checkpoint_every"]) if root else None
    if run is not None and (run.path / RESULT_FILE).is_file():
        print(f"{spec['name']}: finished before, reusing its result", file=sys.stderr)
        return json.loads((run.path / RESULT_FILE).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dataset = load_dataset(spec["dataset"])
    targets = list(dataset.spec.target_returns)
    overrides = {k: spec[k] for k in ("updates", "seed", "device", "compile", "eval_every")}
    overrides |= {"eval_episodes": spec["episodes"], "eval_num_envs": spec["num_envs"]}
    overrides |= {"eval_mode": spec["mode"], "target_returns": targets}
    cfg = train_config(VARIANTS[spec["variant"]], dataset.env or dataset.name, overrides)
    start = time.perf_counter()
    log = lambda line: print(f"{spec['name']}: {line}", file=sys.stderr, flush=True)  # noqa: E731
    result = train(cfg, dataset, ModelStore(spec["store"]), spec["name"], progress=False, log=log, run=run)
    m, keys = result.metrics, ("update", "target_return")
    final = m["final_eval"][0]  # the default target: the honest score
    history = [{**{k: e[k] for k in keys}, "normalized": e["normalized_mean"]} for e in m["evals"]]
    row = {"version": result.version, "target_return": targets[0], "num_parameters": m["num_parameters"]}
    seconds = m["train_seconds"]
    row |= {"train_seconds": seconds, "eval_seconds": time.perf_counter() - start - seconds}
    row |= {"updates_per_second": m["updates_per_second_median"], "final_loss": m["final_loss"]}
    row |= {k: final[k] for k in ("episodes", "mean_return", "std_return", "mean_length")}
    row |= {"normalized": final["normalized_mean"], "normalized_std_over_episodes": final["normalized_std"]}
    # the authors' protocol: the best evaluation over all updates and target returns
    row |= {"eval_history": history, "paper_protocol": max(e["normalized"] for e in history)}
    if run is not None:
        (run.path / RESULT_FILE).write_text(json.dumps(row))
    return row


def add_flags(p: argparse.ArgumentParser) -> None:
    add = p.add_argument
    add("--dataset", default=str(SHARED_HOPPER), help=f"hdf5/pkl file or D4RL name ({SHARED_HOPPER})")
    add("--variants", nargs="+", choices=tuple(VARIANTS), help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    add("--ablations", action="store_true", help=f"also {' and '.join(ABLATIONS)}")
    add("--updates", type=int, help="updates per run (default 100000, study 10000; 20 with --quick)")
    add("--seeds", type=int, nargs="+", help="default 0 1 2 (study 0 1); 0 with --quick")
    add("--episodes", type=int, help="evaluation episodes per run (default 100, study 50; 2 --quick)")
    add("--num-envs", type=int, help="vector envs of the evaluation (default: --episodes)")
    add("--mode", choices=("window", "recurrent"), default="window", help="evaluation inference")
    add(
        "--eval-every",
        type=int,
        help="updates between evaluations at every target return, for the paper-protocol column "
        "(default 10000; 10 with --quick; 0: final checkpoint only)",
    )
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on; off --quick)")
    add("--store", type=Path, help="keep the checkpoints here (default: RUN_ROOT/store, else temporary)")
    add("--run-root", type=Path, help="a resumable run folder per run here; running again resumes them")
    add("--checkpoint-every", type=int, default=5000, help="updates between saved states (--run-root)")
    add("--jobs", type=int, default=1, help="runs trained at once, each in its own process (default 1)")
    add("--run-timeout", type=float, default=24 * 3600.0, help="seconds per run at most")
    add("--study", action="store_true", help="the DMM-vs-DT study (see above)")
    add("--targets", nargs="+", type=float, help="study: target returns (1800 3600 7200; --quick 3600)")
    add("--report", action="store_true", help="study: only tabulate the finished runs")


def defaults(args: argparse.Namespace) -> dict[str, tuple[Any, Any]]:
    """(full, --quick) defaults, the study's where they differ."""
    s = args.study
    both = {"out": harness.default_out(STUDY_RESULTS if s else SCRIPT), "variants": list(DEFAULT_VARIANTS)}
    defaults = {k: (v, v) for k, v in both.items()} | {"eval_every": (10_000, 10), "compile": (True, False)}
    defaults |= {"updates": (10_000 if s else 100_000, 20), "seeds": ([0, 1] if s else [0, 1, 2], [0])}
    defaults |= {"episodes": (50 if s else 100, 2), "threads": (1 if s else None, 1)}
    return defaults | ({"targets": ([1800.0, 3600.0, 7200.0], [3600.0])} if s else {})


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = harness.parser(__doc__, SCRIPT, device=True, threads=None)
    p.set_defaults(out=None)
    add_flags(p)
    args = harness.parse(p, argv, defaults, positive=("updates", "episodes", "num_envs", "jobs", "threads"))
    args.variants = list(dict.fromkeys(args.variants + (list(ABLATIONS) if args.ablations else [])))
    args.num_envs = args.num_envs or args.episodes
    if len(set(args.seeds)) != len(args.seeds):
        p.error("--seeds must be distinct")
    if (args.targets is not None or args.report) and not args.study:
        p.error("--targets and --report belong to --study")
    if args.dataset == str(SHARED_HOPPER) and not SHARED_HOPPER.is_file() and not args.report:
        p.error(
            f"{SHARED_HOPPER} is absent; pass --dataset (e.g. a file written by `dmm collect --env Hopper-v4 "
            "--policy hopper_online_5.npz --steps 1000000 --out hopper-medium-sim-v4.hdf5`)"
        )
    return args


def run_all(args: argparse.Namespace, dataset_name: str) -> list[dict[str, Any]]:
    """Every (variant, seed) in its own worker, ``--jobs`` at once; `kill` of this process stops the
    workers too, each saving its run's state first."""
    with tempfile.TemporaryDirectory(prefix="dmm-bench-scores-") as tmp:
        store = args.store or (args.run_root / "store" if args.run_root else Path(tmp))
        keys = ("updates", "episodes", "num_envs", "mode", "device", "eval_every", "dataset", "compile")
        shared = {k: getattr(args, k) for k in (*keys, "threads", "checkpoint_every")}
        shared |= {"store": str(store), "run_root": str(args.run_root) if args.run_root else None}

        def run(variant: str, seed: int) -> dict[str, Any]:
            print(f"{VARIANTS[variant].label}, seed {seed}: training...", file=sys.stderr)
            key = {"variant": variant, "seed": seed}
            spec = {**shared, **key, "name": f"{dataset_name}-{variant}-seed{seed}"}
            # runs take hours: their status and evaluation lines go straight to the log
            return {**key, **harness.run_worker(MODULE, spec, args.run_timeout, stream_stderr=True)}

        with harness.forward_stop_signals(), ThreadPoolExecutor(max_workers=args.jobs) as pool:
            return list(pool.map(lambda p: run(*p), itertools.product(args.variants, args.seeds)))


def model_summary(key: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's scores over its seeds and what its failed seeds reported."""
    ok = [r for r in runs if r["variant"] == key and "error" not in r]
    scores, paper = np.array([r["normalized"] for r in ok]), np.array([r["paper_protocol"] for r in ok])
    median = lambda k: harness.median([r[k] for r in ok]) if ok else None  # noqa: E731
    return {
        "variant": key,
        "label": VARIANTS[key].label,
        "seeds": [r["seed"] for r in ok],
        "normalized_per_seed": scores.tolist(),
        "normalized_mean": float(scores.mean()) if ok else None,
        "normalized_std": float(scores.std()) if ok else None,
        "paper_protocol_per_seed": paper.tolist(),
        "paper_protocol_mean": float(paper.mean()) if ok else None,
        "num_parameters": ok[0]["num_parameters"] if ok else None,
        "train_seconds_median": median("train_seconds"),
        "updates_per_second_median": median("updates_per_second"),
        "failed_seeds": {r["seed"]: r["error"] for r in runs if r["variant"] == key and "error" in r},
    }


def table(models: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    rows = []
    for m in models:
        if m["normalized_mean"] is None:
            failure = next(iter(m["failed_seeds"].values()))
            rows.append([m["label"], *["-"] * 6, f"all seeds failed: {failure}"])
            continue
        score = f"{m['normalized_mean']:.1f} ± {m['normalized_std']:.1f}"
        row = [m["label"], f"{m['num_parameters']:,}", score]
        row += [", ".join(f"{s:.1f}" for s in m["normalized_per_seed"]), f"{m['paper_protocol_mean']:.1f}"]
        row += [f"{m['train_seconds_median']:.0f}", f"{m['updates_per_second_median']:.1f}"]
        rows.append([*row, "; ".join(f"seed {s}: {e}" for s, e in m["failed_seeds"].items())])
    return harness.markdown_table([h.format(seeds=" ".join(map(str, seeds))) for h in HEADERS], rows)


def figure(models: list[dict[str, Any]], title: str) -> Any:
    fig, axes = harness.new_figure(width=max(5.0, 1.8 * len(models)))
    ax = axes[0][0]
    shown = [m for m in models if m["normalized_mean"] is not None]
    x = np.arange(len(shown))
    ax.bar(x, [m["normalized_mean"] for m in shown], yerr=[m["normalized_std"] for m in shown], capsize=4)
    for i, m in enumerate(shown):
        ax.plot([i] * len(m["normalized_per_seed"]), m["normalized_per_seed"], "k.", ms=5)
    ax.set_xticks(x, [m["label"] for m in shown], fontsize=7)
    ax.set(ylabel="normalized score (final checkpoint)", title=title)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    if (argv := harness.command_or_worker(argv, train_and_evaluate)) is None:
        return 0
    args = parse_args(argv)
    if args.study:
        return study(args, argv)
    from dmm.data import load_dataset

    dataset = load_dataset(args.dataset)  # fail early on bad data, and name it for the table
    label, targets = data_label(dataset.name, dataset.spec.env_id), dataset.spec.target_returns
    runs = run_all(args, dataset.name)
    models = [model_summary(key, runs) for key in args.variants]
    payload = {**harness.header(SCRIPT, argv, args.device), "data": label, "dataset": args.dataset}
    payload |= {"target_return": targets[0], "settings": {k: getattr(args, k) for k in SETTINGS}}
    payload |= {"models": models, "runs": runs}
    notes = [
        f"data: {label}",
        f"{args.updates} updates per run (paper settings; DT: dt.yaml), final checkpoint evaluated on "
        f"{args.episodes} episodes at target return {targets[0]:g} ({args.mode} mode); "
        "a seed's score is its mean normalized return; mean ± std over seeds",
        f"paper protocol (the authors' reporting, for comparison only): evaluations every {args.eval_every} "
        f"updates at every target return ({', '.join(f'{t:g}' for t in targets)}), the best of them per seed",
    ]
    fig, title = figure(models, f"{dataset.name}, {args.updates} updates"), f"Normalized scores: {label}"
    harness.write_report(args.out, SCRIPT, title, table(models, args.seeds), payload, fig, notes)
    return 1 if any("error" in r for r in runs) else 0


# ------------------------------------------------------------------ the DMM-vs-DT study (--study)


def rtg_sensitivity(model: Any, sampler: Any, seed: int) -> dict[str, float]:
    """Mean |a(rtg + shift) - a(rtg)| over fixed dataset windows, also relative to the actions' std."""
    import torch

    rng = np.random.default_rng(seed)
    batch = sampler.windows(rng.integers(0, sampler.num_timesteps, size=SENSITIVITY_WINDOWS))
    tensors = (batch.rtg, batch.states, batch.actions, batch.mask, batch.timesteps)
    rtg, states, actions, mask, timesteps = map(torch.from_numpy, tensors)
    ts = timesteps if model.config.timestep_embedding else None
    with torch.inference_mode():
        base = model(rtg, states, actions, mask, ts)[:, -1]
        moved = model(rtg + RTG_SHIFT / sampler.rtg_scale, states, actions, mask, ts)[:, -1]
    change, last = (moved - base).abs().mean().item(), batch.actions[:, -1]
    result = {"rtg_shift": RTG_SHIFT, "action_change": change}
    result["action_change_rel"] = change / float(last.std(axis=0).mean())
    return result | {"action_mse": float(((base.numpy() - last) ** 2).mean())}


def study_train(spec: dict[str, Any], dataset: Any) -> tuple[Any, Any, Any, list[list[float]], float]:
    """Train the variant's model with the trainer's sampler and update step (``train`` cannot build
    the authors' class, which starts from the random state ``build_policy`` seeded); (model, meta,
    sampler, loss curve, seconds)."""
    import torch

    from dmm.data import WindowSampler
    from dmm.trainer.train import TrainStep, build_policy

    overrides = {"updates": spec["updates"], "seed": spec["seed"], "compile": spec["compile"]}
    cfg = train_config(VARIANTS[spec["variant"]], dataset.env or dataset.name, overrides)
    model, meta = build_policy(cfg, dataset)
    if VARIANTS[spec["variant"]].architecture == "authors":
        from bench.authors_dmm import AuthorsDMM

        model = AuthorsDMM(model.config)
    model.train()
    sampler = WindowSampler(dataset, cfg.model.context, cfg.batch_size, meta.rtg_scale, seed=cfg.seed)
    step = TrainStep(model, cfg, torch.device("cpu"), log=lambda s: print(s, file=sys.stderr))
    start, losses, curve, name = time.perf_counter(), [], [], f"{spec['variant']} s{spec['seed']}"
    for update in range(1, cfg.updates + 1):
        losses.append(step(sampler.sample()))
        if update % 500 == 0 or update == cfg.updates:
            curve.append([update, float(np.mean(losses))])
            losses.clear()
            print(f"{name}: update {update} loss {curve[-1][1]:.4f}", file=sys.stderr)
    return model.eval(), meta, sampler, curve, time.perf_counter() - start


def study_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One (variant, seed) of the study, in this process: train, save the weights, then the final
    checkpoint at every target (with how its episodes ended), its loss and its RTG sensitivity."""
    import torch

    from dmm.data import load_dataset
    from dmm.model import Policy
    from dmm.trainer.evaluate import evaluate

    torch.set_num_threads(spec["threads"])
    dataset = load_dataset(spec["dataset"])
    model, meta, sampler, curve, seconds = study_train(spec, dataset)
    torch.save(model.state_dict(), Path(spec["weights"]))
    evals, policy, episodes, num_envs = [], Policy(model, meta), spec["episodes"], spec["num_envs"]
    for target in spec["targets"]:
        result = evaluate(policy, episodes, target, num_envs=num_envs, seed=10_000, progress=False)
        row = result.summary()
        row["fell"] = float(np.mean(result.lengths < dataset.spec.max_episode_steps))
        evals.append({**row, "normalized_per_episode": result.normalized.tolist()})
        print(f"{spec['variant']} s{spec['seed']} target {target:g}: {result.describe()}", file=sys.stderr)
    run = {k: spec[k] for k in ("variant", "seed", "updates")} | {"num_parameters": model.num_parameters()}
    run |= {"train_seconds": seconds, "loss_curve": curve, "final_loss": curve[-1][1]}
    return run | {"sensitivity": rtg_sensitivity(model, sampler, seed=1234), "evals": evals}


def study_runs(args: argparse.Namespace, command: str) -> None:
    """Every (variant, seed) not finished before, one worker at a time, into ``--out/runs``."""
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    keys = ("updates", "targets", "episodes", "num_envs", "threads", "compile", "dataset")
    shared = {k: getattr(args, k) for k in keys} | {"study": True}
    for variant in args.variants:
        for seed in args.seeds:
            path = runs / f"{variant}-s{seed}.json"
            if path.exists():
                print(f"{path.name}: done, skipped")
                continue
            spec = {**shared, "variant": variant, "seed": seed, "weights": str(path.with_suffix(".pt"))}
            result = harness.run_worker(MODULE, spec, 6 * 3600, stream_stderr=True)
            if "error" in result:
                print(f"{variant} seed {seed}: {result['error']}", file=sys.stderr)
                continue
            path.write_text(json.dumps({**result, "command": command}, indent=2) + "\n")
            print(f"{path.name}: written")


def study_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant (in ``VARIANTS`` order): seeds, and per target the per-seed mean scores, fall
    rates and mean episode lengths; final losses and RTG sensitivities."""
    out: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"])):
        entry = out.setdefault(run["variant"], {"seeds": [], "loss": [], "sens": []})
        entry["seeds"].append(run["seed"])
        entry["loss"].append(run["final_loss"])
        entry["sens"].append(run["sensitivity"]["action_change_rel"])
        for ev in run["evals"]:
            for key, value in (("targets", "normalized_mean"), ("fell", "fell"), ("length", "mean_length")):
                entry.setdefault(key, {}).setdefault(ev["target_return"], []).append(ev[value])
    return out


def study_table(summary: dict[str, dict[str, Any]], targets: list[float]) -> str:
    rows = []
    for variant, s in summary.items():
        at_default, fell = s["targets"].get(STUDY_TARGET, []), s["fell"].get(STUDY_TARGET, [])
        row = [VARIANTS[variant].label, ",".join(map(str, s["seeds"]))]
        row += [harness.mean_std(s["targets"].get(t, [])) for t in targets]
        fell_share = f"{100 * np.mean(fell):.0f}%" if fell else "-"
        row += [" / ".join(f"{v:.1f}" for v in at_default) or "-", fell_share]
        row += [f"{np.mean(s['length'].get(STUDY_TARGET, [np.nan])):.0f}", f"{np.mean(s['loss']):.4f}"]
        rows.append([*row, f"{np.mean(s['sens']):.3f}"])
    headers = ["variant", "seeds", *(f"target {t:g}" for t in targets), f"per seed ({STUDY_TARGET:g})"]
    return harness.markdown_table([*headers, "fell", "mean length", "loss", "RTG sens."], rows)


def study_figure(summary: dict[str, dict[str, Any]]) -> Any:
    fig, axes = harness.new_figure()
    for variant, s in summary.items():
        ts = sorted(s["targets"])
        means, stds = [np.mean(s["targets"][t]) for t in ts], [np.std(s["targets"][t]) for t in ts]
        axes[0][0].errorbar(ts, means, yerr=stds, marker="o", capsize=3, label=VARIANTS[variant].label)
    axes[0][0].set(xlabel="target return", ylabel="normalized score (final checkpoint)")
    axes[0][0].legend(fontsize=7)
    return fig


def study(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the study's unfinished runs (unless ``--report``), then tabulate every finished one."""
    if not args.report:
        with harness.forward_stop_signals():  # `kill` of this process stops its worker too
            study_runs(args, harness.command_line(MODULE, argv))
    runs = [json.loads(p.read_text()) for p in sorted((args.out / "runs").glob("*.json"))]
    if not runs:
        raise SystemExit(f"no finished runs under {args.out / 'runs'}")
    summary, updates = study_summary(runs), runs[0]["updates"]
    targets = sorted({t for s in summary.values() for t in s["targets"]})
    seeds = sorted({seed for s in summary.values() for seed in s["seeds"]})
    reproduce = ["--study", "--variants", *summary, "--seeds", *map(str, seeds), "--updates", str(updates)]
    notes = [
        f"all runs of the table: `{harness.command_line(MODULE, reproduce)}`",
        f"data: {data_label(Path(args.dataset).stem, 'Hopper-v4')}",
        "score: mean ± std over seeds of each seed's mean normalized return (final checkpoint, "
        f"{runs[0]['evals'][0]['episodes']} episodes per target, window mode)",
        f"per seed, fell, mean length: at target {STUDY_TARGET:g}; fell = episodes that ended "
        "before the time limit (the hopper fell)",
        f"RTG sens.: mean |Δaction| when the window's return-to-go rises by {RTG_SHIFT:g}, "
        "over the std of the dataset's actions (fixed dataset windows)",
    ]
    title, report = f"DMM vs DT variants at {updates:,} updates", study_table(summary, targets)
    payload = {**harness.header(SCRIPT, argv), "runs": runs}
    harness.write_report(args.out, "dmm_vs_dt", title, report, payload, study_figure(summary), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
