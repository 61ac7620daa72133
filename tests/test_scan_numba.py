"""The numba scan backend against the per-timestep loop, and the backend choice around it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scan_reference import naive_scan, scan_inputs

from dmm.errors import ConfigError
from dmm.model import scan
from dmm.model.scan_numba import forward_into, selective_scan_numba

SHAPES = [(1, 1, 1, 1), (2, 5, 3, 4), (3, 24, 12, 16), (9, 7, 5, 2)]


def _grads(fn, inputs, weight_last=1.7):
    """y, last state and the gradients of a loss that uses both (so the last state's gradient flows)."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    y, h = fn(*leaves)
    (y.square().sum() + weight_last * (h * h.detach().sign()).sum()).backward()
    return y.detach(), h.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_numba_matches_the_loop_with_all_gradients_in_float64(shape, with_h0):
    inputs = scan_inputs(*shape, seed=sum(shape), with_h0=with_h0)
    y, h, grads = _grads(selective_scan_numba, inputs)
    y_ref, h_ref, grads_ref = _grads(naive_scan, inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    names = ["u", "delta", "A", "B", "C", "D", "h0"]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=f"gradient of {name}")


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (4, 24, 128, 16)])
def test_float32_kernel_with_its_polynomial_exp_stays_within_float32_error(shape):
    inputs = scan_inputs(*shape, seed=3)
    y_ref, h_ref, grads_ref = _grads(selective_scan_numba, inputs)  # float64: math.exp
    y, h, grads = _grads(selective_scan_numba, [t.float() for t in inputs])
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        scale = g_ref.abs().max()
        assert (g.double() - g_ref).abs().max() <= 1e-5 * scale + 1e-6


