"""Masks and label maps brought onto a CT's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from smartformer.data.io import read_ct
from smartformer.errors import InputError

__all__ = ["read_mask_on"]


def read_mask_on(path: Path, reference: MetaTensor, value: int | None = None, allow_empty: bool = False) -> np.ndarray:
    """Read a mask file as a boolean (X, Y, Z) array on the grid of ``reference`` (a :func:`read_ct` result).

    ``value`` picks one label of a label map (e.g. the phantoms' lesion id); without it every
    voxel > 0 counts. A mask on the same grid is taken as stored; any other grid is resampled by
    nearest neighbour through world coordinates (both affines are RAS). An empty result raises
    :class:`~smartformer.errors.InputError` unless ``allow_empty``.
    """
    mask = read_ct(path)
    same_grid = tuple(mask.shape[1:]) == tuple(reference.shape[1:]) and np.allclose(
        np.asarray(mask.affine), np.asarray(reference.affine), atol=1e-3
    )
    if not same_grid:
        mask = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
            mask, dst_affine=reference.affine, spatial_size=reference.shape[1:]
        )
    labels = np.asarray(mask.as_tensor()[0].numpy())
    array = np.rint(labels) == value if value is not None else labels > 0.5
    if not array.any() and not allow_empty:
        what = f"label {value}" if value is not None else "voxel > 0"
        raise InputError(path, f"the mask is empty on the CT's grid (no {what} inside the CT's field of view)")
    return array
