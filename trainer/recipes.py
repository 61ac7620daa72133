"""Recipes of the datasets collected here, with their digests (`dmm collect --recipe NAME`).

No machine here reaches D4RL's servers, so the locomotion data is collected in gymnasium with D4RL's
reference SAC policies (`dmm collect`). An 80 MB file per dataset does not belong in git; what the
repository holds instead is how each one was made (env, policy, transitions, seed) and the sha256 of
the result, so that any machine rebuilds it and proves it got the same file.

Two digests per dataset. ``sha256`` is the file's, as ``sha256sum`` prints it: the promise is bit
for bit. It depends on the hdf5 encoder too (h5py's bundled HDF5 and zlib), so ``content_sha256``,
taken over the arrays and attributes alone, tells a mismatch in the transitions (the simulator or
the numerics changed) from one in the encoding (another h5py): only the former changes results.
:data:`TAKEN_WITH` names the versions the digests were taken with.

The recipes live with the collector rather than in ``dmm.data`` because building one runs the
collector, and the core library does not import the trainer.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dmm.errors import ConfigError, DMMError

# The versions the digests below were taken with: the ones whose change can change them.
TAKEN_WITH = {"mujoco": "3.11.0", "gymnasium": "1.4.0", "numpy": "2.4.6", "h5py": "3.16.0", "HDF5": "2.0.0"}
# The arrays `dmm collect` writes, in the order the content digest reads them.
_KEYS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


@dataclass(frozen=True)
class Recipe:
    """One dataset: roll out ``policy`` (sampled, one env) in ``env_id`` for ``transitions`` steps
    from ``seed`` (episode k reset with seed + k); the hdf5 written has these digests."""

    name: str
    env_id: str
    policy: str  # file name in the folder of D4RL's reference policies
    transitions: int
    seed: int
    sha256: str  # of the hdf5 file
    content_sha256: str  # of its arrays and attributes (:func:`content_sha256`)
    minutes: int  # measured build time on a 2-core CPU shared with other work


RECIPES: dict[str, Recipe] = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="hopper-medium-sim-v4",
            env_id="Hopper-v4",
            policy="hopper_online_5.npz",
            transitions=1_000_000,
            seed=0,
            sha256="b4ab4bfcee4bffaa1a3c60b0a9c0e87ab3c28f8ef929216a3f009fd1d12ae2da",
            content_sha256="72a6436733b11f0af07353a8f56e3a3ade07e75ce22e3da9a7801e83df1c64e1",
            minutes=9,
        ),
        Recipe(
            name="walker2d-medium-sim-v4",
            env_id="Walker2d-v4",
            policy="walker_online_5.npz",
            transitions=1_000_000,
            seed=0,
            sha256="d25813acb14c38c884f80be172e0204d1b781238072c609f621dcc06acba2a8d",
            content_sha256="52dab1a8afa3723f383bb4afe6034bd8c912f14f9b2f4c586e2d43137b19f212",
            minutes=11,
        ),
        Recipe(
            name="halfcheetah-medium-sim-v4",
            env_id="HalfCheetah-v4",
            policy="halfcheetah_online_5.npz",
            transitions=1_000_000,
            seed=0,
            sha256="509d0612fe35379069fb4ccb54b6e1e575636195e3c674eaa6dcf28379da2a7f",
            content_sha256="d317b724bdee061f806c0a4e539acd6a78ce7bd84fe1bb1eac9de06bf64d0a24",
            minutes=3,
        ),
    )
}


def recipe_of(name: str) -> Recipe:
    """The recipe of ``name``, or a ConfigError that lists the known ones."""
    if name not in RECIPES:
        raise ConfigError(f"no recipe for {name!r}; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of what a D4RL-layout file holds, whatever encoded it: each array's name, dtype, shape
    and bytes (C order), then the attributes sorted by name, as ``name=value`` lines."""
    import h5py
    import numpy as np

    digest = hashlib.sha256()
    with h5py.File(path, "r") as f:
        for key in _KEYS:
            array = np.ascontiguousarray(f[key][()])
            digest.update(f"{key} {array.dtype.str} {array.shape}\n".encode())
            digest.update(array.tobytes())
        for key in sorted(f.attrs):
            digest.update(f"{key}={f.attrs[key]}\n".encode())
    return digest.hexdigest()


def _installed_versions() -> dict[str, str]:
    from importlib.metadata import version

    import h5py

    versions = {name: version(name) for name in ("mujoco", "gymnasium", "numpy", "h5py")}
    return {**versions, "HDF5": h5py.version.hdf5_version}


def _version_note() -> str:
    """Which of :data:`TAKEN_WITH` differ here, the likely cause of a mismatch."""
    installed = _installed_versions()
    changed = [
        f"{name} {installed[name]} (digests: {taken})"
        for name, taken in TAKEN_WITH.items()
        if installed[name] != taken
    ]
    return f"differing versions: {', '.join(changed)}" if changed else "the versions are the digests' own"


def verify(path: Path, recipe: Recipe) -> str:
    """Check ``path`` against the recipe's digests; returns how it matched.

    The file digest matching is the promise kept. With only the content digest matching, the
    transitions are the recipe's bit for bit and only the hdf5 encoding differs, which changes no
    result: accepted, and said so. Otherwise a DMMError names both digests and the versions that
    differ from :data:`TAKEN_WITH`; the file is kept for inspection.
    """
    actual = file_sha256(path)
    if actual == recipe.sha256:
        return f"sha256 {actual} matches the recipe"
    if content_sha256(path) == recipe.content_sha256:
        return (
            f"the transitions match the recipe's content digest; the file's sha256 {actual} differs "
            f"from the recipe's {recipe.sha256} in the hdf5 encoding only ({_version_note()})"
        )
    raise DMMError(
        f"{path} (kept for inspection) is not {recipe.name}: sha256 {actual}, the recipe says "
        f"{recipe.sha256}, and the transitions differ too ({_version_note()})"
    )


def collect_recipe(
    recipe: Recipe, policies: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True
) -> Path:
    """Collect ``recipe`` into ``out_dir/<name>.hdf5`` (unverified); returns the file."""
    from dmm.trainer.collect import collect

    policies, out_dir = Path(policies), Path(out_dir)
    if not policies.is_dir():
        raise ConfigError(f"--policies must be the folder of the reference policies, got {policies}")
    if not out_dir.is_dir():
        raise ConfigError(f"with --recipe, --out must be an existing folder, got {out_dir}")
    return collect(
        recipe.env_id,
        policies / recipe.policy,
        recipe.transitions,
        out_dir / f"{recipe.name}.hdf5",
        seed=recipe.seed,
        progress=progress,
    )


def build(name: str, policies: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Build dataset ``name`` from its recipe into ``out_dir`` and verify it, saying what it does
    and how long it takes (minutes: the user should know before waiting)."""
    chosen = recipe_of(name)
    print(
        f"building {chosen.name}: {chosen.transitions:,} transitions of {chosen.env_id} sampled from "
        f"{chosen.policy}, seed {chosen.seed} (about {chosen.minutes} minutes on a 2-core CPU)",
        flush=True,
    )
    start = time.monotonic()
    path = collect_recipe(chosen, policies, out_dir, progress)
    elapsed = time.monotonic() - start
    outcome = verify(path, chosen)
    print(f"wrote {path} in {elapsed / 60:.1f} minutes; {outcome}")
    return path
