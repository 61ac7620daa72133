"""Why DMM trails DT: train model variants at equal updates, then measure what differs.

For every (variant, seed) a worker process trains with the project's trainer pieces (sampler,
``TrainStep``, the paper's optimizer), saves the weights, and measures on the final checkpoint:

- the normalized score against the target return (``--targets``, ``--episodes`` each, window mode),
  with how the episodes ended (fell before the time limit, or reached it);
- RTG sensitivity: on the same fixed dataset windows, how far the predicted actions move when the
  whole window's return-to-go is raised by ``RTG_SHIFT`` (in return units), relative to the
  spread of the dataset's actions;
- the final training loss (action MSE).

Finished runs are kept in ``--out/runs/<variant>-s<seed>.json`` and skipped when the script runs
again, so a long sweep resumes where it stopped; ``--report`` only tabulates what exists.

    python -m bench.dmm_vs_dt --variants dmm authors --seeds 0 1 --updates 10000
    python -m bench.dmm_vs_dt --report
    python -m bench.dmm_vs_dt --quick --out /tmp/dmm-vs-dt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    SHARED_HOPPER,
    VARIANTS,
    command_line,
    data_label,
    default_out,
    forward_stop_signals,
    machine,
    markdown_table,
    new_figure,
    now_utc,
    run_worker,
    serve_worker,
    train_config,
    write_report,
)

SCRIPT = "dmm_vs_dt"
MODULE = f"bench.{SCRIPT}"
RESULTS = "dmm-vs-dt"
RTG_SHIFT = 1000.0
SENSITIVITY_WINDOWS = 2048


def build_model(variant: str, cfg: Any, dataset: Any) -> Any:
    """The variant's untrained model (the trainer's ``build_policy``, or the authors' class built
    from the same config right after it, in the random state ``build_policy`` seeded)."""
    from dmm.trainer.train import build_policy

    model, meta = build_policy(cfg, dataset)
    if VARIANTS[variant].architecture == "authors":
        from bench.authors_dmm import AuthorsDMM

        model = AuthorsDMM(model.config)
    return model, meta


def rtg_sensitivity(model: Any, sampler: Any, seed: int) -> dict[str, float]:
    """Mean |a(rtg + shift) - a(rtg)| over fixed dataset windows, also relative to the actions' std."""
    import torch

    rng = np.random.default_rng(seed)
    batch = sampler.windows(rng.integers(0, sampler.num_timesteps, size=SENSITIVITY_WINDOWS))
    rtg, states, actions, mask, timesteps = (
        torch.from_numpy(x) for x in (batch.rtg, batch.states, batch.actions, batch.mask, batch.timesteps)
    )
    ts = timesteps if model.config.timestep_embedding else None
    shift = RTG_SHIFT / sampler.rtg_scale
    with torch.inference_mode():
        base = model(rtg, states, actions, mask, ts)[:, -1]
        moved = model(rtg + shift, states, actions, mask, ts)[:, -1]
    change = (moved - base).abs().mean().item()
    return {
        "rtg_shift": RTG_SHIFT,
        "action_change": change,
        "action_change_rel": change / float(batch.actions[:, -1].std(axis=0).mean()),
        "action_mse": float(((base.numpy() - batch.actions[:, -1]) ** 2).mean()),
    }


