"""The selective scan as Triton kernels: GPU training without mamba_ssm (which ships no binary wheels).

Same recurrence, shapes and results as :func:`dmm.model.scan.selective_scan_torch`. One program
owns one batch row and a block of ``BLOCK_D`` channels and keeps their ``[BLOCK_D, d_state]`` state
in registers while it walks the L positions, so a whole scan is one launch instead of the torch
loop's L steps of small kernels (which is what filled the CUDA graph).

* forward: ``y`` and the last state from an initial state ``h0``, so a long window runs in chunks
  and ``PolicyNetwork.forward_carried`` continues a sequence. It saves only its inputs.
* backward: recomputes the states. L is cut into equal chunks of at most ``CHUNK`` positions; a
  first pass keeps the state at each chunk's start (``[b, L / chunk, d, n]``); then, chunk by chunk
  from the end, the chunk's states are recomputed into a scratch ``[b, chunk, d, n]`` reused by
  every chunk and the recurrence runs backwards through them. No ``[b, L, d, n]`` tensor exists in
  either direction: 3 L sequential steps instead of 2 L, for memory that does not grow with L.
* sums over channels (the gradients of B and C) and over the batch (A, D) are written per program
  and summed by torch afterwards: deterministic, no atomics.

Both directions are ``torch.library`` custom ops, so ``torch.compile`` (and its CUDA graphs) keeps
the training graph whole around them. The kernels run float32.

With ``TRITON_INTERPRET=1`` in the environment when this module is first imported, triton defines
the kernels for its interpreter, which runs them on CPU tensors: that is how CI tests them without
a GPU (slowly: small shapes only). :data:`INTERPRETED` records which of the two this process got.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from dmm.model import scan_op

CHUNK = 16  # positions per backward chunk: states kept at chunk starts, recomputed within a chunk
BLOCK_D_MAX = 32  # channels per program: 32 x 16 states in registers; d_inner 128 gives 4 programs per row


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(x, axis: tl.constexpr):
    """tl.sum. triton's own (like tl.zeros) is a jit function defined when triton is first imported,
    which does not interpret if that import came before TRITON_INTERPRET was set; the kernels here
    call only triton's builtins and their own jit functions, so setting it before importing this
    module is enough."""
    return tl.reduce(x, axis, _add)


@triton.jit
def _load_step(u_ptr, dt_ptr, B_ptr, row, t, L, d, n, offs_d, offs_n, mask_d, mask_n):
    """u_t, delta_t [BLOCK_D] and B_t [BLOCK_N]; zeros past L, which make the step a no-op."""
    valid = t < L
    ut = tl.load(u_ptr + (row * L + t) * d + offs_d, mask=mask_d & valid, other=0.0)
    dt = tl.load(dt_ptr + (row * L + t) * d + offs_d, mask=mask_d & valid, other=0.0)
    Bt = tl.load(B_ptr + (row * L + t) * n + offs_n, mask=mask_n & valid, other=0.0)
    return ut, dt, Bt


@triton.jit
def _advance(h, A, u_ptr, dt_ptr, B_ptr, row, t, L, d, n, offs_d, offs_n, mask_d, mask_n):
    """The state after position t, h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, and u_t (past L
    delta_t is 0, so h passes unchanged)."""
    ut, dt, Bt = _load_step(u_ptr, dt_ptr, B_ptr, row, t, L, d, n, offs_d, offs_n, mask_d, mask_n)
    return tl.exp(dt[:, None] * A) * h + (dt * ut)[:, None] * Bt[None, :], ut


@triton.jit
def _tile(offs_d, offs_n, mask_d, mask_n, n):
    """The [BLOCK_D, BLOCK_N] tile of a [d, n] state: its mask and its offsets."""
    return mask_d[:, None] & mask_n[None, :], offs_d[:, None] * n + offs_n[None, :]


@triton.jit
def _block(A_ptr, D_ptr, blk, d, n, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Channel block ``blk``: its lanes' offsets and masks, the tile of a state, and its A and D."""
    offs_d = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d, mask_n = offs_d < d, offs_n < n
    mask_dn, dn = _tile(offs_d, offs_n, mask_d, mask_n, n)
    A = tl.load(A_ptr + dn, mask=mask_dn, other=0.0)
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)
    return offs_d, offs_n, mask_d, mask_n, mask_dn, dn, A, Dv


