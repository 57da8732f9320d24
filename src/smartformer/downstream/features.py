"""Frozen encoder features of downstream crops: [CLS] and pooled tokens, batched, in inference mode.

The encoders come from :func:`~smartformer.models.hub.load_encoder` (re-exported here), which reads
every checkpoint form; ``random:PRESET`` (``random:tiny``, ``random:base``) is that preset with
random weights from the run's seed, the baseline every pretrained encoder should beat.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from smartformer.analysis.clustering import centroid_separation
from smartformer.downstream.cases import PASSTHROUGH_COLUMNS
from smartformer.errors import SmartformerError
from smartformer.models.hub import load_encoder

if TYPE_CHECKING:
    from smartformer.downstream.cases import CaseTable
    from smartformer.models.smartformer import SMARTFormer

__all__ = [
    "FEATURE_KINDS",
    "encode",
    "extract_features",
    "feature_columns",
    "feature_distances",
    "feature_table",
    "load_encoder",
    "pick_device",
    "write_distances",
    "write_feature_table",
]

#: Which features a classifier reads: the semantic [CLS], the mean of the tokens, or both concatenated.
FEATURE_KINDS: tuple[str, ...] = ("cls", "pooled", "both")


def pick_device(name: str | None) -> torch.device:
    """``name`` as a device, or CUDA when available and else the CPU."""
    if name:
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise SmartformerError(f"device {name}: {exc}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encode(model: SMARTFormer, batch: torch.Tensor, kind: str = "both") -> torch.Tensor:
    """(B, D) features of a (B, 1, *crop) batch: [CLS], the mean of the tokens, or both concatenated.

    Shared by the probe (frozen) and fine-tuning (trained), so both read the same features.
    """
    if kind not in FEATURE_KINDS:
        raise SmartformerError(f"features {kind!r}: choose one of {', '.join(FEATURE_KINDS)}")
    out = model.forward_features(batch)
    parts = {"cls": [out["cls"]], "pooled": [out["tokens"].mean(dim=1)]}
    parts["both"] = parts["cls"] + parts["pooled"]
    return torch.cat(parts[kind], dim=1)


def extract_features(
    model: SMARTFormer,
    crops: np.ndarray,
    kind: str = "both",
    batch_size: int = 8,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "features",
) -> np.ndarray:
    """Frozen features (N, D) float32 of (N, 1, *crop) crops, in batches under ``torch.inference_mode``.

    The model is moved to ``device`` (default: :func:`pick_device`) and left in eval mode.
    """
    device = pick_device(None) if device is None else torch.device(device)
    model = model.to(device).eval()
    chunks: list[np.ndarray] = []
    starts = range(0, len(crops), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            batch = torch.from_numpy(np.asarray(crops[start : start + batch_size], dtype=np.float32)).to(device)
            chunks.append(encode(model, batch, kind).float().cpu().numpy())
    return np.concatenate(chunks, axis=0)


def feature_columns(kind: str, width: int) -> list[str]:
    """Column names of a feature matrix: ``cls_0..`` and/or ``pooled_0..`` (``width`` = the encoder's C)."""
    prefixes = ["cls", "pooled"] if kind == "both" else [kind]
    return [f"{p}_{i}" for p in prefixes for i in range(width)]


def feature_table(table: CaseTable, features: np.ndarray, kind: str, width: int) -> pd.DataFrame:
    """One row per case of ``table``: ``case``, the CSV's ``label`` (as written) and ``patient`` where the CSV
    has them, then the (N, D) ``features`` in the columns of :func:`feature_columns` (``width``: the encoder's C)."""
    frame = pd.DataFrame({"case": table.ids})
    for column in PASSTHROUGH_COLUMNS:
        if column in table.columns:
            frame[column] = [getattr(c, "raw_label" if column == "label" else column) for c in table.cases]
    values = pd.DataFrame(features, columns=feature_columns(kind, width))
    return pd.concat([frame, values], axis=1)


def write_feature_table(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` to ``path``: CSV for a ``.csv`` name, else Parquet (needs pyarrow); the folder is created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


def feature_distances(values: pd.DataFrame, labels: np.ndarray) -> dict[str, Any]:
    """Intra/inter-cluster distances and centroid separation of each feature kind by ``labels``.

    The kinds are the ``cls_*`` and ``pooled_*`` columns of ``values`` (those present); each gets
    ``intra_distance`` and ``inter_distance`` (mean and sd), ``centroid_separation`` and its ``labels``,
    as :func:`~smartformer.analysis.clustering.centroid_separation` measures them (the SMART paper's
    OrganMNIST3D scores).
    """
    result: dict[str, Any] = {}
    for kind in ("cls", "pooled"):
        columns = [c for c in values.columns if c.startswith(f"{kind}_")]
        if not columns:
            continue
        sep = centroid_separation(values[columns].to_numpy(), labels)
        result[kind] = {
            "intra_distance": sep["intra_distance"],
            "inter_distance": sep["inter_distance"],
            "centroid_separation": sep["mean_ratio"],
            "labels": [str(x) for x in sep["labels"]],
        }
    return result


def write_distances(values: pd.DataFrame, labels: np.ndarray, path: Path) -> dict[str, Any]:
    """:func:`feature_distances` of ``values`` by ``labels``, written to ``path`` as JSON; returns them."""
    result = feature_distances(values, labels)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result
