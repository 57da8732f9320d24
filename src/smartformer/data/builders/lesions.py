"""Lesion vs. normal tissue samples from CT scans with lesion masks.

For each case (a CT and a lesion mask on the same voxel grid, found by
:func:`smartformer.data.cases.find_cases`: a CSV with ``image`` and ``mask`` columns or a folder of
case folders such as ``STS_001/ct.nii.gz`` + ``tumor.nii.gz``) this finds

* **positives** (``label`` 1, ``kind`` ``lesion``): one per connected lesion component (26-
  connectivity, components under ``min_lesion_voxels`` dropped), or only the largest one; the
  centre is the component's centroid, or, when the centroid falls outside the component (a
  crescent-shaped lesion), the component voxel nearest to it, so a positive centre always lies
  in the lesion;
* **negatives** (``label`` 0, ``kind`` ``normal``): ``negatives_per_case`` voxels drawn at random
  from body tissue (HU above ``body_hu``) at least ``min_distance_mm`` from every lesion voxel
  (Euclidean distance in mm, voxel spacing respected). The draw is seeded by ``(seed, case id)``,
  so a case gets the same negatives whatever the other cases are.

Centres are world millimetres in the RAS frame of :func:`smartformer.data.io.read_ct` and point
into the original CT: nothing is copied. Rows are written to ``lesions.csv`` with the columns of
:data:`COLUMNS`.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from tqdm import tqdm

from smartformer.data.builders import (
    CENTER_COLUMNS,
    csv_path,
    prepare_out_dir,
    voxel_to_world,
    write_csv_atomic,
)
from smartformer.data.cases import Case, find_cases
from smartformer.data.io import read_ct
from smartformer.errors import InputError, SmartformerError
from smartformer.wording import plural

COLUMNS: tuple[str, ...] = (
    "image",
    "label",
    "patient",
    *CENTER_COLUMNS,
    "kind",
    "mask",
    "component",
    "lesion_voxels",
    "distance_mm",
    "hu",
)
"""Columns of ``lesions.csv``. ``component``: the lesion component's number (1 = largest) for
positives, empty for negatives; ``lesion_voxels``: that component's size; ``distance_mm``: for
negatives, the distance to the nearest lesion voxel (empty when the case has no lesion);
``hu``: the CT value at the centre voxel."""


@dataclass
class CaseResult:
    """The rows one case gave, and what could not be had."""

    case: Case
    rows: list[dict[str, Any]] = field(default_factory=list)
    n_components: int = 0

    @property
    def n_positive(self) -> int:
        return sum(row["label"] == 1 for row in self.rows)

    @property
    def n_negative(self) -> int:
        return sum(row["label"] == 0 for row in self.rows)


@dataclass(frozen=True)
class SamplingOptions:
    """How positives and negatives are chosen (see the module docstring)."""

    negatives_per_case: int = 4
    min_distance_mm: float = 30.0
    body_hu: float = -500.0
    mask_label: int | None = None
    largest_only: bool = False
    min_lesion_voxels: int = 10
    seed: int = 0

    def check(self) -> None:
        """Raise a one-line SmartformerError for values that make no sense."""
        if self.negatives_per_case < 0:
            raise SmartformerError(
                f"{{setting}} must be >= 0, got {self.negatives_per_case}", setting="negatives_per_case"
            )
        if not np.isfinite(self.min_distance_mm) or self.min_distance_mm < 0:
            raise SmartformerError(
                f"{{setting}} must be >= 0 mm, got {self.min_distance_mm}", setting="min_distance_mm"
            )
        if self.min_lesion_voxels < 1:
            raise SmartformerError(
                f"{{setting}} must be >= 1, got {self.min_lesion_voxels}", setting="min_lesion_voxels"
            )
        if int(self.seed) != self.seed or self.seed < 0:
            raise SmartformerError(f"{{setting}} must be a whole number >= 0, got {self.seed}", setting="seed")


# --- sampling one case ------------------------------------------------------------------------


def case_seed(seed: int, patient: str) -> list[int]:
    """The seed sequence of a case's negatives: the set's seed and a checksum of its id."""
    return [int(seed), zlib.crc32(patient.encode("utf-8"))]


def load_case(case: Case, mask_label: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(HU array (X, Y, Z), boolean lesion mask, RAS affine) of a case, grids checked to match.

    Raises:
        InputError: a file cannot be read, the grids differ, or a mask with more than two
            values comes without ``mask_label``. (A mask without lesion voxels is allowed: the
            case then gives negatives only.)
    """
    image, mask_image = read_ct(case.image), read_ct(case.mask)
    ct, values = image[0].numpy(), mask_image[0].numpy()
    affine = image.affine.numpy()
    if ct.shape != values.shape:
        raise InputError(
            case.mask,
            f"grid {'x'.join(map(str, values.shape))} differs from the "
            f"CT's {'x'.join(map(str, ct.shape))} ({case.image})",
        )
    if not np.allclose(mask_image.affine.numpy(), affine, atol=1e-2):
        raise InputError(
            case.mask,
            f"voxel-to-world affine differs from the CT's ({case.image}); resample the mask onto the CT grid first",
        )
    if mask_label is None:
        present = np.unique(values)
        if present.size > 2:
            shown = ", ".join(f"{v:g}" for v in present[:8]) + (" ..." if present.size > 8 else "")
            raise InputError(
                case.mask,
                f"is a label map with {present.size} values ({shown}); pass {{setting}} with the lesion's value",
                setting="mask_label",
            )
        return ct, values > 0, affine
    return ct, values == mask_label, affine


