"""Names derived from image paths (a module without heavy imports)."""

from __future__ import annotations

from pathlib import Path

from smartformer.data.suffixes import IMAGE_SUFFIXES
from smartformer.errors import InputError

__all__ = ["output_names", "volume_stem"]


def volume_stem(path: Path) -> str:
    """Output file stem for an image path: the file name without its image suffix, or the folder name."""
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_names(images: list[Path]) -> list[str]:
    """Output name of each image (``case_000/ct.nii.gz`` -> ``ct``), with its folder added where names repeat.

    Raises:
        InputError: two images still get the same name (the same file given twice).
    """
    stems = [volume_stem(p) for p in images]
    names = [s if stems.count(s) == 1 else f"{p.resolve().parent.name}_{s}" for p, s in zip(images, stems)]
    for i, name in enumerate(names):
        if names.count(name) > 1:
            raise InputError(images[i], f"gives the same output name {name!r} as another image")
    return names
