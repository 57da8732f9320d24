"""Zero-shot localization metrics: how well a 3D map (attention, or a baseline) finds a lesion mask.

Every metric is computed inside the body (HU > -500, plus the lesion itself; SPEC section 9): a
map that is merely bright inside the patient and dark in the air around it earns nothing. All
functions take (X, Y, Z) numpy arrays on one grid; nothing here needs torch.

Metrics (see :func:`localization_metrics`):

* ``auroc``: voxel-level area under the ROC curve of the map against the lesion;
* ``pointing``: 1 if the map's maximum lies in the lesion dilated by a tolerance in mm, else 0;
* ``dice_otsu`` / ``iou_otsu``: overlap of the map thresholded at Otsu's threshold;
* ``dice_topk`` / ``iou_topk``: overlap of the top-k % voxels of the map;
* ``bbox_iou``: IoU of the bounding boxes of the lesion and of the Otsu component holding the maximum;
* ``enrichment``: mean map inside the lesion / mean map inside the body (1 = no preference);
* ``energy``: share of the map's mass (after shifting its minimum to 0) that lies inside the lesion.

Baselines (SPEC section 9): :func:`centre_prior` and :func:`intensity_prior`; the third one, the
same network with random weights, is built by the ``localize`` command.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from smartformer.data.transforms import BODY_HU_THRESHOLD

__all__ = [
    "METRICS",
    "body_region",
    "auroc",
    "pointing_game",
    "otsu_threshold",
    "top_k_mask",
    "dice_iou",
    "bounding_box",
    "bbox_iou",
    "enrichment",
    "energy_pointing",
    "localization_metrics",
    "centre_prior",
    "intensity_prior",
    "lesion_windows",
]

#: Names of the values :func:`localization_metrics` returns, in table order.
METRICS: tuple[str, ...] = (
    "auroc",
    "pointing",
    "dice_otsu",
    "iou_otsu",
    "dice_topk",
    "iou_topk",
    "bbox_iou",
    "enrichment",
    "energy",
)

#: Soft tissue, the centre of the intensity prior (HU) and its width.
SOFT_TISSUE_HU = 40.0
SOFT_TISSUE_WIDTH_HU = 100.0


def body_region(image_hu: np.ndarray, lesion: np.ndarray, threshold: float = BODY_HU_THRESHOLD) -> np.ndarray:
    """Voxels where metrics are computed: HU above ``threshold`` plus the lesion itself."""
    return (np.asarray(image_hu) > threshold) | np.asarray(lesion, dtype=bool)


def auroc(score: np.ndarray, lesion: np.ndarray, region: np.ndarray | None = None) -> float:
    """Voxel-level ROC AUC of ``score`` for ``lesion`` inside ``region``; NaN if one class is absent."""
    inside = np.ones(score.shape, bool) if region is None else region
    truth = lesion[inside]
    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, score[inside]))


def pointing_game(
    score: np.ndarray,
    lesion: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 10.0,
    region: np.ndarray | None = None,
) -> bool:
    """True if the maximum of ``score`` in ``region`` lies within ``tolerance_mm`` of the lesion.

    The lesion is dilated by a Euclidean distance in mm (anisotropic voxels handled through
    ``spacing``). Ties for the maximum are broken by the first voxel in C order.
    """
    if not lesion.any():
        raise ValueError("pointing game needs a non-empty lesion")
    inside = np.ones(score.shape, bool) if region is None else region
    masked = np.where(inside, score, -np.inf)
    peak = np.unravel_index(int(np.argmax(masked)), score.shape)
    if lesion[peak]:
        return True
    distance = ndimage.distance_transform_edt(~lesion, sampling=tuple(float(s) for s in spacing))
    return bool(distance[peak] <= tolerance_mm)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the cut maximising the between-class variance of a histogram.

    Values ``> threshold`` form the upper class. A constant array returns its value.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1.0)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1.0)
    between = weight_low[:-1] * weight_high[:-1] * (mean_low[:-1] - mean_high[:-1]) ** 2
    best = int(np.argmax(between))
    # every cut between the last occupied bin of the low class and the next occupied bin is
    # equally good: take the midpoint of that gap, so a clean two-mode split lands in between
    upper = best + 1 + int(np.argmax(counts[best + 1 :] > 0))
    return float((centres[best] + centres[upper]) / 2.0)


def top_k_mask(score: np.ndarray, percent: float, region: np.ndarray | None = None) -> np.ndarray:
    """The ``percent`` % highest voxels of ``score`` inside ``region`` (at least one voxel)."""
    if not 0 < percent <= 100:
        raise ValueError(f"top-k percent must be in (0, 100], got {percent}")
    inside = np.ones(score.shape, bool) if region is None else region
    values = score[inside]
    k = max(1, int(round(values.size * percent / 100.0)))
    cut = np.partition(values, values.size - k)[values.size - k]
    return inside & (score >= cut)


def dice_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (both 1.0 when both are empty)."""
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / union


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Inclusive-exclusive voxel box ``(lo, hi)`` of the True voxels, or None for an empty mask."""
    where = np.nonzero(mask)
    if where[0].size == 0:
        return None
    return tuple(int(w.min()) for w in where), tuple(int(w.max()) + 1 for w in where)


def bbox_iou(
    box_a: tuple[Sequence[int], Sequence[int]] | None, box_b: tuple[Sequence[int], Sequence[int]] | None
) -> float:
    """IoU of two ``(lo, hi)`` boxes (hi exclusive); 0 when either is None or they are disjoint."""
    if box_a is None or box_b is None:
        return 0.0
    lo = np.maximum(box_a[0], box_b[0])
    hi = np.minimum(box_a[1], box_b[1])
    inter = float(np.prod(np.clip(hi - lo, 0, None)))
    vol_a = float(np.prod(np.subtract(box_a[1], box_a[0])))
    vol_b = float(np.prod(np.subtract(box_b[1], box_b[0])))
    return inter / (vol_a + vol_b - inter) if inter > 0 else 0.0


def enrichment(score: np.ndarray, lesion: np.ndarray, region: np.ndarray) -> float:
    """Mean of ``score`` inside the lesion divided by its mean inside ``region`` (the body)."""
    body_mean = float(score[region].mean())
    if body_mean <= 0:
        return float("nan")
    return float(score[lesion & region].mean()) / body_mean


def energy_pointing(score: np.ndarray, lesion: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's mass inside ``region`` that lies in the lesion (map shifted to a minimum of 0)."""
    values = score[region] - float(score[region].min())
    total = float(values.sum())
    if total <= 0:
        return float("nan")
    return float(values[lesion[region]].sum()) / total


