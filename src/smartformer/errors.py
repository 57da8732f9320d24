"""Exceptions that the command line turns into one clear line and a non-zero exit.

A message that tells the caller what to change speaks of the value, not of a command-line flag
that a library caller never typed: it holds ``{setting}`` where the setting goes and names it
(``setting="skip_bad", value=True``), and reads ``pass skip_bad=True to leave such files out``. The
command line shows its own option for that setting instead, ``pass --skip-bad to leave such files
out`` (:meth:`SettingMessage.for_option`, called where :mod:`smartformer.cli` catches the error).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class SettingMessage:
    """A message that may name, as ``{setting}``, the setting (a keyword argument or config key) that
    gets past it: shown as ``setting=value`` (or the bare name when ``value`` is None) until a command
    line that has an option for it shows that option (:meth:`for_option`)."""

    template: str
    setting: str | None
    value: Any

    def _name(self, template: str, setting: str | None, value: Any) -> str:
        self.template, self.setting, self.value = template, setting, value
        return self._render(None)

    def _render(self, option: str | None) -> str:
        if self.setting is None:
            return self.template
        name = option or (self.setting if self.value is None else f"{self.setting}={self.value!r}")
        return self.template.replace("{setting}", name)

    def for_option(self, option: str) -> SettingMessage:
        """Name the command line's ``option`` (e.g. ``--skip-bad``) where the message names the setting."""
        self.args = (self._render(option),)  # type: ignore[attr-defined]
        return self


class SmartformerError(SettingMessage, Exception):
    """A user-facing error: its message is printed as one line, without a traceback."""

    def __init__(self, message: str = "", *, setting: str | None = None, value: Any = None) -> None:
        super().__init__(self._name(message, setting, value))


class InputError(SmartformerError):
    """A bad input file or folder, named with the reason it was refused."""

    def __init__(self, path: str | Path, reason: str, *, setting: str | None = None, value: Any = None) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}", setting=setting, value=value)

    @property
    def reason(self) -> str:
        """The message without the path in front."""
        return str(self)[len(self.path) + 2 :]


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


class SettingWarning(SettingMessage, UserWarning):
    """A warning whose advice names a setting as :class:`SmartformerError` does (``{setting}``)."""

    def __init__(self, message: str, *, setting: str | None = None, value: Any = None) -> None:
        super().__init__(self._name(message, setting, value))
