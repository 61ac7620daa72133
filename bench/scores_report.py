"""The score table from resumable run folders, finished or not, wherever they were trained.

``bench.scores`` tabulates the runs of one invocation. Long runs are trained in pieces on different
machines (a 2-core CPU for weeks of DMM updates, a lent GPU for minutes of DT), so this report
reads the run folders themselves (``<root>/<dataset>-<variant>-seed<N>/``: ``state.pt`` with the
update count and the evaluation history, ``result.json`` once the run finished) and puts them side
by side: the honest final-checkpoint score of finished runs, in window and (where a ``dmm eval
--mode recurrent`` result is given) recurrent mode; the learning curves at every evaluation, as the
fair comparison of runs that got to different update counts; and the paper's protocol (the best
evaluation over updates and target returns) at the budget every model reached and at the full one.
Run folders stay on the machine that trained them; ``--previous`` keeps the runs of the committed
report whose folders are not at hand, so a table grows run by run across machines.

    python -m bench.scores_report runs/scores-100k:"2-core CPU" runs/device-scores:"H200" \\
        --recurrent runs/scores-100k/recurrent/*-recurrent.json --out bench/results/scores-100k \\
        --previous bench/results/scores-100k/results.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import VARIANTS
from bench.harness import default_out, header, markdown_table, mean_std, new_figure, write_report
from bench.scores import RESULT_FILE

SCRIPT = "scores_report"
RUN_NAME = re.compile(r"^(?P<stem>.+)-seed(?P<seed>\d+)$")  # <dataset>-<variant>-seed<N>
SWING_EVALS = 5
FINAL_HEADERS = ("model", "finished seeds", "final, window (mean ± std over seeds)", "per seed")
FINAL_HEADERS += ("final, recurrent", "per seed", "mean of the second half's evaluations")
FINAL_HEADERS += (f"swing (std of the last {SWING_EVALS} evaluations)", "paper protocol (best evaluation)")
SCORE_KEYS = ("episodes", "target_return", "normalized_mean", "normalized_std")


def read_run(path: Path, where: str, recurrent: dict[str, dict]) -> dict[str, Any] | None:
    """One run folder as a row; None for a folder that is not a run of a known variant."""
    import torch

    match = RUN_NAME.match(path.name)
    variant = run_variant(match["stem"]) if match else None
    if variant is None or not (path / "state.pt").is_file():
        return None
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    keys = ("update", "target_return", "mode", "normalized_mean", "normalized_std")
    history = [{k: e[k] for k in keys} for e in state["metrics"].get("evals", [])]
    row: dict[str, Any] = {"name": path.name, "variant": variant, "label": VARIANTS[variant].label}
    row |= {"seed": int(match["seed"]), "trained_on": where, "updates": int(state["update"])}
    row |= {"finished": (path / RESULT_FILE).is_file(), "eval_history": history}
    row |= {"paper_protocol": max((e["normalized_mean"] for e in history), default=None), "final": {}}
    if row["finished"]:
        r = json.loads((path / RESULT_FILE).read_text())
        scores = (r["episodes"], r["target_return"], r["normalized"], r["normalized_std_over_episodes"])
        row["final"]["window"] = dict(zip(SCORE_KEYS, scores, strict=True))
        row["second_half"] = second_half_mean(history, r["target_return"], row["updates"])
        row["swing"] = swing(history, r["target_return"])
    if path.name in recurrent:
        row["final"]["recurrent"] = {k: recurrent[path.name][k] for k in SCORE_KEYS}
    return row


def run_variant(stem: str) -> str | None:
    """The variant a ``<dataset>-<variant>`` name ends with: the longest known one, as variant keys
    (``attention-global``) and dataset names (``hopper-medium-sim-v4``) both hold hyphens."""
    return max((v for v in VARIANTS if stem.endswith(f"-{v}")), key=len, default=None)


def read_previous(path: Path) -> list[dict]:
    """The runs of an earlier report (``results.json`` written by this script)."""
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        sys.exit(f"--previous {path}: not a results.json of bench.{SCRIPT} ({type(err).__name__}: {err})")
    runs = [r for r in runs if r.get("variant") in VARIANTS]
    for r in runs:  # reports written before the swing was measured
        if r["finished"] and "swing" not in r:
            r["swing"] = swing(r["eval_history"], r["final"]["window"]["target_return"])
    return runs


def at_target(history: list[dict], target: float) -> list[dict]:
    """A run's evaluations at ``target``, in update order."""
    return sorted((e for e in history if e["target_return"] == target), key=lambda e: e["update"])


