"""Trainer pieces: weight-decay groups, configs, loss masking, batched evaluation, a short training run."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_sac_policy

from dmm.data import load_dataset
from dmm.errors import ConfigError
from dmm.model import DMMConfig, Policy, PolicyMeta, PolicyNetwork, load_policy
from dmm.store import ModelStore
from dmm.trainer.collect import collect
from dmm.trainer.config import load_train_config
from dmm.trainer.evaluate import evaluate
from dmm.trainer.optim import lr_factor, make_optimizer, parameter_groups, warmup_length
from dmm.trainer.train import build_policy, masked_action_mse, train

TINY = {"d_model": 16, "n_layer": 2, "dropout": 0.0}


def test_weight_decay_excludes_norms_biases_A_log_and_D():
    model = PolicyNetwork(DMMConfig(state_dim=11, act_dim=3))
    decay, no_decay = parameter_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(skipped) and decayed | skipped == set(names.values())
    for name in skipped:
        assert name.endswith(("bias", "A_log", ".D")) or ".ln" in name or "_ln" in name or "ln_f" in name, (
            name
        )
    for i in range(3):
        assert {
            f"blocks.{i}.global_mixer.A_log",
            f"blocks.{i}.global_mixer.D",
            f"blocks.{i}.ln1.weight",
            f"blocks.{i}.ln2.weight",
            f"blocks.{i}.local.proj.bias",
        } <= skipped
        assert {
            f"blocks.{i}.local.proj.weight",
            f"blocks.{i}.global_mixer.in_proj.weight",
            f"blocks.{i}.global_mixer.dt_proj.weight",
        } <= decayed
    assert {"embed_ln.weight", "ln_f.weight", "head.bias"} <= skipped
    assert {"embed_state.weight", "head.weight"} <= decayed


def test_the_warm_up_takes_at_most_a_tenth_of_the_budget():
    assert warmup_length(10_000, 100_000) == 10_000  # the paper's budget: the paper's warm-up
    assert warmup_length(10_000, 2_000) == 200  # a short run leaves its warm-up
    assert warmup_length(0, 50) == 0


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_learning_rate_schedules_step_by_step(schedule):
    """The scheduler's rate before each update equals the formula: a linear warm-up, then constant or
    a half cosine that reaches 0 after the last update."""
    model = torch.nn.Linear(2, 2)
    updates, lr = 50, 1e-3
    optimizer, scheduler = make_optimizer(model, lr, 0.0, warmup=10, updates=updates, schedule=schedule)
    rates = []
    for _ in range(updates):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warm = warmup_length(10, updates)
    assert warm == 5
    np.testing.assert_allclose(rates[:warm], [lr * (i + 1) / warm for i in range(warm)])
    assert rates[warm - 1] == pytest.approx(lr)
    if schedule == "constant":
        assert rates[warm:] == [lr] * (updates - warm)
    else:
        tail = rates[warm:]
        assert tail[0] == pytest.approx(lr)
        assert all(a > b for a, b in itertools.pairwise(tail))  # strictly decreasing
        assert 0 < tail[-1] < 1e-2 * lr  # the last update still moves the weights, barely
        assert lr_factor(updates, warm, updates, "cosine") == pytest.approx(0.0, abs=1e-12)
        half = warm + (updates - warm) // 2
        assert lr_factor(half, warm, updates, "cosine") == pytest.approx(0.5, abs=0.05)


def test_paper_configs_per_family(tmp_path):
    hopper = load_train_config("hopper-medium-v2")
    assert (hopper.model.d_model, hopper.model.n_layer, hopper.model.context, hopper.model.dsm_window) == (
        64,
        3,
        8,
        6,
    )
    assert (hopper.batch_size, hopper.updates, hopper.learning_rate, hopper.warmup_updates) == (
        64,
        100_000,
        1e-4,
        10_000,
    )
    assert (hopper.weight_decay, hopper.grad_clip, hopper.model.dropout) == (1e-4, 0.25, 0.1)
    # Tables 5 and 6 differ by family only in the width; everything else is the same everywhere.
    widths = {
        "halfcheetah-medium-v2": 64,
        "walker2d-medium-v2": 32,
        "minari:mujoco/walker2d/medium-v0": 32,
        "antmaze-umaze-v2": 128,
        "kitchen-mixed-v0": 128,
    }
    but_width = {"model": {"d_model"}}
    for dataset, width in widths.items():
        cfg = load_train_config(dataset)
        assert cfg.model.d_model == width, dataset
        assert cfg.model_dump(exclude=but_width) == hopper.model_dump(exclude=but_width), dataset
    dt = load_train_config("walker2d-medium-v2", architecture="dt")
    assert (dt.model.architecture, dt.model.d_model, dt.model.context, dt.model.n_layer, dt.model.n_head) == (
        "dt",
        128,
        20,
        3,
        1,
    )
    assert dt.model.max_ep_len == 1000 and dt.updates == hopper.updates
    user = tmp_path / "user.yaml"
    user.write_text("model: {d_model: 24}\nupdates: 50\n")
    cfg = load_train_config("hopper-medium-v2", user, {"updates": 7, "seed": None})
    assert (cfg.model.d_model, cfg.model.n_layer, cfg.updates, cfg.seed) == (24, 3, 7, 0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {d_model: -1}", "model.d_model"),
        ("learning_rat: 1", "learning_rat"),
        ("[1, 2]", "mapping"),
        ("a: [", "not valid YAML"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_train_config("hopper-medium-v2", path)


def test_loss_ignores_padded_positions():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[9.0, 9.0], [1.0, 1.0], [2.0, 0.0]]])
    mask = torch.tensor([[False, True, True]])
    assert masked_action_mse(pred, target, mask).item() == pytest.approx((1 + 1 + 4 + 0) / 4)


@pytest.fixture(scope="module")
def small_hopper(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    policy = random_sac_policy(folder / "policy.npz", 11, 3, seed=3)
    return collect("Hopper-v4", policy, 600, folder / "hopper-small.hdf5", seed=0)


def _tiny_policy(dataset) -> Policy:
    cfg = load_train_config(dataset.name, overrides={"model": TINY})
    model, meta = build_policy(cfg, dataset)
    return Policy(model.eval(), meta)


@pytest.mark.parametrize("mode", ["window", "recurrent"])
def test_batched_evaluation_equals_one_env_at_a_time(small_hopper, mode):
    """The batched evaluator gives every episode what a batch-1 loop with the same seed gives (up to
    float rounding of batched matmuls)."""
    policy = _tiny_policy(load_dataset(small_hopper))
    batched = evaluate(policy, episodes=3, target_return=3600, mode=mode, num_envs=3, seed=5, progress=False)
    for i in range(3):
        single = evaluate(
            policy, episodes=1, target_return=3600, mode=mode, num_envs=1, seed=5 + i, progress=False
        )
        np.testing.assert_allclose(batched.returns[i], single.returns[0], rtol=1e-5)
        assert batched.lengths[i] == single.lengths[0]


def test_evaluation_runs_more_episodes_than_envs(small_hopper):
    policy = _tiny_policy(load_dataset(small_hopper))
    result = evaluate(policy, episodes=5, target_return=1800, num_envs=2, seed=0, progress=False)
    assert len(result.returns) == len(result.lengths) == 5
    assert (result.lengths >= 1).all() and (result.lengths <= 1000).all()
    again = evaluate(policy, episodes=5, target_return=1800, num_envs=2, seed=0, progress=False)
    np.testing.assert_array_equal(result.returns, again.returns)
    np.testing.assert_allclose(result.normalized, 100 * (result.returns + 20.272305) / (3234.3 + 20.272305))


def test_evaluation_refuses_a_policy_of_other_dims(small_hopper):
    policy = _tiny_policy(load_dataset(small_hopper))
    with pytest.raises(ConfigError, match=r"\(Walker2d-v4\) has 17 and 6"):
        evaluate(policy, episodes=1, target_return=1.0, env="walker2d-medium-v2", progress=False)


def test_training_learns_and_publishes(small_hopper, tmp_path):
    dataset = load_dataset(small_hopper)
    cfg = load_train_config(
        dataset.name,
        overrides={
            "model": TINY,
            "updates": 200,
            "warmup_updates": 20,
            "learning_rate": 1e-3,
            "eval_every": 100,
            "eval_episodes": 2,
            "eval_num_envs": 2,
            "target_returns": [500.0],
            "compile": False,
            "publish_every_eval": True,
        },
    )
    store = ModelStore(tmp_path / "store")
    result = train(cfg, dataset, store, "hopper-small", progress=False, log=lambda _: None)
    assert store.versions("hopper-small") == [1, 2] and result.version == 2
    curve = result.metrics["loss_curve"]
    assert [u for u, _ in curve] == [100, 200] and curve[-1][1] < curve[0][1]
    assert [row["update"] for row in result.metrics["evals"]] == [100, 200]
    version = store.version_path("hopper-small", 2)
    saved = json.loads((version / "metrics.json").read_text())
    assert (
        saved["final_eval"][0]["episodes"] == 2
        and saved["num_parameters"] == result.metrics["num_parameters"]
    )
    assert (version / "learning_curve.png").read_bytes().startswith(b"\x89PNG")
    loaded = load_policy(store, "hopper-small")
    assert loaded.meta.env_id == "Hopper-v4" and loaded.meta.rtg_scale == 1000.0
    np.testing.assert_allclose(loaded.meta.state_mean, dataset.state_mean, rtol=1e-6)
    assert isinstance(loaded.meta, PolicyMeta) and loaded.config.d_model == 16


def test_with_ema_the_published_weights_are_the_average_of_every_update(small_hopper, tmp_path, monkeypatch):
    """The published policy holds avg_t = d * avg_{t-1} + (1 - d) * w_t over the trained weights w_t
    (avg_1 = w_1), computed here by hand from each update's weights, not the last raw weights."""
    import dmm.trainer.train as train_module

    decay, seen = 0.9, []
    original = train_module.TrainStep.__call__

    def recording(self, batch):
        loss = original(self, batch)
        seen.append({k: v.detach().clone() for k, v in self.network.state_dict().items()})
        return loss

    monkeypatch.setattr(train_module.TrainStep, "__call__", recording)
    dataset = load_dataset(small_hopper)
    overrides = {"model": TINY, "updates": 30, "eval_episodes": 0, "compile": False, "ema_decay": decay}
    overrides |= {"learning_rate": 1e-2, "lr_schedule": "cosine", "batch_size": 8}
    cfg = load_train_config(dataset.name, overrides=overrides)
    store = ModelStore(tmp_path / "store")
    train(cfg, dataset, store, "m", progress=False, log=lambda _: None)
    published = load_policy(store, "m").network.state_dict()
    average = dict(seen[0])
    for weights in seen[1:]:
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
    for key, value in published.items():
        torch.testing.assert_close(value, average[key], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(published[k], seen[-1][k]) for k in published)  # not the raw weights


