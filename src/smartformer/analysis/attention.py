"""Whole-volume semantic attention maps on the CT's own grid.

A CT of any size is read (any supported format), reoriented to RAS, resampled to the model's
spacing and windowed like the pretraining data; the teacher's per-head attention is computed on
overlapping ROI windows (MONAI ``sliding_window_inference``, Gaussian blending), upsampled
within each window, and finally resampled back onto the input grid (:func:`resample_to_grid`), so the maps overlay the
input voxel for voxel (same shape, same affine) in 3D Slicer or any viewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Orientation, ScaleIntensityRange, Spacing, SpatialPad

from smartformer.data.io import read_ct, write_nifti
from smartformer.data.resample import resample_to_grid, reverse_axes
from smartformer.data.transforms import as_triple, parse_window
from smartformer.models.smartformer import SMARTFormer

__all__ = ["AttentionResult", "attention_volume", "write_attention"]


@dataclass
class AttentionResult:
    heads: np.ndarray  # (heads, X, Y, Z) on the input grid
    mean: np.ndarray  # (X, Y, Z)
    image_hu: np.ndarray  # (X, Y, Z) the input CT in HU
    affine: np.ndarray  # 4x4 RAS affine of the input


@torch.no_grad()
def attention_volume(
    model: SMARTFormer,
    ct: str | Path | MetaTensor,
    spacing: float | Sequence[float] = (2.0, 2.0, 2.0),
    window: str | Sequence[float] = "wide",
    roi: int | Sequence[int] = (64, 64, 64),
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    device: str | torch.device = "cpu",
    progress: bool = False,
    normalize: str = "uniform",
) -> AttentionResult:
    """Per-head and mean teacher attention of ``model`` for a CT, on the CT's own grid.

    ``ct`` is a path (any supported format) or a volume already read by
    :func:`~smartformer.data.io.read_ct`. ``overlap`` is that of neighbouring windows (MONAI's
    default, 0.25; 0.5 blends more smoothly for about 3x the windows). ``progress`` shows a bar
    over the windows (rate and ETA).

    ``normalize`` makes windows comparable before they are blended: ``"uniform"`` (default)
    multiplies each window's softmax weights by its token count, so 1.0 means "as much as a
    uniform map" in every window and the window seams do not show; ``"max"`` divides by each
    window's peak (the earlier behaviour; a window without salient content is stretched to 1,
    which shows the windows as blocks).
    """
    if normalize not in ("uniform", "max"):
        raise ValueError(f"normalize must be 'uniform' or 'max', got {normalize!r}")
    roi_size = tuple(int(r) for r in as_triple(roi, "roi"))
    lo, hi = parse_window(window)
    original = ct if isinstance(ct, MetaTensor) else read_ct(ct)
    prep = Compose([
        Orientation(axcodes="RAS", labels=None),
        Spacing(pixdim=as_triple(spacing, "spacing"), mode="bilinear", dtype=np.float32),
        ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
        SpatialPad(spatial_size=list(roi_size), value=0, method="end"),
    ])
    image: MetaTensor = prep(original.clone())
    model = model.eval().to(device)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        maps = model.attention_maps(x)  # (b, heads, d, h, w), each map sums to 1 over its window
        if normalize == "max":
            maps = maps / maps.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)
        else:  # relative to a uniform map over the window's tokens
            maps = maps * float(maps.shape[2] * maps.shape[3] * maps.shape[4])
        return F.interpolate(maps, size=x.shape[2:], mode="trilinear", align_corners=False)

    blended = sliding_window_inference(
        image.as_tensor().unsqueeze(0).to(device), roi_size, sw_batch_size, predictor,
        overlap=overlap, mode="gaussian", progress=progress,
    )[0].cpu()
    # Resampled in (heads, Z, Y, X) memory order, NIfTI's order: the (heads, X, Y, Z) result is a
    # transposed view that write_nifti stores without a transposing copy of 12 full-size volumes.
    heads = resample_to_grid(blended.permute(0, 3, 2, 1).contiguous(), reverse_axes(np.asarray(image.affine)),
                             reverse_axes(np.asarray(original.affine)), tuple(original.shape[1:])[::-1])
    return AttentionResult(
        heads=heads.permute(0, 3, 2, 1).numpy(),
        mean=heads.mean(0).permute(2, 1, 0).numpy(),
        image_hu=original.as_tensor()[0].numpy(),
        affine=np.asarray(original.affine, dtype=np.float64),
    )


def write_attention(result: AttentionResult, out_dir: str | Path, stem: str = "attention",
                    mask: np.ndarray | None = None, title: str = "", mask_label: str = "mask") -> dict[str, Path]:
    """Write ``<stem>_mean.nii.gz`` (float32), ``<stem>_heads.nii.gz`` (4D, heads last, 8-bit scaled) and ``<stem>.png``.

    The PNG (:func:`~smartformer.analysis.overlay.save_overlay_png`) is drawn in RAS whatever the
    storage order, through ``mask``'s centroid (its contour named ``mask_label``) or the body's centre.
    """
    from smartformer.analysis.overlay import save_overlay_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean_path = write_nifti(result.mean, result.affine, out_dir / f"{stem}_mean.nii.gz")
    # 8 bits with a scale factor: 1/255 of the range is finer than any viewer's colour map, and
    # the 4D file is 4x smaller and faster to write.
    heads_path = write_nifti(result.heads, result.affine, out_dir / f"{stem}_heads.nii.gz", as_uint8=True)
    png = save_overlay_png(result.image_hu, result.mean, out_dir / f"{stem}.png", title=title, mask=mask,
                           affine=result.affine, mask_label=mask_label,
                           heat_label="mean attention (1 = uniform over a window)")
    return {"mean": mean_path, "heads": heads_path, "png": png}
