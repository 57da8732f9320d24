"""Downstream cases: a CSV of CT scans with labels and lesion locations, and the crops fed to the encoder.

The CSV has one row per case (a lesion, or a whole scan), in the convention of every case list
(:mod:`smartformer.data.cases`: paths, ``case``, ``patient``, ``mask``), with a class and a location:

* ``image`` (required): a CT file or DICOM folder; relative paths resolve against the CSV's folder.
* ``label``: the class, two distinct values (0/1 or any strings). The sorted unique values are mapped
  to 0 and 1 (numbers sorted as numbers), and the mapping is recorded in the outputs.
* ``center_x``, ``center_y``, ``center_z``: the lesion centre in world millimetres, RAS, as the affine of
  :func:`smartformer.data.io.read_ct` gives it; or ``mask``: a mask file whose voxels > 0 have the
  lesion centre as their centroid (the centre columns win where a row has both). A row with neither
  is cropped as a whole scan (scan-level labels, e.g. treatment response).
* ``patient``: groups rows for patient-level splits and bootstrap (default: one patient per row).
* ``case``: the case id (default: the image file name without suffix, with its folder when two
  images share a name, with ``_r<row>`` when one image holds several lesions).

Every other column is ignored. :func:`read_cases` checks the whole file (columns, values, that every
file exists) before anything is computed, so bad input never leaves partial outputs behind.

:func:`build_crops` turns cases into encoder inputs with MONAI transforms: reorient to RAS, resample to
the requested spacing, window the HU to [0, 1], then a box of ``crop`` voxels centred on the lesion
(padded with 0, i.e. the lower window bound, at the scan's border), or, without a location, the body
(voxels above -500 HU) resized to fit the crop and padded to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from monai.transforms import (
    BorderPad,
    CropForeground,
    Orientation,
    Resize,
    ScaleIntensityRange,
    Spacing,
    SpatialCrop,
    SpatialPad,
)
from tqdm.auto import tqdm

from smartformer.data.cases import Case, cases_from_table, read_table, require_columns
from smartformer.data.io import read_ct
from smartformer.data.transforms import BodySelect
from smartformer.errors import InputError, SmartformerError
from smartformer.models.sizes import check_input_size

if TYPE_CHECKING:
    import pandas as pd
    from monai.data import MetaTensor

CENTER_COLUMNS: tuple[str, str, str] = ("center_x", "center_y", "center_z")
#: Columns written through to feature tables when present.
PASSTHROUGH_COLUMNS: tuple[str, ...] = ("label", "patient")


@dataclass(frozen=True)
class LabelledCase(Case):
    """One row of a downstream CSV, checked and resolved: a :class:`~smartformer.data.cases.Case`
    (whose ``mask``, voxels > 0, locates the lesion where the row has no centre) with a class and a centre."""

    label: int | None = None
    """0 or 1 after mapping (see :attr:`CaseTable.classes`); None where the CSV has no labels."""
    raw_label: str | None = None
    """The label as written in the CSV."""
    center_mm: tuple[float, float, float] | None = None
    """Lesion centre in world RAS mm, from the CSV's centre columns."""

    @property
    def located(self) -> bool:
        """True for a lesion crop, False for a whole-scan crop."""
        return self.center_mm is not None or self.mask is not None


@dataclass
class CaseTable:
    """The cases of a CSV and the label mapping (``classes[i]`` is the CSV value mapped to ``i``)."""

    path: Path
    cases: list[LabelledCase]
    classes: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    """The CSV's column names."""

    @property
    def labels(self) -> np.ndarray:
        """(N,) int array of 0/1 labels (only for a labelled table)."""
        return np.asarray([c.label for c in self.cases], dtype=np.int64)

    @property
    def patients(self) -> np.ndarray:
        """(N,) array of patient ids."""
        return np.asarray([c.patient for c in self.cases], dtype=object)

    @property
    def ids(self) -> list[str]:
        """Case ids in CSV order."""
        return [c.case for c in self.cases]

    def class_mapping(self) -> dict[str, int]:
        """CSV label value -> 0/1, for the outputs."""
        return {name: i for i, name in enumerate(self.classes)}


