"""The training loop: sample windows, regress actions, evaluate, publish to the store."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dmm.data import Dataset, EpisodeSampler, WindowBatch, WindowSampler
from dmm.envs import EnvSpec
from dmm.errors import ConfigError
from dmm.model import InferenceMode, Policy, PolicyMeta, PolicyNetwork, publish_policy
from dmm.model.block import BlockState
from dmm.model.scan import resolve_backend
from dmm.store import Store
from dmm.trainer.config import TrainConfig
from dmm.trainer.evaluate import evaluate
from dmm.trainer.optim import make_optimizer, weight_average
from dmm.trainer.plots import learning_curve_png
from dmm.trainer.run_dir import RunDir, TrainingStopped

LOSS_LOG_EVERY = 100
STATUS_LOG_EVERY = 1000  # without progress bars (logs, background runs), one status line this often


def status_line(update: int, total: int, loss: float, rate: float) -> str:
    """One line for a log: where training is, how fast it goes and when it will be done."""
    eta_min = (total - update) / rate / 60 if rate > 0 else float("inf")
    where = f"update {update:,} of {total:,}"
    return f"{where}: loss {loss:.4f}, {rate:.1f} updates/s, about {eta_min:.0f} min left"


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


def eval_targets(cfg: TrainConfig, spec: EnvSpec) -> list[float]:
    """The target returns to evaluate at; the first is stored as the policy's default."""
    return cfg.target_returns or list(spec.target_returns)


def new_policy(
    cfg: TrainConfig, spec: EnvSpec, env: str, state_stats: tuple[Iterable[float], Iterable[float]]
) -> tuple[PolicyNetwork, PolicyMeta]:
    """A freshly initialized policy (seeded by ``cfg.seed``) for ``spec``'s environment and the
    metadata it is served with, normalizing states by ``state_stats`` (mean, std).

    The one place a policy's dimensions are filled in (from the environment) and its metadata
    composed, so training and the benchmarks build the same model from the same config.
    """
    torch.manual_seed(cfg.seed)
    model = PolicyNetwork(cfg.model.with_dims(spec.obs_dim, spec.act_dim))
    mean, std = state_stats
    meta = PolicyMeta(
        env=env,
        env_id=spec.env_id,
        state_mean=[float(x) for x in mean],
        state_std=[float(x) for x in std],
        rtg_scale=cfg.rtg_scale or spec.rtg_scale,
        target_return=float(eval_targets(cfg, spec)[0]),
        inference_mode=served_mode(cfg),
    )
    return model, meta


def served_mode(cfg: TrainConfig) -> InferenceMode:
    """Recurrent for a policy whose training walked whole episodes through its recurrent state: it has
    seen what recurrent inference feeds it, and plays as well that way (docs/training.md) at O(1) per
    step; window otherwise, the only context such a policy was trained on."""
    return "recurrent" if cfg.episode_fraction > 0 else "window"


def build_policy(cfg: TrainConfig, dataset: Dataset) -> tuple[PolicyNetwork, PolicyMeta]:
    """A freshly initialized policy for ``dataset``, whose states it normalizes, once the dataset is
    known to have its environment's dimensions."""
    spec = dataset.spec
    if (dataset.obs_dim, dataset.act_dim) != (spec.obs_dim, spec.act_dim):
        raise ConfigError(
            f"dataset {dataset.name} has states of {dataset.obs_dim} and actions of {dataset.act_dim} dims, "
            f"but {spec.env_id} has {spec.obs_dim} and {spec.act_dim}"
        )
    return new_policy(cfg, spec, dataset.env or spec.dataset, (dataset.state_mean, dataset.state_std))


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile would build its kernels with (``$CXX``, else g++), or None."""
    return shutil.which(os.environ.get("CXX") or "g++")


def compiled_forward(
    forward: Callable[..., Any], wanted: bool, device: torch.device, log: Callable[[str], None]
) -> Callable[..., Any]:
    """``torch.compile(forward)`` (a model or its method) where it can work, else ``forward`` itself.

    Inductor builds its kernels with a C++ compiler on the CPU and Triton's launcher with a C compiler
    on a GPU; a slim image has neither, so instead of an attempt that fails with a traceback, training
    runs eagerly and says so once.
    """
    if not wanted:
        return forward
    if cxx_compiler() is None:
        log("no C++ compiler found (set CXX or install g++): training runs eagerly, without torch.compile")
        return forward
    return torch.compile(forward, mode="reduce-overhead" if device.type == "cuda" else None)


def make_sampler(cfg: TrainConfig, dataset: Dataset, model: PolicyNetwork, rtg_scale: float) -> WindowSampler:
    """Random windows, with ``cfg.episode_fraction`` of each batch's rows walking whole trajectories."""
    context, rows = cfg.model.context, round(cfg.episode_fraction * cfg.batch_size)
    if not rows:
        return WindowSampler(dataset, context, cfg.batch_size, rtg_scale, seed=cfg.seed)
    if not model.config.supports_recurrent:
        raise ConfigError(
            f"episode_fraction carries a recurrent state; the {model.config.describe_architecture()} has none"
        )
    return EpisodeSampler(dataset, context, cfg.batch_size, rtg_scale, rows, seed=cfg.seed)


