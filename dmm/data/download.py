"""Official D4RL dataset names -> download URL and local cache file (``~/.d4rl/datasets``)."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath

from dmm.envs import reference_table
from dmm.errors import DatasetError

CACHE_ENV_VAR = "D4RL_DATASET_DIR"
BASE_URL_ENV_VAR = "D4RL_BASE_URL"  # a mirror of D4RL's files, laid out as the official server
OFFICIAL_BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
DOWNLOAD_TIMEOUT_S = 30.0


def default_cache_dir() -> Path:
    """``$D4RL_DATASET_DIR`` if set, else ``~/.d4rl/datasets`` (the same folder D4RL itself uses)."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path("~/.d4rl/datasets").expanduser()


def dataset_url(name: str) -> str:
    """The download URL of a D4RL dataset name such as ``hopper-medium-v2``: the official one, or the
    same path under ``$D4RL_BASE_URL`` when that names a mirror."""
    entry = reference_table().get(name)
    if entry is None:
        raise DatasetError(f"{name!r} is not a D4RL dataset name; known: {', '.join(reference_table())}")
    official: str = entry["dataset_url"]
    mirror = os.environ.get(BASE_URL_ENV_VAR, "").strip()
    if not mirror:
        return official
    return mirror.rstrip("/") + official.removeprefix(OFFICIAL_BASE_URL)


def cache_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the file of a D4RL dataset lives locally: the URL's file name in the cache folder."""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return folder / PurePosixPath(dataset_url(name)).name


def download_file(url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` with a progress bar; ``dest`` appears only once complete."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
            tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None,
                unit="B",
                unit_scale=True,
                desc=dest.name,
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_dataset(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local file of a D4RL dataset, downloaded into the cache on first use.

    Raises DatasetError naming the file and the exact path to place it at when the download fails
    (for instance on a machine without internet access).
    """
    dest = cache_path(name, cache_dir)
    if dest.is_file():
        return dest
    url = dataset_url(name)
    try:
        download_file(url, dest)
    except (urllib.error.URLError, OSError, shutil.Error, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise DatasetError(
            f"cannot download {dest.name} for {name} from {url} ({reason}); download it elsewhere and "
            f"place it at {dest} (or point ${CACHE_ENV_VAR} at the folder that holds it, or "
            f"${BASE_URL_ENV_VAR} at a mirror)"
        ) from err
    return dest
