"""What the data-set builder commands (``data lidc``, ``data nodulemnist3d``, ``data lesions``) share."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_builder_parser(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str, epilog: str, writes: str
) -> argparse.ArgumentParser:
    """Add ``smartformer data NAME`` with ``--out DIR`` (``writes``: what goes in it) and
    ``--no-progress``; the caller adds its own inputs and sets ``func``."""
    parser = subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help=f"folder to write {writes} into (created if missing)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser
