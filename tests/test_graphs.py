"""The static-buffer step (dmm/model/graphs.py) against the plain torch step of PolicyRunner.

On the CPU the static path runs eagerly (nothing is captured), which is what CI checks: the same
actions as the plain step over changing slot sets and batch sizes, resets, resumes and capacity
growth, in both modes; padding lanes that never touch a real slot; window mode's full-K mask equal to
the plain step's cut span; and no op in the step that would synchronize the host (it could not be
captured). The captured CUDA graphs are checked only where torch sees a CUDA GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import policy_of
from torch.utils._python_dispatch import TorchDispatchMode

from dmm.model import DMMConfig, PolicyNetwork, PolicyRunner, scan
from dmm.model.graphs import GraphedRunner, bucket_size, make_runner

S, A = 5, 2
TOLERANCE = 1e-6


@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: more torch threads only spin on a shared machine's cores (50x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _network(seed: int = 0, **overrides) -> PolicyNetwork:
    torch.manual_seed(seed)
    config = {"state_dim": S, "act_dim": A, "d_model": 16, "n_layer": 3, "context": 4, "dsm_window": 6}
    model = PolicyNetwork(DMMConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # away from the structured init, so every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _runners(mode: str, network: PolicyNetwork, capacity: int, max_bucket: int):
    """The plain torch step and the static path over one policy, both starting at ``capacity``."""
    policy = policy_of(network)
    plain = PolicyRunner(policy, mode, capacity=capacity, recurrent_step="torch")
    return plain, GraphedRunner(policy, mode, capacity=capacity, max_bucket=max_bucket)


class _Counted:
    """Counts the static steps a runner runs, so no test passes by never reaching them."""

    def __init__(self, runner: GraphedRunner, monkeypatch) -> None:
        self.rows: list[int] = []
        inner = runner._static_step

        def counted(size: int) -> torch.Tensor:
            self.rows.append(size)
            return inner(size)

        monkeypatch.setattr(runner, "_static_step", counted)


MODES = [
    ("window", {}),
    ("recurrent", {}),
    ("window", {"architecture": "dt", "n_head": 2}),
    ("window", {"local_mixer": "conv", "timestep_embedding": False}),
    ("recurrent", {"residual": "normalized", "timestep_embedding": False}),
]


@pytest.mark.parametrize(("mode", "overrides"), MODES)
@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_static_path_acts_as_the_plain_step(mode, overrides, backend, monkeypatch):
    """Many steps of episodes that start, end, resume in other slots and share batches of 1, 3, 4, 5,
    17 ... rows (in chunks of 8: ``max_bucket``), while the capacity grows from 2."""
    monkeypatch.setenv(scan.ENV_VAR, backend)
    plain, graphed = _runners(mode, _network(seed=1, **overrides), capacity=2, max_bucket=8)
    counted = _Counted(graphed, monkeypatch)
    rng = np.random.default_rng(0)
    history: dict[int, tuple[list, list, list]] = {}  # slot -> its episode's states, actions, rtgs
    free = list(range(40))
    rng.shuffle(free)
    sizes = [1, 3, 4, 5, 17, 2, 8, 9, 1, 16, 6, 17, 3]
    for tick in range(120):
        # new episodes, resumed ones (an episode moves to another slot) and finished ones
        if free and (len(history) < 20 or rng.random() < 0.3):
            fresh = [free.pop() for _ in range(min(len(free), int(rng.integers(1, 6))))]
            plain.reset(fresh)
            graphed.reset(fresh)
            history.update({s: ([], [], []) for s in fresh})
        moving = [s for s, h in history.items() if h[0]][: min(2, len(free))] if tick % 7 == 3 else []
        for old in moving:
            new = free.pop()
            states, actions, rtgs = (np.asarray(x, dtype=np.float32) for x in history.pop(old))
            for runner in (plain, graphed):
                runner.resume([new], [states], [actions], [rtgs])
                runner.release([old])
            history[new] = tuple(list(x) for x in (states, actions, rtgs))
            free.insert(0, old)
        if tick % 11 == 10:
            done = list(history)[:3]
            for slot in done:
                del history[slot]
            plain.release(done)
            graphed.release(done)
            free[:0] = done
        n = min(len(history), sizes[tick % len(sizes)])
        slots = [int(s) for s in rng.choice(list(history), size=n, replace=False)]
        states = rng.normal(size=(n, S)).astype(np.float32)
        rtgs = (rng.normal(size=n) * 10).astype(np.float32)
        want = plain.step(slots, states, rtgs)
        got = graphed.step(slots, states, rtgs)
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0, err_msg=f"tick {tick}, slots {slots}")
        for row, slot in enumerate(slots):
            history[slot][0].append(states[row])
            history[slot][1].append(want[row])
            history[slot][2].append(rtgs[row])
            assert graphed.steps_taken(slot) == plain.steps_taken(slot) == len(history[slot][0])
    assert graphed.capacity > 2 + 1 and max(len(h[0]) for h in history.values()) > 2 * plain.context
    assert {1, 4, 8} <= set(counted.rows), counted.rows
    assert any(counted.rows[i : i + 3] == [8, 8, 1] for i in range(len(counted.rows))), "17 rows: 8 + 8 + 1"


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_padding_lanes_never_change_a_real_slot(mode, monkeypatch):
    """A bucket of 4 for 3 rows: the fourth lane reads and writes the pad row only. Real slots that
    are not stepped keep their rows bit for bit, and a pad row full of NaN changes no action."""
    monkeypatch.setenv(scan.ENV_VAR, "torch")
    plain, graphed = _runners(mode, _network(seed=2), capacity=6, max_bucket=8)
    counted = _Counted(graphed, monkeypatch)
    slots = list(range(6))
    rng = np.random.default_rng(3)
    for runner in (plain, graphed):
        runner.reset(slots)
    assert graphed.pad_slot == 6 and graphed.capacity == 7  # one row more than asked for
    for _ in range(3):  # every slot some way into its episode
        states, rtgs = rng.normal(size=(6, S)).astype(np.float32), rng.normal(size=6).astype(np.float32)
        np.testing.assert_allclose(
            graphed.step(slots, states, rtgs), plain.step(slots, states, rtgs), atol=1e-6
        )
    buffers = graphed._buffers
    for buffer in buffers.values():
        buffer[graphed.pad_slot] = float("nan")
    still = [0, 2, 5]
    before = {name: buffer[still].clone() for name, buffer in buffers.items()}
    for _ in range(5):
        states, rtgs = rng.normal(size=(3, S)).astype(np.float32), rng.normal(size=3).astype(np.float32)
        got = graphed.step([4, 1, 3], states, rtgs)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, plain.step([4, 1, 3], states, rtgs), atol=TOLERANCE, rtol=0)
    assert counted.rows[-5:] == [4] * 5
    for name, buffer in buffers.items():
        assert torch.equal(buffer[still], before[name]), name
    with pytest.raises(IndexError, match="never reset"):
        graphed.step([graphed.pad_slot], np.zeros((1, S), np.float32), np.zeros(1, np.float32))
    graphed.reset([6])  # the pad row's number as a caller's slot: the buffers grow first
    assert graphed.pad_slot > 6 and graphed.steps_taken(6) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"local_mixer": "conv"},
        {"global_mixer": "attention", "n_head": 2},
        {"architecture": "dt", "n_head": 2},
    ],
)
def test_window_mode_over_the_full_context_with_a_mask_equals_the_cut_span(overrides, monkeypatch):
    """Before step K-1 every slot's window has padding columns: the plain step drops the columns left
    of every slot's start (no mask when all slots started together), the static step keeps all K and
    masks them. Same actions, at every step and for slots that started together or not."""
    monkeypatch.setenv(scan.ENV_VAR, "torch")
    plain, graphed = _runners("window", _network(seed=4, **overrides), capacity=4, max_bucket=4)
    counted = _Counted(graphed, monkeypatch)
    K = plain.context
    rng = np.random.default_rng(5)
    for runner in (plain, graphed):
        runner.reset([0, 1, 2, 3])
    for t in range(K + 1):  # slots 0-3 together: span t + 1, no mask in the plain step
        if t == 2:
            for runner in (plain, graphed):
                runner.reset([3])  # slot 3 starts over: a mixed batch, which the plain step masks
        states, rtgs = rng.normal(size=(4, S)).astype(np.float32), rng.normal(size=4).astype(np.float32)
        np.testing.assert_allclose(
            graphed.step([0, 1, 2, 3], states, rtgs),
            plain.step([0, 1, 2, 3], states, rtgs),
            atol=TOLERANCE,
            rtol=0,
        )
    assert counted.rows == [4] * (K + 1)


class _Ops(TorchDispatchMode):
    """Records every op (with its argument shapes) that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.calls.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


