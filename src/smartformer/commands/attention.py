"""``smartformer attention``: the teacher's semantic attention for one CT, on the CT's own grid.

Also home of two helpers the other interpretation commands (``localize``, ``cluster``) share:
:func:`load_model` (a checkpoint argument to a network) and :func:`read_mask_on` (a mask file
brought onto a CT's grid).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from smartformer.data.naming import volume_stem
from smartformer.errors import InputError, SmartformerError

if TYPE_CHECKING:
    import numpy as np
    from monai.data import MetaTensor

    from smartformer.models.smartformer import SMARTFormer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention",
        help="semantic attention maps of a CT (NIfTI on the CT's grid + PNG)",
        description=(
            "Compute the teacher's per-head and mean semantic attention for a CT of any size "
            "(sliding window with overlap and Gaussian blending), resampled back onto the input "
            "grid. Writes NAME_mean.nii.gz (exactly the input's shape and affine, so it overlays in "
            "3D Slicer), NAME_heads.nii.gz (4D, one volume per head), NAME.png (axial, coronal and "
            "sagittal slices through the mask's centroid, or the body's centre, with the map over the CT inside "
            "the body, the mask as a green contour, a colourbar and orientation letters) and "
            "NAME.json (what was run)."
        ),
    )
    add_checkpoint_argument(p)
    p.add_argument("--image", required=True, type=Path,
                   help="the CT: NIfTI, NRRD, MetaImage file or a DICOM series folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--mask", type=Path, default=None,
                   help="optional mask (e.g. a tumour) drawn as a contour; any grid, resampled to the CT's")
    p.add_argument("--mask-label", type=int, default=None, metavar="ID",
                   help="take only this label of --mask (e.g. 11, the phantoms' lesions); default: every voxel > 0")
    add_inference_arguments(p)
    p.add_argument("--name", default=None, help="file name stem of the outputs (default: from --image)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def add_checkpoint_argument(p: argparse.ArgumentParser) -> None:
    """The ``--checkpoint`` option shared by the interpretation commands."""
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a save_pretrained directory, a training run directory (its teacher/ is used), or "
                        "smart-tiny-ct, the pretrained model shipped with smartformer")


def add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """``--spacing``, ``--window``, ``--roi``, ``--overlap``, ``--normalize``: how a CT is fed to the network."""
    p.add_argument("--spacing", type=float, nargs="+", default=[2.0], metavar="MM",
                   help="voxel size the network sees, 1 or 3 values in mm (default: 2)")
    p.add_argument("--window", default="wide",
                   help="HU window: a preset (wide, lung, abdomen) or --window=LOW,HIGH in HU (default: wide)")
    p.add_argument("--roi", type=int, nargs="+", default=[64], metavar="VOXELS",
                   help="sliding-window size, 1 or 3 values, multiples of 32 (default: 64)")
    p.add_argument("--overlap", type=float, default=0.25,
                   help="overlap of neighbouring windows, in [0, 1) (default: 0.25, as MONAI; 0.5 blends "
                        "more smoothly for about 3x the time)")
    p.add_argument("--normalize", choices=["uniform", "max"], default="uniform",
                   help="how windows are made comparable before blending: relative to a uniform map "
                        "(default), or to each window's peak (before issue 17; shows the windows as blocks)")


def check_inference_arguments(args: argparse.Namespace) -> None:
    """Refuse bad ``--spacing``/``--window``/``--roi``/``--overlap`` values with one line."""
    from smartformer.data.transforms import parse_window

    parse_window(args.window)
    if len(args.spacing) not in (1, 3) or any(s <= 0 for s in args.spacing):
        raise SmartformerError("--spacing takes 1 or 3 positive values (mm)")
    if len(args.roi) not in (1, 3) or any(r < 32 or r % 32 for r in args.roi):
        raise SmartformerError("--roi takes 1 or 3 values, each a positive multiple of 32")
    if not 0.0 <= args.overlap < 1.0:
        raise SmartformerError("--overlap must be in [0, 1)")


def inference_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`~smartformer.analysis.attention.attention_volume` from the CLI options."""
    return {
        "spacing": args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing),
        "window": args.window,
        "roi": args.roi[0] if len(args.roi) == 1 else tuple(args.roi),
        "overlap": args.overlap,
        "normalize": args.normalize,
    }


def resolve_checkpoint(path: Path) -> Path:
    """The save_pretrained directory named by ``path``: itself, ``path/teacher`` for a run directory,
    or the shipped model of that name (:data:`~smartformer.models.smartformer.PRETRAINED`)."""
    from smartformer.models.smartformer import CONFIG_NAME, WEIGHTS_NAME, pretrained_path

    if not path.exists():
        shipped = pretrained_path(path)
        if shipped is not None:
            return shipped
        raise InputError(path, "does not exist")
    for candidate in (path, path / "teacher"):
        if candidate.is_dir() and (candidate / CONFIG_NAME).is_file() and (candidate / WEIGHTS_NAME).is_file():
            return candidate
    raise InputError(path, f"not a save_pretrained directory ({WEIGHTS_NAME} + {CONFIG_NAME}) "
                           "nor a training run directory with teacher/")


