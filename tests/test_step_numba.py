"""The fused CPU step (dmm.model.step_numba) against PolicyNetwork.step, and its vectorized math helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dmm.model import DMMConfig, PolicyNetwork
from dmm.model.block import BlockState
from dmm.model.scan_numba import _forward as scan_forward
from dmm.model.step_numba import FusedStep, _exp_into, _scan, _softplus_into

MEAN, STD, RTG_SCALE = 0.1, 2.0, 10.0


def _model(seed: int = 0, **overrides) -> PolicyNetwork:
    """A small DMM whose every parameter, LayerNorms included, is moved off its initial value."""
    torch.manual_seed(seed)
    settings = {"state_dim": 5, "act_dim": 3, "d_model": 16, "n_layer": 2, "dsm_window": 4, "d_state": 4}
    model = PolicyNetwork(DMMConfig(**{**settings, "max_ep_len": 7, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


class _Pair:
    """The same slot buffers twice: one stepped by the fused kernel, one by PolicyNetwork.step."""

    def __init__(self, model: PolicyNetwork, capacity: int) -> None:
        cfg = model.config
        self.model = model
        self.fused = FusedStep(model, np.full(cfg.state_dim, MEAN), np.full(cfg.state_dim, STD), RTG_SCALE)
        local = torch.randn(cfg.n_layer, capacity, cfg.dsm_window - 1, cfg.d_model)
        ssm = torch.randn(cfg.n_layer, capacity, cfg.d_inner, cfg.d_state)
        self.buffers = [local, ssm, torch.randn(capacity, cfg.act_dim)]
        self.reference = [b.clone() for b in self.buffers]
        self.views = self.fused.views(*self.buffers)
        self.steps = np.zeros(capacity, np.int64)

    def start(self, slots: list[int]) -> None:
        """A new episode in ``slots``: zero state, as a runner's reset leaves it."""
        for buffers in (self.buffers, self.reference):
            buffers[0][:, slots] = 0.0
            buffers[1][:, slots] = 0.0
            buffers[2][slots] = 0.0
        self.steps[slots] = 0

    def step(self, slots: list[int], rng: np.random.Generator) -> None:
        cfg, idx = self.model.config, torch.as_tensor(slots)
        states = rng.normal(size=(len(slots), cfg.state_dim)).astype(np.float32)
        rtgs = rng.uniform(-5, 30, size=len(slots)).astype(np.float32)
        steps = self.steps[slots]
        got = self.fused(self.views, np.asarray(slots, np.int64), steps, states, rtgs)
        local, ssm, prev = self.reference
        state = [BlockState(local[i], ssm[i], slots=idx) for i in range(cfg.n_layer)]
        obs = (torch.from_numpy(states) - MEAN) / STD
        rtg = torch.from_numpy(rtgs).unsqueeze(-1) / RTG_SCALE
        timesteps = torch.as_tensor(steps) if cfg.timestep_embedding else None
        with torch.inference_mode():
            want, _ = self.model.step(state, rtg, obs, prev[idx], torch.as_tensor(steps > 0), timesteps)
        prev[idx] = want
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
        for name, mine, theirs in zip(
            ("local", "ssm", "prev_action"), self.buffers, self.reference, strict=True
        ):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5, msg=f"{name} buffer")
        self.steps[slots] += 1


@pytest.mark.parametrize("residual", ["stream", "normalized"])
@pytest.mark.parametrize("timestep_embedding", [True, False])
@pytest.mark.parametrize("local_mixer", ["dsm", "conv"])
def test_fused_step_equals_the_torch_step(residual, timestep_embedding, local_mixer):
    """One slot alone, then many at different steps (some starting, some past max_ep_len, which the
    timestep embedding clamps), in an order that is not the slot order; untouched rows stay as they are."""
    model = _model(residual=residual, timestep_embedding=timestep_embedding, local_mixer=local_mixer)
    pair, rng = _Pair(model, capacity=8), np.random.default_rng(1)
    pair.start([3])
    for _ in range(3):
        pair.step([3], rng)
    pair.start([0, 5, 6])
    for t in range(9):
        pair.step([5, 3, 0, 6] if t % 2 else [6, 0, 3], rng)
        if t == 4:
            pair.start([6])  # a new episode in a slot amid the others