def test_without_progress_bars_training_logs_status_lines(small_hopper, tmp_path, monkeypatch):
    """Background runs log where they are, how fast they go and how long is left."""
    import dmm.trainer.train as train_module

    monkeypatch.setattr(train_module, "STATUS_LOG_EVERY", 100)
    dataset = load_dataset(small_hopper)
    overrides = {"model": TINY, "updates": 300, "eval_episodes": 0, "compile": False}
    cfg = load_train_config(dataset.name, overrides=overrides)
    lines: list[str] = []
    train(cfg, dataset, ModelStore(tmp_path / "store"), "m", progress=False, log=lines.append)
    status = [line for line in lines if "updates/s" in line]
    assert [line.split(":")[0] for line in status] == [f"update {n} of 300" for n in (100, 200, 300)]
    pattern = r"update \d+ of 300: loss \d+\.\d{4}, \d+\.\d updates/s, about \d+ min left"
    assert all(re.fullmatch(pattern, line) for line in status)
    assert status[-1].endswith("about 0 min left")


def test_the_stored_default_target_is_the_one_that_played_best_at_the_end(small_hopper, tmp_path):
    dataset = load_dataset(small_hopper)
    overrides = {"model": TINY, "updates": 30, "eval_episodes": 2, "eval_num_envs": 2, "compile": False}
    # 300 plays better here than 3600 (0.89 vs 0.85), so listing it second tests the choice
    cfg = load_train_config(dataset.name, overrides={**overrides, "target_returns": [3600.0, 300.0]})
    store = ModelStore(tmp_path / "store")
    result = train(cfg, dataset, store, "m", progress=False, log=lambda _: None)
    final = {row["target_return"]: row["normalized_mean"] for row in result.metrics["final_eval"]}
    best = max(final, key=final.get)
    assert set(final) == {300.0, 3600.0} and best == 300.0
    assert load_policy(store, "m").meta.target_return == best == result.metrics["default_target_return"]


