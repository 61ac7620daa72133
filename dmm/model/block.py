"""The DMM block, each layer with its own mixers and LayerNorms, in one of two residual forms.

``residual="stream"`` (default; what the authors' code runs) keeps a pre-norm residual stream:

    Z = X + DSM(LN1(X));  Y = Z + ModifiedMamba(LN2(Z))

``residual="normalized"`` is eq. 3 as printed, where each mixer adds to its normalized input:

    X~ = LN1(X);  Z = X~ + DSM(X~)
    Z~ = LN2(Z);  Y = Z~ + ModifiedMamba(Z~)

Over 2 seeds at 10k updates the stream form played better (bench/results/dmm-vs-dt).

Padding (mask False) is made exact: padded tokens enter the local mixer as zeros, like positions
before a sequence start, and the scan skips them (delta = 0), so a left-padded window gives the
same outputs at its real positions as the unpadded sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dmm.model.attention import CausalSelfAttention
from dmm.model.config import DMMConfig
from dmm.model.local_mixer import CausalLocalMixer, DenseSequenceMixer, DepthwiseConvMixer
from dmm.model.mamba import ModifiedMamba


@dataclass
class BlockState:
    """What one block carries between chunks in recurrent inference."""

    local: torch.Tensor  # [b, k-1, d]: the last k-1 inputs of the local mixer
    ssm: torch.Tensor  # [b, d_inner, d_state]: the selective-scan state
    # With slots [b], local and ssm are buffers of S sequences ([S, k-1, d], [S, d_inner, d_state])
    # and the batch is their rows ``slots``, which the block updates in place (a server's slot table).
    slots: torch.Tensor | None = None


class DMMBlock(nn.Module):
    def __init__(self, config: DMMConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.ln2 = nn.LayerNorm(d)
        self.local: CausalLocalMixer = (
            DenseSequenceMixer(d, config.dsm_window)
            if config.local_mixer == "dsm"
            else DepthwiseConvMixer(d, config.dsm_window)
        )
        self.global_mixer: nn.Module = (
            ModifiedMamba(config)
            if config.global_mixer == "mamba"
            else CausalSelfAttention(d, config.n_head, config.dropout)
        )
        self.drop = nn.Dropout(config.dropout)
        self.stream = config.residual == "stream"

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, state: BlockState | None = None
    ) -> tuple[torch.Tensor, BlockState | None]:
        x_t = self.ln1(x)
        if mask is not None:
            x_t = x_t * mask.unsqueeze(-1).to(x_t.dtype)
        slots = None if state is None else state.slots
        local, local_cache = self.local(x_t, None if state is None else state.local, slots)
        z = (x if self.stream else x_t) + self.drop(local)
        z_t = self.ln2(z)
        if isinstance(self.global_mixer, ModifiedMamba):
            mixed, ssm = self.global_mixer(z_t, mask, None if state is None else state.ssm, slots)
            new_state: BlockState | None = BlockState(local_cache, ssm, slots)
        else:
            if state is not None:
                raise ValueError("an attention global mixer has no recurrent state")
            mixed, new_state = self.global_mixer(z_t, mask), None
        return (z if self.stream else z_t) + self.drop(mixed), new_state
