"""The whole step of a DMM policy as one CPU kernel (numba), on a runner's slot buffers in place.

:meth:`PolicyNetwork.step` in eager torch is ~90 small ops per step, and at one robot their dispatch,
not the arithmetic, is the step's cost. :class:`FusedStep` does the same step in one call: it
normalizes the raw state and return-to-go, embeds the three tokens (a_{t-1}, rtg_t, s_t) with their
timestep embeddings and LayerNorm, runs them through every block (LayerNorms, the local mixer over
the slot's cache of its last k-1 inputs, Mamba's projections, SiLU and softplus, the selective-scan
update of the slot's state, the gate), then the final LayerNorm and the tanh head. The caches, the
scan states and the previous actions are the runner's torch buffers, read and written through
numpy views (a CPU tensor shares its memory), so the torch step and this one can take turns on a
slot and :meth:`PolicyRunner.resume` fills the same buffers for both.

:meth:`FusedStep.window` is the window-mode step with the same kernels: it appends the step to each
slot's window buffers and runs the network from the initial state (zero local-mixer cache and scan
state) over the last min(t + 1, K) steps as the recurrent step's tokens (a_{c-1}, rtg_c, s_c), with
padding masked as :meth:`PolicyNetwork.forward` masks it (zeros into the local mixer, no scan
update); a masked token from the initial state changes nothing, so this is the forward's action at
s_t, which does not read the last a_t token.

Layout: all ``T B`` tokens of a call (T = 3 in recurrent mode, 3 x the longest window in window
mode) are the rows of ``[T B, *]`` matrices (slot i's at rows T i .. T i + T - 1), and each layer
runs over all of them at once, so a weight matrix is read once per layer per call; the products go
to BLAS (sgemm through numba's ``np.dot``, on one thread) and only the smallest (a lone slot's
three tokens through a small matrix) run as row-blocked loops. Only the scan and the local mixer's
window walk the tokens in order.
``exp`` (SiLU, the scan's decay) is :mod:`dmm.model.scan_numba`'s vectorizable polynomial and
softplus uses a vectorizable ``log1p``: libm's scalar calls would cost more than the products at
large B. Weights are copied once, as float32, when a :class:`FusedStep` is built: a policy whose
weights change afterwards needs a new one (a runner builds it with itself).

The kernel runs on the calling thread and releases the GIL; it does not use numba's threading
layers, and scipy's OpenBLAS (what ``np.dot`` calls) is set to one thread (see
:mod:`dmm.model.scan_numba` on why threads did not pay on this kind of machine).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import NamedTuple

import numpy as np
import torch

from dmm.model.mamba import ModifiedMamba
from dmm.model.policy import TOKENS_PER_STEP, PolicyNetwork
from dmm.model.scan_numba import (
    _EXP_FLOOR,
    _HALF,
    _LN2_HI,
    _LN2_LO,
    _LOG2E,
    _ONE,
    _P2,
    _P3,
    _P4,
    _P5,
    _P6,
    _P7,
    _jit,
)

_EXP_CEIL = np.float32(88.0)  # exp(88) ~ 1.7e38 < the largest float32, 3.4e38
_ZERO, _TWO = np.float32(0.0), np.float32(2.0)
_FLOAT32_MAX, _NAN = np.float32(np.finfo(np.float32).max), np.float32(np.nan)
_SQRT2_M1 = np.float32(0.41421356237309503)  # log1p below folds 1 + y into [0.71, 1.42)
_LN2 = np.float32(0.6931471805599453)
_THIRD, _FIFTH, _SEVENTH = np.float32(1 / 3), np.float32(1 / 5), np.float32(1 / 7)
_NINTH, _ELEVENTH = np.float32(1 / 9), np.float32(1 / 11)
_SOFTPLUS_THRESHOLD = np.float32(20.0)  # torch's: softplus(x) = x above it
_LOCAL_DSM, _LOCAL_CONV = 0, 1
# Products of at least this many multiply-adds go to BLAS (see _matmul; bench/results/step_speed).
_BLAS_MIN_MACS = 4096


@_jit
def _exp_into(z, out, bits):
    """out[j] = exp(z[j]) (z clamped to [-87, 88]): scan_numba's polynomial. out must not be z: LLVM
    vectorizes the loop only behind a check that the two do not overlap."""
    scale = bits.view(np.float32)
    for j in range(z.shape[0]):
        x = min(max(z[j], _EXP_FLOOR), _EXP_CEIL)
        m = np.floor(x * _LOG2E + _HALF)
        r = x - m * _LN2_HI - m * _LN2_LO
        out[j] = _ONE + r * (_ONE + r * (_P2 + r * (_P3 + r * (_P4 + r * (_P5 + r * (_P6 + r * _P7))))))
        bits[j] = (np.int32(m) + np.int32(127)) << np.int32(23)
    for j in range(z.shape[0]):
        out[j] *= scale[j]


@_jit
def _softplus_into(x, z, e, bits):
    """x[j] = softplus(x[j]) as torch computes it (x above 20 stays x), with a branch-free log1p;
    z, e, bits: scratch of x's length.

    softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(y) for y in (0, 1] is 2 atanh(s) with
    s = y / (2 + y), or with 1 + y halved (s = (y - 1) / (y + 3), plus ln 2) above sqrt(2) - 1, so
    |s| <= 0.172 and six odd terms reach float32 precision; y itself is never rounded into 1 + y.
    """
    for j in range(x.shape[0]):
        z[j] = -abs(x[j])
    _exp_into(z, e, bits)
    for j in range(x.shape[0]):
        y = e[j]
        high = y > _SQRT2_M1
        s = (y - _ONE) / (y + np.float32(3.0)) if high else y / (_TWO + y)
        s2 = s * s
        series = _ONE + s2 * (_THIRD + s2 * (_FIFTH + s2 * (_SEVENTH + s2 * (_NINTH + s2 * _ELEVENTH))))
        log1p = _TWO * s * series + (_LN2 if high else _ZERO)
        v = x[j]
        x[j] = v if v > _SOFTPLUS_THRESHOLD else max(v, _ZERO) + log1p


@_jit
def _silu_into(x, z, e, bits):
    """x = x * sigmoid(x) in place (1-D); z, e, bits: scratch of x's length."""
    for j in range(x.shape[0]):
        z[j] = -x[j]
    _exp_into(z, e, bits)
    for j in range(x.shape[0]):
        x[j] = x[j] / (_ONE + e[j])


