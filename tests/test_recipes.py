"""Dataset recipes (`dmm collect --recipe`): deterministic builds, digest checks, names and scores."""

from __future__ import annotations

import dataclasses
import re

import h5py
import pytest
from conftest import SHARED, SHARED_HOPPER_HDF5, random_sac_policy

from dmm.cli import main
from dmm.data import load_dataset
from dmm.envs import env_spec, normalized_score, reference_table
from dmm.errors import ConfigError, DMMError
from dmm.trainer import recipes
from dmm.trainer.recipes import RECIPES, collect_recipe, content_sha256, file_sha256, recipe_of, verify

WALKER = "walker2d-medium-sim-v4"


@pytest.fixture
def short_walker(tmp_path):
    """The walker recipe cut to 2,000 transitions, and a folder holding a random policy under the
    recipe's policy file name (Walker2d: observations 17, actions 6)."""
    policies = tmp_path / "policies"
    policies.mkdir()
    random_sac_policy(policies / RECIPES[WALKER].policy, 17, 6)
    return dataclasses.replace(RECIPES[WALKER], transitions=2000), policies


def build_into(tmp_path, name, recipe, policies):
    out = tmp_path / name
    out.mkdir()
    return collect_recipe(recipe, policies, out, progress=False)


def test_a_recipe_builds_the_same_bytes_twice(tmp_path, short_walker):
    recipe, policies = short_walker
    first = build_into(tmp_path, "a", recipe, policies)
    second = build_into(tmp_path, "b", recipe, policies)
    assert first.name == f"{WALKER}.hdf5"
    assert file_sha256(first) == file_sha256(second)
    with h5py.File(first, "r") as f:
        assert f["observations"].shape == (2000, 17) and f["actions"].shape == (2000, 6)
        assert f["observations"].shuffle and f["observations"].compression == "gzip"
        assert dict(f.attrs)["env_id"] == "Walker2d-v4"
        assert dict(f.attrs)["behavior_policy"] == recipe.policy
    assert load_dataset(first).env == WALKER
    reseeded = build_into(tmp_path, "c", dataclasses.replace(recipe, seed=1), policies)
    assert file_sha256(reseeded) != file_sha256(first)


def test_verify_accepts_the_digests_and_names_a_mismatch(tmp_path, short_walker):
    recipe, policies = short_walker
    path = build_into(tmp_path, "a", recipe, policies)
    exact = dataclasses.replace(recipe, sha256=file_sha256(path), content_sha256=content_sha256(path))
    assert verify(path, exact) == f"sha256 {exact.sha256} matches the recipe"
    # another hdf5 encoder: the file differs, the transitions do not
    encoded_elsewhere = dataclasses.replace(exact, sha256="0" * 64)
    assert "hdf5 encoding only" in verify(path, encoded_elsewhere)
    other = dataclasses.replace(exact, sha256="0" * 64, content_sha256="1" * 64)
    message = (
        f"{path} (kept for inspection) is not {WALKER}: sha256 {exact.sha256}, the recipe says {'0' * 64}"
    )
    with pytest.raises(DMMError, match=re.escape(message) + ".*the transitions differ too"):
        verify(path, other)
    assert path.is_file()


def test_the_content_digest_ignores_the_encoding(tmp_path, short_walker):
    recipe, policies = short_walker
    path = build_into(tmp_path, "a", recipe, policies)
    plain = tmp_path / "plain.hdf5"
    with h5py.File(path, "r") as f, h5py.File(plain, "w") as g:
        for key in f:
            g.create_dataset(key, data=f[key][()])  # no compression
        g.attrs.update(f.attrs)
    assert file_sha256(plain) != file_sha256(path)
    assert content_sha256(plain) == content_sha256(path)
    with h5py.File(plain, "r+") as g:
        g["rewards"][0] += 1.0
    assert content_sha256(plain) != content_sha256(path)


