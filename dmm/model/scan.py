"""The selective scan of Mamba (S6) and its backends.

Recurrence for every channel d and state n (ZOH discretization of A, Euler for B, as in Mamba):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t

``torch`` is the reference and runs everywhere; ``cuda`` uses mamba_ssm's kernels and is picked only
when mamba_ssm imports and the tensors are on a CUDA device. A position with delta = 0 leaves the
state untouched (exp(0) = 1, no input), which is how padded positions are made exact no-ops.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch

Backend = Literal["auto", "torch", "cuda"]

# Without autograd, scans whose [b, L, d, n] state tensors would hold at least this many elements
# run step by step: allocating and faulting in those tensors costs more than the per-step op
# overhead (measured on CPU: batch 100 x 24 tokens is ~1.4x faster step by step, batch 1 ~1.7x slower).
STEPWISE_FROM_ELEMENTS = 1 << 18


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch scan.

    Shapes: u, delta [b, L, d]; A [d, n]; B, C [b, L, n]; D [d]; h0 [b, d, n] or None.
    Returns y [b, L, d] and the last state h_L [b, d, n].

    The discretized tensors are formed for all L at once; only the recurrence itself loops over L
    (24 tokens for K=8), which on CPU beats a log-depth parallel scan that moves L times more memory.
    """
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, D))
    if training or u.numel() * A.shape[1] < STEPWISE_FROM_ELEMENTS:
        return _scan_all_steps(u, delta, A, B, C, D, h0)
    return _scan_step_by_step(u, delta, A, B, C, D, h0)


def _scan_all_steps(u, delta, A, B, C, D, h0):
    """All L discretized steps at once: few, large ops (fast backward, little per-op overhead)."""
    b, _, d = u.shape
    dA = torch.exp(delta.unsqueeze(-1) * A)  # [b, L, d, n]
    dBu = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # [b, L, d, n]
    h = h0 if h0 is not None else u.new_zeros(b, d, A.shape[1])
    states = []
    # unbind, not dA[:, t]: the backward of L slices would zero-fill L full-size gradients.
    for dA_t, dBu_t in zip(dA.unbind(1), dBu.unbind(1), strict=True):
        h = torch.addcmul(dBu_t, dA_t, h)
        states.append(h)
    H = torch.stack(states, dim=1)  # [b, L, d, n]
    y = torch.einsum("bldn,bln->bld", H, C) + u * D
    return y, h


def _scan_step_by_step(u, delta, A, B, C, D, h0):
    """Step by step with [b, d, n] temporaries: no [b, L, d, n] tensors to allocate and fault in,
    which is what dominates large inference batches on CPU."""
    b, L, d = u.shape
    h = h0 if h0 is not None else u.new_zeros(b, d, A.shape[1])
    du = delta * u
    ys = []
    for t in range(L):
        h = torch.addcmul(du[:, t, :, None] * B[:, t, None, :], torch.exp(delta[:, t, :, None] * A), h)
        ys.append(torch.bmm(h, C[:, t, :, None]).squeeze(-1))
    return torch.stack(ys, dim=1) + u * D, h


@functools.cache
def _mamba_ssm_ops():
    """mamba_ssm's kernels, or None when the package (a CUDA-only build) is absent."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:  # ImportError, or a broken CUDA build raising at import
        return None
    return selective_scan_fn, selective_state_update


def cuda_backend_available() -> bool:
    return torch.cuda.is_available() and _mamba_ssm_ops() is not None


def resolve_backend(backend: Backend, device: torch.device) -> Literal["torch", "cuda"]:
    """``auto`` picks ``cuda`` only for CUDA tensors with mamba_ssm importable."""
    if backend == "torch":
        return "torch"
    usable = device.type == "cuda" and cuda_backend_available()
    if backend == "cuda" and not usable:
        raise RuntimeError("the cuda scan backend needs a CUDA device and mamba_ssm (pip install '.[cuda]')")
    return "cuda" if usable else "torch"


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same scan through mamba_ssm. Same shapes and results as :func:`selective_scan_torch`.

    A single token with a carried state goes through ``selective_state_update`` (the decoding
    kernel); a whole sequence from a zero state through ``selective_scan_fn``. mamba_ssm has no
    chunk-with-initial-state entry point, so a multi-token chunk with a state steps token by token.
    """
    selective_scan_fn, selective_state_update = _mamba_ssm_ops()
    if h0 is None:
        y, last = selective_scan_fn(
            u.transpose(1, 2).contiguous(),
            delta.transpose(1, 2).contiguous(),
            A.contiguous(),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            D.float(),
            delta_bias=None,
            delta_softplus=False,
            return_last_state=True,
        )
        return y.transpose(1, 2), last
    h = h0.clone()
    ys = []
    for t in range(u.shape[1]):
        # selective_state_update updates h in place; dt already holds softplus(dt + bias).
        ys.append(
            selective_state_update(h, u[:, t], delta[:, t], A, B[:, t], C[:, t], D=D, dt_softplus=False)
        )
    return torch.stack(ys, dim=1), h


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    h0: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the backend; see :func:`selective_scan_torch` for shapes."""
    if resolve_backend(backend, u.device) == "cuda":
        return selective_scan_cuda(u, delta, A, B, C, D, h0)
    return selective_scan_torch(u, delta, A, B, C, D, h0)