@_jit
def _rows(x, wt, out, m, rows):
    """out[m : m + rows] += x[m : m + rows] @ wt for rows = 6 or 3 (a literal after inlining)."""
    for k in range(x.shape[1]):
        x0, x1, x2 = x[m, k], x[m + 1, k], x[m + 2, k]
        if rows == 6:
            x3, x4, x5 = x[m + 3, k], x[m + 4, k], x[m + 5, k]
        for n in range(wt.shape[1]):
            w = wt[k, n]
            out[m, n] += x0 * w
            out[m + 1, n] += x1 * w
            out[m + 2, n] += x2 * w
            if rows == 6:
                out[m + 3, n] += x3 * w
                out[m + 4, n] += x4 * w
                out[m + 5, n] += x5 * w


@_jit
def _matmul(x, wt, out):
    """out = x @ wt: x [M, K] (C-contiguous, M a multiple of 3), wt [K, N], out [M, N].

    BLAS (sgemm through numba's ``np.dot``) from ``_BLAS_MIN_MACS`` multiply-adds on; below it (a
    lone slot's three tokens through a small matrix) the call costs more than the products, which
    then run as row-blocked loops: six rows at a time (then three), so each weight row is loaded
    once for six tokens, with the inner loop over the N output features of a contiguous weight row.
    """
    M = x.shape[0]
    if M * x.shape[1] * wt.shape[1] >= _BLAS_MIN_MACS:
        np.dot(x, wt, out)
        return
    out[:] = _ZERO
    for m in range(0, M - M % 6, 6):
        _rows(x, wt, out, m, 6)
    if M % 6:
        _rows(x, wt, out, M - 3, 3)


@_jit
def _linear(x, wt, bias, out):
    """out = x @ wt + bias (see :func:`_matmul`); bias [N]."""
    _matmul(x, wt, out)
    for m in range(x.shape[0]):
        for n in range(wt.shape[1]):
            out[m, n] += bias[n]


@_jit
def _layer_norm(x, w, b, out):
    """out[r] = LayerNorm(x[r]) with weight w, bias b and torch's eps 1e-5 (biased variance). A row
    whose variance overflows float32 (inputs ~1e19 and up) comes out NaN, as torch's does for such
    inputs, rather than as the bias (1 / sqrt(inf) = 0): a state far outside the model's range must
    give a non-finite action, which a server reports, not an arbitrary finite one."""
    d = x.shape[1]
    for r in range(x.shape[0]):
        row, o = x[r], out[r]
        mean = _ZERO
        for c in range(d):
            mean += row[c]
        mean /= d
        var = _ZERO
        for c in range(d):
            var += (row[c] - mean) * (row[c] - mean)
        inv = _ONE / np.sqrt(var / d + np.float32(1e-5)) if var <= _FLOAT32_MAX else _NAN
        for c in range(d):
            o[c] = (row[c] - mean) * inv * w[c] + b[c]