@pytest.mark.parametrize("dsm_window", [1, 2, 6])
def test_fused_step_with_any_local_window(dsm_window):
    """Windows shorter than a step's three tokens (no cache, one token) and longer ones."""
    pair, rng = (
        _Pair(_model(seed=dsm_window, dsm_window=dsm_window, n_layer=3), capacity=3),
        np.random.default_rng(2),
    )
    pair.start([0, 1, 2])
    for t in range(5):
        pair.step([0, 1, 2] if t else [1], rng)


def test_weights_are_read_once():
    """Changing the module after the fused step was built changes nothing: the runner rebuilds it."""
    model = _model()
    pair = _Pair(model, capacity=1)
    pair.start([0])
    before = pair.fused(pair.views, np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones((1, 5), np.float32),
                        np.ones(1, np.float32))  # fmt: skip
    with torch.no_grad():
        model.head.bias.add_(1.0)
    pair.start([0])
    after = pair.fused(pair.views, np.zeros(1, np.int64), np.zeros(1, np.int64), np.ones((1, 5), np.float32),
                       np.ones(1, np.float32))  # fmt: skip
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_an_empty_step_is_empty(mode):
    from conftest import policy_of

    from dmm.model import PolicyRunner

    runner = PolicyRunner(policy_of(_model()), mode, 2, "fused")
    assert runner.step([], np.zeros((0, 5)), np.zeros(0)).shape == (0, 3)


def test_bad_inputs_are_refused():
    pair = _Pair(_model(), capacity=2)
    slot, step = np.zeros(1, np.int64), np.zeros(1, np.int64)
    states, rtgs = np.zeros((1, 5), np.float32), np.zeros(1, np.float32)
    with pytest.raises(IndexError, match="slots must lie in"):
        pair.fused(pair.views, np.array([2]), step, states, rtgs)
    with pytest.raises(ValueError, match="expected int64 slots"):
        pair.fused(pair.views, slot.astype(np.int32), step, states, rtgs)
    with pytest.raises(ValueError, match="expected int64 slots"):
        pair.fused(pair.views, slot, step, np.zeros((1, 4), np.float32), rtgs)
    local, ssm, prev = pair.buffers
    with pytest.raises(ValueError, match="local-mixer buffer has shape"):
        pair.fused.views(local[:1], ssm, prev)
    with pytest.raises(ValueError, match="contiguous float32 CPU tensor"):
        pair.fused.views(local, ssm.double(), prev)
    with pytest.raises(ValueError, match="needs a Mamba global mixer"):
        FusedStep(_model(global_mixer="attention"), np.zeros(5), np.ones(5), 1.0)


def test_exp_and_softplus_match_numpy_and_torch():
    """The vectorizable exp over its clamped range and softplus on both sides of torch's threshold."""
    z = np.linspace(-80, 80, 20001, dtype=np.float32)
    out = np.empty_like(z)
    _exp_into(z, out, np.empty(z.size, np.int32))
    np.testing.assert_allclose(out, np.exp(z.astype(np.float64)), rtol=3e-7)
    x = np.concatenate([np.linspace(-40, 40, 40001), [-1e-6, 0.0, 1e-6, 19.999, 20.0, 20.001, 1e4]]).astype(
        np.float32
    )
    want = torch.nn.functional.softplus(torch.from_numpy(x).double()).numpy()
    scratch = np.empty(x.size, np.float32), np.empty(x.size, np.float32), np.empty(x.size, np.int32)
    _softplus_into(x, *scratch)
    np.testing.assert_allclose(x, want, rtol=3e-7, atol=1e-30)