def test_cli_builds_a_recipe_and_fails_on_a_wrong_digest(tmp_path, short_walker, monkeypatch, capsys):
    recipe, policies = short_walker
    expected = build_into(tmp_path, "reference", recipe, policies)
    exact = dataclasses.replace(recipe, sha256=file_sha256(expected), content_sha256=content_sha256(expected))
    out = tmp_path / "out"
    out.mkdir()
    args = ["collect", "--recipe", WALKER, "--policies", str(policies), "--out", str(out), "--no-progress"]
    monkeypatch.setitem(RECIPES, WALKER, exact)
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"building {WALKER}: 2,000 transitions of Walker2d-v4 sampled from walker_online_5.npz" in printed
    assert "minutes on a 2-core CPU" in printed and "matches the recipe" in printed

    monkeypatch.setitem(RECIPES, WALKER, dataclasses.replace(exact, sha256="0" * 64, content_sha256="1" * 64))
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmm collect: error: ")
    assert f"is not {WALKER}: sha256 {exact.sha256}, the recipe says {'0' * 64}" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            "--recipe nope --policies {policies}",
            "no recipe for 'nope'; known: hopper-medium-sim-v4, walker2d-",
        ),
        (
            f"--recipe {WALKER} --policies {{policies}} --steps 10 --seed 3",
            "--recipe sets --steps, --seed itself",
        ),
        (f"--recipe {WALKER} --policies {{policies}} --format minari", "--recipe sets --format itself"),
        (f"--recipe {WALKER} --policies {{tmp}}/missing", "--policies must be the folder of the reference"),
        (f"--recipe {WALKER}", "--recipe NAME and --policies DIR go together"),
        ("--policies {policies}", "--recipe NAME and --policies DIR go together"),
        ("--env Walker2d-v4", "the following arguments are required: --policy, --steps (or --recipe NAME)"),
    ],
)
def test_bad_recipe_options_exit_2_with_one_line(tmp_path, short_walker, capsys, args, message):
    _, policies = short_walker
    argv = args.format(policies=policies, tmp=tmp_path).split()
    assert main(["collect", *argv, "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dmm collect: error: ") and message in lines[0]
    assert list(tmp_path.glob("*.hdf5")) == []


def test_out_must_be_a_folder(tmp_path, short_walker):
    recipe, policies = short_walker
    with pytest.raises(ConfigError, match="--out must be an existing folder"):
        collect_recipe(recipe, policies, tmp_path / "missing", progress=False)
    with pytest.raises(ConfigError, match="no recipe for 'walker2d-medium-v2'"):
        recipe_of("walker2d-medium-v2")


@pytest.mark.parametrize(
    ("name", "env_id", "reference"),
    [
        ("hopper-medium-sim-v4", "Hopper-v4", "hopper-medium-v2"),
        ("walker2d-medium-sim-v4", "Walker2d-v4", "walker2d-medium-v2"),
        ("halfcheetah-medium-sim-v4", "HalfCheetah-v4", "halfcheetah-medium-v2"),
    ],
)
def test_recipe_names_resolve_to_their_family_and_d4rl_scores(name, env_id, reference):
    recipe = RECIPES[name]
    assert recipe.env_id == env_id == env_spec(name).env_id
    assert env_spec(f"runs/data/{name}.hdf5").env_id == env_id  # the file the recipe writes
    assert (recipe.transitions, recipe.seed) == (1_000_000, 0)
    assert re.fullmatch("[0-9a-f]{64}", recipe.sha256) and re.fullmatch("[0-9a-f]{64}", recipe.content_sha256)
    assert recipe.minutes > 0
    scores = reference_table()[reference]
    low, high = scores["ref_min_score"], scores["ref_max_score"]
    assert normalized_score(name, low) == pytest.approx(0.0)
    assert normalized_score(name, high) == pytest.approx(100.0)
    assert normalized_score(name, (low + high) / 2) == pytest.approx(50.0)
    assert (SHARED / "policies" / recipe.policy).is_file() or not SHARED.is_dir()


def test_the_hopper_recipe_holds_the_shared_files_digests():
    if not SHARED_HOPPER_HDF5.is_file():
        pytest.skip(f"{SHARED_HOPPER_HDF5} not present")
    hopper = recipes.RECIPES["hopper-medium-sim-v4"]
    assert file_sha256(SHARED_HOPPER_HDF5) == hopper.sha256
    assert content_sha256(SHARED_HOPPER_HDF5) == hopper.content_sha256
    with h5py.File(SHARED_HOPPER_HDF5, "r") as f:
        assert f.attrs["env_id"] == hopper.env_id and f.attrs["behavior_policy"] == hopper.policy
        assert int(f.attrs["seed"]) == hopper.seed and len(f["rewards"]) == hopper.transitions
