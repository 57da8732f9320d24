"""PNG overlays of a 3D map on a CT: axial, coronal and sagittal slices through what matters.

The slices pass through the centroid of the mask when there is one (a tumour), else through the
centre of the body; the map is drawn semi-transparently over the CT inside the body only (air
keeps the CT visible), with a colourbar, the patient's orientation on every panel edge and a
legend. Panels are shown in the radiological convention (the patient's right on the left).

Figures here and in the other plotting modules are :class:`matplotlib.figure.Figure` objects made
without pyplot: no backend is chosen and no window can open (headless runs and tests need no
``matplotlib.use``), and nothing keeps a figure alive once it is written.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage

from smartformer.analysis.localization import otsu_threshold
from smartformer.data.builders.lesions import inside_centroid
from smartformer.data.transforms import BODY_HU_THRESHOLD

__all__ = ["save_overlay_png", "save_figure", "body_mask", "slice_centre", "slice_titles", "to_ras", "ras_affine"]

#: Orientation letters (left, right, bottom, top) of each panel of a RAS array drawn with
#: ``origin="lower"`` and the horizontal axis inverted in the axial and coronal panels.
_PANELS: tuple[tuple[str, tuple[str, str, str, str], bool], ...] = (
    ("axial", ("R", "L", "P", "A"), True),
    ("coronal", ("R", "L", "I", "S"), True),
    ("sagittal", ("P", "A", "I", "S"), False),
)


def _slices(volume: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial (fixed z), coronal (fixed y), sagittal (fixed x) of a RAS-ordered (x, y, z) array."""
    x, y, z = centre
    return [volume[:, :, z], volume[:, y, :], volume[x, :, :]]


def save_figure(fig: Figure, path: str | Path, dpi: int = 90, tight: bool = True) -> Path:
    """Lay out ``fig`` (unless ``tight`` is False: laid out by hand) and write it as a PNG at
    ``path`` (creating the folder).

    ``fig`` is a :class:`~matplotlib.figure.Figure` made directly, not by pyplot, which would
    keep every figure alive until closed (a command drawing one figure per case would grow
    without bound) and would pick a display backend.
    """
    if tight:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def body_mask(image: np.ndarray) -> np.ndarray:
    """The body of a CT: HU above -500 for an image in HU, else above Otsu's threshold (e.g. a
    windowed 0..1 volume); the whole image when neither leaves anything."""
    image = np.asarray(image)
    in_hu = float(image.min()) < BODY_HU_THRESHOLD
    body = image > (BODY_HU_THRESHOLD if in_hu else otsu_threshold(image))
    return body if body.any() else np.ones(image.shape, dtype=bool)