def test_step_scan_matches_training_scan():
    """The step's scan (one exp pass per token) against scan_numba's forward kernel, padding included
    (delta = 0 leaves a state as it is), on slots out of order."""
    rng = np.random.default_rng(3)
    b, T, d, n = 5, 3, 24, 4
    u, delta = rng.normal(size=(2, b, T, d)).astype(np.float32)
    delta = np.abs(delta)
    delta[1, 0] = 0.0
    At = -rng.uniform(0.5, 8.0, size=(n, d)).astype(np.float32)
    B, C = rng.normal(size=(2, b, T, n)).astype(np.float32)
    D = rng.normal(size=d).astype(np.float32)
    state = rng.normal(size=(7, d, n)).astype(np.float32)
    slots = np.array([6, 0, 3, 2, 5])
    want_state, want_y = state.copy(), np.empty((b, T, d), np.float32)
    scan_forward(u, delta, At, B, C, D, want_state, slots, want_y)
    got_state, got_y = state.copy(), np.empty((b, T, d), np.float32)
    _scan(u, delta, At, B, C, D, got_state, slots, got_y)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_state, want_state, rtol=1e-6, atol=1e-6)


def _episodes(runner, rng: np.random.Generator) -> list[np.ndarray]:
    """Slots stepped at different steps, a slot resumed from a history and the capacity grown."""
    runner.reset([0])
    out = [runner.step([0], rng.normal(size=(1, 5)), [12.0])]
    history = rng.normal(size=(4, 5)), rng.uniform(-1, 1, size=(4, 3)), np.linspace(9, 6, 4)
    runner.resume([2], [history[0]], [history[1]], [history[2]])
    runner.reset([5])  # grows past the first capacity
    for t in range(4):
        out.append(runner.step([5, 0, 2], rng.normal(size=(3, 5)), [8.0 - t, 11.0 - t, 5.0 - t]))
    return out


def test_the_runner_steps_with_the_fused_kernel_on_the_cpu_and_as_the_torch_step_does():
    from conftest import policy_of

    from dmm.model import PolicyRunner

    policy = policy_of(_model(seed=3))
    fused, eager = (
        PolicyRunner(policy, "recurrent", capacity=2),
        PolicyRunner(policy, "recurrent", 2, "torch"),
    )
    assert (fused.recurrent_step, eager.recurrent_step) == ("fused", "torch")
    got, want = _episodes(fused, np.random.default_rng(4)), _episodes(eager, np.random.default_rng(4))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_recurrent_step_is_chosen_by_option_or_environment(monkeypatch):
    """auto: fused wherever the numba scan would run; the option wins over the environment."""
    from conftest import policy_of

    from dmm.model import PolicyRunner, scan

    monkeypatch.setattr(scan, "_default", None)
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.delenv("DMM_RECURRENT_STEP", raising=False)
    policy = policy_of(_model())
    assert PolicyRunner(policy, "recurrent").recurrent_step == "fused"
    assert PolicyRunner(policy, "window").recurrent_step == "fused"
    policy.network.set_scan_backend("torch")
    assert PolicyRunner(policy, "recurrent").recurrent_step == "torch"
    assert PolicyRunner(policy, "window").recurrent_step == "torch"
    assert PolicyRunner(policy, "recurrent", recurrent_step="fused").recurrent_step == "fused"
    assert PolicyRunner(policy, "window", recurrent_step="fused").recurrent_step == "fused"
    policy.network.set_scan_backend(None)
    monkeypatch.setenv("DMM_RECURRENT_STEP", "torch")
    assert PolicyRunner(policy, "recurrent").recurrent_step == "torch"
    assert PolicyRunner(policy, "window").recurrent_step == "torch"
    assert PolicyRunner(policy, "recurrent", recurrent_step="auto").recurrent_step == "fused"
    monkeypatch.setenv("DMM_RECURRENT_STEP", "fast")
    with pytest.raises(ValueError, match=r"unknown \$DMM_RECURRENT_STEP 'fast'"):
        PolicyRunner(policy, "recurrent")
    with pytest.raises(ValueError, match="unknown recurrent_step 'eager'"):
        PolicyRunner(policy, "recurrent", recurrent_step="eager")  # type: ignore[arg-type]


