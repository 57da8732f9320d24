"""Names derived from image paths, and the names that mark label maps (a module without heavy imports)."""

from __future__ import annotations

from pathlib import Path

from smartformer.data.suffixes import IMAGE_SUFFIXES
from smartformer.errors import InputError

__all__ = ["DEFAULT_EXCLUDE", "output_names", "volume_stem"]

#: Name patterns (shell-style, case-insensitive) that mark label maps rather than CT images in
#: folder sources. They are matched against the volume's own name only (a file name without its
#: image suffix, or the name of a DICOM folder), never against the folders above it, so
#: ``case_0/labels.nii.gz``, ``STS_001/tumor.nii.gz``, ``ts/organs.nii.gz``, ``x/ct_mask.nrrd``
#: and ``x/seg.mha`` are skipped while ``organs/ts_example/ct.nii.gz`` is listed. For layouts
#: that keep labels in a separate tree under image-like names (nnU-Net ``labelsTr/``), point
#: the source at the image tree or use a JSON datalist.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    "*label*",
    "*mask*",
    "*seg*",
    "*tumor*",
    "*tumour*",
    "*organs*",
    "*gtv*",
)


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
