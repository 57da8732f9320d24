"""resample_to_grid against MONAI's SpatialResample, the definition it must reproduce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from smartformer.data.resample import axis_aligned_map, resample_to_grid


def _monai(volume: torch.Tensor, src: np.ndarray, dst: np.ndarray, shape) -> torch.Tensor:
    out = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float64)(
        MetaTensor(volume.double(), affine=torch.as_tensor(src)), dst_affine=torch.as_tensor(dst), spatial_size=shape
    )
    return out.as_tensor().float()


def _affine(spacing, origin, axes=(0, 1, 2), flips=(1, 1, 1)) -> np.ndarray:
    a = np.zeros((4, 4))
    for i, (ax, f, s) in enumerate(zip(axes, flips, spacing)):
        a[ax, i] = f * s
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


CASES = {
    "upsample": (_affine((2.0, 2.0, 3.0), (0, 0, 0)), _affine((0.9, 0.8, 1.1), (-1.3, 0.4, 2.0)), (40, 31, 19)),
    "downsample_shifted": (_affine((1.0, 1.0, 1.0), (0, 0, 0)), _affine((2.5, 1.7, 3.0), (3.1, -2.0, 1.0)), (9, 11, 6)),
    "lps_flip": (
        _affine((2.0, 2.0, 2.0), (0, 0, 0)),
        _affine((0.7, 0.7, 2.5), (30.0, 28.0, -3.0), flips=(-1, -1, 1)),
        (40, 37, 12),
    ),
    "permuted": (
        _affine((2.0, 2.0, 2.0), (0, 0, 0)),
        _affine((1.5, 0.9, 1.2), (1.0, 25.0, 2.0), axes=(2, 0, 1), flips=(1, -1, 1)),
        (20, 33, 30),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_axis_aligned_grids_match_monai(name: str) -> None:
    src, dst, shape = CASES[name]
    assert axis_aligned_map(src, dst) is not None
    volume = torch.rand(3, 14, 16, 12, generator=torch.Generator().manual_seed(0))
    ours = resample_to_grid(volume, src, dst, shape)
    assert ours.shape == (3, *shape)
    ref = _monai(volume, src, dst, shape)
    assert torch.allclose(ours, ref, atol=1e-5), float((ours - ref).abs().max())
    assert (ours == 0).any() and (ours > 0).any()  # both the inside and the zero padding are exercised


def test_oblique_grid_falls_back_to_monai() -> None:
    theta = np.deg2rad(20)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    src = _affine((2.0, 2.0, 2.0), (0, 0, 0))
    dst = rot @ _affine((1.0, 1.0, 1.0), (5.0, 0.0, 0.0))
    assert axis_aligned_map(src, dst) is None
    volume = torch.rand(2, 10, 10, 10, generator=torch.Generator().manual_seed(1))
    ours = resample_to_grid(volume, src, dst, (15, 15, 15))
    assert torch.allclose(ours, _monai(volume, src, dst, (15, 15, 15)), atol=1e-5)


def test_reversed_layout_gives_the_same_volume() -> None:
    """Resampling the (C, Z, Y, X) layout on reversed affines is the same resampling, transposed."""
    from smartformer.data.resample import reverse_axes

    src, dst, shape = CASES["lps_flip"]
    volume = torch.rand(2, 14, 16, 12, generator=torch.Generator().manual_seed(2))
    direct = resample_to_grid(volume, src, dst, shape)
    reversed_ = resample_to_grid(
        volume.permute(0, 3, 2, 1).contiguous(), reverse_axes(src), reverse_axes(dst), shape[::-1]
    )
    assert torch.allclose(reversed_.permute(0, 3, 2, 1), direct, atol=1e-6)


def test_identity_axis_is_copied_exactly() -> None:
    src = _affine((2.0, 2.0, 2.0), (0, 0, 0))
    dst = _affine((1.0, 1.0, 2.0), (0, 0, 0))  # z stays on the source grid
    volume = torch.rand(1, 6, 6, 5, generator=torch.Generator().manual_seed(3))
    out = resample_to_grid(volume, src, dst, (12, 12, 5))
    assert torch.equal(out[0, ::2, ::2, :], volume[0])
    assert torch.allclose(out, _monai(volume, src, dst, (12, 12, 5)), atol=1e-5)
