"""The authors' DMM class (bench/authors_dmm.py), the reference point of the DMM-vs-DT study."""

from __future__ import annotations

import torch

from bench.authors_dmm import AuthorsDMM
from dmm.model import DMMConfig


def _model() -> AuthorsDMM:
    torch.manual_seed(0)
    model = AuthorsDMM(DMMConfig(state_dim=5, act_dim=2, context=4, timestep_embedding=False)).double().eval()
    return model


def _episode(T: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, T, 1, dtype=torch.float64, generator=g),
        torch.randn(1, T, 5, dtype=torch.float64, generator=g),
        torch.randn(1, T, 2, dtype=torch.float64, generator=g).tanh(),
    )


def test_their_init_zeroes_the_dt_bias_and_shares_one_norm_pair():
    model = _model()
    for mamba in model.mamba:
        assert torch.count_nonzero(mamba.dt_proj.bias) == 0  # dt = softplus(0) at init
        assert mamba.d_inner == 64  # expand 1
        assert mamba.in_proj.weight.std().item() < 0.03  # GPT-2's normal(0, 0.02)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} >= {"ln_1", "ln_2", "local", "mamba"}
    assert all(local.lin.bias is None for local in model.local)


def test_causal_and_exact_under_left_padding():
    model = _model()
    rtg, states, actions = _episode(6)
    base = model(rtg, states, actions)
    later = states.clone()
    later[:, 4] += 3.0
    torch.testing.assert_close(model(rtg, later, actions)[:, :4], base[:, :4], rtol=0, atol=0)
    pad = 3
    padded = [
        torch.cat([torch.randn(1, pad, x.shape[-1], dtype=x.dtype), x], 1) for x in (rtg, states, actions)
    ]
    mask = torch.tensor([[False] * pad + [True] * 6])
    torch.testing.assert_close(model(*padded, mask=mask)[:, pad:], base, rtol=1e-12, atol=1e-12)
