"""``dmm collect``: write a D4RL-layout hdf5 by rolling out a behaviour policy (in progress)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``dmm collect``."""
