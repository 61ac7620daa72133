"""Offline-RL data: D4RL hdf5, Decision-Transformer pickles and Minari datasets, returns-to-go,
context windows."""

from dmm.data.dataset import Dataset, load_dataset
from dmm.data.download import cache_path, dataset_url, default_cache_dir, fetch_dataset
from dmm.data.formats import load_hdf5, load_pickle, read_hdf5_attrs
from dmm.data.minari_datasets import MINARI_PREFIX, load_minari, minari_root
from dmm.data.sampler import EpisodeSampler, WindowBatch, WindowSampler
from dmm.data.trajectory import (
    Trajectory,
    returns_to_go,
    rewards_from_cumulative,
    split_episodes,
    state_stats,
)

__all__ = [
    "MINARI_PREFIX",
    "Dataset",
    "EpisodeSampler",
    "Trajectory",
    "WindowBatch",
    "WindowSampler",
    "cache_path",
    "dataset_url",
    "default_cache_dir",
    "fetch_dataset",
    "load_dataset",
    "load_hdf5",
    "load_minari",
    "load_pickle",
    "minari_root",
    "read_hdf5_attrs",
    "returns_to_go",
    "rewards_from_cumulative",
    "split_episodes",
    "state_stats",
]
