"""Policies in the model store: what goes into a version and how it comes back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from dmm.model.config import DMMConfig, PolicyMeta
from dmm.model.policy import PolicyNetwork
from dmm.store import CorruptVersionError, Store

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Policy:
    """A network with what inference needs beside it (state normalization, RTG scale, default target):
    what training holds, benchmarks build, and the runner and the evaluation take."""

    network: PolicyNetwork
    meta: PolicyMeta

    @property
    def config(self) -> DMMConfig:
        return self.network.config

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def label(self) -> str:
        """How messages name it."""
        return "the policy"


@dataclass(frozen=True, kw_only=True)
class PolicyVersion(Policy):
    """A version from the model store, in eval mode on its device."""

    name: str
    version: int
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def policy_config(model: PolicyNetwork, meta: PolicyMeta) -> dict[str, Any]:
    """The ``config.json`` of a policy version."""
    return {"format": FORMAT_VERSION, "model": model.config.model_dump(), "meta": meta.model_dump()}


def publish_policy(
    store: Store,
    name: str,
    model: PolicyNetwork,
    meta: PolicyMeta,
    metrics: dict[str, Any] | None = None,
    files: dict[str, bytes | os.PathLike] | None = None,
) -> int:
    """Write ``model`` as a new version of ``name``; returns the version number."""
    if len(meta.state_mean) != model.config.state_dim:
        raise ValueError(
            f"meta has {len(meta.state_mean)} state statistics, model state_dim {model.config.state_dim}"
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return store.publish(name, tensors, policy_config(model, meta), metrics or {}, files)


def policy_from_config(config: dict[str, Any]) -> tuple[DMMConfig, PolicyMeta]:
    """Parse a version's ``config.json``; raises ValueError on anything unexpected."""
    if config.get("format") != FORMAT_VERSION:
        raise ValueError(f"unsupported policy format {config.get('format')!r}")
    try:
        model = dict(config["model"])
        # Written before these options existed: eq. 3's residual, and only DT embedded timesteps.
        model.setdefault("residual", "normalized")
        model.setdefault("timestep_embedding", model.get("architecture") == "dt")
        if model.get("architecture") == "dt":  # once written with DMM's mixer names it never had
            model.pop("local_mixer", None)
            model.pop("global_mixer", None)
        return DMMConfig(**model), PolicyMeta(**config["meta"])
    except (KeyError, TypeError, ValidationError) as err:
        raise ValueError(f"invalid policy config: {err}") from err


def load_policy(
    store: Store, name: str, version: int | str | None = None, device: str | torch.device = "cpu"
) -> PolicyVersion:
    """Load and verify a version; a version that does not describe a valid policy is refused."""
    device = torch.device(device)
    ckpt = store.load(name, version, device=str(device))
    try:
        config, meta = policy_from_config(ckpt.config)
        model = PolicyNetwork(config)
        model.load_state_dict(ckpt.tensors, strict=True)
    except (ValueError, RuntimeError) as err:
        raise CorruptVersionError(f"{name} version {ckpt.version} is not a valid policy: {err}") from err
    model.to(device).eval()
    return PolicyVersion(model, meta, name=name, version=ckpt.version, metrics=ckpt.metrics)