# ops that read a device value on the host, or size their output by one: a CUDA graph cannot hold them
SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "repeat_interleave.Tensor", "item")


@pytest.mark.parametrize(("mode", "overrides"), MODES)
def test_the_static_step_never_syncs_and_runs_the_same_ops_whatever_the_data(mode, overrides, monkeypatch):
    """What a capture needs, checked on the CPU: the step of one bucket dispatches no op that would
    synchronize the host, and the same ops on the same shapes for any slots and episode steps (torch
    scan: the scan a GPU runs without mamba_ssm or triton)."""
    monkeypatch.setenv(scan.ENV_VAR, "torch")
    _, graphed = _runners(mode, _network(seed=6, **overrides), capacity=8, max_bucket=8)
    graphed.reset(list(range(8)))
    rng = np.random.default_rng(7)
    traces = []
    for t in range(2 * graphed.context):
        slots = rng.permutation(8)[: 3 + t % 3]  # 3, 4 or 5 rows: buckets 4 and 8
        states = rng.normal(size=(len(slots), S)).astype(np.float32)
        steps = rng.integers(0, 3 * graphed.context, size=len(slots))
        graphed._stage(bucket_size(len(slots)), slots, states, np.ones(len(slots), np.float32), steps)
        with torch.inference_mode(), _Ops() as ops:
            graphed._static_step(bucket_size(len(slots)))
        syncing = [f for f, _ in ops.calls if any(name in f for name in SYNCING)]
        assert not syncing, syncing
        traces.append((bucket_size(len(slots)), ops.calls))
    for size in (4, 8):
        same = [calls for s, calls in traces if s == size]
        assert len(same) >= 2 and all(calls == same[0] for calls in same), size


