"""Architecture and serving metadata of a policy, as stored in ``config.json``."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

InferenceMode = Literal["window", "recurrent"]


class DMMSettings(BaseModel):
    """Architecture of a Decision MetaMamba policy (and of the ablations and the DT baseline), apart
    from the dimensions of states and actions: what a training config holds, before a dataset fills
    the dimensions in (:meth:`with_dims`). The one definition of each setting, its default and bounds.

    Defaults are the paper's locomotion settings (Table 5): d=64, 3 layers, DSM window k=6,
    context K=8 steps (24 tokens), dropout 0.1, Mamba d_state 16 and expand 2. The mixers stay
    None here when not given, meaning the architecture's own (resolved by :class:`DMMConfig`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["dmm", "dt"] = Field(
        "dmm", description="dmm: DSM + modified Mamba blocks; dt: the Decision Transformer baseline"
    )
    d_model: int = Field(64, gt=0)
    n_layer: int = Field(3, gt=0)
    context: int = Field(8, gt=0, description="K: timesteps per window; 3K tokens")
    dsm_window: int = Field(6, gt=0, description="k: tokens mixed by the local mixer")
    d_state: int = Field(16, gt=0)
    expand: int = Field(2, gt=0)
    dt_rank: int | None = Field(None, description="defaults to ceil(d_model / 16)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    local_mixer: Literal["dsm", "conv"] | None = Field(
        None, description="DMM's local mixer (dsm unless given; conv is the ablation); none for DT"
    )
    global_mixer: Literal["mamba", "attention"] | None = Field(
        None, description="DMM's global mixer (mamba unless given; attention is the ablation); none for DT"
    )
    n_head: int = Field(1, gt=0, description="attention heads (attention global mixer, DT)")
    residual: Literal["stream", "normalized"] = Field(
        "stream",
        description="stream: a pre-norm residual stream, x + DSM(LN1 x) then + Mamba(LN2 .), as the "
        "authors' code does; normalized: eq. 3 as printed, each mixer adds to its normalized input",
    )
    timestep_embedding: bool = Field(
        True,
        description="a learned embedding of the episode step added to every token, as in DT "
        "(not in the paper: without it DMM cannot tell 'rtg r at step t' and follows the target far less)",
    )
    max_ep_len: int = Field(1000, gt=0, description="size of the timestep embedding table")

    @model_validator(mode="after")
    def _check(self) -> DMMSettings:
        """Combinations no model can be built from, refused as early as a training config is read."""
        if self.architecture == "dt" and (self.local_mixer, self.global_mixer) != (None, None):
            raise ValueError("local_mixer and global_mixer select DMM ablations; the DT baseline has neither")
        if (self.global_mixer == "attention" or self.architecture == "dt") and self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        return self

    @property
    def resolved_dt_rank(self) -> int:
        """The rank of Mamba's dt projection: ``dt_rank``, else ceil(d_model / 16) as in Mamba."""
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def d_inner(self) -> int:
        """Mamba's channels: the model width times ``expand``."""
        return self.expand * self.d_model

    def with_dims(self, state_dim: int, act_dim: int) -> DMMConfig:
        """These settings for states of ``state_dim`` and actions of ``act_dim`` dimensions."""
        return DMMConfig(state_dim=state_dim, act_dim=act_dim, **self.model_dump())


class DMMConfig(DMMSettings):
    """A policy's whole architecture: its settings and the dimensions of its states and actions,
    with the mixers resolved; what a model is built from and ``config.json`` stores."""

    state_dim: int = Field(gt=0)
    act_dim: int = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _dmm_mixers(cls, data: Any) -> Any:
        """A DMM has both mixers (the paper's unless an ablation is named); the DT baseline neither."""
        if isinstance(data, dict) and data.get("architecture", "dmm") == "dmm":
            data = {**data, "local_mixer": data.get("local_mixer") or "dsm"}
            data["global_mixer"] = data.get("global_mixer") or "mamba"
        return data

    def describe_architecture(self) -> str:
        if self.architecture == "dt":
            return "Decision Transformer"
        return f"DMM, {self.local_mixer} local mixer, {self.global_mixer} global mixer"

    @property
    def supports_recurrent(self) -> bool:
        """Recurrent inference needs a global mixer with a fixed-size state (Mamba, not attention)."""
        return self.architecture == "dmm" and self.global_mixer == "mamba"


class PolicyMeta(BaseModel):
    """What a server or evaluator needs besides the weights: env, normalization, RTG handling."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str = Field(description="dataset / env-spec name, e.g. hopper-medium-v2")
    env_id: str = Field(description="gymnasium id, e.g. Hopper-v4")
    state_mean: list[float]
    state_std: list[float]
    rtg_scale: float = Field(gt=0)
    target_return: float
    inference_mode: InferenceMode = Field(
        "window",
        description="the mode the policy was trained to be served in: recurrent when training walked "
        "whole episodes through the recurrent state (--episode-fraction), else window; what a server "
        "started with --mode auto gives sessions that ask for no mode",
    )

    @model_validator(mode="after")
    def _check(self) -> PolicyMeta:
        if len(self.state_mean) != len(self.state_std):
            raise ValueError("state_mean and state_std differ in length")
        if any(s <= 0 for s in self.state_std):
            raise ValueError("state_std must be positive")
        return self
