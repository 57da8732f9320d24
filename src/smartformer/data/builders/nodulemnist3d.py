"""MedMNIST NoduleMNIST3D (``nodulemnist3d.npz``, ``nodulemnist3d_64.npz``) to NIfTI + CSV.

OrganMNIST3D (``organmnist3d*.npz``; 11 abdominal organs from LiTS CTs, the set of the SMART
paper's organ clustering) is the same format with labels 0-10 (:data:`ORGAN_CLASSES`):
:func:`build_medmnist3d` with ``classes=ORGAN_CLASSES`` and ``name="organmnist3d"`` builds it, and
writes ``labels.json`` (id -> organ) beside the CSV.

The ``.npz`` file holds ``{train,val,test}_images`` (uint8, ``(N, S, S, S)``, S = 28 or 64: LIDC
nodule crops resampled to 1 mm voxels) and ``{train,val,test}_labels`` (``(N, 1)``, 0 benign,
1 malignant). Each volume becomes ``images/<split>_<index>.nii.gz`` (int16) and one row of
``nodulemnist3d.csv``: ``image`` (relative to the CSV's folder), ``label``, ``patient`` (MedMNIST
has no patient ids: the sample id ``<split>_<index>``, so patient-level splits reduce to sample
splits; keep the ``split`` column to reproduce the official split), ``split``, ``index``.

Intensities: the MedMNIST files store 0..255 with no record of the original HU window. They
are mapped linearly onto ``hu_range`` (default -1000..400 HU, a lung window: 0 is air,
255 is dense tissue), ``HU = low + value / 255 * (high - low)``, so that the downstream
``--window`` (in HU) acts on plausible values; the absolute HU of a voxel is therefore an
approximation. Voxels are 1 mm, the affine is the identity shifted so that the world origin
lies at the volume centre, and the array axes are stored as they are in the file.
"""

from __future__ import annotations

import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from smartformer.data.builders import prepare_out_dir, write_csv_atomic
from smartformer.data.io import write_nifti
from smartformer.errors import InputError, SmartformerError

SPLITS: tuple[str, ...] = ("train", "val", "test")
COLUMNS: tuple[str, ...] = ("image", "label", "patient", "split", "index")
DEFAULT_HU_RANGE: tuple[float, float] = (-1000.0, 400.0)
SPACING_MM = 1.0
NODULE_CLASSES: tuple[str, ...] = ("benign", "malignant")
#: OrganMNIST3D's label ids, in MedMNIST's order.
ORGAN_CLASSES: tuple[str, ...] = (
    "liver",
    "kidney-right",
    "kidney-left",
    "femur-right",
    "femur-left",
    "bladder",
    "heart",
    "lung-right",
    "lung-left",
    "spleen",
    "pancreas",
)


