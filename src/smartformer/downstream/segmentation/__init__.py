"""Organ and tumour segmentation: MONAI ``SwinUNETR`` whose encoder starts from a SMART checkpoint.

The pieces, each usable on its own, one module per section:

* :mod:`.model`: :func:`build_segmenter`, a ``SwinUNETR`` whose ``swinViT`` has the checkpoint
  encoder's feature size, depths, heads and window, with the encoder weights loaded strictly;
  :class:`SegmentationConfig`, what ``segmentation.json`` holds.
* :mod:`.cases`: :func:`split_cases`, a seeded patient-level train/validation split of image + label
  map pairs (:func:`smartformer.data.cases.find_cases` finds them), and :func:`load_case`, one pair
  read, checked (same grid), preprocessed like the pretraining data and its label ids remapped to
  ``1..K``.
* :mod:`.train`: :func:`train_segmentation` (DiceCE, AdamW, sliding-window validation with the Dice of
  each class, the best model kept atomically) and :func:`validate` / :func:`dice_per_case`.
* :mod:`.predict`: :func:`load_segmenter`, :func:`predict_labels` (a label map on the input CT's own
  grid with the original ids) and :func:`write_labels`.

Everything is re-exported here: ``from smartformer.downstream.segmentation import X``.
"""

from __future__ import annotations

from smartformer.downstream.segmentation.cases import check_label_grids, load_case, remap_labels, split_cases
from smartformer.downstream.segmentation.model import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    SegmentationConfig,
    build_segmenter,
    check_monai_layout,
    monai_swinvit_state,
    new_swinunetr,
    segmenter_from_encoder,
    swinunetr_kwargs,
    swinunetr_recipe,
    write_swinunetr_recipe,
)
from smartformer.downstream.segmentation.predict import LabelPrediction, load_segmenter, predict_labels, write_labels
from smartformer.downstream.segmentation.train import (
    METRICS_FILE,
    SegmentationSettings,
    TrainResult,
    _save_model,
    check_settings,
    dice_per_case,
    train_segmentation,
    validate,
)

__all__ = [
    "SegmentationSettings",
    "SegmentationConfig",
    "TrainResult",
    "LabelPrediction",
    "build_segmenter",
    "segmenter_from_encoder",
    "new_swinunetr",
    "swinunetr_kwargs",
    "swinunetr_recipe",
    "write_swinunetr_recipe",
    "check_monai_layout",
    "monai_swinvit_state",
    "split_cases",
    "load_case",
    "train_segmentation",
    "load_segmenter",
    "predict_labels",
    "write_labels",
    "dice_per_case",
    "validate",
    "check_settings",
    "check_label_grids",
    "remap_labels",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "METRICS_FILE",
    "FORMAT_VERSION",
    "_save_model",
]