def load_pretrained(path: Path) -> "SMARTFormer":
    """``SMARTFormer.from_pretrained`` of a checkpoint argument (see :func:`resolve_checkpoint`).

    Raises:
        InputError: ``path`` names no checkpoint.
        SmartformerError: weights that do not fit the checkpoint's ``config.json``, in one line
            naming both files and the first tensor that disagrees.
    """
    from smartformer.models.smartformer import SMARTFormer

    directory = resolve_checkpoint(path)
    try:
        return SMARTFormer.from_pretrained(directory)
    except RuntimeError:  # torch's size-mismatch report: one line per tensor
        _explain_misfit(directory)
        raise


def _explain_misfit(directory: Path) -> None:
    """Raise the one-line reason why ``directory``'s weights do not load into its config's network."""
    import json

    from safetensors import safe_open

    from smartformer.models.smartformer import CONFIG_NAME, WEIGHTS_NAME, SMARTConfig, SMARTFormer
    from smartformer.train.checkpoint import check_state_fits

    config = SMARTConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text())["model"])
    expected = SMARTFormer(config).state_dict()
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as fh:
        shapes = {k: _Shape(fh.get_slice(k).get_shape()) for k in fh.keys()}
    check_state_fits(expected, {k: v for k, v in shapes.items() if k in expected},
                     str(directory / CONFIG_NAME), str(directory / WEIGHTS_NAME))


class _Shape:
    """A tensor's shape without its data, for :func:`check_state_fits`."""

    def __init__(self, shape: list[int]) -> None:
        self.shape = tuple(shape)


def load_model(path: Path, need_attention: bool = True) -> "SMARTFormer":
    """Load the network of a checkpoint argument (see :func:`resolve_checkpoint`), in eval mode.

    ``need_attention`` refuses, in one line, a model without the semantic attention module (the
    pooled-token ablation), which has no attention maps; token features need no such module.
    """
    model = load_pretrained(path).eval()
    if need_attention and not model.has_attention:
        raise InputError(path, "this model has no semantic attention module (built with semantic_attention=False)")
    return model


def read_mask_on(path: Path, reference: "MetaTensor", value: int | None = None,
                 allow_empty: bool = False) -> "np.ndarray":
    """Read a mask file as a boolean (X, Y, Z) array on the grid of ``reference`` (a :func:`read_ct` result).

    ``value`` picks one label of a label map (e.g. the phantoms' lesion id); without it every
    voxel > 0 counts. A mask on the same grid is taken as stored; any other grid is resampled by
    nearest neighbour through world coordinates (both affines are RAS). An empty result raises
    :class:`~smartformer.errors.InputError` unless ``allow_empty``.
    """
    import numpy as np
    import torch
    from monai.transforms import SpatialResample

    from smartformer.data.io import read_ct

    mask = read_ct(path)
    same_grid = (tuple(mask.shape[1:]) == tuple(reference.shape[1:])
                 and np.allclose(np.asarray(mask.affine), np.asarray(reference.affine), atol=1e-3))
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


def save_ras_png(image: "np.ndarray", heat: "np.ndarray", affine: "np.ndarray", path: Path, title: str,
                 mask: "np.ndarray | None" = None) -> Path:
    """:func:`~smartformer.analysis.overlay.save_overlay_png` of arrays stored in any axis order
    (reordered and flipped to RAS first, no resampling)."""
    from smartformer.analysis.overlay import save_overlay_png

    return save_overlay_png(image, heat, path, title=title, mask=mask, affine=affine)


def run(args: argparse.Namespace) -> int:
    from smartformer.analysis.attention import attention_volume, write_attention
    from smartformer.data.io import read_ct

    check_inference_arguments(args)
    model = load_model(args.checkpoint)
    ct = read_ct(args.image)  # refuses unreadable input with one line before any compute
    mask = read_mask_on(args.mask, ct, args.mask_label) if args.mask is not None else None
    result = attention_volume(model, ct, **inference_kwargs(args), progress=not args.no_progress)
    stem = args.name or volume_stem(args.image)
    files = write_attention(result, args.out, stem=stem, mask=mask, title=f"{stem}: mean semantic attention",
                            mask_label=f"mask ({args.mask.name})" if args.mask is not None else "mask")
    summary = {
        "checkpoint": str(resolve_checkpoint(args.checkpoint)),
        "image": str(args.image),
        "mask": str(args.mask) if args.mask is not None else None,
        "shape": list(result.mean.shape),
        "heads": int(result.heads.shape[0]),
        **{key: (list(v) if isinstance(v, tuple) else v) for key, v in inference_kwargs(args).items()},
        **{key: str(p) for key, p in files.items()},
    }
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    for key, p in files.items():
        print(f"  {key:<6} {p}")
    return 0
