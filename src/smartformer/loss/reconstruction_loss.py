"""Masked-voxel reconstruction loss (SimMIM-style L1 on masked cells only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _factors(cell_grid: Sequence[int], size: Sequence[int]) -> tuple[int, int, int]:
    """Integer upsampling factor per axis from a cell grid ``(d, h, w)`` to voxels ``(D, H, W)``."""
    if len(cell_grid) != 3 or len(size) != 3:
        raise ValueError(f"expected 3-D grid and size, got {tuple(cell_grid)} and {tuple(size)}")
    for c, s in zip(cell_grid, size, strict=True):
        if c < 1 or s % c != 0:
            raise ValueError(f"voxel size {tuple(size)} is not an integer multiple of the mask grid {tuple(cell_grid)}")
    return size[0] // cell_grid[0], size[1] // cell_grid[1], size[2] // cell_grid[2]


def upsample_mask(mask: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour upsampling of a cell mask to voxels by integer factors.

    Args:
        mask: ``(B, d, h, w)`` tensor (any dtype; bool for masks, float for attention maps).
        size: target ``(D, H, W)``; each of ``D/d``, ``H/h``, ``W/w`` must be an integer.

    Returns:
        ``(B, D, H, W)`` tensor of the same dtype where each cell is repeated as a block.
    """
    if mask.dim() != 4:
        raise ValueError(f"mask must be (B, d, h, w), got shape {tuple(mask.shape)}")
    fd, fh, fw = _factors(mask.shape[1:], size)
    return mask.repeat_interleave(fd, dim=1).repeat_interleave(fh, dim=2).repeat_interleave(fw, dim=3)


def masked_l1_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute error over the voxels of masked cells (and over channels).

    ``loss = sum_{b,c,voxel in masked cells} |pred - target| / (C * #masked voxels)``, the
    average over all masked voxels of the batch. The cell mask is expanded to voxels by
    nearest-neighbour blocks (as :func:`upsample_mask`) without materializing it. Computed in
    float32. If nothing is masked the loss is an exact 0 that still carries a graph to ``pred``.

    Args:
        pred: ``(B, C, D, H, W)`` reconstruction.
        target: ``(B, C, D, H, W)`` input volume (no gradient is expected through it).
        mask: bool ``(B, d, h, w)`` cell mask, True = masked; ``D/d`` etc. must be integers.

    Returns:
        Scalar float32 loss.
    """
    if pred.dim() != 5 or pred.shape != target.shape:
        raise ValueError(
            f"pred and target must both be (B, C, D, H, W); got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != pred.shape[0]:
        raise ValueError(
            f"mask must be a bool (B, d, h, w) tensor with B={pred.shape[0]}; got {mask.dtype} {tuple(mask.shape)}"
        )
    b, c, depth, height, width = pred.shape
    d, h, w = mask.shape[1:]
    fd, fh, fw = _factors((d, h, w), (depth, height, width))
    with torch.autocast(device_type=pred.device.type, enabled=False):
        err = (pred.float() - target.float()).abs()
        # Sum |err| within each cell: (B, C, d, fd, h, fh, w, fw) -> (B, d, h, w).
        per_cell = err.reshape(b, c, d, fd, h, fh, w, fw).sum(dim=(1, 3, 5, 7))
        m = mask.to(pred.device)
        n_voxels = m.sum().float() * (c * fd * fh * fw)
        return torch.where(m, per_cell, 0.0).sum() / n_voxels.clamp(min=1.0)
