"""Whole-volume semantic attention maps on the CT's own grid.

A CT of any size is read (any supported format), reoriented to RAS, resampled to the model's
spacing and windowed like the pretraining data; the teacher's per-head attention is computed on
overlapping ROI windows (MONAI ``sliding_window_inference``, Gaussian blending), upsampled
within each window, and finally resampled back onto the input grid (:func:`resample_to_grid`), so the maps overlay the
input voxel for voxel (same shape, same affine) in 3D Slicer or any viewer.

Two ways to get each window's map (``mode``):

* ``"whole"`` (the default for Swin models): the backbone runs once over the whole CT, padded to
  a multiple of 32 (Swin attention is local: its windows tile and shift within the whole
  volume), and the semantic attention runs on each ROI window's block of tokens, so every map
  is still a softmax over its own window's tokens. The network sees ~1.3x the CT's voxels
  instead of ~2.7x, and the tokens near a window's edge see their true neighbours instead of
  zero padding;
* ``"sliding"``: the whole network on each ROI window separately (the only way for a ViT,
  whose attention is global).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Orientation, ScaleIntensityRange, Spacing, SpatialPad

from smartformer.analysis.overlay import save_overlay_png
from smartformer.data.io import read_ct, write_nifti
from smartformer.data.resample import resample_to_grid, reverse_axes
from smartformer.data.transforms import as_triple, parse_window
from smartformer.models.sizes import SIZE_MULTIPLE
from smartformer.models.smartformer import SMARTFormer
from smartformer.models.vit3d import ViT3D

__all__ = ["AttentionResult", "MODES", "attention_volume", "write_attention"]

#: How each window's map is computed (see the module doc); "auto": "whole" for a Swin, else "sliding".
MODES = ("auto", "whole", "sliding")
#: "auto" runs "whole" up to this many voxels (the CT at the model's spacing, padded to a multiple
#: of 32): the whole-volume pass holds every token of stage 1 at once, and each shifted-window block
#: a (windows, n, n) mask (1.5 GB for elastix_00's 7.9 M voxels at window 7), where "sliding" needs
#: the memory of one window. 2**24 voxels is 256^3 (~3 GB of shift mask at window 7).
WHOLE_MAX_VOXELS = 2**24


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
    mode: str = "auto",
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

    ``mode``: ``"whole"`` runs the backbone once over the whole volume and the semantic attention
    per window of tokens, ``"sliding"`` the whole network per window (module doc); ``"auto"``
    (default) is ``"whole"`` for a Swin backbone on up to :data:`WHOLE_MAX_VOXELS` voxels, else
    ``"sliding"``. With ``"whole"`` the window step is rounded down to a multiple of the semantic
    stride (MONAI's 48 of 64 voxels at overlap 0.25 already is one).
    """
    if normalize not in ("uniform", "max"):
        raise ValueError(f"normalize must be 'uniform' or 'max', got {normalize!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    roi_size = tuple(int(r) for r in as_triple(roi, "roi"))
    lo, hi = parse_window(window)
    original = ct if isinstance(ct, MetaTensor) else read_ct(ct)
    prep = Compose(
        [
            Orientation(axcodes="RAS", labels=None),
            Spacing(pixdim=as_triple(spacing, "spacing"), mode="bilinear", dtype=np.float32),
            ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            SpatialPad(spatial_size=list(roi_size), value=0, method="end"),
        ]
    )
    image: MetaTensor = prep(original.clone())
    model = model.eval().to(device)
    if mode == "auto":
        padded = np.prod([-(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE for n in image.shape[1:]])
        mode = "sliding" if isinstance(model.backbone, ViT3D) or padded > WHOLE_MAX_VOXELS else "whole"
    volume = image.as_tensor().unsqueeze(0).to(device)
    if mode == "whole":
        blended = _whole_volume(model, volume, roi_size, overlap, sw_batch_size, normalize, progress)
    else:

        def predictor(x: torch.Tensor) -> torch.Tensor:
            return _window_maps(model.attention_maps(x), x.shape[2:], normalize)

        blended = sliding_window_inference(
            volume, roi_size, sw_batch_size, predictor, overlap=overlap, mode="gaussian", progress=progress
        )[0].cpu()
    # Resampled in (heads, Z, Y, X) memory order, NIfTI's order: the (heads, X, Y, Z) result is a
    # transposed view that write_nifti stores without a transposing copy of 12 full-size volumes.
    heads = resample_to_grid(
        blended.permute(0, 3, 2, 1).contiguous(),
        reverse_axes(np.asarray(image.affine)),
        reverse_axes(np.asarray(original.affine)),
        tuple(original.shape[1:])[::-1],
    )
    return AttentionResult(
        heads=heads.permute(0, 3, 2, 1).numpy(),
        mean=heads.mean(0).permute(2, 1, 0).numpy(),
        image_hu=original.as_tensor()[0].numpy(),
        affine=np.asarray(original.affine, dtype=np.float64),
    )


def _window_maps(maps: torch.Tensor, size: Sequence[int], normalize: str) -> torch.Tensor:
    """Maps (b, heads, d, h, w) that each sum to 1 over a window, made comparable between windows
    (``normalize``) and upsampled to the window's voxels ``size``."""
    if normalize == "max":
        maps = maps / maps.amax(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)
    else:  # relative to a uniform map over the window's tokens
        maps = maps * float(maps.shape[2] * maps.shape[3] * maps.shape[4])
    return F.interpolate(maps, size=tuple(size), mode="trilinear", align_corners=False)


def _whole_volume(
    model: SMARTFormer,
    volume: torch.Tensor,
    roi_size: tuple[int, ...],
    overlap: float,
    sw_batch_size: int,
    normalize: str,
    progress: bool,
) -> torch.Tensor:
    """The blended (heads, D, H, W) maps of ``mode="whole"``: the backbone once over ``volume``
    (1, 1, D, H, W) padded at the end to a multiple of 32, the semantic attention per ROI window of
    its tokens, blended as MONAI's sliding window blends (Gaussian), cropped back to (D, H, W)."""
    stride = model.config.semantic_stride
    if any(r % stride for r in roi_size):
        raise ValueError(f"mode='whole' needs an roi that the semantic stride {stride} divides, got {roi_size}")
    size = volume.shape[2:]
    pads = [-s % SIZE_MULTIPLE for s in size]
    padded = F.pad(volume, (0, pads[2], 0, pads[1], 0, pads[0])) if any(pads) else volume
    tokens = model.semantic_input(padded)  # (1, d, h, w, C)
    # Window starts on the token grid: the step rounded down to the stride (MONAI's scan interval
    # is int(roi * (1 - overlap)); +0.5 keeps the float product from rounding below the integer),
    # and the last window, which MONAI moves back to end at the (multiple-of-32) border, is aligned too.
    steps = [max(stride, int(r * (1 - overlap)) // stride * stride) for r in roi_size]
    overlaps = [max(0.0, 1.0 - (st + 0.5) / r) for st, r in zip(steps, roi_size)]

    def predictor(windows: torch.Tensor, slices: list) -> torch.Tensor:
        blocks = []
        for sl in slices:
            starts = [s.start for s in sl[2:]]
            if any(st % stride for st in starts):  # cannot happen with the steps above; never blend misaligned maps
                raise RuntimeError(f"window at {starts} is not on the token grid (stride {stride})")
            blocks.append(
                tokens[
                    :,
                    starts[0] // stride : (starts[0] + roi_size[0]) // stride,
                    starts[1] // stride : (starts[1] + roi_size[1]) // stride,
                    starts[2] // stride : (starts[2] + roi_size[2]) // stride,
                ]
            )
        return _window_maps(model.token_attention_maps(torch.cat(blocks)), windows.shape[2:], normalize)

    blended = sliding_window_inference(
        padded,
        roi_size,
        sw_batch_size,
        predictor,
        overlap=overlaps,
        mode="gaussian",
        progress=progress,
        with_coord=True,
    )
    return blended[0, :, : size[0], : size[1], : size[2]].cpu()


def write_attention(
    result: AttentionResult,
    out_dir: str | Path,
    stem: str = "attention",
    mask: np.ndarray | None = None,
    title: str = "",
    mask_label: str = "mask",
) -> dict[str, Path]:
    """Write ``<stem>_mean.nii.gz`` (16-bit scaled), ``<stem>_heads.nii.gz`` (4D, heads last, 8-bit
    scaled) and ``<stem>.png``.

    The scaled maps hold integers and the factor back to the true values in the header
    (``scl_slope``; ``scl_inter`` 0), which nibabel, 3D Slicer and ITK apply on reading: the mean
    map is exact to 1/65535 of its maximum (half of that, rounded), the head maps to 1/255.

    The PNG (:func:`~smartformer.analysis.overlay.save_overlay_png`) is drawn in RAS whatever the
    storage order, through ``mask``'s centroid (its contour named ``mask_label``) or the body's centre.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # 16 bits: half the bytes of float32 (and ~2x faster to compress and write), 5 significant digits.
    mean_path = write_nifti(result.mean, result.affine, out_dir / f"{stem}_mean.nii.gz", as_uint16=True)
    # 8 bits with a scale factor: 1/255 of the range is finer than any viewer's colour map, and
    # the 4D file is 4x smaller and faster to write.
    heads_path = write_nifti(result.heads, result.affine, out_dir / f"{stem}_heads.nii.gz", as_uint8=True)
    png = save_overlay_png(
        result.image_hu,
        result.mean,
        out_dir / f"{stem}.png",
        title=title,
        mask=mask,
        affine=result.affine,
        mask_label=mask_label,
        heat_label="mean attention (1 = uniform over a window)",
    )
    return {"mean": mean_path, "heads": heads_path, "png": png}
