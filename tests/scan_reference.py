"""The slow, obvious selective scan every backend is checked against."""

from __future__ import annotations

import torch


def naive_scan(u, delta, A, B, C, D, h0=None):
    """Per-timestep, per-channel loop straight from the recurrence (differentiable: no in-place writes)."""
    b, L, d = u.shape
    n = A.shape[1]
    ys, last = [], []
    for i in range(b):
        h = [u.new_zeros(n) if h0 is None else h0[i, c] for c in range(d)]
        rows = []
        for t in range(L):
            row = []
            for c in range(d):
                h[c] = torch.exp(delta[i, t, c] * A[c]) * h[c] + delta[i, t, c] * B[i, t] * u[i, t, c]
                row.append((C[i, t] * h[c]).sum() + D[c] * u[i, t, c])
            rows.append(torch.stack(row))
        ys.append(torch.stack(rows))
        last.append(torch.stack(h))
    return torch.stack(ys), torch.stack(last)


def scan_inputs(b, L, d, n, seed=0, dtype=torch.float64, with_h0=True):
    """Random scan inputs with the signs the model produces (delta >= 0, A < 0)."""
    g = torch.Generator().manual_seed(seed)
    kw = {"dtype": dtype, "generator": g}
    u, delta = torch.randn(b, L, d, **kw), torch.rand(b, L, d, **kw)
    A, B, C = -torch.rand(d, n, **kw) * 3, torch.randn(b, L, n, **kw), torch.randn(b, L, n, **kw)
    D = torch.randn(d, **kw)
    h0 = torch.randn(b, d, n, **kw) if with_h0 else None
    return u, delta, A, B, C, D, h0
