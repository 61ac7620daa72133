"""AdamW with the paper's warm-up, and weight decay only where it belongs."""

from __future__ import annotations

import torch
from torch import nn

# Parameters that are not weights of a linear map: decaying them pulls norms to zero, the scan's
# decay rates A = -exp(A_log) towards -1 and its skip D towards 0.
NO_DECAY_NAMES = ("A_log", "D")


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


def make_optimizer(
    model: nn.Module, lr: float, weight_decay: float, warmup: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW; lr rises linearly to ``lr`` over ``warmup`` updates, then stays constant."""
    optimizer = torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup))
    )
    return optimizer, scheduler
