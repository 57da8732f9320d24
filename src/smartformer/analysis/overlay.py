"""PNG overlays of a 3D map on a CT: axial, coronal and sagittal slices through the map's maximum."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["save_overlay_png", "save_figure"]


def _slices(volume: np.ndarray, centre: tuple[int, int, int]) -> list[tuple[str, np.ndarray, tuple[int, ...]]]:
    """Axial (fixed z), coronal (fixed y), sagittal (fixed x) of a RAS-ordered (x, y, z) array."""
    x, y, z = centre
    return [("axial", volume[:, :, z], (x, y)), ("coronal", volume[:, y, :], (x, z)), ("sagittal", volume[x, :, :], (y, z))]


def save_figure(fig, path: str | Path, dpi: int = 90) -> Path:
    """Lay out ``fig``, write it as a PNG at ``path`` (creating the folder) and close it.

    Closing matters: pyplot keeps every figure alive until it is closed, so a command drawing
    one figure per case would otherwise grow without bound.
    """
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_overlay_png(
    image: np.ndarray,
    heat: np.ndarray,
    path: str | Path,
    title: str = "",
    mask: np.ndarray | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    alpha: float = 0.45,
) -> Path:
    """Write three orthogonal slices of ``image`` with ``heat`` on top (and ``mask`` as a contour).

    Args:
        image: (X, Y, Z) intensities in RAS voxel order (any range; shown in grey, 1st-99th percentile).
        heat: (X, Y, Z) map on the same grid; slices go through its maximum.
        mask: optional (X, Y, Z) binary mask drawn as a contour (e.g. the tumour).
        spacing: voxel size, used for the aspect ratio.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image.shape != heat.shape or (mask is not None and mask.shape != image.shape):
        raise ValueError(f"image {image.shape}, heat {heat.shape} and mask must share a grid")
    centre = tuple(int(i) for i in np.unravel_index(int(np.argmax(heat)), heat.shape))
    lo, hi = np.percentile(image, [1, 99])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    mask_slices = _slices(mask, centre) if mask is not None else [None] * 3
    for ax, (name, img2d, point), (_, heat2d, _), m, aspect in zip(
        axes, _slices(image, centre), _slices(heat, centre), mask_slices, aspects
    ):
        ax.imshow(img2d.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        ax.imshow(heat2d.T, cmap="jet", origin="lower", alpha=alpha, aspect=aspect,
                  vmin=float(heat.min()), vmax=float(heat.max()) or 1.0)
        if m is not None and m[1].any():
            ax.contour(m[1].T.astype(float), levels=[0.5], colors="lime", linewidths=1.2, origin="lower")
        ax.plot(*point, marker="+", color="white", markersize=10)
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=90)
