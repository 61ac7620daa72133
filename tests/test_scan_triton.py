"""The triton scan backend against the torch scan and the per-timestep loop, run by triton's
interpreter on CPU tensors (TRITON_INTERPRET=1), and the backend choice around it.

triton decides at a kernel's definition whether it compiles for a GPU or interprets, and reads the
variable again while interpreting, so it is set while dmm.model.scan_triton is imported and during
every test here (and nowhere else: other tests keep their own triton settings). The interpreter
runs each program's block operations in numpy: small shapes only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from scan_reference import naive_scan, scan_inputs

from dmm.errors import ConfigError
from dmm.model import scan
from dmm.model.config import DMMSettings
from dmm.model.mamba import ModifiedMamba

pytest.importorskip("triton")
with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TRITON_INTERPRET", "1")
    from dmm.model import scan_triton
if not scan_triton.INTERPRETED:
    pytest.skip(
        "dmm.model.scan_triton was imported for the GPU before these tests could ask for the interpreter",
        allow_module_level=True,
    )

NAMES = ["u", "delta", "A", "B", "C", "D", "h0"]


@pytest.fixture(autouse=True)
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _grads(fn, inputs, weight_last=1.7):
    """y, last state and the gradients of a loss that uses both (so the last state's gradient flows)."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    y, h = fn(*leaves)
    (y.square().sum() + weight_last * (h * h.detach().sign()).sum()).backward()
    return y.detach(), h.detach(), [None if t is None else t.grad for t in leaves]


def _assert_matches(got, want, tol: float) -> None:
    """Outputs and every gradient within tol of the reference's largest magnitude (float32 sums)."""
    (y, h, grads), (y_ref, h_ref, grads_ref) = got, want
    torch.testing.assert_close(y.double(), y_ref.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(h.double(), h_ref.double(), rtol=tol, atol=tol)
    for name, g, g_ref in zip(NAMES, grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None, name
            continue
        assert g.dtype == torch.float32, name
        err = (g.double() - g_ref.double()).abs().max().item()
        assert err <= tol * (1 + g_ref.abs().max().item()), f"gradient of {name}: off by {err:.2e}"


@pytest.mark.parametrize("L", [1, 5, 17])  # 17: two backward chunks of 9, the last one partial
@pytest.mark.parametrize("with_h0", [False, True])
def test_triton_matches_the_torch_scan_and_the_loop_with_all_gradients(L, with_h0):
    inputs64 = scan_inputs(2, L, 8, 4, seed=L, with_h0=with_h0)
    inputs = [None if t is None else t.float() for t in inputs64]
    got = _grads(scan_triton.selective_scan_triton, inputs)
    _assert_matches(got, _grads(scan.selective_scan_torch, inputs), tol=2e-5)
    _assert_matches(got, _grads(naive_scan, inputs64), tol=2e-5)


def test_three_backward_chunks_pass_the_gradient_through_their_checkpoints():
    inputs = [t.float() for t in scan_inputs(1, 33, 8, 4, seed=6)]  # 3 chunks of 11 positions
    assert -(-33 // scan_triton.CHUNK) == 3
    _assert_matches(
        _grads(scan_triton.selective_scan_triton, inputs), _grads(scan.selective_scan_torch, inputs), 2e-5
    )


def test_channel_and_state_blocks_with_padding_lanes_and_several_channel_blocks():
    """d_inner 40 runs as two programs per row (32 + 8 channels), d_state 3 in a block of 4."""
    assert scan_triton.BLOCK_D_MAX < 40
    inputs = [t.float() for t in scan_inputs(2, 3, 40, 3, seed=7)]
    _assert_matches(
        _grads(scan_triton.selective_scan_triton, inputs), _grads(scan.selective_scan_torch, inputs), 2e-5
    )


def test_a_sequence_in_two_chunks_equals_it_in_one_piece():
    """What forward_carried relies on: the last state of one chunk continues the next."""
    u, delta, A, B, C, D, h0 = [t.float() for t in scan_inputs(2, 9, 8, 4, seed=2)]

    def in_two(u, delta, A, B, C, D, h0):
        y1, h1 = scan_triton.selective_scan_triton(u[:, :4], delta[:, :4], A, B[:, :4], C[:, :4], D, h0)
        y2, h2 = scan_triton.selective_scan_triton(u[:, 4:], delta[:, 4:], A, B[:, 4:], C[:, 4:], D, h1)
        return torch.cat([y1, y2], dim=1), h2

    inputs = [u, delta, A, B, C, D, h0]
    _assert_matches(_grads(in_two, inputs), _grads(scan_triton.selective_scan_triton, inputs), tol=1e-6)


def test_positions_with_delta_zero_leave_the_state_untouched():
    """Padding (a mask zeroes delta) at the end of a window gives the unpadded prefix's last state."""
    u, delta, A, B, C, D, h0 = [t.float() for t in scan_inputs(2, 6, 8, 4, seed=4)]
    delta[:, 4:] = 0
    y, h = scan_triton.selective_scan_triton(u, delta, A, B, C, D, h0)
    y4, h4 = scan_triton.selective_scan_triton(u[:, :4], delta[:, :4], A, B[:, :4], C[:, :4], D, h0)
    torch.testing.assert_close(h, h4, rtol=0, atol=0)
    torch.testing.assert_close(y[:, :4], y4, rtol=0, atol=0)


def test_the_mamba_layer_on_triton_matches_torch_with_a_mask_and_a_carried_state():
    """Through the layer: u, B and C reach the kernels as views of wider projections."""
    torch.manual_seed(0)
    layer = ModifiedMamba(DMMSettings(d_model=8, d_state=4)).train()
    x, state = torch.randn(2, 6, 8), torch.randn(2, layer.d_inner, 4)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    results = {}
    for backend in ("torch", "triton"):
        layer.zero_grad()
        layer.scan_backend = backend
        y, h = layer(x, mask, state)
        (y.square().sum() + h.sum()).backward()
        results[backend] = [y.detach(), h.detach()] + [p.grad.clone() for p in layer.parameters()]
    for got, want in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_the_backend_dispatches_and_updates_slot_rows_in_place():
    u, delta, A, B, C, D, _ = [t.float() for t in scan_inputs(2, 3, 8, 4, seed=5)]
    state = torch.randn(4, 8, 4)
    want_state = state.clone()
    slots = torch.tensor([3, 1])
    y = scan.selective_scan_slots_(u, delta, A, B, C, D, state, slots, backend="triton")
    y_ref = scan.selective_scan_slots_(u, delta, A, B, C, D, want_state, slots, backend="torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[[0, 2]], want_state[[0, 2]], rtol=0, atol=0)


def test_inputs_other_than_float32_or_without_positions_are_refused():
    inputs = scan_inputs(1, 2, 4, 2, seed=1)
    with pytest.raises(TypeError, match=r"float32, not torch\.float64"):
        scan_triton.selective_scan_triton(*inputs)
    empty = [t.float() for t in scan_inputs(1, 0, 4, 2, seed=1)]
    with pytest.raises(ValueError, match="at least one position"):
        scan_triton.selective_scan_triton(*empty)


def test_auto_takes_triton_on_cuda_without_mamba_ssm_and_nothing_changes_on_the_cpu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(scan, "cuda_backend_available", lambda: False)
    assert scan.resolve_backend("auto", cuda) == "triton"
    assert scan.resolve_backend("auto", cpu) == "numba"
    assert scan.resolve_backend("triton", cpu) == "triton"  # under the interpreter
    monkeypatch.setattr(scan, "cuda_backend_available", lambda: True)
    assert scan.resolve_backend("auto", cuda) == "cuda"


def test_triton_asked_for_where_it_cannot_run_is_an_error(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(scan, "cuda_backend_available", lambda: False)
    monkeypatch.setattr(scan_triton, "INTERPRETED", False)
    with pytest.raises(ConfigError, match=r"triton scan backend needs triton .* and CUDA tensors"):
        scan.resolve_backend("triton", cpu)
    monkeypatch.setattr(scan, "_triton_scan", lambda: None)
    with pytest.raises(ConfigError, match="pip install triton"):
        scan.resolve_backend("triton", cuda)
    assert scan.resolve_backend("auto", cuda) == "torch"


COMPILE_FOR_A_GPU = textwrap.dedent(
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from dmm.model import scan_triton

    def signature(kernel, ints):
        names = kernel.arg_names
        sig = {a: "i32" if a in ints else "constexpr" if a.startswith("BLOCK") else "*fp32" for a in names}
        return ASTSource(kernel, sig, constexprs={"BLOCK_D": 32, "BLOCK_N": 16})

    assert not scan_triton.INTERPRETED
    kernels = {scan_triton._forward_kernel: "L d n", scan_triton._backward_kernel: "L d n n_chunks chunk"}
    for kernel, ints in kernels.items():
        binary = compile(signature(kernel, ints.split()), target=GPUTarget("cuda", 90, 32))
        assert ".local" not in binary.asm["ptx"], "registers spill"
        print(kernel.__name__, len(binary.asm["cubin"]))
    """
)


def test_the_kernels_compile_for_a_gpu_without_spilling():
    """The interpreter checks the numbers, not that triton's compiler accepts the kernels: compile
    them for an H100 (sm_90) to a cubin, which needs no GPU, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_A_GPU], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[::2] == ["_forward_kernel", "_backward_kernel"]
