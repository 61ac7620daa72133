"""The selective scan as fused CPU kernels (numba): no ``[b, L, d, n]`` tensor in either direction.

Same recurrence as :mod:`dmm.model.scan`. Each kernel walks one batch row at a time and keeps
that row's state ``h`` as an ``[n, d]`` scratch (16 x 128 floats, in L1), so every inner loop
runs over the ``d`` channels: contiguous, vectorized, no horizontal sums in the forward.

* forward: ``y`` and the last state; the state lives in a ``[S, d, n]`` buffer updated in place at
  rows ``slots`` (a fresh copy of ``h0`` for a training sequence, a server's slot table in
  recurrent serving, which therefore never gathers or scatters states).
* backward: recomputes the row's states into an ``[L + 1, n, d]`` scratch instead of saving
  ``[b, L, d, n]`` from the forward (what mamba_ssm's CUDA kernel does), then runs the recurrence
  backwards. Registered with ``torch.library.custom_op`` so ``torch.compile`` keeps the training
  graph whole around it.
* ``exp``: float32 uses a degree-7 polynomial after a Cody-Waite range reduction, with 2**m built
  from its exponent bits, which LLVM vectorizes (scalar ``math.exp`` made the forward 2x slower,
  and a separate torch ``exp`` over ``[b, L, d, n]`` was no faster). Relative error < 1e-7.
  float64 keeps ``math.exp``, which is what the float64 reference tests check the loops against.

The kernels run on the calling thread and release the GIL. Splitting rows over a second thread
made 2-thread training slower (92 vs 66 ms per update): torch's OpenMP workers spin on the other
core between ops. numba's threading layers are not used, so any thread may call the kernels.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch
from torch import Tensor

from dmm.model import scan_op

# nnan/ninf are left out: a NaN or inf in the inputs must come out as NaN, not as whatever the
# optimizer assumed away.
_FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}
_jit = functools.partial(numba.njit, fastmath=_FASTMATH, nogil=True, cache=True)

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693145751953125)  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI exact in few bits
_LN2_LO = np.float32(1.428606765330187e-06)
_EXP_FLOOR = np.float32(-87.0)  # exp(-87) ~ 1.6e-38: the smallest normal float32 is 1.2e-38
_HALF, _ONE = np.float32(0.5), np.float32(1.0)
_P2, _P3, _P4 = np.float32(1 / 2), np.float32(1 / 6), np.float32(1 / 24)
_P5, _P6, _P7 = np.float32(1 / 120), np.float32(1 / 720), np.float32(1 / 5040)


def _decay(dt, A_k, a, bits):
    """a[j] = exp(dt[j] * A_k[j]); compiled per dtype by the overload below."""
    raise NotImplementedError("only callable from numba kernels")


def _decay_f32(dt, A_k, a, bits):
    """a[j] = exp(dt[j] * A_k[j]) for arguments <= 0, in two vectorizable loops."""
    scale = bits.view(np.float32)
    for j in range(dt.shape[0]):
        z = max(dt[j] * A_k[j], _EXP_FLOOR)
        m = math.floor(z * _LOG2E + _HALF)
        r = z - m * _LN2_HI - m * _LN2_LO
        a[j] = _ONE + r * (_ONE + r * (_P2 + r * (_P3 + r * (_P4 + r * (_P5 + r * (_P6 + r * _P7))))))
        bits[j] = (np.int32(m) + np.int32(127)) << np.int32(23)  # the float32 2**m
    for j in range(dt.shape[0]):
        a[j] *= scale[j]


def _decay_libm(dt, A_k, a, bits):
    for j in range(dt.shape[0]):
        a[j] = math.exp(dt[j] * A_k[j])


@numba.extending.overload(_decay, inline="always", jit_options={"fastmath": _FASTMATH})
def _decay_for_dtype(dt, A_k, a, bits):
    return _decay_f32 if dt.dtype == numba.types.float32 else _decay_libm


@_jit
def _forward(u, delta, At, B, C, D, state, slots, y):
    """y [b, L, d]; the state [S, d, n] at rows slots[i] is updated in place."""
    b, L, d = u.shape
    n = At.shape[0]
    h = np.empty((n, d), u.dtype)
    a, x, acc = np.empty(d, u.dtype), np.empty(d, u.dtype), np.empty(d, u.dtype)
    bits = np.empty(d, np.int32)
    for i in range(b):
        s = slots[i]
        for k in range(n):
            for j in range(d):
                h[k, j] = state[s, j, k]
        for t in range(L):
            dt, ut = delta[i, t], u[i, t]
            for j in range(d):
                x[j] = dt[j] * ut[j]
                acc[j] = D[j] * ut[j]
            for k in range(n):
                _decay(dt, At[k], a, bits)
                b_k, c_k, h_k = B[i, t, k], C[i, t, k], h[k]
                for j in range(d):
                    v = a[j] * h_k[j] + x[j] * b_k
                    h_k[j] = v
                    acc[j] += v * c_k
            y[i, t] = acc
        for j in range(d):
            for k in range(n):
                state[s, j, k] = h[k, j]


@_jit
def _backward(u, delta, At, B, C, D, h0, gy, ghT, gu, gdelta, gB, gC, gAt, gD):
    """gu, gdelta, gB, gC are written; gAt [n, d] and gD [d] accumulate; h0 becomes dLoss/dh0."""
    b, L, d = u.shape
    n = At.shape[0]
    H = np.empty((L + 1, n, d), u.dtype)  # H[t + 1] = h_t, H[0] = h0
    As = np.empty((L, n, d), u.dtype)  # exp(delta_t * A)
    x, gx, gdt = np.empty(d, u.dtype), np.empty(d, u.dtype), np.empty(d, u.dtype)
    g = np.empty((n, d), u.dtype)  # dLoss/dh_t, carried backwards
    bits = np.empty(d, np.int32)
    for i in range(b):
        for k in range(n):
            for j in range(d):
                H[0, k, j] = h0[i, j, k]
                g[k, j] = ghT[i, j, k]
        for t in range(L):
            dt, ut = delta[i, t], u[i, t]
            for k in range(n):
                _decay(dt, At[k], As[t, k], bits)
                b_k, a_k, prev, cur = B[i, t, k], As[t, k], H[t, k], H[t + 1, k]
                for j in range(d):
                    cur[j] = a_k[j] * prev[j] + dt[j] * ut[j] * b_k
        for t in range(L - 1, -1, -1):
            dt, ut, gyt = delta[i, t], u[i, t], gy[i, t]
            for j in range(d):
                x[j] = dt[j] * ut[j]
                gx[j] = 0.0
                gdt[j] = 0.0
                gu[i, t, j] = gyt[j] * D[j]
                gD[j] += gyt[j] * ut[j]
            for k in range(n):
                b_k, c_k, a_k, A_k = B[i, t, k], C[i, t, k], As[t, k], At[k]
                cur, prev, g_k, gA_k = H[t + 1, k], H[t, k], g[k], gAt[k]
                sum_c = u.dtype.type(0.0)
                sum_b = u.dtype.type(0.0)
                for j in range(d):
                    gh = g_k[j] + gyt[j] * c_k  # dLoss/dh_t
                    sum_c += gyt[j] * cur[j]
                    sum_b += gh * x[j]
                    gx[j] += gh * b_k
                    g_log = gh * prev[j] * a_k[j]  # dLoss/d(delta_t * A)
                    gdt[j] += g_log * A_k[j]
                    gA_k[j] += g_log * dt[j]
                    g_k[j] = gh * a_k[j]  # on to h_{t-1}
                gC[i, t, k] = sum_c
                gB[i, t, k] = sum_b
            for j in range(d):
                gdelta[i, t, j] = gdt[j] + gx[j] * ut[j]
                gu[i, t, j] += gx[j] * dt[j]
        for j in range(d):
            for k in range(n):
                h0[i, j, k] = g[k, j]  # h0 is the caller's scratch copy: it becomes dLoss/dh0


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"the numba scan runs in float32 or float64, not {dtype}")


def _np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def forward_into(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, state: Tensor, slots: Tensor
) -> Tensor:
    """The scan from the states ``state[slots]``, which it overwrites with the last states.

    u, delta [b, L, d]; A [d, n]; B, C [b, L, n]; D [d]; state [S, d, n] (contiguous; S >= b);
    slots [b] distinct row indices. Returns y [b, L, d].
    """
    if not state.is_contiguous():
        raise ValueError("the state buffer must be contiguous: it is updated in place")
    _check_dtype(u.dtype)
    y = torch.empty_like(u, memory_format=torch.contiguous_format)
    arrays = [_np(t) for t in (u, delta, A.t(), B, C, D)]
    _forward(*arrays, state.detach().numpy(), _np(slots.long()), y.numpy())
    return y


def _scan_from(u, delta, A, B, C, D, h0) -> tuple[Tensor, Tensor]:
    """The scan of a batch from its own initial states: a fresh copy of h0 becomes the last state."""
    state = h0.detach().clone(memory_format=torch.contiguous_format)
    return forward_into(u, delta, A, B, C, D, state, torch.arange(u.shape[0])), state


def _gradients(u, delta, A, B, C, D, h0, grad_y, grad_last) -> tuple[Tensor, ...]:
    """Gradients of (u, delta, A, B, C, D, h0), recomputing the states."""
    _check_dtype(u.dtype)
    b, L, d = u.shape
    n = A.shape[1]
    gu, gdelta = (torch.empty_like(u, memory_format=torch.contiguous_format) for _ in range(2))
    gB, gC = torch.empty(b, L, n, dtype=u.dtype), torch.empty(b, L, n, dtype=u.dtype)
    gAt, gD = torch.zeros(n, d, dtype=u.dtype), torch.zeros(d, dtype=u.dtype)
    gh0 = h0.detach().clone(memory_format=torch.contiguous_format)
    arrays = [_np(t) for t in (u, delta, A.t(), B, C, D)] + [gh0.numpy()]
    grads = [_np(grad_y), _np(grad_last), gu.numpy(), gdelta.numpy(), gB.numpy(), gC.numpy()]
    _backward(*arrays, *grads, gAt.numpy(), gD.numpy())
    return gu, gdelta, gAt.t().contiguous(), gB, gC, gD, gh0


# y [b, L, d] and the last state [b, d, n] from h0 [b, d, n] (see forward_into); its backward.
selective_scan_op, selective_scan_backward_op = scan_op.define(
    "selective_scan", _scan_from, _gradients, "cpu"
)


@functools.cache
def warm_up() -> None:
    """Compile (or load from numba's cache) the float32 kernels now rather than at a first request.

    Calls the kernels' wrappers, not the registered op: going through the op (and autograd) imports
    ``torch._dynamo``, a second or more of a server's start that serving never needs."""
    shapes = [(1, 2, 2), (1, 2, 2), (2, 1), (1, 2, 1), (1, 2, 1), (2,), (1, 2, 1)]
    u, delta, A, B, C, D, h0 = (torch.rand(s) for s in shapes)
    y, h = _scan_from(u, delta, A, B, C, D, h0)
    _gradients(u, delta, A, B, C, D, h0, torch.ones_like(y), torch.ones_like(h))


selective_scan_numba = scan_op.entry_point(selective_scan_op, _scan_from, "numba")
