"""The GPT-2 style block of the Decision Transformer baseline (Chen et al., 2021)."""

from __future__ import annotations

import torch
from torch import nn

from dmm.model.attention import CausalSelfAttention
from dmm.model.config import DMMConfig


class GPTBlock(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP; the block interface of DMMBlock."""

    def __init__(self, config: DMMConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, config.n_head, config.dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(config.dropout)
        for module in self.modules():  # GPT-2's initialization
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, state: None = None
    ) -> tuple[torch.Tensor, None]:
        if state is not None:
            raise ValueError("the Decision Transformer has no recurrent state")
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.mlp(self.ln2(x))), None
