"""Shared test fixtures: writers of small synthetic CT files in every supported format."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _sitk_image(
    array_zyx: np.ndarray, spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]
) -> sitk.Image:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    image.SetDirection(tuple(float(d) for d in direction))
    return image


@pytest.fixture
def write_volume() -> Callable[..., Path]:
    """``write_volume(path, array_zyx, spacing, origin, direction)``: write with SimpleITK.

    ``array_zyx`` is in SimpleITK's (z, y, x) order; geometry is in ITK's LPS convention
    (``direction`` row-major, its columns the world directions of the x, y, z axes).
    """

    def write(
        path: Path,
        array_zyx: np.ndarray,
        spacing: Sequence[float],
        origin: Sequence[float],
        direction: Sequence[float] = IDENTITY,
    ) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(_sitk_image(array_zyx, spacing, origin, direction), str(path))
        return path

    return write


@pytest.fixture
def write_dicom_series() -> Callable[..., Path]:
    """``write_dicom_series(folder, array_zyx, spacing, origin, direction, series_uid, ...)``.

    Writes one CT slice file per z index with SimpleITK, setting the geometry tags (position,
    orientation, pixel spacing), instance numbers and a rescale intercept of -1024, so the
    stored values are HU + 1024. ``suffix=""`` writes files without an extension.
    """

    def write(
        folder: Path,
        array_zyx: np.ndarray,
        spacing: Sequence[float],
        origin: Sequence[float],
        direction: Sequence[float] = IDENTITY,
        series_uid: str = "1.2.826.0.1.3680043.8.498.1",
        prefix: str = "slice",
        suffix: str = ".dcm",
    ) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        volume = _sitk_image(array_zyx.astype(np.int16), spacing, origin, direction)
        cosines = np.asarray(direction).reshape(3, 3)
        orientation = (*cosines[:, 0], *cosines[:, 1])
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.KeepOriginalImageUIDOn()
        for k in range(volume.GetDepth()):
            tags = {
                "0008|0060": "CT",
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{series_uid}.{k + 1}",
                "0020|000d": "1.2.826.0.1.3680043.8.498.100",
                "0020|000e": series_uid,
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
                "0020|0037": "\\".join(f"{v:.6f}" for v in orientation),
                "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}",  # row, column spacing
                "0018|0050": f"{spacing[2]:.6f}",
                "0028|1052": "-1024",
                "0028|1053": "1",
            }
            image = volume[:, :, k]
            for tag, value in tags.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"{prefix}{k:03d}{suffix}"))
            writer.Execute(image)
        return folder

    return write


@pytest.fixture
def phantom_zyx() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """``phantom_zyx(shape_zyx)``: (CT, label) int16/uint8 arrays in (z, y, x) order.

    Air (-1000 HU) around a soft-tissue box (40 HU) holding a bright, off-centre cube (700 HU);
    the label is 1 exactly on the cube.
    """

    def make(shape_zyx: Sequence[int] = (16, 40, 30)) -> tuple[np.ndarray, np.ndarray]:
        ct = np.full(shape_zyx, -1000, dtype=np.int16)
        body = tuple(slice(n // 8, n - n // 8) for n in shape_zyx)
        cube = tuple(slice(n // 4, n // 2) for n in shape_zyx)  # off-centre: flips would show
        ct[body] = 40
        ct[cube] = 700
        label = np.zeros(shape_zyx, dtype=np.uint8)
        label[cube] = 1
        return ct, label

    return make


@pytest.fixture
def one_thread():
    """Tiny volumes: one torch thread is as fast, and immune to a busy second core."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
