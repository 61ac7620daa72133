"""The model against slow, obvious references: the scan, causality, masking, and the two inference modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import policy_of
from scan_reference import naive_scan

from dmm.errors import ConfigError
from dmm.model import DMMConfig, Policy, PolicyNetwork, PolicyRunner, scan
from dmm.model.local_mixer import DenseSequenceMixer
from dmm.model.mamba import ModifiedMamba
from dmm.model.scan import resolve_backend, selective_scan_torch


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 3, 4), (3, 24, 4, 16), (2, 9, 8, 2)])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("path", ["all-steps", "step-by-step", "training"])
def test_scan_matches_naive_loop(shape, with_h0, path, monkeypatch):
    b, L, d, n = shape
    g = torch.Generator().manual_seed(sum(shape))
    f64 = {"dtype": torch.float64, "generator": g}
    u, delta = torch.randn(b, L, d, **f64), torch.rand(b, L, d, **f64)
    A, B, C = -torch.rand(d, n, **f64) * 3, torch.randn(b, L, n, **f64), torch.randn(b, L, n, **f64)
    D = torch.randn(d, **f64)
    h0 = torch.randn(b, d, n, **f64) if with_h0 else None
    monkeypatch.setattr(scan, "STEPWISE_FROM_ELEMENTS", 0 if path == "step-by-step" else 1 << 40)
    u.requires_grad_(path == "training")
    y, h = selective_scan_torch(u, delta, A, B, C, D, h0)
    y, h = y.detach(), h.detach()
    u = u.detach()
    y_ref, h_ref = naive_scan(u, delta, A, B, C, D, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)


def test_scan_is_chunkable():
    """Scanning a sequence in two chunks with the carried state equals one pass."""
    g = torch.Generator().manual_seed(1)
    f64 = {"dtype": torch.float64, "generator": g}
    u, delta = torch.randn(2, 10, 3, **f64), torch.rand(2, 10, 3, **f64)
    A, B, C, D = (
        -torch.rand(3, 4, **f64),
        torch.randn(2, 10, 4, **f64),
        torch.randn(2, 10, 4, **f64),
        torch.ones(3),
    )
    y, h = selective_scan_torch(u, delta, A, B, C, D.double())
    y1, h1 = selective_scan_torch(u[:, :6], delta[:, :6], A, B[:, :6], C[:, :6], D.double())
    y2, h2 = selective_scan_torch(u[:, 6:], delta[:, 6:], A, B[:, 6:], C[:, 6:], D.double(), h1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(h2, h)


def test_zero_delta_leaves_state_untouched():
    h0 = torch.randn(1, 2, 3, dtype=torch.float64)
    u = torch.randn(1, 4, 2, dtype=torch.float64)
    _, h = selective_scan_torch(
        u,
        torch.zeros_like(u),
        -torch.rand(2, 3).double(),
        torch.randn(1, 4, 3).double(),
        torch.randn(1, 4, 3).double(),
        torch.ones(2).double(),
        h0,
    )
    torch.testing.assert_close(h, h0)


def test_cpu_never_selects_cuda_backend():
    assert resolve_backend("auto", torch.device("cpu")) == "numba"
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_backend("cuda", torch.device("cpu"))


def _policy(seed=0, **overrides) -> PolicyNetwork:
    torch.manual_seed(seed)
    cfg = {
        "state_dim": 5,
        "act_dim": 2,
        "d_model": 16,
        "n_layer": 3,
        "context": 4,
        "dsm_window": 6,
        **overrides,
    }
    model = PolicyNetwork(DMMConfig(**cfg)).double().eval()
    # Perturb A_log and D away from their structured init so the tests exercise every parameter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _episode(T, S=5, A=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, T, 1, dtype=torch.float64, generator=g),
        torch.randn(1, T, S, dtype=torch.float64, generator=g),
        torch.tanh(torch.randn(1, T, A, dtype=torch.float64, generator=g)),
    )


VARIANTS = [
    {},
    {"residual": "normalized"},
    {"timestep_embedding": False},
    {"local_mixer": "conv"},
    {"global_mixer": "attention", "n_head": 2},
    {"architecture": "dt", "n_head": 2},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_causal_future_tokens_never_change_earlier_outputs(overrides):
    model = _policy(**overrides)
    rtg, states, actions = _episode(7)
    timesteps = torch.arange(7).unsqueeze(0)
    base = model(rtg, states, actions, timesteps=timesteps)
    for t in range(7):
        # a_t comes after s_t, so changing a_t must not change the prediction at step t either.
        for name, tensor in (("rtg", rtg), ("states", states), ("actions", actions)):
            changed = {"rtg": rtg, "states": states, "actions": actions}
            changed[name] = tensor.clone()
            changed[name][:, t] += 3.0
            out = model(**changed, timesteps=timesteps)
            first_affected = t if name != "actions" else t + 1
            torch.testing.assert_close(out[:, :first_affected], base[:, :first_affected], rtol=0, atol=0)
            if first_affected < 7:
                assert not torch.allclose(out[:, first_affected:], base[:, first_affected:])


@pytest.mark.parametrize("overrides", VARIANTS)
def test_left_padding_with_mask_equals_unpadded_prefix(overrides):
    model = _policy(**overrides)
    rtg, states, actions = _episode(3)
    pad = 4
    padded = [
        torch.cat([torch.randn(1, pad, x.shape[-1], dtype=x.dtype), x], 1) for x in (rtg, states, actions)
    ]
    mask = torch.tensor([[False] * pad + [True] * 3])
    timesteps = torch.arange(3).unsqueeze(0)
    padded_timesteps = torch.cat([torch.zeros(1, pad, dtype=torch.long), timesteps], 1)
    torch.testing.assert_close(
        model(*padded, mask=mask, timesteps=padded_timesteps)[:, pad:],
        model(rtg, states, actions, timesteps=timesteps),
        rtol=1e-12,
        atol=1e-12,
    )


def _loaded(model: PolicyNetwork) -> Policy:
    return policy_of(model.float())


def _run(runner: PolicyRunner, slot: int, states: np.ndarray, rtgs: np.ndarray) -> np.ndarray:
    runner.reset([slot])
    return np.stack([runner.step([slot], states[t : t + 1], rtgs[t : t + 1])[0] for t in range(len(states))])


def _reference(model, states, rtgs, actions, t, context=None):
    """The full forward's prediction at step t, over the whole prefix or its last ``context`` steps."""
    lo = 0 if context is None else max(0, t + 1 - context)
    s = (torch.tensor(states[lo : t + 1]) - 0.1) / 2.0
    r = torch.tensor(rtgs[lo : t + 1]).reshape(1, -1, 1) / 10.0
    a = torch.tensor(np.concatenate([actions[lo:t], np.zeros((1, actions.shape[1]))]))
    timesteps = torch.arange(lo, t + 1).unsqueeze(0)
    with torch.no_grad():
        return model(r.float(), s[None].float(), a[None].float(), timesteps=timesteps)[0, -1].numpy()


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("overrides", [{}, {"residual": "normalized"}, {"timestep_embedding": False}])
def test_recurrent_equals_window_before_context_and_each_equals_full_forward(overrides, backend, monkeypatch):
    monkeypatch.setenv(scan.ENV_VAR, backend)
    model = _policy(**overrides).float()
    K = model.config.context
    rng = np.random.default_rng(0)
    T = 3 * K
    states = rng.normal(size=(T, 5)).astype(np.float32)
    rtgs = rng.normal(size=T).astype(np.float32) * 10
    window = _run(PolicyRunner(_loaded(model), "window", capacity=2), 1, states, rtgs)
    recurrent = _run(PolicyRunner(_loaded(model), "recurrent", capacity=2), 0, states, rtgs)
    np.testing.assert_allclose(recurrent[:K], window[:K], atol=1e-5, rtol=0)
    assert not np.allclose(recurrent[K:], window[K:], atol=1e-5), "modes should differ once t >= K"
    for t in range(T):
        np.testing.assert_allclose(
            window[t], _reference(model, states, rtgs, window, t, K), atol=1e-5, rtol=0
        )
        np.testing.assert_allclose(
            recurrent[t], _reference(model, states, rtgs, recurrent, t), atol=1e-5, rtol=0
        )