def test_auto_steps_large_batches_with_torch_on_the_same_slots(monkeypatch):
    """Over AUTO_FUSED_MAX_ROWS rows ``auto`` takes the torch step, reading and writing the slots the
    fused step uses, so episodes go on across batch sizes with the actions of the torch step."""
    from conftest import policy_of

    from dmm.model import PolicyRunner, inference

    monkeypatch.setattr(inference, "AUTO_FUSED_MAX_ROWS", 2)
    policy = policy_of(_model(seed=6))
    calls = []
    auto, eager = PolicyRunner(policy, "recurrent", 4), PolicyRunner(policy, "recurrent", 4, "torch")
    original = type(auto._fused).run  # the runner's entry into the kernel
    monkeypatch.setattr(
        type(auto._fused), "run", lambda self, *a: calls.append(len(a[1])) or original(self, *a)
    )
    rng_a, rng_b = np.random.default_rng(1), np.random.default_rng(1)
    for runner in (auto, eager):
        runner.reset([0, 1, 2])
    for rows in ([0, 1, 2], [0, 1], [2], [0, 1, 2]):
        states = rng_a.normal(size=(len(rows), 5))
        np.testing.assert_allclose(
            auto.step(rows, states, [9.0] * len(rows)),
            eager.step(rows, rng_b.normal(size=(len(rows), 5)), [9.0] * len(rows)),
            rtol=1e-5,
            atol=1e-5,
        )
    assert calls == [2, 1]  # the three-row batches took the torch step


