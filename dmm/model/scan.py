"""The selective scan of Mamba (S6) and its backends.

Recurrence for every channel d and state n (ZOH discretization of A, Euler for B, as in Mamba):

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t = <C_t, h_t> + D * u_t

Backends: ``torch`` is the reference and runs everywhere; ``numba`` (:mod:`dmm.model.scan_numba`)
fuses the scan into CPU kernels; ``cuda`` uses mamba_ssm's kernels on CUDA tensors; ``triton``
(:mod:`dmm.model.scan_triton`) runs Triton kernels on CUDA tensors (on CPU tensors only under triton's
interpreter, ``TRITON_INTERPRET=1``, which is how CI tests them). ``auto`` takes ``cuda`` on a CUDA
device with mamba_ssm importable, else ``triton`` there with triton importable; ``numba`` on the CPU
with numba importable; else ``torch``. The process default comes from ``DMM_SCAN_BACKEND`` (else
``auto``); the CLIs' ``--scan-backend`` replaces it. A backend asked for by name that cannot run is an
error, never a silent fallback.

A position with delta = 0 leaves the state untouched (exp(0) = 1, no input), which is how padded
positions are made exact no-ops.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Literal, get_args

import torch
from torch import Tensor

from dmm.errors import ConfigError

Backend = Literal["auto", "torch", "numba", "cuda", "triton"]
Resolved = Literal["torch", "numba", "cuda", "triton"]
BACKENDS: tuple[str, ...] = get_args(Backend)
ENV_VAR = "DMM_SCAN_BACKEND"

# Without autograd, scans whose [b, L, d, n] state tensors would hold at least this many elements
# run step by step: allocating and faulting in those tensors costs more than the per-step op
# overhead (measured on CPU: batch 100 x 24 tokens is ~1.4x faster step by step, batch 1 ~1.7x slower).
STEPWISE_FROM_ELEMENTS = 1 << 18


def selective_scan_torch(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
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


_numba: list[ModuleType | None] = []  # [dmm.model.scan_numba, or None without numba] once imported


def _numba_scan() -> ModuleType | None:
    """:mod:`dmm.model.scan_numba`, or None when numba does not import (a plain global after the
    first call, so a compiled model traces no import)."""
    if not _numba:
        try:
            from dmm.model import scan_numba
        except ImportError:
            scan_numba = None
        _numba.append(scan_numba)
    return _numba[0]


_triton: list[ModuleType | None] = []  # [dmm.model.scan_triton, or None without triton] once imported


def _triton_scan() -> ModuleType | None:
    """:mod:`dmm.model.scan_triton`, or None when triton does not import (imported on first use
    only: triton's import costs a CPU process that never runs it)."""
    if not _triton:
        try:
            from dmm.model import scan_triton
        except ImportError:
            scan_triton = None
        _triton.append(scan_triton)
    return _triton[0]


def triton_backend_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors when triton defined them for its
    interpreter (``TRITON_INTERPRET=1`` when :mod:`dmm.model.scan_triton` was first imported)."""
    if device.type not in ("cuda", "cpu"):
        return False
    module = _triton_scan()
    return module is not None and (device.type == "cuda" or module.INTERPRETED)


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


@functools.cache
def _state_update_takes_indices() -> bool:
    """Whether this mamba_ssm's ``selective_state_update`` can update rows of a state buffer."""
    import inspect

    _, selective_state_update = _mamba_ssm_ops()
    return "state_batch_indices" in inspect.signature(selective_state_update).parameters


_default: Backend | None = None  # set by set_default_backend; None: read DMM_SCAN_BACKEND


def _check_name(name: str, source: str) -> Backend:
    if name not in BACKENDS:
        raise ConfigError(f"unknown scan backend {name!r} ({source}); expected one of {', '.join(BACKENDS)}")
    return name  # type: ignore[return-value]


def default_backend() -> Backend:
    """The process default: ``set_default_backend``'s, else ``$DMM_SCAN_BACKEND``, else ``auto``."""
    if _default is not None:
        return _default
    return _check_name(os.environ.get(ENV_VAR, "auto").strip() or "auto", f"from ${ENV_VAR}")


def set_default_backend(backend: str, device: torch.device | str = "cpu") -> Resolved:
    """Make ``backend`` the process default after checking it runs on ``device``; returns its resolution."""
    global _default
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}") from err
    resolved = resolve_backend(_check_name(backend, "--scan-backend"), device)
    if resolved == "numba":
        _numba_scan().warm_up()  # compile now, not at the first request
    _default = backend  # type: ignore[assignment]
    return resolved


def resolve_backend(backend: Backend | None, device: torch.device) -> Resolved:
    """The backend that runs on ``device``: ``auto`` resolved, a named one checked (ConfigError)."""
    backend = default_backend() if backend is None else backend
    if backend == "torch":
        return "torch"
    numba_ok = device.type == "cpu" and _numba_scan() is not None
    cuda_ok = device.type == "cuda" and cuda_backend_available()
    if backend == "numba" and not numba_ok:
        why = "CPU tensors" if device.type != "cpu" else "numba (pip install numba)"
        raise ConfigError(f"the numba scan backend needs {why}")
    if backend == "cuda" and not cuda_ok:
        raise ConfigError("the cuda scan backend needs a CUDA device and mamba_ssm (pip install '.[cuda]')")
    if backend == "triton" and not triton_backend_available(device):
        raise ConfigError(
            "the triton scan backend needs triton (pip install triton) and CUDA tensors "
            "(CPU tensors only under TRITON_INTERPRET=1)"
        )
    if backend == "auto":
        if cuda_ok:
            return "cuda"
        if device.type == "cuda" and triton_backend_available(device):
            return "triton"
        return "numba" if numba_ok else "torch"
    return backend  # type: ignore[return-value]


def selective_scan_cuda(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
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


def selective_scan(u, delta, A, B, C, D, h0=None, backend: Backend | None = None) -> tuple[Tensor, Tensor]:
    """Dispatch to the backend (None: the process default); see :func:`selective_scan_torch` for shapes."""
    resolved = resolve_backend(backend, u.device)
    if resolved == "numba":
        return _numba_scan().selective_scan_numba(u, delta, A, B, C, D, h0)
    if resolved == "cuda":
        return selective_scan_cuda(u, delta, A, B, C, D, h0)
    if resolved == "triton":
        return _triton_scan().selective_scan_triton(u, delta, A, B, C, D, h0)
    return selective_scan_torch(u, delta, A, B, C, D, h0)


def selective_scan_slots_(u, delta, A, B, C, D, state, slots, backend: Backend | None = None) -> Tensor:
    """The scan continuing from ``state[slots]``, written back in place; returns y [b, L, d].

    ``state`` [S, d, n] is a buffer of S sequences (a server's slot table), ``slots`` [b] the
    distinct rows this batch continues. numba updates the rows where they lie; mamba_ssm's decoding
    kernel does the same for one token given ``state_batch_indices``; otherwise (``triton`` included)
    the rows are gathered, scanned with the backend and scattered back.
    """
    resolved = resolve_backend(backend, u.device)
    if resolved == "numba":
        return _numba_scan().forward_into(u, delta, A, B, C, D, state, slots)
    if resolved == "cuda" and u.shape[1] == 1 and _state_update_takes_indices():
        _, selective_state_update = _mamba_ssm_ops()
        y = selective_state_update(
            state, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D=D, state_batch_indices=slots
        )
        return y.unsqueeze(1)
    y, h = selective_scan(u, delta, A, B, C, D, state[slots], backend=resolved)
    state.index_copy_(0, slots, h)
    return y
