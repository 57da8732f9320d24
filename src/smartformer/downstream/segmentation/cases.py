"""The data of segmentation: image + label map pairs, their split, and their preprocessing.

The pairs are :class:`~smartformer.data.cases.Case` records (the image and its label map in
``mask``) from :func:`smartformer.data.cases.find_cases` with ``prefer="labels"``: a CSV with
``image`` and ``label`` (or ``mask``) columns, or a folder of case folders such as the phantoms'
``CASE/ct.nii.gz`` + ``CASE/labels.nii.gz``.

* :func:`split_cases`: a seeded patient-level train/validation split.
* :func:`load_case`: one pair read, checked (same grid), preprocessed like the pretraining data
  (:func:`~smartformer.data.transforms.preprocess_transforms`: RAS, body crop, spacing, HU window)
  and its label ids remapped to ``1..K`` (everything else background).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import Compose

from smartformer.data.cases import Case
from smartformer.data.io import read_ct, validate_volume
from smartformer.data.transforms import LoadCTd, preprocess_transforms
from smartformer.errors import InputError, SmartformerError

if TYPE_CHECKING:
    from monai.data import MetaTensor


def split_cases(cases: Sequence[Case], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Seeded patient-level ``(train, validation)`` split: ``round(fraction * patients)`` patients,
    at least one, to validation, at least one kept for training; no patient on both sides.

    Raises:
        SmartformerError: fewer than two patients, or a fraction outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise SmartformerError(f"the validation fraction must be in (0, 1), got {val_fraction}")
    patients = list(dict.fromkeys(c.patient for c in cases))
    if len(patients) < 2:
        raise SmartformerError(f"need cases of at least 2 patients for a train/validation split, got {len(patients)}")
    order = np.random.default_rng([seed, 7]).permutation(len(patients))
    n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
    held = {patients[i] for i in order[:n_val]}
    return [c for c in cases if c.patient not in held], [c for c in cases if c.patient in held]


def _preprocess(
    spacing: Sequence[float], window: str | Sequence[float], roi: Sequence[int], with_label: bool
) -> Callable[[dict], dict]:
    """:func:`preprocess_transforms` for volumes already read by ``read_ct`` (its loader left out)."""
    steps = preprocess_transforms(["image"], ["label"] if with_label else [], spacing, window, roi).transforms
    if not isinstance(steps[0], LoadCTd):  # pragma: no cover - guards a change of preprocess_transforms
        raise RuntimeError("preprocess_transforms no longer starts with LoadCTd")
    return Compose(list(steps[1:]))


def _same_grid(a: MetaTensor, b: MetaTensor, atol: float = 1e-3) -> bool:
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and bool(
        np.allclose(np.asarray(a.affine), np.asarray(b.affine), atol=atol)
    )


def _grid_text(volume: MetaTensor) -> str:
    shape = "x".join(str(int(n)) for n in volume.shape[1:])
    origin = ", ".join(f"{v:.1f}" for v in np.asarray(volume.affine)[:3, 3])
    return f"{shape} voxels, {volume.meta.get('orientation', '?')}, origin ({origin}) mm"


def check_label_grids(cases: Sequence[Case]) -> None:
    """Cheap header check that each label map has its image's voxel grid size.

    Catches most mismatches before anything is decoded; :func:`load_case` also compares affines.

    Raises:
        InputError: an unreadable header, or a label map of another size, naming the label file.
    """
    for case in cases:
        image_shape = validate_volume(case.image)
        label_shape = validate_volume(case.mask)
        if image_shape != label_shape:
            raise InputError(
                case.mask,
                f"is on a different grid than its image {case.image} "
                f"({'x'.join(map(str, label_shape))} vs {'x'.join(map(str, image_shape))} voxels)",
            )


def remap_labels(label: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """``label_ids[k]`` -> ``k + 1``, every other value -> 0, as uint8 (``len(label_ids) <= 255``)."""
    values = torch.round(label)
    out = torch.zeros(label.shape, dtype=torch.uint8)
    for k, value in enumerate(label_ids, start=1):
        out[values == value] = k
    return out


def load_case(
    case: Case,
    spacing: Sequence[float],
    window: str | Sequence[float],
    roi: Sequence[int],
    label_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Read, check and preprocess one pair: ``{"case", "image" (1, X, Y, Z) float32, "label", "ids"}``.

    ``label`` is the raw label map (float) on the preprocessed grid when ``label_ids`` is None, else
    remapped with :func:`remap_labels`. ``ids`` are the distinct label values present.

    Raises:
        InputError: unreadable files, a label map on another grid than its image (shape or affine),
            or a label map with non-integer values.
    """
    image, label = read_ct(case.image), read_ct(case.mask)
    if not _same_grid(image, label):
        raise InputError(
            case.mask,
            f"is on a different grid than its image {case.image} ({_grid_text(label)} vs {_grid_text(image)})",
        )
    if not torch.equal(label.as_tensor(), torch.round(label.as_tensor())):
        raise InputError(case.mask, "is not a label map (it holds non-integer values)")
    out = _preprocess(spacing, window, roi, with_label=True)({"image": image, "label": label})
    raw = out["label"].as_tensor()
    return {
        "case": case.case,
        "image": out["image"].as_tensor().float().contiguous(),
        "label": raw if label_ids is None else remap_labels(raw, label_ids),
        "ids": sorted(int(v) for v in torch.unique(torch.round(raw)).tolist()),
    }