def load_npz(path: str | Path, classes: Sequence[str] = NODULE_CLASSES) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images (N, S, S, S) uint8, labels (N,) int64)}``, every array read and checked;
    labels must lie in ``0 .. len(classes) - 1``.

    Raises:
        InputError: the file is missing, not an npz, truncated, lacks a key, or holds arrays of
            the wrong dtype or shape (one line naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(path, f"not a readable .npz file ({_one_line(exc)})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(
            path, "holds a single array, not the MedMNIST .npz archive of train/val/test images and labels"
        )
    with archive:
        keys = set(archive.files)
        wanted = [f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")]
        missing = [key for key in wanted if key not in keys]
        if missing:
            raise InputError(
                path, f"is not a MedMNIST 3D file: no {', '.join(missing)} (keys: {', '.join(sorted(keys)) or 'none'})"
            )
        data = {}
        size = None
        for split in SPLITS:
            images, labels = (_read(archive, path, f"{split}_{kind}") for kind in ("images", "labels"))
            size = _check_split(path, split, images, labels, size, classes)
            data[split] = (images, labels.reshape(-1).astype(np.int64))
    return data


def _read(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(path, f"array {key!r} cannot be read, file truncated or corrupt ({_one_line(exc)})") from None


def _check_split(
    path: Path, split: str, images: np.ndarray, labels: np.ndarray, size: int | None, classes: Sequence[str]
) -> int:
    if images.dtype != np.uint8 or images.ndim != 4 or len(set(images.shape[1:])) != 1:
        raise InputError(path, f"{split}_images must be uint8 (N, S, S, S), got {images.dtype} {images.shape}")
    if size is not None and images.shape[1] != size:
        raise InputError(path, f"{split}_images are {images.shape[1]}^3, other splits {size}^3")
    if labels.shape not in ((len(images), 1), (len(images),)):
        raise InputError(
            path, f"{split}_labels has shape {labels.shape}, expected ({len(images)}, 1) for {len(images)} images"
        )
    allowed = np.arange(len(classes))
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or not np.isin(labels, allowed).all()):
        what = "0/1" if len(classes) == 2 else f"0-{len(classes) - 1}"
        raise InputError(
            path,
            f"{split}_labels must be {what} integers ({'/'.join(classes)}), got "
            f"{labels.dtype} values {np.unique(labels)[:5].tolist()}",
        )
    return int(images.shape[1])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def to_hu(images: np.ndarray, hu_range: Sequence[float] = DEFAULT_HU_RANGE) -> np.ndarray:
    """uint8 MedMNIST intensities mapped linearly onto ``hu_range`` (int16, rounded)."""
    low, high = (float(v) for v in hu_range)
    return np.rint(low + images.astype(np.float32) / 255.0 * (high - low)).astype(np.int16)


def centred_affine(size: int, spacing: float = SPACING_MM) -> np.ndarray:
    """Axis-aligned RAS affine of a ``size``^3 grid with the world origin at its centre."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2.0 * spacing
    return affine


def build_nodulemnist3d(
    npz: str | Path, out: str | Path, hu_range: Sequence[float] = DEFAULT_HU_RANGE, progress: bool = True
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write every volume of ``npz`` under ``out/images`` and the table ``out/nodulemnist3d.csv``
    (:func:`build_medmnist3d` for NoduleMNIST3D)."""
    return build_medmnist3d(npz, out, hu_range, progress)


def build_medmnist3d(
    npz: str | Path,
    out: str | Path,
    hu_range: Sequence[float] = DEFAULT_HU_RANGE,
    progress: bool = True,
    name: str = "nodulemnist3d",
    classes: Sequence[str] = NODULE_CLASSES,
) -> tuple[Path, dict[str, np.ndarray]]:
    """Write every volume of ``npz`` under ``out/images`` and the table ``out/<name>.csv`` (with
    more than two classes also ``out/labels.json``, id -> class name).

    Returns the CSV path and the labels per split. The file is read and checked in full before
    anything is written.

    Raises:
        InputError: a bad ``npz`` or output folder. SmartformerError: a bad ``hu_range``.
    """
    low, high = (float(v) for v in hu_range)
    if not np.isfinite([low, high]).all() or high <= low:
        raise SmartformerError(f"HU range: the low end must be below the high end, got {low:g} {high:g}")
    data = load_npz(npz, classes)

    out = prepare_out_dir(out)
    rows: list[dict[str, Any]] = []
    total = sum(len(images) for images, _ in data.values())
    with tqdm(total=total, desc=name, unit="vol", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for split, (images, labels) in data.items():
            affine = centred_affine(images.shape[1])
            for index, (volume, label) in enumerate(zip(to_hu(images, (low, high)), labels)):
                sample = f"{split}_{index:05d}"
                write_nifti(volume, affine, out / "images" / f"{sample}.nii.gz")
                rows.append(
                    {
                        "image": f"images/{sample}.nii.gz",
                        "label": int(label),
                        "patient": sample,
                        "split": split,
                        "index": index,
                    }
                )
                bar.update()
    if len(classes) > 2:
        (out / "labels.json").write_text(json.dumps({str(i): c for i, c in enumerate(classes)}, indent=2) + "\n")
    path = write_csv_atomic(out / f"{name}.csv", rows, COLUMNS)
    return path, {split: labels for split, (_, labels) in data.items()}
