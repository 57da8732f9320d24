"""Exceptions that the command line turns into one clear line and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class SmartformerError(Exception):
    """A user-facing error: its message is printed as one line, without a traceback."""


class InputError(SmartformerError):
    """A bad input file or folder, named with the reason it was refused."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CheckpointError(InputError):
    """A checkpoint argument that names no usable network, with the reason: a path that does not
    exist, a folder without weights, an unknown ``random:`` preset, weights that do not fit their config."""


class ConfigError(SmartformerError):
    """An invalid configuration value, key or file."""


class OutputError(SmartformerError):
    """An output location that cannot be written (full disk, a file in the way, read-only), named."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
