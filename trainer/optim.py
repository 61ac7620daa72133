"""AdamW with weight decay only where it belongs, a warm-up that fits the budget, and the weight
average that is evaluated and published."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# Parameters that are not weights of a linear map: decaying them pulls norms to zero, the scan's
# decay rates A = -exp(A_log) towards -1 and its skip D towards 0.
NO_DECAY_NAMES = ("A_log", "D")
# The warm-up never takes more than this share of the budget: a fixed 10k-update warm-up would keep
# a 2k-update run at a fifth of its learning rate throughout.
MAX_WARMUP_FRACTION = 0.1

Schedule = Literal["constant", "cosine"]


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (matrix weights) and not (norms, biases, A_log, D)."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if id(param) in norm_params or leaf == "bias" or leaf in NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_length(warmup: int, updates: int) -> int:
    """The warm-up actually used: ``warmup`` updates, but at most a tenth of the budget."""
    return min(warmup, math.ceil(MAX_WARMUP_FRACTION * updates))


def lr_factor(step: int, warmup: int, updates: int, schedule: Schedule) -> float:
    """The learning rate's multiplier before update ``step + 1`` of ``updates``.

    Linear from 1/warmup to 1 over the warm-up, then 1 (``constant``, the paper's) or a half cosine
    from 1 to 0 just after the last update (``cosine``): the weights then settle instead of wandering with
    a large step to the end, so the final checkpoint is not a draw.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, updates - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, warmup: int, updates: int, schedule: Schedule
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its schedule (see ``lr_factor``), the warm-up capped by ``warmup_length``."""
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr)
    warm = warmup_length(warmup, updates)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warm, updates, schedule)
    )
    return optimizer, scheduler


def weight_average(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights (and buffers), or None without ``decay``."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