@_jit
def _embed(emb, mean, std, rtg_scale, prev_act, slots, steps, obs, rtgs, x):
    """x [3B, d]: the tokens (a_{t-1}, rtg_t, s_t) of every slot, embedded, before the LayerNorm."""
    w_act, b_act, w_rtg, b_rtg, w_state, b_state, table = emb
    S = obs.shape[1]
    t_max = table.shape[0] - 1
    for i in range(slots.shape[0]):
        a, r, s = x[3 * i], x[3 * i + 1], x[3 * i + 2]
        a[:] = b_act
        for k in range(w_act.shape[0]):
            p = prev_act[slots[i], k]
            for c in range(a.shape[0]):
                a[c] += p * w_act[k, c]
        rtg = rtgs[i] / rtg_scale
        for c in range(r.shape[0]):
            r[c] = w_rtg[c] * rtg + b_rtg[c]
        s[:] = b_state
        for k in range(S):
            v = (obs[i, k] - mean[k]) / std[k]
            for c in range(s.shape[0]):
                s[c] += v * w_state[k, c]
        if t_max >= 0:
            t = min(max(steps[i], 0), t_max)
            t_prev = min(max(steps[i] - 1, 0), t_max)
            for c in range(a.shape[0]):
                a[c] += table[t_prev, c]
                r[c] += table[t, c]
                s[c] += table[t, c]


@_jit
def _embed_window(emb, bufs, slots, steps, span, x, mask):
    """x [3 span B, d]: each slot's last ``span`` steps from its window buffers as the recurrent step's
    tokens (a_{c-1}, rtg_c, s_c) for c < span, embedded, before the LayerNorm; mask [3 span B]: False
    at padding (columns before the slot's first step, and the a_{-1} of the window's first column)."""
    w_act, b_act, w_rtg, b_rtg, w_state, b_state, table = emb
    rtg_buf, obs_buf, act_buf = bufs
    K, S, A = obs_buf.shape[1], obs_buf.shape[2], act_buf.shape[2]
    t_max = table.shape[0] - 1
    T = TOKENS_PER_STEP * span
    for i in range(slots.shape[0]):
        slot, first = slots[i], steps[i] + 1 - span  # the episode step of the window's column 0
        real = span - min(steps[i] + 1, K)  # columns c >= real hold the slot's steps
        for c in range(span):
            col, row = K - span + c, T * i + TOKENS_PER_STEP * c
            a, r, s = x[row], x[row + 1], x[row + 2]
            mask[row], mask[row + 1], mask[row + 2] = c > real, c >= real, c >= real
            a[:] = b_act
            if c > 0:  # a_{-1} of column 0 is padding whatever it holds
                for k in range(A):
                    p = act_buf[slot, col - 1, k]
                    for ch in range(a.shape[0]):
                        a[ch] += p * w_act[k, ch]
            rtg = rtg_buf[slot, col, 0]
            for ch in range(r.shape[0]):
                r[ch] = w_rtg[ch] * rtg + b_rtg[ch]
            s[:] = b_state
            for k in range(S):
                v = obs_buf[slot, col, k]
                for ch in range(s.shape[0]):
                    s[ch] += v * w_state[k, ch]
            if t_max >= 0:
                t = min(max(first + c, 0), t_max)
                t_prev = min(max(first + c - 1, 0), t_max)
                for ch in range(a.shape[0]):
                    a[ch] += table[t_prev, ch]
                    r[ch] += table[t, ch]
                    s[ch] += table[t, ch]


@_jit
def _local_mix(xt, cache, slots, kind, w, bias, windows, out):
    """out = the local mixer of the normalized tokens xt [T B, d] (slot i's at rows T i .. T i + T - 1)
    over each slot's cache [S, k-1, d], which then holds the slot's last k-1 tokens. windows
    [T B, k*d]: token j's k inputs, oldest first."""
    d = xt.shape[1]
    k = windows.shape[1] // d
    held = k - 1
    T = xt.shape[0] // slots.shape[0]
    for i in range(slots.shape[0]):
        c = cache[slots[i]]
        for j in range(T):
            row = windows[T * i + j]
            for p in range(j, j + k):  # position in (cache, tokens)
                src = c[p] if p < held else xt[T * i + p - held]
                row[(p - j) * d : (p - j + 1) * d] = src
        for q in range(held):  # shift: the last k-1 of (cache, tokens); c[q + T] is read before written
            p = q + T
            c[q] = c[p] if p < held else xt[T * i + p - held]
    if kind == _LOCAL_DSM:
        _linear(windows, w, bias, out)
        return
    for r in range(xt.shape[0]):  # depthwise conv: w [k, d]
        out[r] = bias
        for p in range(k):
            for ch in range(d):
                out[r, ch] += windows[r, p * d + ch] * w[p, ch]