def second_half_mean(history: list[dict], target: float, updates: int) -> float:
    """The mean of a run's evaluations from half its budget on, final one included, at ``target``.

    One checkpoint's score swings from one evaluation to the next far more than its episodes spread;
    averaging the second half's checkpoints says where the run levelled off with less of that swing.
    """
    late = [e["normalized_mean"] for e in at_target(history, target) if 2 * e["update"] >= updates]
    return float(np.mean(late))


def swing(history: list[dict], target: float) -> float:
    """The std of a run's last ``SWING_EVALS`` evaluations at ``target``: how much the score of the
    checkpoint that happens to be last depends on where training stopped."""
    return float(np.std([e["normalized_mean"] for e in at_target(history, target)][-SWING_EVALS:]))


def collect(roots: Sequence[str], recurrent: dict[str, dict], previous: Sequence[dict] = ()) -> list[dict]:
    """Every run under the roots and in ``previous`` (rows of an earlier report); where a (variant,
    seed) appears twice, the one further on."""
    rows = list(previous)
    for spec in roots:
        root, _, where = spec.partition(":")
        if not Path(root).is_dir():
            sys.exit(f"{root} is not a folder of runs")
        found = [read_run(p, where or root, recurrent) for p in sorted(Path(root).iterdir()) if p.is_dir()]
        rows += [row for row in found if row]
    best: dict[tuple[str, int], dict] = {}
    for row in rows:
        key = (row["variant"], row["seed"])
        if key not in best or row["updates"] > best[key]["updates"]:
            best[key] = row
    return list(best.values())


def curve(runs: list[dict], target: float) -> dict[int, list[float]]:
    """Normalized score at every evaluated update, one value per seed that got there."""
    points: dict[int, list[float]] = {}
    for r in runs:
        for e in at_target(r["eval_history"], target):
            points.setdefault(e["update"], []).append(e["normalized_mean"])
    return dict(sorted(points.items()))


def final_table(models: dict[str, list[dict]]) -> str:
    rows = []
    for runs in models.values():
        done = [r for r in runs if r["finished"]]
        window = [r["final"]["window"]["normalized_mean"] for r in done]
        rec = [r["final"]["recurrent"]["normalized_mean"] for r in done if "recurrent" in r["final"]]
        unfinished = ", ".join(f"seed {r['seed']} at {r['updates']:,}" for r in runs if not r["finished"])
        row = [runs[0]["label"], " ".join(str(r["seed"]) for r in done) or "-"]
        for scores in (window, rec):
            row += [mean_std(scores), " / ".join(f"{v:.1f}" for v in scores) or "-"]
        row += [mean_std([r[k] for r in done if k in r]) for k in ("second_half", "swing", "paper_protocol")]
        rows.append([*row, unfinished or "-"])
    return markdown_table([*FINAL_HEADERS, "unfinished"], rows)


def curve_table(models: dict[str, list[dict]], target: float) -> str:
    curves = {k: curve(runs, target) for k, runs in models.items()}
    updates = sorted({u for c in curves.values() for u in c})
    cell = lambda c, u: f"{mean_std(c[u])} ({len(c[u])})" if u in c else "-"  # noqa: E731
    rows = [[f"{u:,}", *(cell(c, u) for c in curves.values())] for u in updates]
    labels = [f"{runs[0]['label']}: mean ± std (seeds)" for runs in models.values()]
    return markdown_table(["updates", *labels], rows)


def protocol_table(models: dict[str, list[dict]], budgets: Sequence[int]) -> str:
    """The paper's number (best evaluation per seed, mean over seeds) up to each budget."""
    rows = []
    for runs in models.values():
        cells = []
        for budget in budgets:
            histories = [r["eval_history"] for r in runs]
            reached = [h for h in histories if any(e["update"] >= budget for e in h)]
            best = [max(e["normalized_mean"] for e in h if e["update"] <= budget) for h in reached]
            cells.append(f"{mean_std(best)} ({len(best)})")
        rows.append([runs[0]["label"], *cells])
    return markdown_table(["model", *(f"best evaluation up to {b:,} (seeds)" for b in budgets)], rows)


