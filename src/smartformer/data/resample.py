"""Resampling a multi-channel volume from one voxel grid onto another (e.g. back onto a CT's grid).

:func:`resample_to_grid` computes what MONAI's ``SpatialResample`` (trilinear, zero padding)
computes, faster in the common case: when the two grids are axis-aligned with each other (one
is a reorientation and rescaling of the other, as after ``Orientation`` + ``Spacing``), the
trilinear weights factor into one 1-D linear interpolation per axis. Three 1-D passes touch
each output voxel a few times, instead of ``grid_sample``'s eight gathers per voxel and
channel plus a full (X, Y, Z, 3) sampling grid; for 12 attention heads on a 512 x 512 CT
that is several seconds. Oblique grids go through ``SpatialResample`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from torch import Tensor

__all__ = ["resample_to_grid", "axis_aligned_map", "reverse_axes"]


def axis_aligned_map(
    src_affine: np.ndarray, dst_affine: np.ndarray, tol: float = 1e-6
) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """How destination voxel indices map to source voxel indices, if the grids are axis-aligned.

    Returns ``(perm, scale, offset)`` such that source axis ``j`` reads destination axis
    ``perm[j]`` with ``src_j = scale[j] * dst_{perm[j]} + offset[j]``, or None when some source
    axis depends on two destination axes (oblique grids).
    """
    xform = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    linear = xform[:3, :3]
    big = np.abs(linear) > tol * max(1.0, float(np.abs(linear).max()))
    if not (big.sum(axis=1) == 1).all() or not (big.sum(axis=0) == 1).all():
        return None
    perm = [int(np.argmax(row)) for row in big]
    scale = np.array([linear[j, perm[j]] for j in range(3)])
    return perm, scale, xform[:3, 3].copy()


def _interp_axis(volume: Tensor, dim: int, coords: Tensor) -> Tensor:
    """Linear interpolation of ``volume`` along ``dim`` at fractional indices ``coords``, zero outside."""
    n = volume.shape[dim]
    lower = torch.floor(coords)
    frac = (coords - lower).to(volume.dtype)
    i0 = lower.long()
    i1 = i0 + 1
    w0 = (1 - frac) * ((i0 >= 0) & (i0 < n))
    w1 = frac * ((i1 >= 0) & (i1 < n))
    shape = [1] * volume.ndim
    shape[dim] = -1
    out = _take(volume, dim, i0.clamp(0, n - 1)).mul_(w0.view(shape))
    return out.addcmul_(_take(volume, dim, i1.clamp(0, n - 1)), w1.view(shape))


def _take(volume: Tensor, dim: int, index: Tensor) -> Tensor:
    """``volume.index_select(dim, index)``; along the last axis as a gather, 4-6x faster on CPU there."""
    if dim != volume.ndim - 1:
        return volume.index_select(dim, index)
    return torch.gather(volume, dim, index.expand(*volume.shape[:-1], index.numel()))


def resample_to_grid(
    volume: Tensor, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int]
) -> Tensor:
    """Trilinear resampling of ``volume`` (C, X, Y, Z) on ``src_affine`` onto ``dst_shape`` on ``dst_affine``.

    Equal, to float rounding, to MONAI's ``SpatialResample(mode="bilinear",
    padding_mode="zeros")``; voxels whose sample falls outside the source are 0.
    """
    dst_shape = [int(s) for s in dst_shape]
    mapping = axis_aligned_map(src_affine, dst_affine)
    if mapping is None:
        resampler = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)
        out = resampler(
            MetaTensor(volume, affine=torch.as_tensor(src_affine)),
            dst_affine=torch.as_tensor(dst_affine),
            spatial_size=dst_shape,
        )
        return out.as_tensor()
    perm, scale, offset = mapping
    out = volume.float()
    # The last (contiguous) axis first, as index_select along it is a slow per-element gather;
    # then shrinking axes before growing ones, so that the early passes work on less data.
    order = [2] + sorted(range(2), key=lambda j: dst_shape[perm[j]] / volume.shape[1 + j])
    for j in order:
        dst_axis = perm[j]
        if abs(scale[j] - 1) < 1e-9 and abs(offset[j]) < 1e-6 and dst_shape[dst_axis] == out.shape[1 + j]:
            continue  # this axis is already on the destination grid
        coords = torch.arange(dst_shape[dst_axis], dtype=torch.float64) * scale[j] + offset[j]
        out = _interp_axis(out, 1 + j, coords)
    inverse = [perm.index(k) for k in range(3)]  # the source axis feeding destination axis k
    return out.permute(0, *(1 + j for j in inverse)).contiguous()


def reverse_axes(affine: np.ndarray) -> np.ndarray:
    """The affine of the same grid with its axes in reverse order: (X, Y, Z) <-> (Z, Y, X).

    A (C, Z, Y, X) C-contiguous tensor on ``reverse_axes(A)`` is the (C, X, Y, Z) volume on ``A``
    stored in NIfTI's (Fortran) order, so resampling in that layout gives maps that are written
    without a transposing copy.
    """
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:, :3] = out[:, [2, 1, 0]]
    return out
