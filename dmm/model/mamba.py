"""Mamba (v1) with its depthwise conv1d removed: the global mixer of DMM."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dmm.model.config import DMMSettings
from dmm.model.scan import Backend, selective_scan, selective_scan_slots_


class ModifiedMamba(nn.Module):
    """in_proj -> (x, z); x -> SiLU -> x_proj -> (dt, B, C); selective scan; y * SiLU(z) -> out_proj.

    ``A_log`` uses the S4D-real initialization (A = -[1..N] for every channel); ``dt_proj.bias`` the
    inverse-softplus of a log-uniform dt in [dt_min, dt_max], both as in Mamba.
    """

    def __init__(
        self, config: DMMSettings, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4
    ) -> None:
        """Sizes from ``config``, which derives ``d_inner`` and ``dt_rank`` for every user of them."""
        super().__init__()
        d_model, d_state = config.d_model, config.d_state
        self.d_inner, self.d_state, self.dt_rank = config.d_inner, d_state, config.resolved_dt_rank
        self.scan_backend: Backend | None = None  # None: the process default (dmm.model.scan)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's initialization of dt_proj, A_log and D (call again after a generic re-init)."""
        dt_min, dt_max, dt_init_floor = self._dt_range
        dt_init_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [b, L, d]; mask [b, L] (False = padding, made a no-op); state [b, d_inner, d_state].

        With ``slots`` [b], ``state`` is a buffer [S, d_inner, d_state] whose rows ``slots`` hold the
        batch's states; they are updated in place and the buffer is returned.
        Returns y [b, L, d] and the SSM state after the last token.
        """
        xz = self.in_proj(x)
        u, z = xz.chunk(2, dim=-1)
        u = F.silu(u)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))
        if mask is not None:
            delta = delta * mask.unsqueeze(-1).to(delta.dtype)
        A = -torch.exp(self.A_log.float())
        if slots is None:
            y, h = selective_scan(u, delta, A, B, C, self.D, h0=state, backend=self.scan_backend)
        else:
            assert state is not None, "slots index a state buffer"
            y = selective_scan_slots_(u, delta, A, B, C, self.D, state, slots, backend=self.scan_backend)
            h = state
        return self.out_proj(y * F.silu(z)), h
