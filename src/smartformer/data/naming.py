"""Names derived from image paths (a module without heavy imports)."""

from __future__ import annotations

from pathlib import Path

from smartformer.data.suffixes import IMAGE_SUFFIXES

__all__ = ["volume_stem"]


def volume_stem(path: Path) -> str:
    """Output file stem for an image path: the file name without its image suffix, or the folder name."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