def train_and_measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One (variant, seed), in this process."""
    import torch

    from dmm.data import WindowSampler, load_dataset
    from dmm.model import Policy
    from dmm.trainer.evaluate import evaluate
    from dmm.trainer.train import TrainStep

    torch.set_num_threads(spec["threads"])
    dataset = load_dataset(spec["dataset"])
    overrides = {"updates": spec["updates"], "seed": spec["seed"], "compile": spec["compile"]}
    cfg = train_config(VARIANTS[spec["variant"]], dataset.env or dataset.name, overrides)
    model, meta = build_model(spec["variant"], cfg, dataset)
    model.train()
    sampler = WindowSampler(dataset, cfg.model.context, cfg.batch_size, meta.rtg_scale, seed=cfg.seed)
    step = TrainStep(model, cfg, torch.device("cpu"), log=lambda s: print(s, file=sys.stderr))
    name = f"{spec['variant']} s{spec['seed']}"
    start, losses, curve = time.perf_counter(), [], []
    for update in range(1, cfg.updates + 1):
        losses.append(step(sampler.sample()))
        if update % 500 == 0 or update == cfg.updates:
            curve.append([update, float(np.mean(losses))])
            losses.clear()
            print(f"{name}: update {update} loss {curve[-1][1]:.4f}", file=sys.stderr)
    train_seconds = time.perf_counter() - start
    model.eval()
    torch.save(model.state_dict(), Path(spec["weights"]))
    live = Policy(model, meta)
    evals = []
    for target in spec["targets"]:
        result = evaluate(
            live, spec["episodes"], target, num_envs=spec["num_envs"], seed=10_000, progress=False
        )
        row = result.summary()
        row["fell"] = float(np.mean(result.lengths < dataset.spec.max_episode_steps))
        row["normalized_per_episode"] = result.normalized.tolist()
        evals.append(row)
        print(f"{name} target {target:g}: {result.describe()}", file=sys.stderr)
    return {
        "variant": spec["variant"],
        "seed": spec["seed"],
        "updates": cfg.updates,
        "num_parameters": model.num_parameters(),
        "train_seconds": train_seconds,
        "loss_curve": curve,
        "final_loss": curve[-1][1],
        "sensitivity": rtg_sensitivity(model, sampler, seed=1234),
        "evals": evals,
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["dmm", "dt"], choices=sorted(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--updates", type=int, default=10_000)
    p.add_argument("--dataset", default=str(SHARED_HOPPER))
    p.add_argument("--targets", nargs="+", type=float, default=[1800.0, 3600.0, 7200.0])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--num-envs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", type=Path, default=default_out(RESULTS))
    p.add_argument("--report", action="store_true", help="only tabulate the finished runs")
    p.add_argument("--quick", action="store_true", help="smoke test: 20 updates, 2 episodes, one target")
    args = p.parse_args(argv)
    args.command = command_line(MODULE, argv)
    if args.quick:
        args.updates, args.episodes, args.num_envs, args.targets, args.compile = 20, 2, 2, [3600.0], False
    return args


def run_all(args: argparse.Namespace) -> None:
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for variant in args.variants:
        for seed in args.seeds:
            path = runs / f"{variant}-s{seed}.json"
            if path.exists():
                print(f"{path.name}: done, skipped")
                continue
            spec = {
                **{k: getattr(args, k) for k in ("updates", "targets", "episodes", "num_envs", "threads")},
                "variant": variant,
                "seed": seed,
                "dataset": args.dataset,
                "compile": args.compile,
                "weights": str(runs / f"{variant}-s{seed}.pt"),
            }
            result = run_worker(MODULE, spec, timeout_s=6 * 3600, stream_stderr=True)
            if "error" in result:
                print(f"{variant} seed {seed}: {result['error']}", file=sys.stderr)
                continue
            result["command"] = args.command
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"{path.name}: written")


def load_runs(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


DEFAULT_TARGET = 3600.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant (in ``VARIANTS`` order): seeds, and per target the per-seed mean scores,
    fall rates and mean episode lengths; final losses and RTG sensitivities."""
    out: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"])):
        entry = out.setdefault(
            run["variant"], {"seeds": [], "targets": {}, "loss": [], "sens": [], "fell": {}, "length": {}}
        )
        entry["seeds"].append(run["seed"])
        entry["loss"].append(run["final_loss"])
        entry["sens"].append(run["sensitivity"]["action_change_rel"])
        for ev in run["evals"]:
            target = ev["target_return"]
            entry["targets"].setdefault(target, []).append(ev["normalized_mean"])
            entry["fell"].setdefault(target, []).append(ev["fell"])
            entry["length"].setdefault(target, []).append(ev["mean_length"])
    return out