@_jit
def _scan(u, delta, At, B, C, D, state, slots, y):
    """The selective scan of the step's tokens: y [b, T, d]; the state [S, d, n] at rows slots[i] is
    updated in place: scan_numba's forward kernel, with a token's decays exp(delta_j A_kj), which do
    not depend on the state, computed as one pass of :func:`_exp_into` over all n d of them (2048
    floats at the paper's sizes) rather than as n passes of d, each with its own loop entry and
    overlap checks: 40% less time at 256 slots (bench/results/serve-fused-fast). The state update
    runs over k and j as in the training kernel, so it sums in the same order. The rest of the time
    is mostly the transposes of the state rows between the buffer's [d, n] and the update's [n, d]."""
    b, T, d = u.shape
    n = At.shape[0]
    A = At.reshape(n * d)
    h = np.empty((n, d), np.float32)
    z, a, bits = np.empty(n * d, np.float32), np.empty((n, d), np.float32), np.empty(n * d, np.int32)
    x, acc = np.empty(d, np.float32), np.empty(d, np.float32)
    for i in range(b):
        s = slots[i]
        for k in range(n):
            for j in range(d):
                h[k, j] = state[s, j, k]
        for t in range(T):
            dt, ut = delta[i, t], u[i, t]
            for k in range(n):
                for j in range(d):
                    z[k * d + j] = dt[j] * A[k * d + j]
            _exp_into(z, a.reshape(n * d), bits)
            for j in range(d):
                x[j] = dt[j] * ut[j]
                acc[j] = D[j] * ut[j]
            for k in range(n):
                b_k, c_k, h_k, a_k = B[i, t, k], C[i, t, k], h[k], a[k]
                for j in range(d):
                    v = a_k[j] * h_k[j] + x[j] * b_k
                    h_k[j] = v
                    acc[j] += v * c_k
            y[i, t] = acc
        for j in range(d):
            for k in range(n):
                state[s, j, k] = h[k, j]


