"""Subcommands of the client."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this application's subcommands to ``dmm``."""