def plot(models: dict[str, list[dict]], targets: Sequence[float]) -> Any:
    """One panel per target return, the models in the same colour in each, the legend beneath."""
    fig, axes = new_figure(ncols=len(targets), width=5.0, height=4.2, sharey=True)
    for ax, target in zip(axes[0], targets, strict=True):
        for i, runs in enumerate(models.values()):
            c = curve(runs, target)
            x, m = np.array(list(c)), np.array([np.mean(v) for v in c.values()])
            s = np.array([np.std(v) for v in c.values()])
            ax.plot(x, m, color=f"C{i}", marker=".", label=runs[0]["label"])
            ax.fill_between(x, m - s, m + s, color=f"C{i}", alpha=0.15)
            partial = np.array([len(v) < len(runs) for v in c.values()], dtype=bool)
            ax.plot(x[partial], m[partial], "o", color=f"C{i}", markerfacecolor="white")
        ax.set(xlabel="updates", title=f"target return {target:g}")
    axes[0][0].set_ylabel("normalized score (100 episodes, window)")
    fig.suptitle("learning curves: mean ± std over seeds (hollow: not every seed got there)")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncols=2, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"bench.{SCRIPT}", description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="*", help="run roots, each as ROOT or ROOT:WHERE-IT-WAS-TRAINED")
    p.add_argument("--recurrent", nargs="*", type=Path, default=[], help="`dmm eval --json` results")
    p.add_argument(
        "--previous",
        type=Path,
        help="an earlier report's results.json: its runs stay in the table unless a run folder is further on "
        "(run folders stay on the machine that trained them; the report is what gets committed)",
    )
    p.add_argument("--out", type=Path, default=default_out("scores-100k"))
    return p.parse_args(argv)


def notes(runs: list[dict], targets: Sequence[float]) -> list[str]:
    trained = "; ".join(sorted({f"{r['label']} on {r['trained_on']}" for r in runs}))
    return [
        f"runs: {trained}",
        "final: the last checkpoint on 100 episodes at the first target return; a seed's score is its mean "
        "normalized return; mean ± std over seeds",
        "mean of the second half's evaluations: per seed, the mean of its evaluations (window, first target) "
        "from half its updates on, the final one included; less swayed by one checkpoint's swing",
        f"swing: per seed, the std of its last {SWING_EVALS} evaluations (window, first target), the final "
        "one included; mean ± std over seeds",
        "paper protocol (the authors' reporting, for comparison only): the best of the evaluations every "
        f"10k updates at every target return ({', '.join(f'{t:g}' for t in targets)}), per seed",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    recurrent = {(d := json.loads(p.read_text()))["name"]: d for p in args.recurrent}
    runs = collect(args.roots, recurrent, read_previous(args.previous) if args.previous else [])
    if not runs:
        sys.exit(f"no run folders under {', '.join(args.roots) or '(no roots given)'} and no --previous runs")
    models: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"])):
        models.setdefault(r["variant"], []).append(r)
    targets = sorted({e["target_return"] for r in runs for e in r["eval_history"]}, reverse=True)
    common = min(max(e["update"] for e in r["eval_history"]) for r in runs if r["eval_history"])
    tables = [
        "### Final checkpoint (finished runs)",
        final_table(models),
        *(f"### Learning curves at target {t:g} (window)\n\n{curve_table(models, t)}" for t in targets),
        "### The paper's protocol at the budget every run reached and at the full budget",
        protocol_table(models, sorted({common, max(r["updates"] for r in runs)})),
    ]
    previous = str(args.previous) if args.previous else None
    payload = {**header(SCRIPT, argv), "roots": args.roots, "previous": previous, "target_returns": targets}
    payload["runs"] = runs
    title, fig = "Normalized scores at the paper's budget", plot(models, targets)
    write_report(args.out, "scores", title, "\n\n".join(tables), payload, fig, notes(runs, targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
