"""The training loop: sample windows, regress actions, evaluate, publish to the store."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dmm.data import Dataset, WindowSampler
from dmm.errors import ConfigError
from dmm.model import DMMConfig, DMMPolicy, LoadedPolicy, PolicyMeta, publish_policy
from dmm.store import ModelStore
from dmm.trainer.config import TrainConfig
from dmm.trainer.evaluate import evaluate
from dmm.trainer.optim import make_optimizer
from dmm.trainer.plots import learning_curve_png

LOSS_LOG_EVERY = 100


@dataclass
class TrainResult:
    name: str
    version: int
    metrics: dict[str, Any]


def masked_action_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared action error over real (non-padded) positions only."""
    weight = mask.unsqueeze(-1).to(pred.dtype)
    return ((pred - target) ** 2 * weight).sum() / (weight.sum() * pred.shape[-1])


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA GPU")
    return device


def build_policy(cfg: TrainConfig, dataset: Dataset) -> tuple[DMMPolicy, PolicyMeta]:
    """A freshly initialized policy for ``dataset`` and the metadata it is served with."""
    spec = dataset.spec
    if (dataset.obs_dim, dataset.act_dim) != (spec.obs_dim, spec.act_dim):
        raise ConfigError(
            f"dataset {dataset.name} has states of {dataset.obs_dim} and actions of {dataset.act_dim} dims, "
            f"but {spec.env_id} has {spec.obs_dim} and {spec.act_dim}"
        )
    torch.manual_seed(cfg.seed)
    model = DMMPolicy(DMMConfig(state_dim=dataset.obs_dim, act_dim=dataset.act_dim, **cfg.model.model_dump()))
    targets = cfg.target_returns or list(spec.target_returns)
    meta = PolicyMeta(
        env=dataset.env or spec.dataset,
        env_id=spec.env_id,
        state_mean=[float(x) for x in dataset.state_mean],
        state_std=[float(x) for x in dataset.state_std],
        rtg_scale=cfg.rtg_scale or spec.rtg_scale,
        target_return=float(targets[0]),
    )
    return model, meta


def train(
    cfg: TrainConfig,
    dataset: Dataset,
    store: ModelStore,
    name: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train on ``dataset`` for ``cfg.updates`` updates and publish the final policy as a new version."""
    device = _device(cfg.device)
    model, meta = build_policy(cfg, dataset)
    model.to(device).train()
    targets = cfg.target_returns or list(dataset.spec.target_returns)
    sampler = WindowSampler(dataset, cfg.model.context, cfg.batch_size, meta.rtg_scale, seed=cfg.seed)
    optimizer, scheduler = make_optimizer(model, cfg.learning_rate, cfg.weight_decay, cfg.warmup_updates)
    forward: Callable[..., torch.Tensor] = torch.compile(model) if cfg.compile else model

    metrics: dict[str, Any] = {
        "dataset": dataset.name,
        "env": meta.env,
        "num_parameters": model.num_parameters(),
        "train_config": cfg.model_dump(),
        "loss_curve": [],
        "evals": [],
    }

    def run_evals(update: int) -> None:
        if cfg.eval_episodes == 0:
            return
        model.eval()
        live = LoadedPolicy(name, 0, model, model.config, meta, device, {})
        for target in targets:
            result = evaluate(
                live,
                cfg.eval_episodes,
                target,
                mode=cfg.eval_mode,
                num_envs=cfg.eval_num_envs,
                seed=cfg.seed + 10_000,
                progress=progress,
            )
            row = {"update": update, **result.summary()}
            metrics["evals"].append(row)
            log(f"update {update}: target {target:g}: {result.describe()}")
        model.train()

    def publish() -> int:
        return publish_policy(
            store, name, model, meta, metrics, {"learning_curve.png": learning_curve_png(metrics)}
        )

    chunk_rates: list[float] = []
    losses: list[float] = []
    chunk_start = start = time.perf_counter()
    bar = tqdm(total=cfg.updates, desc=f"train {name}", disable=not progress, unit="upd")
    for update in range(1, cfg.updates + 1):
        batch = sampler.sample()
        rtg, states, actions, mask, timesteps = (
            torch.from_numpy(x).to(device)
            for x in (batch.rtg, batch.states, batch.actions, batch.mask, batch.timesteps)
        )
        timesteps = timesteps if model.config.uses_timesteps else None
        try:
            pred = forward(rtg, states, actions, mask, timesteps)
        except Exception as err:  # a compiler failure on this platform: train eagerly instead
            if forward is model:
                raise
            log(f"torch.compile failed ({type(err).__name__}: {err}); training without compiling")
            forward = model
            pred = forward(rtg, states, actions, mask, timesteps)
        loss = masked_action_mse(pred, actions, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if update % LOSS_LOG_EVERY == 0 or update == cfg.updates:
            now = time.perf_counter()
            chunk_rates.append(len(losses) / (now - chunk_start))
            metrics["loss_curve"].append([update, float(np.mean(losses))])
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
            bar.update(len(losses))
            losses.clear()
        if cfg.eval_every and update % cfg.eval_every == 0 and update != cfg.updates:
            bar.clear()
            run_evals(update)
            if cfg.publish_every_eval:
                log(f"published {name} version {publish()}")
            chunk_start = time.perf_counter()  # keep evaluation out of the update rate
        elif update % LOSS_LOG_EVERY == 0:
            chunk_start = time.perf_counter()
    bar.close()
    metrics["train_seconds"] = time.perf_counter() - start
    metrics["updates"] = cfg.updates
    metrics["updates_per_second_median"] = float(np.median(chunk_rates)) if chunk_rates else None
    metrics["final_loss"] = metrics["loss_curve"][-1][1]
    run_evals(cfg.updates)
    metrics["final_eval"] = [row for row in metrics["evals"] if row["update"] == cfg.updates]
    version = publish()
    log(f"published {name} version {version} to {store.root}")
    return TrainResult(name, version, metrics)