def test_every_architecture_setting_of_the_model_can_be_configured_for_training():
    """The trainer's model settings are DMMConfig's own (dims aside), so none can be missing or drift."""
    from dmm.model import DMMConfig
    from dmm.model.config import DMMSettings
    from dmm.trainer.config import TrainConfig

    assert TrainConfig.model_fields["model"].annotation is DMMSettings and issubclass(DMMConfig, DMMSettings)
    assert set(DMMSettings.model_fields) == set(DMMConfig.model_fields) - {"state_dim", "act_dim"}
    cfg = load_train_config("hopper-medium-v2", overrides={"model": {"dt_rank": 8}})
    config = cfg.model.with_dims(11, 3)
    assert isinstance(config, DMMConfig) and config.resolved_dt_rank == 8
    with pytest.raises(ConfigError, match="state_dim"):
        load_train_config("hopper-medium-v2", overrides={"model": {"state_dim": 3}})


def test_without_a_cxx_compiler_training_runs_eagerly_and_says_so_once(small_hopper, monkeypatch):
    from dmm.trainer.train import TrainStep

    monkeypatch.setenv("CXX", "/nonexistent/c++")
    dataset = load_dataset(small_hopper)
    cfg = load_train_config(dataset.name, overrides={"model": TINY, "compile": True})
    model, _ = build_policy(cfg, dataset)
    lines: list[str] = []
    step = TrainStep(model, cfg, torch.device("cpu"), lines.append)
    assert step.forward is step.eager  # model.forward_carried, uncompiled
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "eagerly" in lines[0]