def sample_case(case: Case, options: SamplingOptions) -> CaseResult:
    """Positive and negative rows of one case (see the module docstring)."""
    ct, lesion, affine = load_case(case, options.mask_label)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    result = CaseResult(case)
    base = {"image": str(case.image), "patient": case.patient, "mask": str(case.mask)}

    components, n = ndimage.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    order = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= options.min_lesion_voxels]
    result.n_components = len(order)
    for rank, index in enumerate(order[:1] if options.largest_only else order, start=1):
        voxel = inside_centroid(components == index, spacing)
        result.rows.append(
            {
                **base,
                **_centre(affine, voxel),
                "label": 1,
                "kind": "lesion",
                "component": rank,
                "lesion_voxels": int(sizes[index - 1]),
                "distance_mm": 0.0,
                "hu": float(ct[voxel]),
            }
        )

    rng = np.random.default_rng(case_seed(options.seed, case.patient))
    chosen, distance = _draw_negatives(ct > options.body_hu, lesion, spacing, options, rng)
    for index, voxel in enumerate(zip(*np.unravel_index(chosen, ct.shape))):
        result.rows.append(
            {
                **base,
                **_centre(affine, voxel),
                "label": 0,
                "kind": "normal",
                "component": "",
                "lesion_voxels": "",
                "distance_mm": "" if distance is None else float(distance[index]),
                "hu": float(ct[voxel]),
            }
        )
    return result