@dataclass(frozen=True)
class CropOptions:
    """How a case becomes an encoder input: crop size (voxels), voxel spacing (mm) and HU window."""

    size: tuple[int, int, int] = (64, 64, 64)
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0)
    window: tuple[float, float] = (-1000.0, 1000.0)

    def __post_init__(self) -> None:
        if len(self.size) != 3:
            raise SmartformerError(f"crop size {self.size}: need three sides (voxels)")
        check_input_size(self.size, "crop size")
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            raise SmartformerError(f"crop spacing {self.spacing}: need three positive values (mm)")
        if not self.window[0] < self.window[1]:
            raise SmartformerError(f"window {self.window}: the lower bound must be below the upper bound")

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready settings, for metrics.json and feature tables."""
        return {"crop": list(self.size), "spacing": list(self.spacing), "window": list(self.window)}


def read_cases(path: str | Path, require_labels: bool = True) -> CaseTable:
    """Read and check a downstream CSV (see the module docstring for its columns).

    The CSV is read as every case list is (:mod:`smartformer.data.cases`: image and mask paths, case
    ids, patients); the classes and lesion centres are checked here.

    Args:
        path: the CSV file.
        require_labels: refuse a CSV without a ``label`` column or with other than two classes
            (probe, finetune); without it labels are read when present (features).

    Raises:
        InputError: naming the CSV (and the row) for a missing column, an empty or malformed value,
            a missing image or mask file, duplicate case ids, or a label count other than two.
    """
    path = Path(path)
    table = read_table(path)
    columns = list(table.columns)
    require_columns(path, table, ["image"] + (["label"] if require_labels else []))
    present_centre = [c for c in CENTER_COLUMNS if c in columns]
    if present_centre and len(present_centre) != 3:
        raise InputError(path, f"has {', '.join(present_centre)} but needs all of {', '.join(CENTER_COLUMNS)}")
    has_labels = "label" in columns
    classes = _classes(path, table["label"]) if has_labels else []
    if require_labels and len(classes) != 2:
        shown = ", ".join(repr(c) for c in classes)
        raise InputError(path, f"label needs exactly two classes, found {len(classes)} ({shown})")
    cases: list[LabelledCase] = []
    for case in cases_from_table(path, table, need_mask=False):
        centre = _centre(path, case.row, case.fields) if present_centre else None  # type: ignore[arg-type]
        raw = case.fields["label"] if has_labels else None
        cases.append(
            LabelledCase(
                case=case.case,
                image=case.image,
                patient=case.patient,
                row=case.row,
                label=classes.index(raw) if raw is not None else None,
                raw_label=raw,
                center_mm=centre,
                mask=case.mask if centre is None else None,
                kind=case.kind if centre is None else None,
                fields=case.fields,
            )
        )
    return CaseTable(path=path, cases=cases, classes=classes, columns=columns)


def _classes(path: Path, column: pd.Series) -> list[str]:
    """The sorted distinct labels (as numbers when all are numbers); refuses empty cells."""
    values = [(row, str(v).strip()) for row, v in enumerate(column, start=2)]
    empty = [row for row, v in values if not v]
    if empty:
        raise InputError(path, f"row {empty[0]}: empty label")
    distinct = sorted({v for _, v in values})
    try:
        return sorted(distinct, key=float)
    except ValueError:
        return distinct


def _centre(csv: Path, row: int, record: Mapping[str, str]) -> tuple[float, float, float] | None:
    """The row's centre in mm, None when all three cells are empty; refuses partial or non-numeric ones."""
    cells = [str(record[c]).strip() for c in CENTER_COLUMNS]
    if not any(cells):
        return None
    try:
        values = tuple(float(c) for c in cells)
    except ValueError:
        raise InputError(csv, f"row {row}: center_x/y/z must be three numbers (mm), got {cells}") from None
    if not all(math.isfinite(v) for v in values):
        raise InputError(csv, f"row {row}: center_x/y/z must be finite, got {cells}")
    return values  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- crops


def prepare_volume(image: Path, options: CropOptions, whole_scan: bool = False) -> MetaTensor:
    """A CT as the encoder sees it: RAS, resampled to ``options.spacing``, HU windowed to [0, 1].

    ``whole_scan`` first crops to the body (voxels above -500 HU, as for pretraining), so that a scan
    fitted into the crop is mostly patient, not air.
    """
    volume = Orientation(axcodes="RAS", labels=None)(read_ct(image))
    if whole_scan:
        volume = CropForeground(select_fn=BodySelect(), allow_smaller=True)(volume)
    volume = Spacing(pixdim=options.spacing, mode="bilinear", dtype=np.float32)(volume)
    lo, hi = options.window
    return ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(volume)