class TrainStep:
    """One optimizer update on a batch of windows: masked action MSE, clipping, AdamW, the learning-rate
    schedule and, with ``cfg.ema_decay``, the weight average (``average``) that is served.

    With ``cfg.compile`` the model's forward is compiled on the first call, on a GPU with CUDA graphs
    (``mode="reduce-overhead"``: an update of these small models is bound by kernel launches, and the
    graphs make it 2.4x (DMM) and 1.8x (DT) faster than plain compiling on an H200,
    bench/results/device/device.md); if the compiler fails on this platform, training continues
    eagerly and says so through ``log``.
    """

    def __init__(
        self, model: PolicyNetwork, cfg: TrainConfig, device: torch.device, log: Callable[[str], None] = print
    ) -> None:
        self.network = model
        self.grad_clip = cfg.grad_clip
        self.device = device
        self.log = log
        self.optimizer, self.scheduler = make_optimizer(
            model, cfg.learning_rate, cfg.weight_decay, cfg.warmup_updates, cfg.updates, cfg.lr_schedule
        )
        self.average = weight_average(model, cfg.ema_decay)
        if self.average is not None:
            self.average.eval()  # only ever evaluated and published
        self.eager = model.forward_carried
        self.forward = compiled_forward(self.eager, cfg.compile, device, log)
        self.carry: list[BlockState] | None = None  # the episode rows' state after the last update

    def _predict(self, *inputs: Any) -> tuple[torch.Tensor, list[BlockState]]:
        try:
            return self.forward(*inputs)
        except Exception as err:  # a compiler failure on this platform: train eagerly instead
            if self.forward is self.eager:
                raise
            self.log(f"torch.compile failed ({type(err).__name__}: {err}); training without compiling")
            self.forward = self.eager
            return self.forward(*inputs)

    def _carried(self, fresh: np.ndarray | None) -> list[BlockState] | None:
        """The state each row continues from: the last update's for episode rows that go on (detached:
        backpropagation stops at the update's chunk), zero for rows that start afresh."""
        if fresh is None or self.carry is None or fresh.all():
            return None
        keep = torch.from_numpy(~fresh).to(self.device)[:, None, None]
        return [BlockState(s.local.detach() * keep, s.ssm.detach() * keep) for s in self.carry]

    def __call__(self, batch: WindowBatch) -> float:
        """Update on ``batch``; returns the loss (reading it also synchronizes a GPU)."""
        rtg, states, actions, mask, timesteps = (
            torch.from_numpy(x).to(self.device)
            for x in (batch.rtg, batch.states, batch.actions, batch.mask, batch.timesteps)
        )
        timesteps = timesteps if self.network.config.timestep_embedding else None
        pred, carry = self._predict(rtg, states, actions, mask, timesteps, self._carried(batch.fresh))
        if batch.fresh is not None:
            self.carry = carry
        loss = masked_action_mse(pred, actions, mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update_parameters(self.network)
        return loss.item()

    @property
    def served(self) -> PolicyNetwork:
        """The weights that are evaluated and published: the average where there is one."""
        return self.network if self.average is None else self.average.module


def train(
    cfg: TrainConfig,
    dataset: Dataset,
    store: Store,
    name: str,
    progress: bool = True,
    log: Callable[[str], None] = print,
    run: RunDir | None = None,
) -> TrainResult:
    """Train on ``dataset`` for ``cfg.updates`` updates and publish the final policy as a new version.

    With ``run``, training continues from the run's saved state (if any), saves it every
    ``run.checkpoint_every`` updates, and on SIGTERM/SIGINT saves it and raises ``TrainingStopped``.
    """
    training = _Training(cfg, dataset, store, name, progress, log, run)
    done = training.restore()
    start = time.perf_counter()
    with run.stop_on_signals() if run is not None else contextlib.nullcontext():
        training.update_until_done(done)
    return training.finish(time.perf_counter() - start)


class _Training:
    """One run's model, optimizer, sampler and metrics, and the phases ``train`` goes through."""

    def __init__(
        self,
        cfg: TrainConfig,
        dataset: Dataset,
        store: Store,
        name: str,
        progress: bool,
        log: Callable[[str], None],
        run: RunDir | None,
    ) -> None:
        self.cfg, self.store, self.name, self.run = cfg, store, name, run
        self.progress, self.log = progress, log
        device = _device(cfg.device)
        self.network, self.meta = build_policy(cfg, dataset)
        self.network.to(device).train()
        self.targets = eval_targets(cfg, dataset.spec)
        self.sampler = make_sampler(cfg, dataset, self.network, self.meta.rtg_scale)
        self.step = TrainStep(self.network, cfg, device, log)
        mamba = self.network.config.global_mixer == "mamba"
        self.metrics: dict[str, Any] = {
            "dataset": dataset.name,
            "env": self.meta.env,
            "num_parameters": self.network.num_parameters(),
            "scan_backend": resolve_backend(None, device) if mamba else None,
            "train_config": cfg.model_dump(),
            "loss_curve": [],
            "evals": [],
        }
        self.losses: list[float] = []  # since the last loss-curve point
        self.rates: list[float] = []  # updates/s of each LOSS_LOG_EVERY chunk, evaluations left out
        self.chunk_start = time.perf_counter()

    def restore(self) -> int:
        """Load the run's saved state, if any; returns the number of updates already done."""
        if self.run is None:
            return 0
        step = self.step
        done, self.losses, step.carry = self.run.restore(
            self.network, step.optimizer, step.scheduler, self.sampler, self.metrics, step.average
        )
        if done:
            self.log(f"resuming {self.name} at update {done} of {self.cfg.updates} from {self.run.path}")
        return done

    def update_until_done(self, done: int) -> None:
        """Updates ``done + 1`` to the last, with loss logging, evaluations and saved state on the way."""
        cfg = self.cfg
        bar = tqdm(
            total=cfg.updates, initial=done, desc=f"train {self.name}", disable=not self.progress, unit="upd"
        )
        self.chunk_start = time.perf_counter()
        for update in range(done + 1, cfg.updates + 1):
            self.losses.append(self.step(self.sampler.sample()))
            if update % LOSS_LOG_EVERY == 0 or update == cfg.updates:
                self._record_loss(update, bar)
            if cfg.eval_every and update % cfg.eval_every == 0 and update != cfg.updates:
                bar.clear()
                self.evaluate(update)
                if cfg.publish_every_eval:
                    self.log(f"published {self.name} version {self.publish()}")
                self.chunk_start = time.perf_counter()  # keep evaluation out of the update rate
            if self.run is not None and self.run.due(update, cfg.updates):
                self.save(update)
                if self.run.stop_signal is not None:
                    bar.close()
                    raise TrainingStopped(
                        f"stopped by signal {self.run.stop_signal} after update {update} of {cfg.updates}; "
                        f"the state is in {self.run.path}: continue with dmm train --resume {self.run.path}"
                    )
        bar.close()

    def _record_loss(self, update: int, bar: tqdm) -> None:
        """Add a loss-curve point for the updates since the last one; show it in the bar or the log."""
        now = time.perf_counter()
        self.rates.append(len(self.losses) / (now - self.chunk_start))
        mean_loss = float(np.mean(self.losses))
        self.metrics["loss_curve"].append([update, mean_loss])
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{self.step.scheduler.get_last_lr()[0]:.1e}")
        bar.update(len(self.losses))
        if not self.progress and update % STATUS_LOG_EVERY == 0:
            self.log(status_line(update, self.cfg.updates, mean_loss, float(np.median(self.rates[-10:]))))
        self.losses.clear()
        self.chunk_start = now

    def evaluate(self, update: int) -> None:
        """Play the current model at every target return and add the results to the metrics."""
        if self.cfg.eval_episodes == 0:
            return
        served = self.step.served
        served.eval()
        live = Policy(served, self.meta)
        for target in self.targets:
            result = evaluate(
                live,
                self.cfg.eval_episodes,
                target,
                mode=self.cfg.eval_mode,
                num_envs=self.cfg.eval_num_envs,
                seed=self.cfg.seed + 10_000,
                progress=self.progress,
            )
            self.metrics["evals"].append({"update": update, **result.summary()})
            self.log(f"update {update}: target {target:g}: {result.describe()}")
        self.network.train()

    def publish(self) -> int:
        png = learning_curve_png(self.metrics)
        return publish_policy(
            self.store, self.name, self.step.served, self.meta, self.metrics, {"learning_curve.png": png}
        )

    def save(self, update: int, version: int | None = None) -> None:
        if self.run is not None:
            step = self.step
            self.run.save(
                update,
                self.network,
                step.optimizer,
                step.scheduler,
                self.sampler,
                self.losses,
                self.metrics,
                version,
                step.average,
                step.carry,
            )

    def finish(self, train_seconds: float) -> TrainResult:
        """Evaluate the final model, store its best target as the default, publish it and save the run."""
        metrics, updates = self.metrics, self.cfg.updates
        metrics["train_seconds"] = train_seconds
        metrics["updates"] = updates
        metrics["updates_per_second_median"] = float(np.median(self.rates)) if self.rates else None
        metrics["final_loss"] = metrics["loss_curve"][-1][1]
        self.evaluate(updates)
        metrics["final_eval"] = [row for row in metrics["evals"] if row["update"] == updates]
        if metrics["final_eval"]:  # serve with the target that played best at the end, not the first listed
            best = max(metrics["final_eval"], key=lambda row: row["normalized_mean"])
            self.meta = self.meta.model_copy(update={"target_return": float(best["target_return"])})
        metrics["default_target_return"] = self.meta.target_return
        version = self.publish()
        self.save(updates, version)
        self.log(f"published {self.name} version {version} to {self.store.root}")
        return TrainResult(self.name, version, metrics)
