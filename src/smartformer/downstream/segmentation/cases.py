"""The data of segmentation: image + label map pairs, their split, and their preprocessing.

* :func:`find_cases` / :func:`split_cases`: image + label map pairs from a CSV (``image``,
  ``label``, optional ``case`` and ``patient`` columns) or from a folder of ``CASE/ct.nii.gz`` +
  ``CASE/labels.nii.gz`` (the phantom layout), and a seeded patient-level train/validation split.
* :func:`load_case`: one pair read, checked (same grid), preprocessed like the pretraining data
  (:func:`~smartformer.data.transforms.preprocess_transforms`: RAS, body crop, spacing, HU window)
  and its label ids remapped to ``1..K`` (everything else background).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartformer.errors import InputError, SmartformerError

if TYPE_CHECKING:
    import torch
    from monai.data import MetaTensor


#: File names inside each case folder of a directory data set (the phantom layout).
DEFAULT_IMAGE_NAME = "ct.nii.gz"
DEFAULT_LABEL_NAME = "labels.nii.gz"


@dataclass(frozen=True)
class SegCase:
    """One image + label map pair; ``patient`` groups cases for the split (default: the case)."""

    case: str
    image: Path
    label: Path
    patient: str


def find_cases(data: str | Path, image_name: str = DEFAULT_IMAGE_NAME,
               label_name: str = DEFAULT_LABEL_NAME) -> list[SegCase]:
    """The image/label pairs of a CSV or a case folder, with every file checked to exist.

    A CSV needs ``image`` and ``label`` columns (paths; relative ones resolve against the CSV's
    folder) and may have ``case`` (id, default: the image's folder and name) and ``patient`` (for
    the split). A folder holds one sub-folder per case with ``image_name`` and ``label_name``.

    Raises:
        InputError: naming the CSV or folder (and row) for missing columns, empty cells, missing
            files or repeated case ids; a folder with no case.
    """
    data = Path(data)
    if not data.exists():
        raise InputError(data, "does not exist")
    cases = _csv_cases(data) if data.is_file() else _folder_cases(data, image_name, label_name)
    seen: dict[str, SegCase] = {}
    for case in cases:
        if case.case in seen:
            raise InputError(data, f"case {case.case!r} appears twice ({seen[case.case].image} and {case.image})")
        seen[case.case] = case
    return cases


def _csv_cases(csv: Path) -> list[SegCase]:
    from smartformer.downstream.cases import read_table, resolve_csv_path

    table = read_table(csv)
    missing = [c for c in ("image", "label") if c not in table.columns]
    if missing:
        raise InputError(csv, f"missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")
    cases = []
    for row, record in enumerate(table.to_dict("records"), start=2):
        image, label = (resolve_csv_path(csv, row, column, str(record[column]).strip()) for column in ("image", "label"))
        case = str(record.get("case", "")).strip() or f"{image.parent.name}/{image.name}"
        cases.append(SegCase(case, image, label, str(record.get("patient", "")).strip() or case))
    return cases


def _folder_cases(folder: Path, image_name: str, label_name: str) -> list[SegCase]:
    cases = []
    for case_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        image, label = case_dir / image_name, case_dir / label_name
        if not image.exists():
            continue
        if not label.exists():
            raise InputError(label, f"does not exist (case {case_dir.name} has {image_name} but no label map)")
        cases.append(SegCase(case_dir.name, image, label, case_dir.name))
    if not cases:
        raise InputError(folder, f"holds no CASE/{image_name} + CASE/{label_name} cases (nor is it a CSV)")
    return cases


def split_cases(cases: Sequence[SegCase], val_fraction: float = 0.2,
                seed: int = 0) -> tuple[list[SegCase], list[SegCase]]:
    """Seeded patient-level ``(train, validation)`` split: ``round(fraction * patients)`` patients,
    at least one, to validation, at least one kept for training; no patient on both sides.

    Raises:
        SmartformerError: fewer than two patients, or a fraction outside (0, 1).
    """
    import numpy as np

    if not 0.0 < val_fraction < 1.0:
        raise SmartformerError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    patients = list(dict.fromkeys(c.patient for c in cases))
    if len(patients) < 2:
        raise SmartformerError(f"need cases of at least 2 patients for a train/validation split, got {len(patients)}")
    order = np.random.default_rng([seed, 7]).permutation(len(patients))
    n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
    held = {patients[i] for i in order[:n_val]}
    return [c for c in cases if c.patient not in held], [c for c in cases if c.patient in held]


def _preprocess(spacing: Sequence[float], window: str | Sequence[float], roi: Sequence[int],
                with_label: bool) -> Callable[[dict], dict]:
    """:func:`preprocess_transforms` for volumes already read by ``read_ct`` (its loader left out)."""
    from monai.transforms import Compose

    from smartformer.data.transforms import LoadCTd, preprocess_transforms

    steps = preprocess_transforms(["image"], ["label"] if with_label else [], spacing, window, roi).transforms
    if not isinstance(steps[0], LoadCTd):  # pragma: no cover - guards a change of preprocess_transforms
        raise RuntimeError("preprocess_transforms no longer starts with LoadCTd")
    return Compose(list(steps[1:]))


def _same_grid(a: "MetaTensor", b: "MetaTensor", atol: float = 1e-3) -> bool:
    import numpy as np

    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and bool(
        np.allclose(np.asarray(a.affine), np.asarray(b.affine), atol=atol))


def _grid_text(volume: "MetaTensor") -> str:
    import numpy as np

    shape = "x".join(str(int(n)) for n in volume.shape[1:])
    origin = ", ".join(f"{v:.1f}" for v in np.asarray(volume.affine)[:3, 3])
    return f"{shape} voxels, {volume.meta.get('orientation', '?')}, origin ({origin}) mm"


def check_label_grids(cases: Sequence[SegCase]) -> None:
    """Cheap header check that each label map has its image's voxel grid size.

    Catches most mismatches before anything is decoded; :func:`load_case` also compares affines.

    Raises:
        InputError: an unreadable header, or a label map of another size, naming the label file.
    """
    from smartformer.data.io import validate_volume

    for case in cases:
        image_shape = validate_volume(case.image)
        label_shape = validate_volume(case.label)
        if image_shape != label_shape:
            raise InputError(case.label, f"is on a different grid than its image {case.image} "
                                         f"({'x'.join(map(str, label_shape))} vs {'x'.join(map(str, image_shape))} voxels)")


def remap_labels(label: "torch.Tensor", label_ids: Sequence[int]) -> "torch.Tensor":
    """``label_ids[k]`` -> ``k + 1``, every other value -> 0, as uint8 (``len(label_ids) <= 255``)."""
    import torch

    values = torch.round(label)
    out = torch.zeros(label.shape, dtype=torch.uint8)
    for k, value in enumerate(label_ids, start=1):
        out[values == value] = k
    return out


def load_case(case: SegCase, spacing: Sequence[float], window: str | Sequence[float],
              roi: Sequence[int], label_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Read, check and preprocess one pair: ``{"case", "image" (1, X, Y, Z) float32, "label", "ids"}``.

    ``label`` is the raw label map (float) on the preprocessed grid when ``label_ids`` is None, else
    remapped with :func:`remap_labels`. ``ids`` are the distinct label values present.

    Raises:
        InputError: unreadable files, a label map on another grid than its image (shape or affine),
            or a label map with non-integer values.
    """
    import torch

    from smartformer.data.io import read_ct

    image, label = read_ct(case.image), read_ct(case.label)
    if not _same_grid(image, label):
        raise InputError(case.label, f"is on a different grid than its image {case.image} "
                                     f"({_grid_text(label)} vs {_grid_text(image)})")
    if not torch.equal(label.as_tensor(), torch.round(label.as_tensor())):
        raise InputError(case.label, "is not a label map (it holds non-integer values)")
    out = _preprocess(spacing, window, roi, with_label=True)({"image": image, "label": label})
    raw = out["label"].as_tensor()
    return {
        "case": case.case,
        "image": out["image"].as_tensor().float().contiguous(),
        "label": raw if label_ids is None else remap_labels(raw, label_ids),
        "ids": sorted(int(v) for v in torch.unique(torch.round(raw)).tolist()),
    }