def _play(runner, slot_steps: list[list[int]], starts: dict[int, list[int]], seed: int) -> list[np.ndarray]:
    """Step ``runner`` through ``slot_steps`` (the slots of each step, in the given order), starting
    episodes in ``starts[t]`` before step t; raw states and returns-to-go from ``seed``."""
    rng, out = np.random.default_rng(seed), []
    for t, slots in enumerate(slot_steps):
        if t in starts:
            runner.reset(starts[t])
        states = rng.normal(size=(len(slots), runner.state_dim))
        out.append(runner.step(slots, states, rng.uniform(-5, 30, size=len(slots))))
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"local_mixer": "conv"},
        {"residual": "normalized"},
        {"timestep_embedding": False},
        {"dsm_window": 1},
        {"dsm_window": 2, "context": 3},
        {"dsm_window": 12, "n_layer": 1},
    ],
)
def test_the_fused_window_step_equals_the_torch_window_step(overrides):
    """Window mode: one slot from t = 0 through t = K and on to t >> K (past max_ep_len, which the
    timestep embedding clamps), then slots at different steps (t < K next to t >> K: left padding,
    masked) in orders that are not the slot order, a slot restarted amid the others, a slot resumed
    from a history, and a batch of one slot whose window is shorter than the others'."""
    from conftest import policy_of

    from dmm.model import PolicyRunner

    policy = policy_of(_model(seed=7, **{"context": 4, **overrides}))
    K = policy.config.context
    plan = [[0]] * (3 * K + 2) + [[4, 0, 1] if t % 2 else [1, 4, 0] for t in range(2 * K + 3)]
    plan += [[1], [4, 1], [0, 1, 4]]
    starts = {0: [0], 3 * K + 2: [4, 1], 4 * K + 2: [1]}
    fused, eager = PolicyRunner(policy, "window", 2), PolicyRunner(policy, "window", 2, "torch")
    assert (fused.recurrent_step, eager.recurrent_step) == ("fused", "torch")
    for a, b in zip(_play(fused, plan, starts, 3), _play(eager, plan, starts, 3), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    history = [np.random.default_rng(5).normal(size=(n, 5)) for n in (K + 3, 2)]
    actions = [np.random.default_rng(6).uniform(-1, 1, size=(len(h), 3)) for h in history]
    rtgs = [np.linspace(20, 10, len(h)) for h in history]
    for runner in (fused, eager):
        runner.resume([2, 4], history, actions, rtgs)
    later = [[2, 4, 0], [4, 2], [2, 4, 0]]
    for a, b in zip(_play(fused, later, {}, 8), _play(eager, later, {}, 8), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for name in ("rtg", "obs"):  # normalized as the torch step normalizes: the same bits
        torch.testing.assert_close(fused._buffers[name], eager._buffers[name], rtol=0, atol=0)
    torch.testing.assert_close(fused._buffers["act"], eager._buffers["act"], rtol=1e-5, atol=1e-5)


def test_the_window_step_takes_turns_with_the_torch_step_on_the_same_slots(monkeypatch):
    """Over AUTO_FUSED_MAX_ROWS rows ``auto`` takes the torch window step on the same buffers."""
    from conftest import policy_of

    from dmm.model import PolicyRunner, inference

    monkeypatch.setattr(inference, "AUTO_FUSED_MAX_ROWS", 2)
    policy = policy_of(_model(seed=8, context=3))
    auto, eager = PolicyRunner(policy, "window", 4), PolicyRunner(policy, "window", 4, "torch")
    assert auto._fused_max_rows == 2
    plan = [[0, 1, 2], [0, 1], [2], [0, 1, 2], [1, 2], [2, 0, 1], [0]]
    starts = {0: [0, 1, 2], 3: [1]}
    for a, b in zip(_play(auto, plan, starts, 2), _play(eager, plan, starts, 2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_fused_window_step_refuses_bad_inputs():
    pair = _Pair(_model(), capacity=2)
    K = pair.model.config.context
    views = pair.fused.window_views(torch.zeros(2, K, 1), torch.zeros(2, K, 5), torch.zeros(2, K, 3))
    states, rtgs = np.zeros((1, 5), np.float32), np.zeros(1, np.float32)
    with pytest.raises(IndexError, match="slots must lie in"):
        pair.fused.window(views, np.array([2]), np.zeros(1, np.int64), states, rtgs)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        pair.fused.window(views, np.array([1]), np.array([-1]), states, rtgs)
    with pytest.raises(ValueError, match="state window has shape"):
        pair.fused.window_views(torch.zeros(2, K, 1), torch.zeros(2, K, 4), torch.zeros(2, K, 3))


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_a_state_that_overflows_the_model_gives_a_non_finite_action_as_in_torch(mode):
    """A state of 1e30 overflows the LayerNorms' variance: torch's action is NaN, and so is the fused
    step's (not the bias that 1 / sqrt(inf) = 0 would leave), so a server reports it; the other
    slots of the batch are untouched."""
    from conftest import policy_of

    from dmm.model import PolicyRunner

    policy = policy_of(_model(seed=9))
    states = np.array([[1e30] * 5, [0.5] * 5])
    for step in ("fused", "torch"):
        runner = PolicyRunner(policy, mode, 2, step)
        runner.reset([0, 1])
        runner.step([0, 1], np.zeros((2, 5)), [10.0, 10.0])
        finite = np.isfinite(runner.step([0, 1], states, [9.0, 9.0])).all(axis=1)
        np.testing.assert_array_equal(finite, [False, True], err_msg=step)


def test_without_scipy_auto_takes_the_torch_step(monkeypatch):
    """numba's np.dot needs SciPy's BLAS: without SciPy ``auto`` steps with torch; ``fused`` says why."""
    import importlib.util

    from conftest import policy_of

    from dmm.model import PolicyRunner, scan

    monkeypatch.setattr(scan, "_default", None)
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    monkeypatch.delenv("DMM_RECURRENT_STEP", raising=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else find_spec(name, *a)
    )
    policy = policy_of(_model())
    assert PolicyRunner(policy, "window").recurrent_step == "torch"
    assert PolicyRunner(policy, "recurrent").recurrent_step == "torch"
    with pytest.raises(ValueError, match="needs SciPy"):
        PolicyRunner(policy, "window", recurrent_step="fused")
