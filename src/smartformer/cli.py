"""The ``smartformer`` command line: one subcommand per job.

Each command lives in :mod:`smartformer.commands` as a module with ``register(subparsers)``;
the parser it adds sets ``func(args) -> int``. A :class:`~smartformer.errors.SmartformerError`
(or an ``OSError``: a full disk, a missing folder) reaching this level becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from smartformer import __version__
from smartformer.errors import SmartformerError

# Top-level commands, and commands under `smartformer data ...`. A module is listed here only
# once the command it adds works end to end.
COMMANDS: list[str] = [
    "smartformer.commands.demo",
    "smartformer.commands.pretrain",
    "smartformer.commands.export",
    "smartformer.commands.attention",
    "smartformer.commands.localize",
    "smartformer.commands.cluster",
    "smartformer.commands.report",
    "smartformer.commands.features",
    "smartformer.commands.probe",
    "smartformer.commands.finetune",
    "smartformer.commands.segment",
]
DATA_COMMANDS: list[str] = ["smartformer.commands.data_check", "smartformer.commands.data_phantom",
                            "smartformer.commands.data_lidc", "smartformer.commands.data_nodulemnist3d",
                            "smartformer.commands.data_organmnist3d", "smartformer.commands.data_lesions"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartformer",
        description="Self-supervised SMART pretraining of 3D Swin transformers on CT scans.",
    )
    parser.add_argument("--version", action="version", version=f"smartformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if DATA_COMMANDS:
        data = sub.add_parser("data", help="read, check and synthesize CT data sets",
                              description="Read, check and synthesize CT data sets.")
        data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
        data.set_defaults(func=lambda args: _print_help(data))
        for name in DATA_COMMANDS:
            importlib.import_module(name).register(data_sub)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    parser.set_defaults(func=lambda args: _print_help(parser))
    return parser


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SmartformerError as exc:
        print(f"smartformer: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an input or output location the commands did not name themselves
        from smartformer.io_utils import os_reason, output_error

        message = output_error(exc.filename, exc, "cannot access") if exc.filename else os_reason(exc)
        print(f"smartformer: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smartformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