def test_episode_rows_carry_their_state_from_update_to_update_and_need_a_recurrent_model(
    small_hopper, tmp_path, monkeypatch
):
    """An episode row that goes on starts from the state the last update left (detached); one that
    starts an episode from zeros. Without a recurrent state (DT) the option is refused."""
    import dmm.trainer.train as train_module

    dataset = load_dataset(small_hopper)
    overrides = {"model": TINY, "updates": 6, "eval_episodes": 0, "compile": False, "batch_size": 4}
    seen: list[tuple[np.ndarray, list | None]] = []
    original = train_module.TrainStep._carried

    def recording(self, fresh):
        state = original(self, fresh)
        seen.append((fresh.copy(), state))
        return state

    monkeypatch.setattr(train_module.TrainStep, "_carried", recording)
    cfg = load_train_config(dataset.name, overrides={**overrides, "episode_fraction": 0.5})
    train(cfg, dataset, ModelStore(tmp_path / "a"), "m", progress=False, log=lambda _: None)
    # trained for recurrent inference: served that way by default (dmm serve --mode auto, dmm eval)
    assert load_policy(ModelStore(tmp_path / "a"), "m").meta.inference_mode == "recurrent"
    assert seen[0][1] is None and seen[0][0].all()
    fresh, state = seen[1]
    assert not fresh[:2].all() and fresh[2:].all()  # two episode rows, two random windows
    for block in state:
        assert not block.ssm.requires_grad
        assert (block.ssm[torch.from_numpy(fresh)] == 0).all()
        assert (block.ssm[torch.from_numpy(~fresh)] != 0).any()
    dt = load_train_config(dataset.name, overrides={**overrides, "episode_fraction": 0.5}, architecture="dt")
    with pytest.raises(ConfigError, match="recurrent state"):
        train(dt, dataset, ModelStore(tmp_path / "b"), "m", progress=False, log=lambda _: None)