def test_dt_window_runner_equals_full_forward_with_timesteps():
    model = _policy(architecture="dt", n_head=2).float()
    K = model.config.context
    rng = np.random.default_rng(2)
    states = rng.normal(size=(2 * K + 1, 5)).astype(np.float32)
    rtgs = rng.normal(size=2 * K + 1).astype(np.float32)
    actions = _run(PolicyRunner(_loaded(model), "window"), 0, states, rtgs)
    for t in range(len(states)):
        np.testing.assert_allclose(
            actions[t], _reference(model, states, rtgs, actions, t, K), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize(
    ("mode", "overrides"),
    [
        ("window", {}),
        ("recurrent", {}),
        ("window", {"architecture": "dt"}),
        ("recurrent", {"residual": "normalized", "timestep_embedding": False}),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_runner_batches_independent_episodes_at_different_steps(mode, overrides, backend, monkeypatch):
    """Slots that start at different times and share forwards get their own single-slot actions."""
    monkeypatch.setenv(scan.ENV_VAR, backend)
    model = _policy(seed=3, **overrides).float()
    rng = np.random.default_rng(1)
    T, n = 12, 3
    states = rng.normal(size=(n, T, 5)).astype(np.float32)
    rtgs = rng.normal(size=(n, T)).astype(np.float32)
    expected = [_run(PolicyRunner(_loaded(model), mode, capacity=1), 0, states[i], rtgs[i]) for i in range(n)]
    runner = PolicyRunner(_loaded(model), mode, capacity=1)  # grows on demand
    starts = [0, 2, 5]
    slots = [7, 2, 4]
    got = [[] for _ in range(n)]
    for clock in range(T + max(starts)):
        active = [i for i in range(n) if starts[i] <= clock < starts[i] + T]
        for i in active:
            if clock == starts[i]:
                runner.reset([slots[i]])
        if active:
            t = [clock - starts[i] for i in active]
            out = runner.step([slots[i] for i in active], states[active, t], rtgs[active, t])
            for row, i in enumerate(active):
                got[i].append(out[row])
    for i in range(n):
        np.testing.assert_allclose(np.stack(got[i]), expected[i], atol=1e-5, rtol=0)
        assert runner.steps_taken(slots[i]) == T


def test_runner_rejects_bad_shapes_and_attention_recurrent():
    runner = PolicyRunner(_loaded(_policy().float()), "window")
    runner.reset([0])
    with pytest.raises(ValueError, match="expected states"):
        runner.step([0], np.zeros((1, 4)), np.zeros(1))
    with pytest.raises(ValueError, match=r"\(DMM, dsm local mixer, attention global mixer\) supports window"):
        PolicyRunner(_loaded(_policy(global_mixer="attention").float()), "recurrent")
    with pytest.raises(ValueError, match=r"\(Decision Transformer\) supports window mode only"):
        PolicyRunner(_loaded(_policy(architecture="dt").float()), "recurrent")


def test_the_dt_baseline_has_no_dmm_mixers_and_a_dmm_always_has_both():
    dt = DMMConfig(architecture="dt", state_dim=3, act_dim=2)
    assert (dt.local_mixer, dt.global_mixer) == (None, None)
    assert "mixer" not in json.dumps({k: v for k, v in dt.model_dump().items() if v is not None})
    dmm = DMMConfig(state_dim=3, act_dim=2, global_mixer="attention")
    assert (dmm.local_mixer, dmm.global_mixer) == ("dsm", "attention")
    with pytest.raises(ValueError, match="the DT baseline has neither"):
        DMMConfig(architecture="dt", state_dim=3, act_dim=2, global_mixer="mamba")


def test_every_layer_owns_its_parameters():
    model = PolicyNetwork(DMMConfig(state_dim=11, act_dim=3))
    blocks = list(model.blocks)
    assert len(blocks) == 3
    seen: dict[int, str] = {}
    for name, p in model.named_parameters():
        assert id(p) not in seen, f"{name} shares storage with {seen[id(p)]}"
        seen[id(p)] = name
    for i, block in enumerate(blocks):
        assert isinstance(block.local, DenseSequenceMixer) and isinstance(block.global_mixer, ModifiedMamba)
        for other in blocks[i + 1 :]:
            for mod in ("ln1", "ln2", "local", "global_mixer"):
                assert getattr(block, mod) is not getattr(other, mod)
    names = set(dict(model.named_parameters()))
    for i in range(3):
        for part in ("ln1.weight", "ln2.weight", "local.proj.weight", "global_mixer.A_log", "global_mixer.D"):
            assert f"blocks.{i}.{part}" in names
    # Everything the model uses is in the state dict (nothing hidden in plain lists).
    assert set(model.state_dict()) == names


def test_paper_shapes():
    model = PolicyNetwork(DMMConfig(state_dim=11, act_dim=3))
    block = model.blocks[0]
    assert block.local.proj.in_features == 6 * 64 and block.local.proj.out_features == 64
    mamba = block.global_mixer
    assert (mamba.d_inner, mamba.d_state, mamba.dt_rank) == (128, 16, 4)
    torch.testing.assert_close(-torch.exp(mamba.A_log[0]), -torch.arange(1.0, 17.0))
    assert not hasattr(mamba, "conv1d")


def test_a_fresh_policy_sees_the_magnitude_of_the_return_to_go_and_the_state():
    """Every token goes through LayerNorm, which is scale-invariant: with zero-bias embeddings,
    rtg 1 and rtg 3 (or s and 2s) would be the same token. The init must keep them apart."""
    torch.manual_seed(0)
    model = PolicyNetwork(DMMConfig(state_dim=5, act_dim=2)).eval()
    rtg, states, actions = (x.float() for x in _episode(4))
    t = torch.arange(4).unsqueeze(0)
    base = model(rtg.abs(), states, actions, timesteps=t)
    assert not torch.allclose(model(3 * rtg.abs(), states, actions, timesteps=t), base, atol=1e-4)
    assert not torch.allclose(model(rtg.abs(), 2 * states, actions, timesteps=t), base, atol=1e-4)


def test_the_default_policy_knows_the_episode_step():
    """An RTG means little without the step it is read at: 'r left at step t' (the study in
    bench/results/dmm-vs-dt: without the step, DMM and DT stop following the target return). The
    same window must give other actions at another point of the episode, trained or not."""
    torch.manual_seed(0)
    model = PolicyNetwork(DMMConfig(state_dim=5, act_dim=2)).eval()
    rtg, states, actions = (x.float() for x in _episode(4))
    early = model(rtg, states, actions, timesteps=torch.arange(4).unsqueeze(0))
    late = model(rtg, states, actions, timesteps=torch.arange(500, 504).unsqueeze(0))
    assert not torch.allclose(early, late, atol=1e-4)
    with pytest.raises(ValueError, match="timestep"):
        model(rtg, states, actions)


def test_configs_written_before_the_residual_and_timestep_options_load_as_they_were_trained():
    from dmm.model.checkpoint import policy_from_config

    meta = {"env": "e", "env_id": "E-v0", "state_mean": [0.0], "state_std": [1.0], "rtg_scale": 1.0}
    meta["target_return"] = 1.0
    for architecture, expected in (("dmm", False), ("dt", True)):
        model = {"architecture": architecture, "state_dim": 1, "act_dim": 1}
        model |= {"local_mixer": "dsm", "global_mixer": "mamba"}  # what DT configs carried then
        config, _ = policy_from_config({"format": 1, "model": model, "meta": meta})
        assert config.timestep_embedding is expected and config.residual == "normalized"
        assert config.global_mixer == (None if architecture == "dt" else "mamba")


@pytest.mark.cuda
@pytest.mark.skipif(not scan.cuda_backend_available(), reason="needs a CUDA GPU and mamba_ssm")
@pytest.mark.parametrize("with_h0", [False, True])
def test_cuda_backend_matches_torch_backend(with_h0):
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": g}
    b, L, d, n = 3, 24, 32, 16
    u, delta = torch.randn(b, L, d, **kw), torch.rand(b, L, d, **kw) * 0.5
    A, B, C = -torch.rand(d, n, **kw) * 3, torch.randn(b, L, n, **kw), torch.randn(b, L, n, **kw)
    D = torch.randn(d, **kw)
    h0 = torch.randn(b, d, n, **kw) if with_h0 else None
    y_cuda, h_cuda = scan.selective_scan(u, delta, A, B, C, D, h0, backend="cuda")
    y_ref, h_ref = scan.selective_scan(u, delta, A, B, C, D, h0, backend="torch")
    torch.testing.assert_close(y_cuda, y_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h_cuda, h_ref, rtol=1e-3, atol=1e-3)


def test_the_default_block_passes_its_input_through_a_residual_stream():
    """With both mixers silenced, a block must hand on its input unchanged (pre-norm residual,
    as the authors' code); eq. 3 as printed would hand on LN2(LN1(x)) and lose the scale of x."""
    torch.manual_seed(0)
    block = PolicyNetwork(DMMConfig(state_dim=5, act_dim=2)).blocks[0].eval()
    with torch.no_grad():
        block.local.proj.weight.zero_()
        block.local.proj.bias.zero_()
        block.global_mixer.out_proj.weight.zero_()
    x = 5.0 * torch.randn(2, 6, 64) + 3.0
    y, _ = block(x)
    torch.testing.assert_close(y, x)


def test_stepping_the_model_from_its_initial_state_equals_the_full_forward_on_every_prefix():
    """The model's own recurrent API (what PolicyRunner's recurrent mode builds on), without the runner."""
    model = _policy(seed=4)
    T, S, A = 7, model.config.state_dim, model.config.act_dim
    torch.manual_seed(1)
    rtg, states, actions = (
        torch.randn(1, T, 1).double(),
        torch.randn(1, T, S).double(),
        torch.randn(1, T, A).double(),
    )
    timesteps = torch.arange(T).unsqueeze(0)
    state = model.initial_state(1)
    with torch.no_grad():
        for t in range(T):
            prev = actions[:, t - 1] if t else torch.zeros(1, A, dtype=torch.float64)
            action, state = model.step(
                state, rtg[:, t], states[:, t], prev, torch.tensor([t > 0]), timesteps[:, t]
            )
            full = model(
                rtg[:, : t + 1], states[:, : t + 1], actions[:, : t + 1], timesteps=timesteps[:, : t + 1]
            )
            torch.testing.assert_close(action, full[:, -1], rtol=1e-9, atol=1e-9)


def test_a_sequence_run_chunk_by_chunk_with_its_carried_state_equals_one_piece_and_the_steps():
    """forward_carried continues a sequence exactly (training's episode rows, and rebuilding a session):
    chunks of 3 steps, right-padded at the end, give the actions of the whole sequence at once and of
    the recurrent step."""
    model = _policy(seed=5)
    T, S, A = 8, model.config.state_dim, model.config.act_dim
    torch.manual_seed(2)
    rtg, states, actions = (torch.randn(1, T, n).double() for n in (1, S, A))
    timesteps = torch.arange(T).unsqueeze(0)
    with torch.no_grad():
        whole = model(rtg, states, actions, timesteps=timesteps)
        pieces, state = [], None
        for start in range(0, T, 3):
            chunk = slice(start, start + 3)
            n = rtg[:, chunk].shape[1]

            def pad(x: torch.Tensor, n: int = n) -> torch.Tensor:
                return torch.cat([x, x.new_zeros(1, 3 - n, *x.shape[2:])], dim=1)

            mask = torch.arange(3).unsqueeze(0) < n
            out, state = model.forward_carried(
                pad(rtg[:, chunk]),
                pad(states[:, chunk]),
                pad(actions[:, chunk]),
                mask,
                pad(timesteps[:, chunk]),
                state,
            )
            pieces.append(out[:, :n])
        torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-9, atol=1e-9)
        step_state = model.initial_state(1)
        for t in range(T):
            prev = actions[:, t - 1] if t else torch.zeros(1, A, dtype=torch.float64)
            action, step_state = model.step(
                step_state, rtg[:, t], states[:, t], prev, torch.tensor([t > 0]), timesteps[:, t]
            )
            torch.testing.assert_close(action, whole[:, t], rtol=1e-9, atol=1e-9)