def _over_seeds(values: list[float] | None) -> str:
    if not values:
        return "-"
    return f"{values[0]:.1f}" if len(values) == 1 else f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def table_rows(summary: dict[str, dict[str, Any]], targets: list[float]) -> list[list[str]]:
    rows = []
    for variant, s in summary.items():
        at_default = s["targets"].get(DEFAULT_TARGET, [])
        fell = s["fell"].get(DEFAULT_TARGET, [])
        rows.append(
            [
                VARIANTS[variant].label,
                ",".join(map(str, s["seeds"])),
                *(_over_seeds(s["targets"].get(t)) for t in targets),
                " / ".join(f"{v:.1f}" for v in at_default) or "-",
                f"{100 * np.mean(fell):.0f}%" if fell else "-",
                f"{np.mean(s['length'].get(DEFAULT_TARGET, [np.nan])):.0f}",
                f"{np.mean(s['loss']):.4f}",
                f"{np.mean(s['sens']):.3f}",
            ]
        )
    return rows


def reproduce_command(summary: dict[str, dict[str, Any]], first: dict[str, Any]) -> str:
    """One command that would produce every run in the table (seeds per variant in the table)."""
    seeds = sorted({seed for s in summary.values() for seed in s["seeds"]})
    argv = ["--variants", *summary, "--seeds", *map(str, seeds), "--updates", str(first["updates"])]
    return command_line(MODULE, argv)


def report(args: argparse.Namespace) -> None:
    runs = load_runs(args.out)
    if not runs:
        raise SystemExit(f"no finished runs under {args.out / 'runs'}")
    summary = summarize(runs)
    targets = sorted({t for s in summary.values() for t in s["targets"]})
    headers = [
        "variant",
        "seeds",
        *(f"target {t:g}" for t in targets),
        f"per seed ({DEFAULT_TARGET:g})",
        "fell",
        "mean length",
        "loss",
        "RTG sens.",
    ]
    rows = table_rows(summary, targets)
    fig, axes = new_figure()
    for variant, s in summary.items():
        ts = sorted(s["targets"])
        means = [np.mean(s["targets"][t]) for t in ts]
        stds = [np.std(s["targets"][t]) for t in ts]
        axes[0][0].errorbar(ts, means, yerr=stds, marker="o", capsize=3, label=VARIANTS[variant].label)
    axes[0][0].set_xlabel("target return")
    axes[0][0].set_ylabel("normalized score (final checkpoint)")
    axes[0][0].legend(fontsize=7)
    first = runs[0]
    write_report(
        args.out,
        SCRIPT,
        f"DMM vs DT variants at {first['updates']:,} updates",
        markdown_table(headers, rows),
        {"machine": machine(), "command": args.command, "date": now_utc(), "runs": runs},
        fig,
        notes=[
            f"all runs of the table: `{reproduce_command(summary, first)}`",
            f"data: {data_label(Path(args.dataset).stem, 'Hopper-v4')}",
            "score: mean ± std over seeds of each seed's mean normalized return (final checkpoint, "
            f"{first['evals'][0]['episodes']} episodes per target, window mode)",
            f"per seed, fell, mean length: at target {DEFAULT_TARGET:g}; fell = episodes that ended "
            "before the time limit (the hopper fell)",
            f"RTG sens.: mean |Δaction| when the window's return-to-go rises by {RTG_SHIFT:g}, "
            "over the std of the dataset's actions (fixed dataset windows)",
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if serve_worker(argv, train_and_measure):
        return 0
    args = parse_args(argv)
    if not args.report:
        with forward_stop_signals():  # `kill` of this process stops its worker too
            run_all(args)
    report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
