"""Training configuration: the paper's hyper-parameters by default, per-family YAML, CLI overrides.

The defaults are the paper's MuJoCo settings (Table 5), so a family's bundled YAML holds only where
the paper departs from them; families without one (hopper, halfcheetah, ...) train with the defaults.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmm.data.minari_datasets import MINARI_PREFIX
from dmm.errors import ConfigError
from dmm.model.config import DMMSettings, InferenceMode
from dmm.trainer.optim import Schedule


class TrainConfig(BaseModel):
    """Paper, Appendix A and Table 5: AdamW, lr 1e-4 with 10k linear warm-up then constant,
    weight decay 1e-4, grad-norm clip 0.25, batch 64, 100k updates. The warm-up is capped at a tenth
    of ``updates``; ``lr_schedule`` and ``ema_decay`` are the levers against a final checkpoint that
    swings from one evaluation to the next (``dmm.trainer.optim``)."""

    model_config = ConfigDict(extra="forbid")

    model: DMMSettings = Field(
        default_factory=DMMSettings, description="the architecture; a dataset fills in the dimensions"
    )
    episode_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of each batch's rows that walk whole trajectories, K steps per update, "
        "carrying the recurrent state from update to update (what recurrent inference sees); "
        "the others are the paper's random windows",
    )
    updates: int = Field(100_000, gt=0)
    batch_size: int = Field(64, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    warmup_updates: int = Field(10_000, ge=0, description="at most a tenth of `updates` is used")
    lr_schedule: Schedule = Field("constant", description="after the warm-up: constant, or cosine to 0")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="evaluate and publish an average of the weights with this decay"
    )
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(0.25, gt=0)
    rtg_scale: float | None = Field(None, gt=0, description="None: the environment's (1000 for locomotion)")
    target_returns: list[float] | None = Field(None, description="None: the environment's defaults")
    eval_every: int = Field(10_000, ge=0, description="0: evaluate only at the end")
    eval_episodes: int = Field(10, ge=0)
    eval_num_envs: int = Field(10, gt=0)
    eval_mode: InferenceMode = "window"
    publish_every_eval: bool = False
    seed: int = 0
    device: str = "cpu"
    compile: bool = Field(True, description="torch.compile the model for training (eager if compiling fails)")


CONFIG_PACKAGE = "dmm.trainer.configs"
# Families whose paper settings differ from the defaults, and the bundled YAML with the difference:
# Table 5's narrower Walker2d model, and Table 6's wider model for the sparse-reward tasks.
PAPER_CONFIGS: dict[str, str] = {
    "walker2d": "walker2d",
    "antmaze": "sparse-reward",
    "kitchen": "sparse-reward",
}


def family_of(dataset: str) -> str:
    """``hopper-medium-v2`` -> ``hopper``; file stems work the same way. A Minari id names its
    environment in the namespace's last folder (``minari:mujoco/hopper/medium-v0`` -> ``hopper``)."""
    minari_id = dataset.removeprefix(MINARI_PREFIX)
    if minari_id != dataset and "/" in minari_id:
        return minari_id.split("/")[-2].lower()
    return Path(minari_id).stem.split("-")[0].split("_")[0].lower()


def paper_config_path(dataset: str) -> Path | None:
    """The bundled YAML with the paper's departures from the defaults for the dataset's family, if any."""
    stem = PAPER_CONFIGS.get(family_of(dataset))
    return _bundled(stem) if stem else None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return data


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in values.items() if v is not None}


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _bundled(name: str) -> Path | None:
    candidate = resources.files(CONFIG_PACKAGE) / f"{name}.yaml"
    return Path(str(candidate)) if candidate.is_file() else None


def load_train_config(
    dataset: str,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    architecture: str = "dmm",
) -> TrainConfig:
    """Defaults <- the family's bundled YAML <- ``dt.yaml`` for the DT baseline <- ``config_file``
    <- ``overrides`` (None values skipped)."""
    settings: dict[str, Any] = {}
    layers = [
        paper_config_path(dataset),
        _bundled("dt") if architecture == "dt" else None,
        Path(config_file).expanduser() if config_file else None,
    ]
    for path in layers:
        if path is not None:
            settings = _merge(settings, _read_yaml(path))
    settings = _merge(settings, _without_none(overrides or {}))
    try:
        return TrainConfig(**settings)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid training config: {problems}") from err