@_jit
def _mamba(zt, layer, li, mask, state, slots, out, ws, wbits):
    """out [T B, d] = ModifiedMamba(zt) of layer li; its scan (:func:`_scan`, T tokens per slot)
    updates the slots' rows of ``state`` [S, d_inner, d_state]. ws, wbits: scratch (see
    :func:`_workspace`)."""
    in_x, in_z, x_dt, x_B, x_C, dt_wt, dt_b, out_wt, At, D = layer[6:]
    M, di, N = zt.shape[0], dt_wt.shape[2], At.shape[1]
    R = dt_wt.shape[1]
    xz = ws[: 2 * M * di].reshape(2, M, di)  # u = silu(x) and the gate silu(z)
    _matmul(zt, in_x[li], xz[0])
    _matmul(zt, in_z[li], xz[1])
    z, e, bits = ws[2 * M * di : 4 * M * di], ws[4 * M * di : 6 * M * di], wbits[: 2 * M * di]
    _silu_into(xz.reshape(2 * M * di), z, e, bits)
    u, gate = xz[0], xz[1]
    bt = (slots.shape[0], M // slots.shape[0])
    o = 6 * M * di
    dt = ws[o : o + M * R].reshape(M, R)
    B = ws[o + M * R : o + M * (R + N)].reshape(M, N)
    C = ws[o + M * (R + N) : o + M * (R + 2 * N)].reshape(M, N)
    o += M * (R + 2 * N)
    _matmul(u, x_dt[li], dt)
    _matmul(u, x_B[li], B)
    _matmul(u, x_C[li], C)
    delta = ws[o : o + M * di].reshape(M, di)
    _linear(dt, dt_wt[li], dt_b[li], delta)
    _softplus_into(delta.reshape(M * di), z[: M * di], e[: M * di], bits[: M * di])
    for r in range(M):
        if not mask[r]:
            delta[r] = _ZERO  # padding: the scan leaves the state as it is
    y = ws[o + M * di : o + 2 * M * di].reshape(M, di)
    _scan(
        u.reshape(*bt, di), delta.reshape(*bt, di), At[li], B.reshape(*bt, N), C.reshape(*bt, N), D[li],
        state, slots, y.reshape(*bt, di),
    )  # fmt: skip
    for r in range(M):
        for c in range(di):
            y[r, c] *= gate[r, c]
    _matmul(y, out_wt[li], out)


@_jit
def _block(x, layer, li, stream, kind, mask, cache, state, slots, ws, wbits):
    """x [T B, d] becomes block li's output: Z = X + DSM(LN1 X), Y = Z + Mamba(LN2 Z) ("stream"), or
    each mixer added to its normalized input ("normalized")."""
    ln1_w, ln1_b, ln2_w, ln2_b, local_w, local_b = layer[:6]
    M, d = x.shape
    xt = ws[: M * d].reshape(M, d)
    _layer_norm(x, ln1_w[li], ln1_b[li], xt)
    for r in range(M):
        if not mask[r]:
            xt[r] = _ZERO  # padding enters the local mixer as zeros, as before a sequence start
    mixed = ws[M * d : 2 * M * d].reshape(M, d)
    width = local_w.shape[1] if kind == _LOCAL_DSM else local_w.shape[1] * d  # k * d either way
    windows = ws[2 * M * d : (2 * d + width) * M].reshape(M, width)
    _local_mix(xt, cache, slots, kind, local_w[li], local_b[li], windows, mixed)
    for r in range(M):
        for c in range(d):
            x[r, c] = (x[r, c] if stream else xt[r, c]) + mixed[r, c]
    zt = xt  # LN1's output is no longer needed
    _layer_norm(x, ln2_w[li], ln2_b[li], zt)
    _mamba(zt, layer, li, mask, state, slots, mixed, ws[2 * M * d :], wbits)  # windows are done
    for r in range(M):
        for c in range(d):
            x[r, c] = (x[r, c] if stream else zt[r, c]) + mixed[r, c]


@_jit
def _head(x, head, B, out):
    """out [B, act_dim] = tanh(head(LN_f(h))) at each slot's last token (its s_t)."""
    ln_w, ln_b, wt, b = head
    d = x.shape[1]
    T = x.shape[0] // B
    h = np.empty((1, d), np.float32)
    for i in range(B):
        _layer_norm(x[T * i + T - 1 : T * i + T], ln_w, ln_b, h)
        for a in range(wt.shape[1]):
            acc = b[a]
            for c in range(d):
                acc += h[0, c] * wt[c, a]
            out[i, a] = np.tanh(acc)


@_jit
def _step(
    emb, norm, layers, head, stream, kind, caches, states, prev_act, slots, steps, obs, rtgs, out, ws, wbits
):
    """The whole recurrent step for slots [B]: see :class:`FusedStep`; ws, wbits: scratch."""
    ln_w, ln_b = emb[7], emb[8]
    mean, std, rtg_scale = norm
    B, d = slots.shape[0], ln_w.shape[0]
    M = TOKENS_PER_STEP * B
    x = ws[: M * d].reshape(M, d)
    _embed(emb[:7], mean, std, rtg_scale, prev_act, slots, steps, obs, rtgs, x)
    _layer_norm(x, ln_w, ln_b, x)
    mask = np.ones(TOKENS_PER_STEP * B, np.bool_)
    for i in range(B):
        mask[3 * i] = steps[i] > 0  # at t = 0 the a_{t-1} token is padding
    for li in range(caches.shape[0]):
        _block(x, layers, li, stream, kind, mask, caches[li], states[li], slots, ws[M * d :], wbits)
    _head(x, head, B, out)
    for i in range(B):
        prev_act[slots[i]] = out[i]  # the next step's a_{t-1}


@_jit
def _window(emb, layers, head, stream, kind, bufs, slots, steps, obs, rtgs, out, ws, wbits):
    """The whole window step for slots [B]: see :meth:`FusedStep.window`; obs and rtgs come normalized
    (the window buffers hold them as the torch step writes them, bit for bit)."""
    ln_w, ln_b = emb[7], emb[8]
    rtg_buf, obs_buf, act_buf = bufs
    B, d, K = slots.shape[0], ln_w.shape[0], obs_buf.shape[1]
    k = layers[4].shape[1] // d if kind == _LOCAL_DSM else layers[4].shape[1]  # [L, k d, d] or [L, k, d]
    N, di = layers[14].shape[1], layers[14].shape[2]  # At [L, N, d_inner]
    span = 1
    for i in range(B):  # shift each window by one step and append (rtg_t, s_t, 0)
        slot = slots[i]
        span = max(span, min(steps[i] + 1, K))
        for col in range(K - 1):
            rtg_buf[slot, col] = rtg_buf[slot, col + 1]
            obs_buf[slot, col] = obs_buf[slot, col + 1]
            act_buf[slot, col] = act_buf[slot, col + 1]
        rtg_buf[slot, K - 1, 0] = rtgs[i]
        obs_buf[slot, K - 1] = obs[i]
        act_buf[slot, K - 1] = _ZERO
    M = TOKENS_PER_STEP * span * B
    x = ws[: M * d].reshape(M, d)
    mask = np.empty(M, np.bool_)
    _embed_window(emb[:7], bufs, slots, steps, span, x, mask)
    _layer_norm(x, ln_w, ln_b, x)
    # every window starts from the initial state: a zero cache and scan state per slot, not kept
    rows = np.arange(B)
    o = M * d + B * (k - 1) * d
    cache = ws[M * d : o].reshape(B, k - 1, d)
    state = ws[o : o + B * di * N].reshape(B, di, N)
    o += B * di * N
    for li in range(layers[0].shape[0]):
        cache[:] = _ZERO
        state[:] = _ZERO
        _block(x, layers, li, stream, kind, mask, cache, state, rows, ws[o:], wbits)
    _head(x, head, B, out)
    for i in range(B):
        act_buf[slots[i], K - 1] = out[i]  # the action column of step t


class SlotBuffers(NamedTuple):
    """numpy views of a runner's recurrent slot buffers (float32, C-contiguous, on the CPU), each layer's
    buffer a row of one array so that one compiled kernel serves any number of layers."""

    local: np.ndarray  # [n_layer, S, k-1, d]: each local mixer's last k-1 inputs
    ssm: np.ndarray  # [n_layer, S, d_inner, d_state]: each layer's scan state
    prev_action: np.ndarray  # [S, act_dim]: the action each slot answered last


class WindowBuffers(NamedTuple):
    """numpy views of a window runner's slot buffers (float32, C-contiguous, on the CPU): each slot's
    last K steps, left-padded with zeros, inputs normalized as the network takes them."""

    rtg: np.ndarray  # [S, K, 1]: returns-to-go over the runner's rtg scale
    obs: np.ndarray  # [S, K, state_dim]: normalized states
    act: np.ndarray  # [S, K, act_dim]: the actions answered (0 in the newest column before it is)


def _f32(t: torch.Tensor) -> np.ndarray:
    """A float32, C-contiguous copy of ``t`` that no later change of the module reaches."""
    return np.array(t.detach().to("cpu", torch.float32).numpy(), dtype=np.float32, order="C", copy=True)


def _stack(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.ascontiguousarray(np.stack([_f32(t) for t in tensors]))


def _view(t: torch.Tensor, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The numpy view of buffer ``t``: the same memory, so the kernel's writes are the runner's."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor, not {t.dtype} on {t.device}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    return t.detach().numpy()


@functools.cache
def _blas_on_one_thread() -> None:
    """Keep the BLAS that numba's ``np.dot`` calls (scipy's OpenBLAS) on the calling thread, as the rest
    of the kernel: its own threads would compete with the server's event loop and torch's workers
    for the same cores. Other BLAS builds are left as they are."""
    import ctypes
    import glob

    import scipy
    import scipy.linalg.cython_blas

    libs = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs", "*openblas*")
    for path in glob.glob(libs):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(path).scipy_openblas_set_num_threads(1)


class FusedStep:
    """:meth:`PolicyNetwork.step` for the rows ``slots`` of a runner's slot buffers, fused into one kernel,
    with the runner's input normalization folded in (raw states and returns-to-go in, actions out)."""

    def __init__(
        self, model: PolicyNetwork, state_mean: np.ndarray, state_std: np.ndarray, rtg_scale: float
    ) -> None:
        cfg = model.config
        if not cfg.supports_recurrent:
            raise ValueError(f"the fused step needs a Mamba global mixer ({cfg.describe_architecture()})")
        self.config = cfg
        self._norm = (
            np.array(state_mean, np.float32).reshape(cfg.state_dim),
            np.array(state_std, np.float32).reshape(cfg.state_dim),
            np.float32(rtg_scale),
        )
        self._stream = cfg.residual == "stream"
        self._kind = _LOCAL_DSM if cfg.local_mixer == "dsm" else _LOCAL_CONV
        self._read_weights(model)
        self._scratch = threading.local()  # see _workspace
        _blas_on_one_thread()

    def _read_weights(self, model: PolicyNetwork) -> None:
        """Copy the weights once into the kernel's layout: linear weights transposed to [in, out], and
        Mamba's in_proj and x_proj split by output (x, z; dt, B, C) so that every product writes a
        contiguous matrix."""
        d = self.config.d_model
        table = model.embed_timestep.weight if model.embed_timestep is not None else torch.zeros(0, d)
        emb = [model.embed_action.weight.t(), model.embed_action.bias, model.embed_rtg.weight[:, 0]]
        emb += [model.embed_rtg.bias, model.embed_state.weight.t(), model.embed_state.bias, table]
        self._emb = tuple(_f32(t) for t in [*emb, model.embed_ln.weight, model.embed_ln.bias])
        blocks = list(model.blocks)
        mambas: list[ModifiedMamba] = [b.global_mixer for b in blocks]
        local = [b.local.proj.weight.t() if self._kind == _LOCAL_DSM else b.local.weight for b in blocks]
        local_bias = [b.local.proj.bias if self._kind == _LOCAL_DSM else b.local.bias for b in blocks]
        self._layers = (
            _stack([b.ln1.weight for b in blocks]),
            _stack([b.ln1.bias for b in blocks]),
            _stack([b.ln2.weight for b in blocks]),
            _stack([b.ln2.bias for b in blocks]),
            _stack(local),
            _stack(local_bias),
            _stack([m.in_proj.weight[: m.d_inner].t() for m in mambas]),  # x
            _stack([m.in_proj.weight[m.d_inner :].t() for m in mambas]),  # the gate z
            _stack([m.x_proj.weight[: m.dt_rank].t() for m in mambas]),  # dt
            _stack([m.x_proj.weight[m.dt_rank : m.dt_rank + m.d_state].t() for m in mambas]),  # B
            _stack([m.x_proj.weight[m.dt_rank + m.d_state :].t() for m in mambas]),  # C
            _stack([m.dt_proj.weight.t() for m in mambas]),
            _stack([m.dt_proj.bias for m in mambas]),
            _stack([m.out_proj.weight.t() for m in mambas]),
            _stack([(-torch.exp(m.A_log.float())).t() for m in mambas]),
            _stack([m.D for m in mambas]),
        )
        self._head = tuple(
            _f32(t) for t in (model.ln_f.weight, model.ln_f.bias, model.head.weight.t(), model.head.bias)
        )

    def views(self, local: torch.Tensor, ssm: torch.Tensor, prev_action: torch.Tensor) -> SlotBuffers:
        """numpy views of a runner's buffers of S slots: local [n_layer, S, k-1, d], ssm
        [n_layer, S, d_inner, d_state], prev_action [S, act_dim] (checked here once, not at each step)."""
        cfg = self.config
        L, S = cfg.n_layer, prev_action.shape[0]
        return SlotBuffers(
            _view(local, "the local-mixer buffer", (L, S, cfg.dsm_window - 1, cfg.d_model)),
            _view(ssm, "the scan-state buffer", (L, S, cfg.d_inner, cfg.d_state)),
            _view(prev_action, "the previous-action buffer", (S, cfg.act_dim)),
        )

    def _workspace(self, rows: int, window_slots: int) -> tuple[np.ndarray, np.ndarray]:
        """Scratch for a call over ``rows`` tokens (and ``window_slots`` windows' initial states): float32
        and int32 arrays that this thread's calls reuse, grown as needed, never shrunk. Fresh arrays
        every call cost page faults at large batches (a 256-slot window call needs ~40 MB)."""
        cfg = self.config
        d, di, N, k, R = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dsm_window, cfg.resolved_dt_rank
        floats = rows * (3 * d + max(k * d, 8 * di + R + 2 * N)) + window_slots * ((k - 1) * d + di * N)
        ints = 2 * rows * di
        scratch = self._scratch.__dict__
        ws, wbits = scratch.get("ws"), scratch.get("wbits")
        if ws is None or ws.size < floats or wbits.size < ints:
            grown = ws is not None and wbits is not None
            ws = np.empty(max(floats, ws.size if grown else 0), np.float32)
            wbits = np.empty(max(ints, wbits.size if grown else 0), np.int32)
            scratch["ws"], scratch["wbits"] = ws, wbits
        return ws, wbits

    def window_views(self, rtg: torch.Tensor, obs: torch.Tensor, act: torch.Tensor) -> WindowBuffers:
        """numpy views of a window runner's buffers of S slots and K steps: rtg [S, K, 1], obs
        [S, K, state_dim], act [S, K, act_dim] (checked here once, not at each step)."""
        cfg = self.config
        S, K = obs.shape[:2]
        return WindowBuffers(
            _view(rtg, "the return-to-go window", (S, K, 1)),
            _view(obs, "the state window", (S, K, cfg.state_dim)),
            _view(act, "the action window", (S, K, cfg.act_dim)),
        )

    def _check(
        self, slots: np.ndarray, steps: np.ndarray, states: np.ndarray, rtgs: np.ndarray, S: int
    ) -> None:
        """The kernels do not check their indices, so :meth:`__call__` and :meth:`window` do."""
        B = len(slots)
        ints = (slots.dtype, steps.dtype) == (np.int64, np.int64) and slots.shape == steps.shape == (B,)
        if not ints or states.shape != (B, self.config.state_dim) or rtgs.shape != (B,):
            raise ValueError(
                f"expected int64 slots and steps [B], states [B, {self.config.state_dim}] and rtgs [B]; got "
                f"{slots.dtype} {slots.shape}, {steps.dtype} {steps.shape}, {states.shape}, {rtgs.shape}"
            )
        if B and (slots.min() < 0 or slots.max() >= S):
            raise IndexError(f"slots must lie in [0, {S})")
        if B and steps.min() < 0:
            raise ValueError("steps must be >= 0")

    def __call__(
        self, buffers: SlotBuffers, slots: np.ndarray, steps: np.ndarray, states: np.ndarray, rtgs: np.ndarray
    ) -> np.ndarray:
        """Step the distinct ``slots`` [B] (int64) at episode steps ``steps`` [B] (int64) on raw
        ``states`` [B, state_dim] and raw returns-to-go ``rtgs`` [B] (float32); returns the actions
        [B, act_dim] and updates the slots' rows of ``buffers`` in place."""
        self._check(slots, steps, states, rtgs, buffers.prev_action.shape[0])
        return self.run(buffers, slots, steps, states, rtgs)

    def run(
        self, buffers: SlotBuffers, slots: np.ndarray, steps: np.ndarray, states: np.ndarray, rtgs: np.ndarray
    ) -> np.ndarray:
        """:meth:`__call__` for a caller that has checked the arguments itself (a runner's step, which
        checks its slots against its own buffers): the kernel alone."""
        out = np.empty((len(slots), self.config.act_dim), np.float32)
        if not len(slots):
            return out
        obs, rtg = np.ascontiguousarray(states, np.float32), np.ascontiguousarray(rtgs, np.float32)
        _step(
            self._emb, self._norm, self._layers, self._head, self._stream, self._kind,
            buffers.local, buffers.ssm, buffers.prev_action, slots, steps, obs, rtg, out,
            *self._workspace(TOKENS_PER_STEP * len(slots), 0),
        )  # fmt: skip
        return out

    def window(
        self,
        buffers: WindowBuffers,
        slots: np.ndarray,
        steps: np.ndarray,
        states: np.ndarray,
        rtgs: np.ndarray,
        *,
        check: bool = True,
    ) -> np.ndarray:
        """The window step (:class:`PolicyRunner`'s ``window`` mode) of the distinct ``slots`` at
        episode steps ``steps`` (arguments as in :meth:`__call__`): each slot's window shifts by one
        step and takes the normalized (rtg_t, s_t); the network runs from the initial state over the
        last min(t + 1, K) steps as the recurrent step's tokens (a_{c-1}, rtg_c, s_c), slots with
        fewer steps than the longest masked at their padding as the window forward masks it (a
        masked token from the initial state leaves it as it is, so this is the window forward's
        action at s_t, which reads nothing after s_t); the action, returned, goes into the window.
        ``check=False``: the caller has checked the arguments itself (see :meth:`run`)."""
        if check:
            self._check(slots, steps, states, rtgs, buffers.obs.shape[0])
        B, K = len(slots), buffers.obs.shape[1]
        out = np.empty((B, self.config.act_dim), np.float32)
        if not B:
            return out
        # normalized here, in numpy's IEEE float32 (not under the kernel's fast-math), as the torch step
        # and resume normalize: the buffers then hold the same bits whichever step wrote them, and a
        # resumed window acts exactly as the uninterrupted one
        mean, std, rtg_scale = self._norm
        obs = (np.asarray(states, np.float32) - mean) / std
        rtg = np.asarray(rtgs, np.float32) / rtg_scale
        span = min(int(steps.max()) + 1, K)  # the longest window of the batch, as the kernel finds it
        _window(
            self._emb, self._layers, self._head, self._stream, self._kind,
            tuple(buffers), slots, steps, obs, rtg, out, *self._workspace(TOKENS_PER_STEP * span * B, B),
        )  # fmt: skip
        return out


@functools.cache
def warm_up() -> None:
    """Compile (or load from numba's cache) the kernel now rather than at a first request: one
    signature serves every policy size."""
    from dmm.model.config import DMMConfig

    cfg = DMMConfig(state_dim=1, act_dim=1, d_model=8, n_layer=1)
    fused = FusedStep(PolicyNetwork(cfg), np.zeros(1), np.ones(1), 1.0)
    local = torch.zeros(1, 1, cfg.dsm_window - 1, cfg.d_model)
    buffers = fused.views(local, torch.zeros(1, 1, cfg.d_inner, cfg.d_state), torch.zeros(1, 1))
    one = np.zeros(1, np.int64)
    fused(buffers, one, one, np.zeros((1, 1), np.float32), np.zeros(1, np.float32))
    K = cfg.context
    window = fused.window_views(torch.zeros(1, K, 1), torch.zeros(1, K, 1), torch.zeros(1, K, 1))
    fused.window(window, one, one, np.zeros((1, 1), np.float32), np.zeros(1, np.float32))