def mask_centre_mm(mask: Path) -> tuple[float, float, float]:
    """World RAS mm of the centroid of a mask's voxels > 0 (on the mask's own grid)."""
    volume = read_ct(mask)
    voxels = np.argwhere(volume.as_tensor()[0].numpy() > 0)
    if not len(voxels):
        raise InputError(mask, "the mask is empty (no voxel > 0); cannot locate the lesion")
    centroid = np.append(voxels.mean(axis=0), 1.0)
    world = np.asarray(volume.affine, dtype=np.float64) @ centroid
    return float(world[0]), float(world[1]), float(world[2])


def lesion_crop(volume: MetaTensor, centre_mm: Sequence[float], size: Sequence[int], where: Path) -> np.ndarray:
    """The box of ``size`` voxels centred on ``centre_mm`` in a prepared volume, padded with 0 at its border.

    Raises:
        InputError: (naming ``where``) the centre lies outside the scan.
    """
    affine = np.asarray(volume.affine, dtype=np.float64)
    voxel = (np.linalg.inv(affine) @ np.append(np.asarray(centre_mm, dtype=np.float64), 1.0))[:3]
    shape = np.asarray(volume.shape[1:])
    if np.any(voxel < -0.5) or np.any(voxel > shape - 0.5):
        mm = ", ".join(f"{c:g}" for c in centre_mm)
        raise InputError(where, f"lesion centre ({mm}) mm lies outside the scan")
    half = [int(s) // 2 for s in size]
    padded = BorderPad(spatial_border=half, mode="constant", value=0.0)(volume)
    start = [int(round(v)) + h - s // 2 for v, h, s in zip(voxel, half, size)]  # padded index of the box's corner
    crop = SpatialCrop(roi_start=start, roi_end=[a + int(s) for a, s in zip(start, size)])(padded)
    return np.asarray(crop.as_tensor().numpy(), dtype=np.float32)


def whole_scan_crop(volume: MetaTensor, size: Sequence[int]) -> np.ndarray:
    """A prepared (body-cropped) volume scaled by one factor to fit inside ``size``, centred and padded with 0."""
    shape = np.asarray(volume.shape[1:], dtype=np.float64)
    factor = float(np.min(np.asarray(size, dtype=np.float64) / shape))
    target = [max(1, min(int(s), int(round(n * factor)))) for n, s in zip(shape, size)]
    resized = Resize(spatial_size=target, mode="trilinear", anti_aliasing=factor < 1)(volume)
    padded = SpatialPad(spatial_size=[int(s) for s in size], value=0.0)(resized)
    return np.asarray(padded.as_tensor().numpy(), dtype=np.float32)


def build_crops(table: CaseTable, options: CropOptions, progress: bool = True) -> np.ndarray:
    """Every case's encoder input, computed once per run: (N, 1, *options.size) float16.

    Cases sharing an image reuse its prepared volume (one resampling per scan). Stored as float16 to
    halve the memory of a large cohort (values in [0, 1]; models get float32 batches).

    Raises:
        InputError: an unreadable image or mask, an empty mask, or a lesion centre outside its scan.
    """
    crops = np.zeros((len(table.cases), 1, *options.size), dtype=np.float16)
    order = sorted(range(len(table.cases)), key=lambda i: (str(table.cases[i].image), table.cases[i].located))
    cached: tuple[tuple[Path, bool], MetaTensor] | None = None
    for i in tqdm(order, desc="crops", unit="case", disable=not progress):
        case = table.cases[i]
        key = (case.image, not case.located)
        if cached is None or cached[0] != key:
            cached = (key, prepare_volume(case.image, options, whole_scan=not case.located))
        volume = cached[1]
        if case.located:
            centre = case.center_mm if case.center_mm is not None else mask_centre_mm(case.mask)  # type: ignore[arg-type]
            where = table.path if case.center_mm is not None else case.mask
            try:
                crops[i] = lesion_crop(volume, centre, options.size, where)  # type: ignore[arg-type]
            except InputError as exc:
                raise InputError(exc.path, f"row {case.row} ({case.image.name}): {exc.reason}") from None
        else:
            crops[i] = whole_scan_crop(volume, options.size)
    return crops
