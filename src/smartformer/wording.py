"""Small helpers for the words of user-facing messages."""

from __future__ import annotations

__all__ = ["plural"]


def plural(n: int, noun: str, plural_form: str | None = None) -> str:
    """``"1 case"``, ``"2 cases"``: ``n`` and ``noun``, in the plural (``plural_form``, else noun + "s")
    unless ``n`` is 1."""
    return f"{n} {noun if n == 1 else (plural_form or noun + 's')}"
