"""Where the presets shipped with the package live, and their names.

Torch-free on purpose: the command line lists the presets in ``--help``, which must not import
the models (and torch with them) just to print a sentence.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRESET_DIR", "available_presets"]

#: The folder of the built-in ``NAME.yaml`` presets.
PRESET_DIR = Path(__file__).parent / "presets"


def available_presets() -> list[str]:
    """The names of the built-in presets (``tiny``, ``base``, ...), sorted."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
