"""CT intensity windows: the named HU presets and the ``"lo,hi"`` syntax (a module without
heavy imports: checking a configuration's window needs neither torch nor MONAI).

:mod:`smartformer.data.transforms` applies the window.
"""

from __future__ import annotations

from collections.abc import Sequence

from smartformer.errors import ConfigError

__all__ = ["WINDOWS", "parse_window"]

#: HU window presets: name -> (lower, upper) Hounsfield units mapped to 0 and 1.
WINDOWS: dict[str, tuple[float, float]] = {
    "wide": (-1000, 1000),
    "lung": (-1000, 400),
    "abdomen": (-175, 250),
}


def parse_window(spec: str | Sequence[float]) -> tuple[float, float]:
    """Turn a window preset name (see :data:`WINDOWS`), ``"lo,hi"`` or ``(lo, hi)`` into HU bounds.

    Raises:
        ConfigError: unknown preset, malformed numbers, or ``lo >= hi``.
    """
    if isinstance(spec, str):
        if spec in WINDOWS:
            lo, hi = WINDOWS[spec]
            return float(lo), float(hi)
        parts = spec.split(",")
    else:
        parts = list(spec)
    try:
        lo, hi = (float(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(
            f"window {spec!r}: give a preset ({', '.join(WINDOWS)}) or 'lo,hi' in HU, e.g. '-1000,400'"
        ) from None
    if not lo < hi:
        raise ConfigError(f"window {spec!r}: the lower bound must be below the upper bound")
    return lo, hi
