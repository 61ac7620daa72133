"""What the kernel scan backends (numba, triton) share around their ``torch.library`` custom ops.

Each backend gives two functions, which :func:`define` makes ops: the forward
``(u, delta, A, B, C, D, h0) -> (y, h_L)`` and the backward
``(u, delta, A, B, C, D, h0, grad_y, grad_last) -> gradients of the seven inputs``, which recomputes
the states from the saved inputs. The ops' schemas, the autograd link between the two, their fake
(meta) versions for ``torch.compile``, and the entry point that skips the op's dispatch when no graph
needs it are the same for both backends, so they live here once.

Both ops return contiguous tensors, which is what the fakes below promise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# u, delta [b, L, d]; A [d, n]; B, C [b, L, n]; D [d]; h0 [b, d, n] -> y [b, L, d], the last state [b, d, n]
FORWARD_SCHEMA = (
    "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor h0) -> (Tensor, Tensor)"
)
# the forward's inputs and the gradients of its outputs -> the gradients of its seven inputs
BACKWARD_SCHEMA = (
    "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor D, Tensor h0, Tensor grad_y, "
    "Tensor grad_last) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

Pair = tuple[Tensor, Tensor]
ScanFn = Callable[..., Pair]


def _fake_forward(u, delta, A, B, C, D, h0) -> Pair:
    return (
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(h0, memory_format=torch.contiguous_format),
    )


def _fake_backward(u, delta, A, B, C, D, h0, grad_y, grad_last) -> tuple[Tensor, ...]:
    b, L, _ = u.shape
    gBC = u.new_empty(b, L, A.shape[1])
    return (
        u.new_empty(u.shape),
        u.new_empty(u.shape),
        A.new_empty(A.shape),
        gBC,
        u.new_empty(gBC.shape),
        D.new_empty(D.shape),
        h0.new_empty(h0.shape),
    )


def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def define(
    name: str,
    forward: Callable[..., Pair],
    backward: Callable[..., tuple[Tensor, ...]],
    device_types: str | None = None,
) -> tuple[torch.library.CustomOpDef, torch.library.CustomOpDef]:
    """The ops ``dmm::<name>`` (running ``forward``) and ``dmm::<name>_backward`` (running ``backward``),
    with their fakes and the autograd that leads from the first to the second.

    The backward op takes zeros for a gradient autograd leaves out (an output the loss never used).
    """
    forward_op = torch.library.custom_op(
        f"dmm::{name}", forward, mutates_args=(), device_types=device_types, schema=FORWARD_SCHEMA
    )
    backward_op = torch.library.custom_op(
        f"dmm::{name}_backward", backward, mutates_args=(), device_types=device_types, schema=BACKWARD_SCHEMA
    )

    def gradients(ctx, grad_y, grad_last):
        u, delta, A, B, C, D, h0 = ctx.saved_tensors
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y
        grad_last = torch.zeros_like(h0) if grad_last is None else grad_last
        return backward_op(u, delta, A, B, C, D, h0, grad_y, grad_last)

    forward_op.register_fake(_fake_forward)
    backward_op.register_fake(_fake_backward)
    forward_op.register_autograd(gradients, setup_context=_save_inputs)
    return forward_op, backward_op


def entry_point(forward_op, direct: Callable[..., Pair], name: str) -> ScanFn:
    """The backend's ``selective_scan_<name>``: the op where autograd or ``torch.compile`` needs it,
    else ``direct`` (the op's own computation, minus its dispatch cost, which small serving batches
    feel). ``h0`` None starts from a zero state."""

    def selective_scan(
        u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None = None
    ) -> Pair:
        if h0 is None:
            h0 = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C, D, h0))
        if needs_grad or torch.compiler.is_compiling():
            return forward_op(u, delta, A, B, C, D, h0)
        return direct(u, delta, A, B, C, D, h0)

    selective_scan.__name__ = selective_scan.__qualname__ = f"selective_scan_{name}"
    selective_scan.__doc__ = f"""The {name} scan. Same shapes and results as
    :func:`dmm.model.scan.selective_scan_torch`."""
    return selective_scan