def test_the_polynomial_exp_is_accurate_over_the_whole_range():
    """exp(z) for z in [-87, 0] (the range delta * A covers) to 2 float32 ulps; below that, ~0."""
    z = torch.linspace(-87, 0, 200_001, dtype=torch.float32)
    # One channel, state size 1: h_1 = exp(delta * A) * h0 with delta = z, A = 1... as -|z| * 1.
    L = z.numel()
    u = torch.zeros(1, 1, L)
    delta = -z.reshape(1, 1, L)
    A = -torch.ones(L, 1)
    h0 = torch.ones(1, L, 1)
    _, h = selective_scan_numba(u, delta, A, torch.zeros(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(L), h0)
    exact = torch.exp(z.double())
    assert ((h.flatten().double() - exact).abs() / exact).max() < 1.2e-7
    tiny = torch.tensor([[[200.0, 1e30]]])
    _, h = selective_scan_numba(
        torch.zeros(1, 1, 2), tiny, -torch.ones(2, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1, 1),
        torch.zeros(2), torch.ones(1, 2, 1),
    )  # fmt: skip
    assert (h.abs() < 1e-37).all()


def test_nan_in_the_input_comes_out_as_nan():
    u, delta, A, B, C, D, h0 = (t.float() for t in scan_inputs(2, 4, 3, 4, seed=5))
    u[1, 2, 0] = float("nan")
    y, h = selective_scan_numba(u, delta, A, B, C, D, h0)
    assert torch.isnan(y[1, 2:, 0]).all() and torch.isnan(h[1, 0]).all()
    assert not torch.isnan(y[0]).any() and not torch.isnan(h[0]).any()


def test_masked_positions_leave_the_state_untouched():
    u, delta, A, B, C, D, h0 = scan_inputs(2, 6, 3, 4, seed=7)
    delta[:, 2:5] = 0.0  # padding is delta = 0
    _, h_all = selective_scan_numba(u, delta, A, B, C, D, h0)
    _, h_before = selective_scan_numba(u[:, :2], delta[:, :2], A, B[:, :2], C[:, :2], D, h0)
    _, h_after = selective_scan_numba(u[:, 5:], delta[:, 5:], A, B[:, 5:], C[:, 5:], D, h_before)
    torch.testing.assert_close(h_all, h_after, rtol=0, atol=0)


def test_a_chunk_with_an_initial_state_equals_one_pass():
    u, delta, A, B, C, D, _ = scan_inputs(3, 10, 5, 4, seed=8, with_h0=False)
    y, h = selective_scan_numba(u, delta, A, B, C, D)
    y1, h1 = selective_scan_numba(u[:, :6], delta[:, :6], A, B[:, :6], C[:, :6], D)
    y2, h2 = selective_scan_numba(u[:, 6:], delta[:, 6:], A, B[:, 6:], C[:, 6:], D, h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h2, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_the_in_place_slot_update_equals_gather_step_scatter(backend):
    S, b, L, d, n = 10, 4, 3, 6, 4
    u, delta, A, B, C, D, _ = scan_inputs(b, L, d, n, seed=9, dtype=torch.float32, with_h0=False)
    buffer = torch.randn(S, d, n)
    slots = torch.tensor([7, 0, 3, 9])
    y_ref, h_ref = naive_scan(u, delta, A, B, C, D, buffer[slots])
    expected = buffer.clone()
    expected[slots] = h_ref
    y = scan.selective_scan_slots_(u, delta, A, B, C, D, buffer, slots, backend=backend)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(buffer, expected, rtol=1e-5, atol=1e-5)  # other rows untouched


def test_forward_into_rejects_a_strided_state_buffer():
    u, delta, A, B, C, D, _ = scan_inputs(1, 2, 3, 4, seed=1, dtype=torch.float32, with_h0=False)
    buffer = torch.zeros(4, 3, 2, 4)[:, :, 0]
    with pytest.raises(ValueError, match="contiguous"):
        forward_into(u, delta, A, B, C, D, buffer, torch.tensor([1]))


def test_torch_compile_keeps_the_op_and_its_gradients():
    torch._dynamo.reset()
    inputs = [t.float() for t in scan_inputs(2, 6, 8, 4, seed=12)]

    def loss_grads(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, h = fn(*leaves)
        (y.sin().sum() + h.sum()).backward()
        return [y.detach()] + [t.grad for t in leaves]

    compiled = torch.compile(selective_scan_numba, fullgraph=True)
    for got, want in zip(loss_grads(compiled), loss_grads(selective_scan_numba), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_backend_names_resolve_and_unusable_ones_are_errors(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(scan, "_default", None)
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    assert scan.default_backend() == "auto"
    assert scan.resolve_backend(None, cpu) == "numba"
    monkeypatch.setenv(scan.ENV_VAR, "torch")
    assert scan.resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv(scan.ENV_VAR, "fast")
    with pytest.raises(ConfigError, match=r"unknown scan backend 'fast'.*DMM_SCAN_BACKEND"):
        scan.resolve_backend(None, cpu)
    assert scan.set_default_backend("torch") == "torch"  # the flag wins over the environment
    assert scan.default_backend() == "torch"
    with pytest.raises(ConfigError, match="cuda scan backend needs a CUDA device"):
        scan.set_default_backend("cuda")
    assert scan.default_backend() == "torch"  # a refused choice changes nothing
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="numba scan backend needs CPU tensors"):
            scan.resolve_backend("numba", torch.device("cuda"))


def test_without_numba_auto_falls_back_and_numba_is_an_error(monkeypatch):
    monkeypatch.setattr(scan, "_numba_scan", lambda: None)
    cpu = torch.device("cpu")
    assert scan.resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ConfigError, match="needs numba"):
        scan.resolve_backend("numba", cpu)
    u, delta, A, B, C, D, h0 = scan_inputs(2, 3, 4, 2, seed=2)
    y, _ = scan.selective_scan(u, delta, A, B, C, D, h0, backend="auto")
    torch.testing.assert_close(y, naive_scan(u, delta, A, B, C, D, h0)[0])


def test_a_backend_pinned_on_the_policy_overrides_the_process_default(monkeypatch):
    from dmm.model import DMMConfig, PolicyNetwork

    monkeypatch.setattr(scan, "_default", None)
    monkeypatch.delenv(scan.ENV_VAR, raising=False)

    calls = []
    monkeypatch.setattr(scan, "selective_scan_torch", lambda *a: calls.append("torch") or _loop(*a))
    model = PolicyNetwork(DMMConfig(state_dim=3, act_dim=2, d_model=16, n_layer=2))
    x = (torch.randn(1, 4, 1), torch.randn(1, 4, 3), torch.randn(1, 4, 2), None, torch.arange(4)[None])
    model(*x)
    assert calls == []  # auto: numba
    model.set_scan_backend("torch")
    model(*x)
    assert calls == ["torch", "torch"]


def _loop(*args):
    return naive_scan(*args)


def _trained_checkpoint(store) -> int:
    """A paper-size hopper DMM after 20 AdamW updates on random windows, published to ``store``."""
    from dmm.model import DMMConfig, PolicyMeta, PolicyNetwork, publish_policy

    torch.manual_seed(0)
    model = PolicyNetwork(DMMConfig(state_dim=11, act_dim=3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(20):
        rtg, states, actions = torch.randn(8, 8, 1), torch.randn(8, 8, 11), torch.rand(8, 8, 3) * 2 - 1
        loss = (model(rtg, states, actions, None, torch.arange(8).expand(8, 8)) - actions).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = PolicyMeta(
        env="hopper-medium-v2",
        env_id="Hopper-v4",
        state_mean=[0.0] * 11,
        state_std=[1.0] * 11,
        rtg_scale=1000.0,
        target_return=3600.0,
    )
    return publish_policy(store, "trained", model.eval(), meta)


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_numba_and_torch_backends_act_alike_on_a_trained_checkpoint(tmp_path, mode, monkeypatch):
    from dmm.model import PolicyRunner, load_policy
    from dmm.store import ModelStore

    store = ModelStore(tmp_path / "store")
    version = _trained_checkpoint(store)
    obs = np.random.default_rng(0).normal(size=(20, 4, 11)).astype(np.float32)
    actions = {}
    for backend in ("torch", "numba"):
        monkeypatch.setenv(scan.ENV_VAR, backend)
        runner = PolicyRunner(load_policy(store, "trained", version), mode, capacity=4)
        runner.reset(range(4))
        actions[backend] = np.stack(
            [runner.step(range(4), o, np.full(4, 3600.0 - 10 * t)) for t, o in enumerate(obs)]
        )
    np.testing.assert_allclose(actions["numba"], actions["torch"], atol=1e-5, rtol=0)


def test_a_compiled_policy_is_one_graph_around_the_numba_op():
    """Backend resolution and the op must not split the traced model (each break costs an update)."""
    from dmm.model import DMMConfig, PolicyNetwork

    torch._dynamo.reset()
    model = PolicyNetwork(DMMConfig(state_dim=3, act_dim=2, d_model=16, n_layer=2))
    inputs = (
        torch.randn(4, 5, 1),
        torch.randn(4, 5, 3),
        torch.randn(4, 5, 2),
        torch.ones(4, 5, dtype=torch.bool),
    )
    explained = torch._dynamo.explain(model)(*inputs, torch.arange(5).expand(4, 5))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
