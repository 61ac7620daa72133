"""The authors' Decision MetaMamba model class, re-implemented as a reference point.

Follows ``decision-model/models/decision_metamamba.py`` and ``mamba/mamba_ssm/modules/mamba_simple.py``
of too-z/decision-metamamba, piece by piece, with this project's selective scan so it runs on a CPU:

- embeddings: one Linear per modality (PyTorch's default init), tokens (rtg_t, s_t, a_t), one
  LayerNorm, dropout; no timestep embedding;
- blocks: a **pre-norm residual stream**, ``h = h + DSM(LN1(h)); h = h + Mamba(LN2(h))``, with **one
  LN1/LN2 pair shared by all layers** (their code's defect, kept here on purpose) and no dropout;
- DSM: Linear(k*d -> d) without bias over the k causal tokens;
- Mamba: ``expand=1``, no conv1d, S4D-real A, D = 1, SiLU(z) gating, no biases in the projections;
- init: GPT-2's ``normal(0, 0.02)`` and zero bias on every Linear of the blocks, **including**
  ``dt_proj.bias`` (their ``_init_weights`` ignores mamba_ssm's ``_no_reinit`` flag), so every
  channel starts at dt = softplus(0) = 0.69 instead of Mamba's log-uniform [1e-3, 1e-1];
- head: a final LayerNorm, then Linear + tanh at the s_t token.

Padding is this project's (masked, exact), not theirs, so a comparison measures the model alone.
``config`` is a :class:`DMMConfig` describing the same sizes, for the trainer and the runner.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmm.model import DMMConfig
from dmm.model.policy import TOKENS_PER_STEP
from dmm.model.scan import selective_scan


class AuthorsMamba(nn.Module):
    """mamba_simple.Mamba as the authors use it: expand 1, conv1d removed."""

    def __init__(self, d_model: int, d_state: int, expand: int) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = -(-d_model // 16)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(u)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        if mask is not None:
            delta = delta * mask.unsqueeze(-1).to(delta.dtype)
        y, _ = selective_scan(u, delta, -torch.exp(self.A_log), B, C, self.D)
        return self.out_proj(y * F.silu(z))


class AuthorsDSM(nn.Module):
    def __init__(self, d_model: int, window: int) -> None:
        super().__init__()
        self.window = window
        self.lin = nn.Linear(window * d_model, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        padded = F.pad(x, (0, 0, self.window - 1, 0))
        return self.lin(padded.unfold(1, self.window, 1).transpose(2, 3).flatten(2))


class AuthorsDMM(nn.Module):
    def __init__(self, config: DMMConfig, expand: int = 1) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.drop = nn.Dropout(config.dropout)
        self.ln_1 = nn.LayerNorm(d)
        self.ln_2 = nn.LayerNorm(d)
        self.local = nn.ModuleList(AuthorsDSM(d, config.dsm_window) for _ in range(config.n_layer))
        self.mamba = nn.ModuleList(AuthorsMamba(d, config.d_state, expand) for _ in range(config.n_layer))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.ln_f = nn.LayerNorm(d)
        self.embed_return = nn.Linear(1, d)
        self.embed_state = nn.Linear(config.state_dim, d)
        self.embed_action = nn.Linear(config.act_dim, d)
        self.embed_ln = nn.LayerNorm(d)
        self.predict_action = nn.Linear(d, config.act_dim)
        # Not in their class: DT's timestep embedding, for the study's "+ timestep" variant only.
        self.embed_timestep = nn.Embedding(config.max_ep_len, d) if config.timestep_embedding else None
        if self.embed_timestep is not None:
            nn.init.normal_(self.embed_timestep.weight, std=0.02)  # as PolicyNetwork's

    def forward(self, rtg: Tensor, states: Tensor, actions: Tensor, mask=None, timesteps=None) -> Tensor:
        """The interface of :meth:`PolicyNetwork.forward` (``timesteps`` only with ``timestep_embedding``)."""
        b, T = states.shape[:2]
        stacked = torch.stack(
            [self.embed_return(rtg), self.embed_state(states), self.embed_action(actions)], dim=2
        )
        if self.embed_timestep is not None:
            stacked = stacked + self.embed_timestep(timesteps).unsqueeze(2)
        h = self.drop(self.embed_ln(stacked.reshape(b, TOKENS_PER_STEP * T, -1)))
        token_mask = None if mask is None else mask.repeat_interleave(TOKENS_PER_STEP, dim=1)
        keep = 1.0 if token_mask is None else token_mask.unsqueeze(-1).to(h.dtype)
        for local, mamba in zip(self.local, self.mamba, strict=True):
            h = h + local(self.ln_1(h) * keep)
            h = h + mamba(self.ln_2(h), token_mask)
        h = self.ln_f(h)
        return torch.tanh(self.predict_action(h[:, 1::TOKENS_PER_STEP]))

    def forward_carried(
        self, rtg, states, actions, mask=None, timesteps=None, carry=None
    ) -> tuple[Tensor, list]:
        """What the trainer's update step calls: the authors' class trains on independent windows
        only, so there is no state to continue from or to carry on."""
        if carry is not None:
            raise ValueError("the authors' class carries no state from one window to the next")
        return self.forward(rtg, states, actions, mask, timesteps), []

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