def slice_centre(
    image: np.ndarray, mask: np.ndarray | None = None, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> tuple[int, int, int]:
    """The voxel the three slices pass through: the mask's centroid when the mask has voxels,
    else the body's (:func:`body_mask`); moved to the nearest voxel of that region when the
    centroid falls outside it."""
    region = np.asarray(mask if mask is not None and mask.any() else body_mask(image), dtype=bool)
    voxel = tuple(int(round(c)) for c in ndimage.center_of_mass(region))  # no N x 3 index array for a whole body
    if region[voxel]:
        return voxel  # type: ignore[return-value]
    return inside_centroid(region, np.asarray(spacing, dtype=np.float64))


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``array`` (stored in the axis order of ``affine``) reordered and flipped to RAS, without
    resampling, and the voxel size along its new axes."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)[transform[:, 0].argsort()]
    ras = np.ascontiguousarray(nib.orientations.apply_orientation(array, transform))
    return ras, tuple(float(s) for s in spacing)  # type: ignore[return-value]


def ras_affine(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The voxel-to-world affine of an array of ``shape`` (stored as ``affine`` says) after :func:`to_ras`."""
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")
    )
    return np.asarray(affine) @ nib.orientations.inv_ornt_aff(transform, shape)


def slice_titles(centre: tuple[int, int, int], world: np.ndarray | None = None) -> list[str]:
    """Titles of the axial, coronal and sagittal panels through ``centre`` (RAS voxel order): the
    slice's world position in mm, as a viewer such as 3D Slicer shows it, when ``world`` (the RAS
    arrays' affine) is known; else the voxel index."""
    titles = []
    for name, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        if world is not None:
            where = f"{'RAS'[axis]} {float((world @ np.array([*centre, 1.0]))[axis]):.1f} mm"
        else:
            where = f"{'xyz'[axis]}={centre[axis]}"
        titles.append(f"{name} ({where})")
    return titles


def save_overlay_png(
    image: np.ndarray,
    heat: np.ndarray,
    path: str | Path,
    title: str = "",
    mask: np.ndarray | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    alpha: float = 0.45,
    affine: np.ndarray | None = None,
    heat_label: str = "attention",
    mask_label: str = "mask",
    orientation: bool | None = None,
) -> Path:
    """Write three orthogonal slices of ``image`` with ``heat`` on top (and ``mask`` as a contour).

    Args:
        image: (X, Y, Z) CT, in HU or any range (grey, 1st-99th percentile).
        heat: (X, Y, Z) map on the same grid; drawn inside the body only, its colour scale spans
            its 1st-99.5th percentile inside the body.
        mask: optional (X, Y, Z) binary mask drawn as a green contour (e.g. the tumour); the
            slices go through its centroid (else through the body's centre).
        spacing: voxel size, used for the aspect ratio (ignored when ``affine`` is given).
        affine: the arrays' voxel-to-RAS affine; when given they are reordered to RAS first, so
            the panels are true to their names and orientation letters. Without it the arrays
            must already be in RAS order.
        heat_label: the colourbar's label. ``mask_label``: the contour's legend entry.
        orientation: draw the patient's orientation letters (R/L, A/P, S/I) on the panel edges;
            default: when ``affine`` is given (arrays of unknown orientation, such as randomly
            flipped training views, get none).

    The ``+`` on each panel marks the highest value of ``heat`` inside the body on that slice.
    """
    if image.shape != heat.shape or (mask is not None and mask.shape != image.shape):
        raise ValueError(f"image {image.shape}, heat {heat.shape} and mask must share a grid")
    show_letters = affine is not None if orientation is None else orientation
    world = ras_affine(affine, image.shape) if affine is not None else None
    if affine is not None:
        image, spacing = to_ras(image, affine)
        heat = to_ras(heat, affine)[0]
        mask = to_ras(mask, affine)[0] if mask is not None else None
    body = body_mask(image)
    if mask is not None:
        body = body | mask.astype(bool)
    centre = slice_centre(image, mask, spacing)
    vmin, vmax = (float(v) for v in np.percentile(heat[body], [1, 99.5]))  # a few hot voxels do not wash it out
    vmax = vmax if vmax > vmin else vmin + 1.0
    lo, hi = np.percentile(image, [1, 99])
    fig = Figure(figsize=(13, 4.8))
    grid = fig.add_gridspec(
        1, 4, width_ratios=[1, 1, 1, 0.04], left=0.01, right=0.94, bottom=0.12, top=0.84, wspace=0.08
    )
    axes = [fig.add_subplot(grid[0, k]) for k in range(3)]
    aspects = [spacing[1] / spacing[0], spacing[2] / spacing[0], spacing[2] / spacing[1]]
    shown = None
    for k, (ax, (_name, letters, flip), aspect) in enumerate(zip(axes, _PANELS, aspects)):
        img2d, heat2d, body2d = (_slices(v, centre)[k] for v in (image, heat, body))
        ax.imshow(img2d.T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=aspect)
        shown = ax.imshow(
            np.ma.masked_where(~body2d.T, heat2d.T),
            cmap="jet",
            origin="lower",
            alpha=alpha,
            aspect=aspect,
            vmin=vmin,
            vmax=vmax,
            interpolation="bilinear",
        )
        if mask is not None:
            m = _slices(mask, centre)[k]
            if m.any():
                ax.contour(m.T.astype(float), levels=[0.5], colors="lime", linewidths=1.5, origin="lower")
        if body2d.any():
            peak = np.unravel_index(int(np.argmax(np.where(body2d, heat2d, -np.inf))), heat2d.shape)
            ax.plot(*peak, marker="+", color="white", markersize=12, markeredgewidth=2)
        if flip:
            ax.invert_xaxis()
        for (x, y, ha, va), letter in zip(
            (
                (0.01, 0.5, "left", "center"),
                (0.99, 0.5, "right", "center"),
                (0.5, 0.01, "center", "bottom"),
                (0.5, 0.99, "center", "top"),
            ),
            letters if show_letters else (),
        ):
            ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="yellow", fontsize=11, fontweight="bold")
        ax.set_title(slice_titles(centre, world)[k])
        ax.axis("off")
    fig.colorbar(shown, cax=fig.add_subplot(grid[0, 3]), label=heat_label, extend="both")
    handles = [
        Line2D(
            [],
            [],
            marker="+",
            color="black",
            linestyle="none",
            markersize=10,
            markeredgewidth=2,
            label="highest value in the body on the slice",
        )
    ]
    if mask is not None:
        handles.append(Line2D([], [], color="lime", linewidth=2, label=mask_label))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    where = "the mask's centroid" if mask is not None and mask.any() else "the body's centre"
    fig.suptitle((f"{title}\n" if title else "") + f"slices through {where}; map shown inside the body", fontsize=10)
    return save_figure(fig, path, dpi=90, tight=False)