@triton.jit
def _forward_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, y_ptr, hT_ptr, L, d, n,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y [b, L, d] and hT [b, d, n] for batch row program_id(0), channel block program_id(1)."""
    row, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    offs_d, offs_n, mask_d, mask_n, mask_dn, dn, A, Dv = _block(A_ptr, D_ptr, blk, d, n, BLOCK_D, BLOCK_N)
    h = tl.load(h0_ptr + row * d * n + dn, mask=mask_dn, other=0.0)
    for t in range(L):
        h, ut = _advance(h, A, u_ptr, dt_ptr, B_ptr, row, t, L, d, n, offs_d, offs_n, mask_d, mask_n)
        Ct = tl.load(C_ptr + (row * L + t) * n + offs_n, mask=mask_n, other=0.0)
        y = _sum(h * Ct[None, :], axis=1) + Dv * ut
        tl.store(y_ptr + (row * L + t) * d + offs_d, y, mask=mask_d)
    tl.store(hT_ptr + row * d * n + dn, h, mask=mask_dn)


@triton.jit
def _checkpoints(
    u_ptr, dt_ptr, A, B_ptr, h, ck_ptr, row, L, d, n, n_chunks, offs_d, offs_n, mask_d, mask_n, chunk,
):  # fmt: skip
    """ck [b, n_chunks, d, n]: the state before positions 0, chunk, 2 * chunk, ... (h is h0)."""
    mask_dn, dn = _tile(offs_d, offs_n, mask_d, mask_n, n)
    tl.store(ck_ptr + row * n_chunks * d * n + dn, h, mask=mask_dn)
    for t in range((n_chunks - 1) * chunk):
        h, _ = _advance(h, A, u_ptr, dt_ptr, B_ptr, row, t, L, d, n, offs_d, offs_n, mask_d, mask_n)
        at_start = (t + 1) % chunk == 0
        tl.store(ck_ptr + (row * n_chunks + (t + 1) // chunk) * d * n + dn, h, mask=mask_dn & at_start)


@triton.jit
def _chunk_states(
    u_ptr, dt_ptr, A, B_ptr, h, w_ptr, row, start, L, d, n, offs_d, offs_n, mask_d, mask_n, chunk,
):  # fmt: skip
    """w [b, chunk, d, n]: the states after positions start .. start + chunk - 1 (h: before start)."""
    mask_dn, dn = _tile(offs_d, offs_n, mask_d, mask_n, n)
    for s in range(chunk):
        t = start + s
        h, _ = _advance(h, A, u_ptr, dt_ptr, B_ptr, row, t, L, d, n, offs_d, offs_n, mask_d, mask_n)
        tl.store(w_ptr + (row * chunk + s) * d * n + dn, h, mask=mask_dn)


@triton.jit
def _chunk_backward(
    u_ptr, dt_ptr, A, B_ptr, C_ptr, Dv, gy_ptr, h_start, w_ptr, g, gA, gD,
    gu_ptr, gdt_ptr, gB_ptr, gC_ptr, row, blk, n_blk, start, L, d, n, offs_d, offs_n, mask_d, mask_n,
    chunk,
):  # fmt: skip
    """The recurrence backwards through positions start + chunk - 1 .. start, whose states are in w.

    g is dLoss/dh after the chunk on entry and before it on return; gA [BLOCK_D, BLOCK_N] and gD
    [BLOCK_D] accumulate this row's share. gB, gC [b, n_blk, L, n] get this channel block's share.
    """
    mask_dn, dn = _tile(offs_d, offs_n, mask_d, mask_n, n)
    for i in range(chunk):
        s = chunk - 1 - i
        t = start + s
        valid = t < L
        ut, dt, Bt = _load_step(u_ptr, dt_ptr, B_ptr, row, t, L, d, n, offs_d, offs_n, mask_d, mask_n)
        Ct = tl.load(C_ptr + (row * L + t) * n + offs_n, mask=mask_n & valid, other=0.0)
        gyt = tl.load(gy_ptr + (row * L + t) * d + offs_d, mask=mask_d & valid, other=0.0)
        h_t = tl.load(w_ptr + (row * chunk + s) * d * n + dn, mask=mask_dn, other=0.0)
        h_w = tl.load(w_ptr + (row * chunk + s - 1) * d * n + dn, mask=mask_dn & (s > 0), other=0.0)
        h_prev = tl.where(s > 0, h_w, h_start)
        a = tl.exp(dt[:, None] * A)
        g = g + gyt[:, None] * Ct[None, :]  # dLoss/dh_t
        gx = _sum(g * Bt[None, :], axis=1)  # dLoss/d(delta_t * u_t)
        g_log = g * h_prev * a  # dLoss/d(delta_t * A)
        gA += g_log * dt[:, None]
        gD += gyt * ut
        ud = (row * L + t) * d + offs_d
        tl.store(gu_ptr + ud, gyt * Dv + gx * dt, mask=mask_d & valid)
        tl.store(gdt_ptr + ud, _sum(g_log * A, axis=1) + gx * ut, mask=mask_d & valid)
        part = ((row * n_blk + blk) * L + t) * n + offs_n
        tl.store(gB_ptr + part, _sum(g * (dt * ut)[:, None], axis=0), mask=mask_n & valid)
        tl.store(gC_ptr + part, _sum(gyt[:, None] * h_t, axis=0), mask=mask_n & valid)
        g = g * a  # on to h_{t-1}
    return g, gA, gD


@triton.jit
def _backward_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, gy_ptr, ghT_ptr,
    gu_ptr, gdt_ptr, gB_ptr, gC_ptr, gA_ptr, gD_ptr, gh0_ptr, ck_ptr, w_ptr, L, d, n, n_chunks, chunk,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """All gradients for one batch row and channel block; gA [b, d, n] and gD [b, d] per row."""
    row = tl.program_id(0).to(tl.int64)
    blk, n_blk = tl.program_id(1), tl.num_programs(1)
    offs_d, offs_n, mask_d, mask_n, mask_dn, dn, A, Dv = _block(A_ptr, D_ptr, blk, d, n, BLOCK_D, BLOCK_N)
    h0 = tl.load(h0_ptr + row * d * n + dn, mask=mask_dn, other=0.0)
    _checkpoints(
        u_ptr, dt_ptr, A, B_ptr, h0, ck_ptr, row, L, d, n, n_chunks, offs_d, offs_n, mask_d, mask_n, chunk
    )
    tl.debug_barrier()  # the checkpoints (and later the chunk states) are read by other threads
    g = tl.load(ghT_ptr + row * d * n + dn, mask=mask_dn, other=0.0)
    gA = tl.full((BLOCK_D, BLOCK_N), 0.0, tl.float32)
    gD = tl.full((BLOCK_D,), 0.0, tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        start = c * chunk
        h_start = tl.load(ck_ptr + (row * n_chunks + c) * d * n + dn, mask=mask_dn, other=0.0)
        _chunk_states(
            u_ptr,
            dt_ptr,
            A,
            B_ptr,
            h_start,
            w_ptr,
            row,
            start,
            L,
            d,
            n,
            offs_d,
            offs_n,
            mask_d,
            mask_n,
            chunk,
        )
        tl.debug_barrier()
        g, gA, gD = _chunk_backward(
            u_ptr, dt_ptr, A, B_ptr, C_ptr, Dv, gy_ptr, h_start, w_ptr, g, gA, gD,
            gu_ptr, gdt_ptr, gB_ptr, gC_ptr, row, blk, n_blk, start, L, d, n, offs_d, offs_n, mask_d, mask_n,
            chunk,
        )  # fmt: skip
        tl.debug_barrier()  # the next chunk overwrites w
    tl.store(gh0_ptr + row * d * n + dn, g, mask=mask_dn)
    tl.store(gA_ptr + row * d * n + dn, gA, mask=mask_dn)
    tl.store(gD_ptr + row * d + offs_d, gD, mask=mask_d)


INTERPRETED: bool = isinstance(_forward_kernel, InterpretedFunction)


def _check(u: torch.Tensor, *others: torch.Tensor) -> None:
    """float32 tensors on one device, and at least one position (the reference rejects L = 0 too)."""
    for t in (u, *others):
        if t.dtype != torch.float32:
            raise TypeError(f"the triton scan runs in float32, not {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"the triton scan's inputs must share a device: {t.device} and {u.device}")
    if u.shape[1] == 0:
        raise ValueError("the triton scan needs at least one position (L = 0)")


def _blocks(d: int, n: int) -> tuple[int, int]:
    """BLOCK_D and BLOCK_N: powers of two (triton's rule) covering d and n, BLOCK_D at most 32."""
    return min(triton.next_power_of_2(d), BLOCK_D_MAX), triton.next_power_of_2(n)


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The kernels index rows densely; u, B and C arrive as views of wider projections."""
    return [t.detach().contiguous() for t in tensors]


def _forward(u, delta, A, B, C, D, h0) -> tuple[torch.Tensor, torch.Tensor]:
    _check(u, delta, A, B, C, D, h0)
    u, delta, A, B, C, D, h0 = _contiguous(u, delta, A, B, C, D, h0)
    b, L, d = u.shape
    n = A.shape[1]
    y, hT = torch.empty_like(u), torch.empty_like(h0)
    BLOCK_D, BLOCK_N = _blocks(d, n)
    grid = (b, triton.cdiv(d, BLOCK_D))
    _forward_kernel[grid](u, delta, A, B, C, D, h0, y, hT, L, d, n, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N)
    return y, hT


def _backward(u, delta, A, B, C, D, h0, grad_y, grad_last) -> tuple[torch.Tensor, ...]:
    """Gradients of (u, delta, A, B, C, D, h0), recomputing the states (see the module docstring)."""
    _check(u, delta, A, B, C, D, h0, grad_y, grad_last)
    u, delta, A, B, C, D, h0, grad_y, grad_last = _contiguous(u, delta, A, B, C, D, h0, grad_y, grad_last)
    b, L, d = u.shape
    n = A.shape[1]
    BLOCK_D, BLOCK_N = _blocks(d, n)
    n_blk, n_chunks = triton.cdiv(d, BLOCK_D), triton.cdiv(L, CHUNK)
    chunk = triton.cdiv(L, n_chunks)  # equal chunks of at most CHUNK: < n_chunks steps run as padding
    gu, gdelta, gh0 = torch.empty_like(u), torch.empty_like(u), torch.empty_like(h0)
    gB, gC = (u.new_empty(b, n_blk, L, n) for _ in range(2))  # per channel block: summed below
    gA, gD = u.new_empty(b, d, n), u.new_empty(b, d)  # per batch row: summed below
    checkpoints, chunk_states = u.new_empty(b, n_chunks, d, n), u.new_empty(b, chunk, d, n)
    _backward_kernel[(b, n_blk)](
        u, delta, A, B, C, D, h0, grad_y, grad_last,
        gu, gdelta, gB, gC, gA, gD, gh0, checkpoints, chunk_states, L, d, n, n_chunks, chunk,
        BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
    )  # fmt: skip
    return gu, gdelta, gA.sum(0), gB.sum(1), gC.sum(1), gD.sum(0), gh0


selective_scan_op, selective_scan_backward_op = scan_op.define("selective_scan_triton", _forward, _backward)
selective_scan_triton = scan_op.entry_point(selective_scan_op, _forward, "triton")
