"""Local (short-range) token mixers: the Dense Sequence Mixer and the depthwise-conv ablation.

Both look at the k tokens i-k+1..i for output position i (causal; positions before the sequence
start are zero). With a cache of the last k-1 input tokens the same code continues a sequence
chunk by chunk, which is how recurrent inference runs in O(1) per step.
"""

from __future__ import annotations

import torch
from torch import nn


class CausalLocalMixer(nn.Module):
    """Shared windowing: ``_mix`` gets windows [b, L, k, d] (oldest token first)."""

    def __init__(self, d_model: int, window: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.window = window

    def forward(
        self, x: torch.Tensor, cache: torch.Tensor | None = None, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, L, d]; cache [b, k-1, d] holds the tokens before x (zeros at a sequence start).

        With ``slots`` [b], ``cache`` is a buffer [S, k-1, d] whose rows ``slots`` are the batch's
        caches; they are updated in place and the buffer is returned.
        Returns the mixed tokens [b, L, d] and the new cache (the last k-1 tokens seen).
        """
        b, _, d = x.shape
        if cache is None:
            cache = x.new_zeros(b, self.window - 1, d)
        padded = torch.cat([cache if slots is None else cache[slots], x], dim=1)  # [b, L + k - 1, d]
        windows = padded.unfold(1, self.window, 1).transpose(2, 3)  # [b, L, k, d]
        last = padded[:, padded.shape[1] - (self.window - 1) :]
        if slots is None:
            return self._mix(windows), last
        return self._mix(windows), cache.index_copy_(0, slots, last)

    def _mix(self, windows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DenseSequenceMixer(CausalLocalMixer):
    """DSM (paper §3.3): concatenate the k token vectors and apply one Linear(k*d -> d)."""

    def __init__(self, d_model: int, window: int) -> None:
        super().__init__(d_model, window)
        self.proj = nn.Linear(window * d_model, d_model)

    def _mix(self, windows: torch.Tensor) -> torch.Tensor:
        return self.proj(windows.flatten(2))


class DepthwiseConvMixer(CausalLocalMixer):
    """Ablation (paper Table 3, "Conv"): a causal depthwise 1-D convolution of width k."""

    def __init__(self, d_model: int, window: int) -> None:
        super().__init__(d_model, window)
        self.weight = nn.Parameter(torch.empty(window, d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        nn.init.uniform_(self.weight, -(window**-0.5), window**-0.5)

    def _mix(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.einsum("blkd,kd->bld", windows, self.weight) + self.bias
