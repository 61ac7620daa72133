"""A resumable training run: its folder holds what was asked (``run.json``) and where it is (``state.pt``).

``state.pt`` has everything an update depends on: the update count, model, optimizer and LR-schedule
states, the weight average (if any), the torch RNG, where the sampler is (its RNG; with stream
rows, each row's place and carried recurrent state), the losses of the unfinished
logging chunk and the metrics so far. It is written to a temporary file, flushed to disk and renamed
over the previous one, so a crash while saving leaves the last good state. Resuming restores all of
it, which makes an interrupted eager CPU run end with the same weights, bit for bit, as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dmm.data import WindowSampler
from dmm.errors import ConfigError, DMMError
from dmm.model import PolicyNetwork
from dmm.model.block import BlockState

RUN_FILE = "run.json"
STATE_FILE = "state.pt"


class TrainingStopped(DMMError):
    """A signal stopped training after the state was saved; ``dmm train --resume`` continues it."""


class RunDir:
    def __init__(self, path: Path, checkpoint_every: int) -> None:
        if checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be positive, got {checkpoint_every}")
        self.path = Path(path)
        self.checkpoint_every = checkpoint_every
        self.stop_signal: int | None = None

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    # ------------------------------------------------------------------ run.json

    def start(self, spec: dict[str, Any]) -> None:
        """Begin a new run in this folder (refused where a run already is)."""
        if (self.path / RUN_FILE).exists():
            raise ConfigError(f"{self.path} already holds a run: continue it with --resume {self.path}")
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path / RUN_FILE, lambda f: f.write(json.dumps(spec, indent=2).encode()))

    def spec(self) -> dict[str, Any]:
        path = self.path / RUN_FILE
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{self.path} is not a training run: {path} is missing") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path} is unreadable: {err}") from None

    # ------------------------------------------------------------------ state.pt

    def save(
        self,
        update: int,
        model: PolicyNetwork,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        sampler: WindowSampler,
        pending_losses: list[float],
        metrics: dict[str, Any],
        published_version: int | None = None,
        average: torch.nn.Module | None = None,
        carry: list[BlockState] | None = None,
    ) -> None:
        """Write the state after ``update`` updates (with ``published_version``: the run is finished)."""
        state = {
            "update": update,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "sampler": sampler.state(),
            "pending_losses": list(pending_losses),
            "metrics": {key: metrics[key] for key in ("loss_curve", "evals")},
            "published_version": published_version,
            "average": None if average is None else average.state_dict(),
            "carry": None if carry is None else [(s.local, s.ssm) for s in carry],
        }
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.state_file, lambda f: torch.save(state, f))

    def restore(
        self,
        model: PolicyNetwork,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        sampler: WindowSampler,
        metrics: dict[str, Any],
        average: torch.nn.Module | None = None,
    ) -> tuple[int, list[float], list[BlockState] | None]:
        """Load the saved state into the given objects; returns the update, the pending losses and the
        episode rows' carried state: (0, [], None) if there is none."""
        if not self.state_file.exists():
            return 0, [], None
        try:
            state = torch.load(self.state_file, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated or foreign file
            raise ConfigError(f"{self.state_file} is damaged ({type(err).__name__}: {err})") from None
        if state.get("published_version") is not None:
            raise ConfigError(
                f"the run in {self.path} is finished: it published version {state['published_version']}"
            )
        try:
            model.load_state_dict(state["model"])
            if average is not None:
                average.load_state_dict(state["average"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            sampler.set_state(state["sampler"] if "sampler" in state else {"rng": state["sampler_rng"]})
            metrics.update(state["metrics"])
            carry = state.get("carry")
            carried = None if carry is None else [BlockState(local, ssm) for local, ssm in carry]
            return int(state["update"]), list(state["pending_losses"]), carried
        except Exception as err:  # a state that does not fit this run
            raise ConfigError(f"{self.state_file} is damaged ({type(err).__name__}: {err})") from None

    # ------------------------------------------------------------------ signals

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT ask training to save and stop after the current update."""

        def request_stop(signum: int, _frame: Any) -> None:
            self.stop_signal = signum

        self.stop_signal = None
        previous = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def due(self, update: int, last: int) -> bool:
        return self.stop_signal is not None or (update % self.checkpoint_every == 0 and update != last)


def _write_atomically(path: Path, write: Any) -> None:
    """Write through ``write(file)`` to a temporary file, fsync it, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
