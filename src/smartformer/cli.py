"""The ``smartformer`` command line: one subcommand per job.

Each command lives in :mod:`smartformer.commands` as a module with ``register(subparsers)``;
the parser it adds sets ``func(args) -> int``. A :class:`~smartformer.errors.SmartformerError`
(or an ``OSError``: a full disk, a missing folder) reaching this level becomes one line on
stderr and exit code 2. Where such an error, or a :class:`~smartformer.errors.SettingWarning`, names
the setting that gets past it (``skip_bad``), it names the command's option for it (``--skip-bad``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from smartformer import __version__
from smartformer.errors import SettingMessage, SettingWarning, SmartformerError

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
DATA_COMMANDS: list[str] = [
    "smartformer.commands.data_check",
    "smartformer.commands.data_phantom",
    "smartformer.commands.data_lidc",
    "smartformer.commands.data_nodulemnist3d",
    "smartformer.commands.data_organmnist3d",
    "smartformer.commands.data_lesions",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smartformer",
        description="Self-supervised SMART pretraining of 3D Swin transformers on CT scans.",
    )
    parser.add_argument("--version", action="version", version=f"smartformer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if DATA_COMMANDS:
        data = sub.add_parser(
            "data",
            help="read, check and synthesize CT data sets",
            description="Read, check and synthesize CT data sets.",
        )
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


def option_for(parser: argparse.ArgumentParser, args: argparse.Namespace, setting: str) -> str | None:
    """The option of the invoked command (and the commands above it) that sets ``setting`` (its ``dest``; of
    a config key, its last part): the long form, e.g. ``--skip-bad`` for ``skip_bad`` or ``data.skip_bad``;
    None when the command has none."""
    setting = setting.rsplit(".", 1)[-1]
    found: str | None = None
    while parser is not None:
        below = None
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                below = action.choices.get(getattr(args, action.dest, None) or "")
            elif action.dest == setting and action.option_strings:
                found = max(action.option_strings, key=len)
        parser = below
    return found


def name_option(message: Any, parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """``message`` (an error or a warning) naming the command's option where it names a setting."""
    if isinstance(message, SettingMessage) and message.setting is not None:
        option = option_for(parser, args, message.setting)
        if option is not None:
            message.for_option(option)
    return message


@contextlib.contextmanager
def _warnings_name_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Iterator[None]:
    """Show :class:`~smartformer.errors.SettingWarning` s with the command's option for their setting."""
    shown = warnings.showwarning

    def show(message: Any, category: type[Warning], *rest: Any, **kwargs: Any) -> None:
        shown(
            name_option(message, parser, args) if issubclass(category, SettingWarning) else message,
            category,
            *rest,
            **kwargs,
        )

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _warnings_name_options(parser, args):
            return int(args.func(args) or 0)
    except SmartformerError as exc:
        print(f"smartformer: error: {name_option(exc, parser, args)}", file=sys.stderr)
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