def _draw_negatives(
    body: np.ndarray,
    lesion: np.ndarray,
    spacing: np.ndarray,
    options: SamplingOptions,
    rng: np.random.Generator,
    batch: int = 4096,
    tries: int = 16,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Flat indices of up to ``negatives_per_case`` body voxels far enough from the lesion, and
    their distances (mm) to the nearest lesion voxel (None without a lesion).

    Body voxels are drawn uniformly at random (seeded) and kept, first come first kept, while
    they are at least ``min_distance_mm`` from the lesion: a uniform draw among all such voxels
    without a distance map of the whole scan. When ``tries`` batches do not give enough (such
    voxels are rare), all body voxels are visited in a random order instead, so a case gets
    fewer only if fewer exist. Distances are exact: the lesion voxel nearest to an outside point
    always lies on the lesion's boundary, so they are measured to the boundary voxels (k-d tree).
    """
    wanted = options.negatives_per_case
    flat = np.flatnonzero(body & ~lesion)
    if not lesion.any() or wanted == 0 or flat.size == 0:
        return np.sort(
            rng.choice(flat, size=min(wanted, flat.size), replace=False)
        ), None if not lesion.any() else np.zeros(0)

    box = tuple(
        slice(max(lo - 1, 0), hi + 2)
        for lo, hi in zip(np.argwhere(lesion).min(axis=0), np.argwhere(lesion).max(axis=0))
    )
    inner = lesion[box] & ~ndimage.binary_erosion(lesion[box])
    tree = cKDTree((np.argwhere(inner) + [b.start for b in box]) * spacing)

    def far(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        points = np.stack(np.unravel_index(indices, body.shape), axis=1) * spacing
        distance, _ = tree.query(points)
        keep = distance >= options.min_distance_mm
        return indices[keep], distance[keep]

    chosen: dict[int, float] = {}
    for _ in range(tries):
        indices, distance = far(flat[rng.integers(0, flat.size, size=batch)])
        for index, value in zip(indices.tolist(), distance.tolist()):
            chosen.setdefault(index, value)
        if len(chosen) >= wanted:
            break
    if len(chosen) < wanted:  # rare candidates: visit every body voxel once, in random order
        chosen = {}
        order = rng.permutation(flat)
        for start in range(0, order.size, batch * 16):
            indices, distance = far(order[start : start + batch * 16])
            chosen.update(zip(indices.tolist(), distance.tolist()))
            if len(chosen) >= wanted:
                break
    picked = sorted(list(chosen.items())[:wanted])
    return np.array([i for i, _ in picked], dtype=np.int64), np.array([d for _, d in picked])


def inside_centroid(component: np.ndarray, spacing: np.ndarray) -> tuple[int, int, int]:
    """The voxel at the component's centroid, or the component voxel nearest to it (in mm)."""
    points = np.argwhere(component)
    centroid = points.mean(axis=0)
    voxel = tuple(int(v) for v in np.rint(centroid))
    if component[voxel]:
        return voxel
    nearest = np.argmin((((points - centroid) * spacing) ** 2).sum(axis=1))
    return tuple(int(v) for v in points[nearest])


def _centre(affine: np.ndarray, voxel: Sequence[int]) -> dict[str, float]:
    return dict(zip(CENTER_COLUMNS, (float(v) for v in voxel_to_world(affine, voxel))))


# --- the whole set ----------------------------------------------------------------------------


def build_lesion_set(
    data: str | Path,
    out: str | Path,
    options: SamplingOptions = SamplingOptions(),
    image_name: str | None = None,
    mask_name: str | None = None,
    progress: bool = True,
) -> tuple[Path, list[CaseResult]]:
    """Sample every case of ``data`` and write ``out/lesions.csv``; return it and per-case results.

    Every case is read and sampled before the table is written (then atomically), so a bad case
    leaves no partial output.

    Raises:
        InputError: a bad source, case file or output folder.
        SmartformerError: bad sampling options.
    """
    options.check()
    cases = find_cases(data, image_name=image_name, mask_name=mask_name)
    out = prepare_out_dir(out)
    results = [
        sample_case(case, options)
        for case in tqdm(cases, desc="lesions", unit="case", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    ]
    rows = (
        {**row, "image": csv_path(row["image"], out), "mask": csv_path(row["mask"], out)}
        for r in results
        for row in r.rows
    )  # readers resolve relative cells against the CSV's folder
    path = write_csv_atomic(out / "lesions.csv", rows, COLUMNS)
    return path, results


def summarize(results: Sequence[CaseResult], negatives_per_case: int) -> list[str]:
    """Closing lines: counts of cases, positives and negatives, and cases that fell short."""
    n_pos = sum(r.n_positive for r in results)
    n_neg = sum(r.n_negative for r in results)
    lines = [
        f"{plural(len(results), 'case')}: {plural(n_pos, 'lesion sample')} (label 1), "
        f"{plural(n_neg, 'normal-tissue sample')} (label 0)"
    ]
    no_lesion = [r.case.patient for r in results if r.n_components == 0]
    if no_lesion:
        lines.append(f"{plural(len(no_lesion), 'case')} without a lesion component: {_ids(no_lesion)}")
    short = [r.case.patient for r in results if r.n_negative < negatives_per_case]
    if short:
        lines.append(
            f"{plural(len(short), 'case')} with fewer than {negatives_per_case} normal-tissue "
            f"voxels far enough from the lesion: {_ids(short)}"
        )
    return lines


def _ids(ids: Sequence[str], most: int = 8) -> str:
    return ", ".join(ids[:most]) + (f" (+{len(ids) - most} more)" if len(ids) > most else "")