def _peak_component(above: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The connected component of ``above`` that holds the highest-scoring voxel of ``above``."""
    labels, _ = ndimage.label(above)
    masked = np.where(above, score, -np.inf)
    peak = np.unravel_index(int(np.argmax(masked)), score.shape)
    return labels == labels[peak]


def localization_metrics(
    score: np.ndarray,
    lesion: np.ndarray,
    image_hu: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = 10.0,
    top_k_percent: float = 5.0,
) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one map against one lesion, inside the body.

    Args:
        score: (X, Y, Z) map, higher = more lesion-like.
        lesion: (X, Y, Z) boolean lesion mask on the same grid (must not be empty).
        image_hu: the CT in HU on the same grid (defines the body).
        spacing: voxel size in mm (for the pointing-game tolerance).
        tolerance_mm: dilation of the lesion for the pointing game.
        top_k_percent: share of body voxels kept for ``dice_topk`` / ``iou_topk``.
    """
    score = np.asarray(score, dtype=np.float64)
    lesion = np.asarray(lesion, dtype=bool)
    if score.shape != lesion.shape or score.shape != np.shape(image_hu):
        raise ValueError(f"map {score.shape}, lesion {lesion.shape} and CT {np.shape(image_hu)} must share a grid")
    if not lesion.any():
        raise ValueError("the lesion mask is empty")
    region = body_region(image_hu, lesion)
    above = region & (score > otsu_threshold(score[region]))
    if not above.any():  # a constant map: nothing is above the threshold
        above = np.zeros_like(region)
    dice_o, iou_o = dice_iou(above, lesion)
    dice_k, iou_k = dice_iou(top_k_mask(score, top_k_percent, region), lesion)
    peak_box = bounding_box(_peak_component(above, score)) if above.any() else None
    return {
        "auroc": auroc(score, lesion, region),
        "pointing": float(pointing_game(score, lesion, spacing, tolerance_mm, region)),
        "dice_otsu": dice_o,
        "iou_otsu": iou_o,
        "dice_topk": dice_k,
        "iou_topk": iou_k,
        "bbox_iou": bbox_iou(peak_box, bounding_box(lesion)),
        "enrichment": enrichment(score, lesion, region),
        "energy": energy_pointing(score, lesion, region),
    }


def centre_prior(shape: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Baseline map: a Gaussian around the volume centre, sigma a quarter of the extent along each axis."""
    axes = []
    for n, s in zip(shape, spacing):
        mm = (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * float(s)
        sigma = max(n * float(s) / 4.0, 1e-6)
        axes.append(-0.5 * (mm / sigma) ** 2)
    grid = axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]
    return np.exp(grid)


def intensity_prior(
    image_hu: np.ndarray, centre_hu: float = SOFT_TISSUE_HU, width_hu: float = SOFT_TISSUE_WIDTH_HU
) -> np.ndarray:
    """Baseline map: closeness of each voxel's HU to soft tissue (a Gaussian in HU)."""
    return np.exp(-0.5 * ((np.asarray(image_hu, dtype=np.float64) - centre_hu) / width_hu) ** 2)


def lesion_windows(
    lesion: np.ndarray, size: Sequence[int], n: int, rng: np.random.Generator
) -> list[tuple[slice, slice, slice]]:
    """``n`` boxes of ``size`` voxels (clipped to the volume) at random offsets, each holding lesion voxels.

    For lesion-centred crops (SPEC section 9): each box is placed so that a random lesion voxel
    falls at a uniformly random position inside it, so the lesion is rarely in the box's centre.
    """
    points = np.argwhere(lesion)
    if points.size == 0:
        raise ValueError("lesion_windows needs a non-empty lesion")
    shape = np.asarray(lesion.shape)
    size_arr = np.minimum(np.asarray(size, dtype=int), shape)
    boxes = []
    for _ in range(n):
        anchor = points[rng.integers(len(points))]
        start = anchor - rng.integers(0, size_arr)
        start = np.clip(start, 0, shape - size_arr)
        boxes.append(tuple(slice(int(a), int(a + s)) for a, s in zip(start, size_arr)))
    return boxes
