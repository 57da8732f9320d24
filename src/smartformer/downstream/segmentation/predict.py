"""Segmenting new CTs with a trained model, on each input's own grid.

:func:`predict_labels`: sliding-window inference and argmax on the model's grid, the label map
brought back (nearest neighbour) onto the input CT's exact grid, original label ids restored;
:func:`write_labels` writes it as uint8 NIfTI with the input's affine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from safetensors.torch import load_file

from smartformer.data.io import read_ct, write_nifti
from smartformer.downstream.segmentation.cases import _preprocess
from smartformer.downstream.segmentation.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    SegmentationConfig,
    _sliding_logits,
    new_swinunetr,
)
from smartformer.errors import InputError

if TYPE_CHECKING:
    from monai.networks.nets import SwinUNETR


def load_segmenter(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[SwinUNETR, SegmentationConfig]:
    """The trained network of a run folder (``segmentation.json`` + ``best.safetensors``), in eval mode.

    Raises:
        InputError: naming the folder or file when it is not a segmentation run or is damaged.
    """
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE
    if not run_dir.is_dir():
        raise InputError(run_dir, "does not exist" if not run_dir.exists() else "is not a folder")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise InputError(
                run_dir,
                f"not a segmentation run: {path.name} is missing "
                f"(expected {CONFIG_FILE} + {WEIGHTS_FILE} from 'smartformer segment train')",
            )
    try:
        config = SegmentationConfig(**json.loads(config_path.read_text()))
        encoder = config.encoder_config()
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise InputError(config_path, f"not a valid segmentation config ({exc})") from None
    net = new_swinunetr(encoder, config.num_classes, config.roi)
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InputError(weights_path, f"unreadable safetensors file ({exc})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(
            weights_path, f"weights do not match {CONFIG_FILE} ({' '.join(str(exc).split())[:300]})"
        ) from None
    return net.to(device).eval(), config


@dataclass
class LabelPrediction:
    """A label map on the input CT's grid: ``labels`` (X, Y, Z) with the original ids, ``affine`` RAS."""

    labels: np.ndarray
    affine: np.ndarray
    label_ids: list[int]

    def volumes_ml(self) -> dict[int, float]:
        """Volume per label id in millilitres (0 for an id that was not predicted)."""
        voxel_ml = abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        counts = np.bincount(self.labels.ravel(), minlength=max(self.label_ids) + 1)
        return {i: float(counts[i]) * voxel_ml for i in self.label_ids}


def predict_labels(
    net: torch.nn.Module,
    config: SegmentationConfig,
    ct: str | Path | MetaTensor,
    overlap: float | None = None,
    device: torch.device | str = "cpu",
    sw_batch_size: int = 2,
) -> LabelPrediction:
    """Segment one CT (a path in any supported format, or a :func:`read_ct` volume) on its own grid.

    Preprocessed as in training (RAS, body crop, spacing, window, pad), sliding-window logits and
    argmax on that grid, then the class map resampled by nearest neighbour onto the input's grid
    (voxels outside the body crop are background) and mapped back to the original label ids.
    """
    original = ct if isinstance(ct, MetaTensor) else read_ct(ct)
    image = _preprocess(config.spacing, config.window, config.roi, with_label=False)({"image": original.clone()})[
        "image"
    ]
    net = net.eval().to(device)
    with torch.no_grad():
        logits = _sliding_logits(
            net,
            image.as_tensor(),
            config.roi,
            config.overlap if overlap is None else overlap,
            torch.device(device),
            sw_batch_size,
        )
    classes = logits[0].argmax(0, keepdim=True).cpu().to(torch.float32)
    on_input = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
        MetaTensor(classes, affine=image.affine), dst_affine=original.affine, spatial_size=original.shape[1:]
    )
    lut = np.asarray([0, *config.label_ids], dtype=np.uint8 if max(config.label_ids) <= 255 else np.uint16)
    labels = lut[np.rint(on_input.as_tensor()[0].numpy()).astype(np.int64)]
    return LabelPrediction(
        labels=labels, affine=np.asarray(original.affine, dtype=np.float64), label_ids=list(config.label_ids)
    )


def write_labels(prediction: LabelPrediction, path: str | Path) -> Path:
    """Write the label map as NIfTI (uint8, uint16 for ids above 255) with the input's affine; returns the path.

    :func:`~smartformer.data.io.write_nifti` writes it atomically (a reader never sees half a file) and
    appends ``.nii.gz`` to a name without a NIfTI suffix.
    """
    return write_nifti(prediction.labels, prediction.affine, path)
