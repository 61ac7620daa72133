"""What the benchmarks measure: the model variants (architecture, model and training settings),
their configs and untrained policies, and the data they train on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.harness import REPO_ROOT

if TYPE_CHECKING:
    from dmm.data import Dataset
    from dmm.model import Policy

SHARED_HOPPER = REPO_ROOT.parent / "shared" / "data" / "hopper-medium-sim-v4.hdf5"
FRESH_POLICY_ENV = "hopper-medium-sim-v4"


@dataclass(frozen=True)
class Variant:
    """A model to train: an architecture (its bundled YAML applies), DMMSettings overrides and
    TrainConfig overrides (``train``: the optimization levers)."""

    key: str
    label: str
    architecture: str = "dmm"
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


COSINE_EMA = {"lr_schedule": "cosine", "ema_decay": 0.999}
_VARIANTS = (
    Variant("dmm", "DMM (K=8)"),
    Variant("dt", "DT (K=20)", "dt"),
    Variant("dt-k8", "DT (K=8)", "dt", {"context": 8}),
    Variant("conv-local", "DMM, conv local mixer (ablation)", model={"local_mixer": "conv"}),
    Variant(
        "attention-global", "DMM, attention global mixer (ablation)", model={"global_mixer": "attention"}
    ),
    Variant("dmm-k20", "DMM (K=20)", model={"context": 20}),
    # DT's usual width gives it three times DMM's parameters (726k against 236k on hopper):
    # each model at the other's width, for a comparison at equal size.
    Variant("dmm-d128", "DMM (K=8), d=128 as DT", model={"d_model": 128}),
    Variant("dt-d64", "DT (K=20), d=64 as DMM", "dt", {"d_model": 64}),
    # Against a final checkpoint that swings from one evaluation to the next (issue: stable finals)
    Variant("dmm-cosine", "DMM, cosine learning rate", train={"lr_schedule": "cosine"}),
    Variant("dmm-ema", "DMM, weight average (EMA 0.999)", train={"ema_decay": 0.999}),
    Variant("dmm-cosine-ema", "DMM, cosine learning rate + EMA 0.999", train=COSINE_EMA),
    # Against a recurrent mode that trails the window (issue: recurrent as good as the window)
    Variant(
        "dmm-cosine-ema-rows",
        "DMM, cosine + EMA 0.999, half the rows walk whole episodes",
        train={**COSINE_EMA, "episode_fraction": 0.5},
    ),
    Variant("dt-cosine-ema", "DT (K=20), cosine learning rate + EMA 0.999", "dt", train=COSINE_EMA),
    Variant(
        "dmm-stream",
        "DMM, residual stream, no timestep embedding",
        model={"residual": "stream", "timestep_embedding": False},
    ),
    Variant(
        "dmm-timestep",
        "DMM (eq. 3 residual) + timestep embedding",
        model={"residual": "normalized", "timestep_embedding": True},
    ),
    Variant(
        "dmm-stream-timestep",
        "DMM, residual stream + timestep embedding",
        model={"residual": "stream", "timestep_embedding": True},
    ),
    Variant("dt-no-timestep", "DT (K=20) without timestep embedding", "dt", {"timestep_embedding": False}),
    Variant(
        "dmm-paper",
        "DMM as printed (eq. 3 residual, no timestep embedding)",
        model={"residual": "normalized", "timestep_embedding": False},
    ),
    Variant(
        "authors", "the authors' DMM class (bench/authors_dmm.py)", "authors", {"timestep_embedding": False}
    ),
    Variant(
        "authors-timestep",
        "the authors' DMM class + timestep embedding",
        "authors",
        {"timestep_embedding": True},
    ),
)
VARIANTS: dict[str, Variant] = {v.key: v for v in _VARIANTS}
ABLATIONS = ("conv-local", "attention-global")


def train_config(variant: Variant, dataset: str, overrides: dict[str, Any] | None = None) -> Any:
    """The TrainConfig of ``variant`` on ``dataset`` (paper YAML <- DT YAML <- variant <- overrides)."""
    from dmm.trainer.config import load_train_config

    settings = {**variant.train, **(overrides or {})}
    settings["model"] = {**variant.model, **settings.get("model", {})}
    return load_train_config(dataset, None, settings, architecture=variant.architecture)


def fresh_policy(variant: str, env: str, seed: int, device: str) -> Policy:
    """An untrained policy with the paper's settings for ``env``'s family (identity normalization),
    built by the trainer's own builder so a benchmark measures the model that training starts from."""
    from dmm.envs import env_spec
    from dmm.model import Policy
    from dmm.trainer.train import new_policy

    spec = env_spec(env)
    cfg = train_config(VARIANTS[variant], env, {"seed": seed})
    model, meta = new_policy(cfg, spec, env, ([0.0] * spec.obs_dim, [1.0] * spec.obs_dim))
    return Policy(model.to(device).eval(), meta)


def synthetic_dataset(env: str = "hopper-medium-sim-v4", transitions: int = 20_000, seed: int = 0) -> Dataset:
    """Random trajectories with ``env``'s dimensions, for timing only (speed does not depend on values)."""
    from dmm.data import Dataset, Trajectory
    from dmm.envs import env_spec

    spec = env_spec(env)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(50, spec.max_episode_steps + 1, size=transitions // 50 + 1)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), transitions) + 1]
    trajectories = [
        Trajectory(
            rng.standard_normal((n, spec.obs_dim)).astype(np.float32),
            rng.uniform(-1, 1, (n, spec.act_dim)).astype(np.float32),
            rng.uniform(0, 4, n).astype(np.float32),
            terminal=bool(rng.random() < 0.5),
        )
        for n in lengths
    ]
    return Dataset.from_trajectories(f"{spec.dataset.split('-')[0]}-synthetic", trajectories, env)


def data_label(name: str, env_id: str) -> str:
    """How scores on a dataset may be described: locally collected data are not D4RL results."""
    if "-sim-" in name:
        return f"D4RL-layout data collected in gymnasium {env_id} with D4RL's reference policy ({name})"
    return name
