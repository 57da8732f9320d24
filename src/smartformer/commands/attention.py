"""``smartformer attention``: the teacher's semantic attention for one CT, on the CT's own grid."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smartformer.commands._options import (
    add_checkpoint_argument,
    add_inference_arguments,
    check_inference_arguments,
    inference_kwargs,
)
from smartformer.data.naming import volume_stem


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention",
        help="semantic attention maps of a CT (NIfTI on the CT's grid + PNG)",
        description=(
            "Compute the teacher's per-head and mean semantic attention for a CT of any size "
            "(ROI windows with overlap and Gaussian blending; see --mode), resampled back onto the input "
            "grid. Writes NAME_mean.nii.gz (exactly the input's shape and affine, so it overlays in "
            "3D Slicer), NAME_heads.nii.gz (4D, one volume per head), NAME.png (axial, coronal and "
            "sagittal slices through the mask's centroid, or the body's centre, with the map over the CT inside "
            "the body, the mask as a green contour, a colourbar and orientation letters) and "
            "NAME.json (what was run)."
        ),
    )
    add_checkpoint_argument(p)
    p.add_argument(
        "--image", required=True, type=Path, help="the CT: NIfTI, NRRD, MetaImage file or a DICOM series folder"
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="optional mask (e.g. a tumour) drawn as a contour; any grid, resampled to the CT's",
    )
    p.add_argument(
        "--mask-label",
        type=int,
        default=None,
        metavar="ID",
        help="take only this label of --mask (e.g. 11, the phantoms' lesions); default: every voxel > 0",
    )
    add_inference_arguments(p)
    p.add_argument("--name", default=None, help="file name stem of the outputs (default: from --image)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from smartformer.analysis.attention import attention_volume, write_attention
    from smartformer.data.io import read_ct
    from smartformer.data.masks import read_mask_on
    from smartformer.models.hub import load_encoder, resolve_checkpoint

    check_inference_arguments(args)
    model = load_encoder(args.checkpoint, need_attention=True)
    ct = read_ct(args.image)  # refuses unreadable input with one line before any compute
    mask = read_mask_on(args.mask, ct, args.mask_label) if args.mask is not None else None
    result = attention_volume(model, ct, **inference_kwargs(args), progress=not args.no_progress)
    stem = args.name or volume_stem(args.image)
    files = write_attention(
        result,
        args.out,
        stem=stem,
        mask=mask,
        title=f"{stem}: mean semantic attention",
        mask_label=f"mask ({args.mask.name})" if args.mask is not None else "mask",
    )
    summary = {
        "checkpoint": resolve_checkpoint(args.checkpoint).source,
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
