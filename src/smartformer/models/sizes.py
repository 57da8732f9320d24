"""The input-size rule of the Swin encoder, importable without torch (the CLI's help texts use it)."""

from __future__ import annotations

from collections.abc import Sequence

from smartformer.errors import SmartformerError

__all__ = ["SIZE_MULTIPLE", "check_input_size", "is_input_size"]

#: Divisor that every spatial side of the input must satisfy (patch 2 x four mergings): ROIs, crops
#: and windows fed to the network are multiples of it. The one place this rule is written.
SIZE_MULTIPLE = 32


def is_input_size(size: Sequence[int]) -> bool:
    """Whether every side of ``size`` is a positive multiple of :data:`SIZE_MULTIPLE`."""
    return all(int(s) >= SIZE_MULTIPLE and int(s) % SIZE_MULTIPLE == 0 for s in size)


def check_input_size(size: Sequence[int], what: str = "input size") -> tuple[int, ...]:
    """``size`` as ints if every side is a positive multiple of :data:`SIZE_MULTIPLE`.

    Raises:
        SmartformerError: naming ``what`` and its value.
    """
    if not is_input_size(size):
        raise SmartformerError(
            f"{what} {[int(s) for s in size]}: every side must be a positive multiple of "
            f"{SIZE_MULTIPLE} (the Swin encoder downsamples {SIZE_MULTIPLE}x)"
        )
    return tuple(int(s) for s in size)
