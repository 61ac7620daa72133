"""Causal multi-head self-attention: the ablation's global mixer and the DT baseline's mixer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [b, L, d]; mask [b, L] with False at padding, which no real position attends to."""
        b, L, d = x.shape
        q, k, v = self.qkv(x).view(b, L, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        allowed = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            # Every position may see itself, so rows of padding stay finite.
            eye = torch.eye(L, dtype=torch.bool, device=x.device)
            allowed = (allowed & mask[:, None, None, :]) | eye
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(b, L, d))
