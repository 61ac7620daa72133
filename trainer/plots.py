"""Learning-curve plot written beside ``metrics.json``."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def learning_curve_png(metrics: dict[str, Any]) -> bytes:
    """Training loss and normalized evaluation score (mean ± std per target) against updates."""
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(11, 4))
    loss = metrics.get("loss_curve", [])
    if loss:
        updates, values = zip(*loss, strict=True)
        ax_loss.plot(updates, values, lw=1)
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="update", ylabel="action MSE", title="training loss")
    ax_loss.grid(alpha=0.3)
    by_target: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for row in metrics.get("evals", []):
        by_target.setdefault((row["target_return"], row["mode"]), []).append(row)
    for (target, mode), rows in sorted(by_target.items()):
        x = [r["update"] for r in rows]
        mean = [r["normalized_mean"] for r in rows]
        std = [r["normalized_std"] for r in rows]
        ax_score.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=f"target {target:g} ({mode})")
    if by_target:
        ax_score.legend()
    ax_score.set(xlabel="update", ylabel="normalized score", title=f"evaluation: {metrics.get('env', '')}")
    ax_score.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
