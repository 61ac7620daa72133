"""Subcommands of the trainer: ``collect``, ``train`` and ``eval``."""

from __future__ import annotations

import argparse

from dmm.trainer import collect


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the trainer's subcommands to ``dmm``."""
    collect.register(subparsers)