def test_buckets_and_factory():
    assert [bucket_size(n) for n in (1, 2, 3, 4, 5, 17, 1024, 1025)] == [1, 2, 4, 4, 8, 32, 1024, 2048]
    policy = policy_of(_network())
    assert type(make_runner(policy, "recurrent")) is PolicyRunner  # on the CPU: off by default
    assert type(make_runner(policy, "window", cuda_graphs=False)) is PolicyRunner
    with pytest.raises(ValueError, match="CUDA graphs need a policy on a CUDA device"):
        make_runner(policy, "window", cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need a policy on a CUDA device"):
        GraphedRunner(policy, "window", capture=True)
    with pytest.raises(ValueError, match="power of two"):
        GraphedRunner(policy, "window", max_bucket=48)
    runner = GraphedRunner(policy, "recurrent")
    assert runner.recurrent_step == "torch" and not runner.capture and runner.capture_buckets() == []
    assert runner.step([], np.zeros((0, S), np.float32), np.zeros(0, np.float32)).shape == (0, A)


# ----------------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize(("mode", "overrides"), MODES)
@pytest.mark.parametrize("eager_capture", [False, True])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_captured_graphs_act_as_the_plain_gpu_step(mode, overrides, eager_capture):
    """The captured graphs, replayed over changing batches, resets and a capacity growth (which drops
    them and captures again), against the plain torch step on the same GPU."""
    network = _network(seed=8, **overrides).to("cuda")
    policy = policy_of(network)
    plain = PolicyRunner(policy, mode, capacity=4)
    graphed = make_runner(policy, mode, capacity=4, max_bucket=8)
    assert isinstance(graphed, GraphedRunner) and graphed.capture
    if eager_capture:
        assert graphed.capture_buckets() == [8, 4, 2, 1] == sorted(graphed.graphs_captured, reverse=True)
        assert graphed.capture_buckets() == []  # nothing left to capture
    rng = np.random.default_rng(9)
    active = [0, 1, 2]
    for runner in (plain, graphed):
        runner.reset(active)
    for tick in range(4 * plain.context):
        if tick == 5:  # past the capacity: the buffers grow, the graphs are captured again
            for runner in (plain, graphed):
                runner.reset([9, 10])
            active += [9, 10]
        if tick == 8:  # garbage in the pad row reaches no real slot (3 or 5 rows: buckets 4 and 8)
            for buffer in graphed._buffers.values():
                buffer[graphed.pad_slot] = float("nan")
        n = [1, 3, 5, 2, 4][tick % 5]
        slots = [int(s) for s in rng.choice(active, size=min(n, len(active)), replace=False)]
        states = rng.normal(size=(len(slots), S)).astype(np.float32)
        rtgs = rng.normal(size=len(slots)).astype(np.float32)
        np.testing.assert_allclose(
            graphed.step(slots, states, rtgs), plain.step(slots, states, rtgs), atol=1e-5, rtol=0
        )
    assert graphed.graphs_captured  # the steps after the growth replayed fresh graphs
