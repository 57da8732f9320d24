"""Unsupervised organ clustering of frozen token features (SPEC section 9).

The CT is reoriented to RAS, resampled to the model's spacing and windowed like the pretraining
data, padded to whole windows and cut into non-overlapping ``roi`` windows; the semantic-stage
tokens (stride 16) of every window are placed on one token grid for the whole volume. Each token
gets the majority label of the 16^3 voxels it covers (the label map goes through the same
reorientation and resampling, nearest neighbour); tokens whose majority is background (0) or
padding are left out. k-means on the L2-normalised features of the remaining tokens is compared
with their labels (NMI, ARI, purity), and the distance between label centroids is measured
against the spread within labels. The cluster of each token is written back on the CT's grid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from monai.data import MetaTensor
from monai.transforms import Orientation, ScaleIntensityRange, Spacing, SpatialResample
from sklearn.cluster import KMeans
from sklearn.manifold import TSNE
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from tqdm.auto import tqdm

from smartformer.analysis.overlay import save_figure
from smartformer.data.io import read_ct, write_nifti
from smartformer.data.transforms import as_triple, parse_window
from smartformer.errors import InputError, SmartformerError

__all__ = [
    "TokenFeatures",
    "purity",
    "clustering_scores",
    "centroid_separation",
    "kmeans_clusters",
    "token_features",
    "clusters_on_input",
    "load_label_names",
    "find_label_names",
    "save_tsne_png",
    "OrganClustering",
    "cluster_organs",
    "write_clustering",
]

#: Token-grid label of padding voxels (never clustered).
PAD_LABEL = -1


@dataclass
class TokenFeatures:
    features: np.ndarray  # (d, h, w, C) tokens of the whole (padded) volume
    labels: np.ndarray  # (d, h, w) majority label per token; 0 background, -1 padding
    token_affine: np.ndarray  # 4x4 RAS affine of the token grid (token centres)
    input_affine: np.ndarray  # 4x4 RAS affine of the input CT
    input_shape: tuple[int, int, int]
    extra: dict[str, Any] = field(default_factory=dict)

    def kept(self) -> np.ndarray:
        """Boolean (d, h, w): tokens with a foreground majority label (the ones that are clustered)."""
        return self.labels > 0


def purity(labels: Sequence[int] | np.ndarray, clusters: Sequence[int] | np.ndarray) -> float:
    """Share of items whose cluster's most common label is their own label."""
    table = contingency_matrix(np.asarray(labels), np.asarray(clusters))
    return float(table.max(axis=0).sum() / table.sum())


def clustering_scores(labels: Sequence[int] | np.ndarray, clusters: Sequence[int] | np.ndarray) -> dict[str, float]:
    """NMI, ARI (scikit-learn) and purity of a clustering against reference labels."""
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "purity": purity(labels, clusters),
    }


def centroid_separation(features: np.ndarray, labels: np.ndarray, min_count: int = 2) -> dict[str, Any]:
    """Distance between label centroids relative to the spread within labels.

    For labels ``a`` and ``b`` (each with at least ``min_count`` items), the ratio is
    ``|c_a - c_b| / ((s_a + s_b) / 2)`` with ``s`` the root-mean-square distance of a label's items
    to its centroid. Ratios above 1 mean the labels stand apart in feature space.

    Also the published SMART paper's measures (DAGMaN, MIDL 2025, organ clustering): the
    intra-cluster distance, each item's Euclidean distance to its label's centroid, and the
    inter-cluster distance, between the centroids of every pair of labels, each as mean and
    standard deviation (over items, over pairs; the paper does not say which sd it gives).

    Returns:
        ``mean_ratio`` over all pairs, ``labels`` (those used), ``ratio`` (the symmetric matrix as
        nested lists, 0 on the diagonal), ``centroid_distance`` and ``spread`` per label, and
        ``intra_distance`` / ``inter_distance``, each ``{"mean", "sd"}``.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    ids, counts = np.unique(labels, return_counts=True)
    ids = ids[counts >= min_count]
    if ids.size < 2:
        nan = {"mean": float("nan"), "sd": float("nan")}
        return {
            "mean_ratio": float("nan"),
            "labels": ids.tolist(),
            "ratio": [],
            "centroid_distance": [],
            "spread": [],
            "intra_distance": nan,
            "inter_distance": nan,
        }
    centroids = np.stack([features[labels == i].mean(0) for i in ids])
    spread = np.array([np.sqrt(((features[labels == i] - c) ** 2).sum(1).mean()) for i, c in zip(ids, centroids)])
    distance = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    scale = (spread[:, None] + spread[None]) / 2.0
    ratio = np.divide(distance, scale, out=np.full_like(distance, np.nan), where=scale > 0)
    np.fill_diagonal(ratio, 0.0)
    upper = ratio[np.triu_indices(ids.size, k=1)]
    intra = np.concatenate([np.linalg.norm(features[labels == i] - c, axis=1) for i, c in zip(ids, centroids)])
    inter = distance[np.triu_indices(ids.size, k=1)]
    return {
        "mean_ratio": float(np.nanmean(upper)) if np.isfinite(upper).any() else float("nan"),
        "labels": ids.tolist(),
        "ratio": ratio.tolist(),
        "centroid_distance": distance.tolist(),
        "spread": spread.tolist(),
        "intra_distance": {"mean": float(intra.mean()), "sd": float(intra.std())},
        "inter_distance": {"mean": float(inter.mean()), "sd": float(inter.std())},
    }


def kmeans_clusters(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means (scikit-learn, 4 restarts) on L2-normalised ``features`` (N, C); cluster ids 0..k-1."""
    if not 1 <= k <= len(features):
        raise ValueError(f"k={k} clusters need between 1 and {len(features)} items")
    x = np.asarray(features, dtype=np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x).astype(np.int64)


def token_features(
    model: Any,
    ct_path: str | Path,
    labels_path: str | Path | None = None,
    spacing: float | Sequence[float] = (2.0, 2.0, 2.0),
    window: str | Sequence[float] = "wide",
    roi: int | Sequence[int] = (64, 64, 64),
    progress: bool = True,
) -> TokenFeatures:
    """Frozen semantic-stage tokens of a whole CT on one token grid, with each token's majority label.

    ``labels_path`` may be on any grid (it is brought onto the CT's grid first, nearest neighbour);
    without it every non-padding token gets label 1.
    """
    roi_size = np.asarray([int(r) for r in as_triple(roi, "roi")])
    stride = _token_stride(model)
    if (roi_size % stride).any():
        raise ValueError(f"roi {tuple(roi_size)} must be a multiple of the token stride {stride}")
    lo, hi = parse_window(window)
    pixdim = as_triple(spacing, "spacing")
    original = read_ct(ct_path)
    to_ras = Orientation(axcodes="RAS", labels=None)
    image = Spacing(pixdim=pixdim, mode="bilinear", dtype=torch.float32)(to_ras(original))
    image = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(image)
    if labels_path is not None:
        labels = read_ct(labels_path)
        if tuple(labels.shape) != tuple(original.shape) or not np.allclose(
            np.asarray(labels.affine), np.asarray(original.affine), atol=1e-3
        ):
            labels = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
                labels, dst_affine=original.affine, spatial_size=original.shape[1:]
            )
        labels.affine = original.affine
        labels = Spacing(pixdim=pixdim, mode="nearest", dtype=torch.float32)(to_ras(labels))
        label_vox = torch.round(labels.as_tensor()[0]).long()
    else:
        label_vox = torch.ones(image.shape[1:], dtype=torch.long)
    shape = np.asarray(image.shape[1:])
    padded = (np.ceil(shape / roi_size) * roi_size).astype(int)
    pad = [(0, int(p - s)) for p, s in zip(padded, shape)]
    volume = F.pad(image.as_tensor()[0], [v for pair in reversed(pad) for v in pair])
    label_vox = F.pad(label_vox, [v for pair in reversed(pad) for v in pair], value=PAD_LABEL)

    grid = padded // stride
    feats: np.ndarray | None = None
    starts = [
        (i, j, k)
        for i in range(0, padded[0], roi_size[0])
        for j in range(0, padded[1], roi_size[1])
        for k in range(0, padded[2], roi_size[2])
    ]
    model = model.eval()
    with torch.no_grad():
        for i, j, k in tqdm(starts, desc="token features", unit="window", disable=not progress):
            crop = volume[i : i + roi_size[0], j : j + roi_size[1], k : k + roi_size[2]][None, None]
            out = model.forward_features(crop)
            tokens = out["tokens"][0].reshape(*out["grid"], -1).float().numpy()
            if feats is None:
                feats = np.zeros((*grid, tokens.shape[-1]), dtype=np.float32)
            a, b, c = i // stride, j // stride, k // stride
            feats[a : a + tokens.shape[0], b : b + tokens.shape[1], c : c + tokens.shape[2]] = tokens
    assert feats is not None
    token_labels = _majority_labels(label_vox, stride)
    token_affine = np.asarray(image.affine, dtype=np.float64) @ np.array(
        [
            [stride, 0, 0, (stride - 1) / 2.0],
            [0, stride, 0, (stride - 1) / 2.0],
            [0, 0, stride, (stride - 1) / 2.0],
            [0, 0, 0, 1.0],
        ]
    )
    return TokenFeatures(
        features=feats,
        labels=token_labels,
        token_affine=token_affine,
        input_affine=np.asarray(original.affine, dtype=np.float64),
        input_shape=tuple(int(s) for s in original.shape[1:]),  # type: ignore[arg-type]
        extra={"model_grid": [int(s) for s in shape]},
    )


def _token_stride(model: Any) -> int:
    """Voxels per token side at the semantic stage."""
    return int(model.config.semantic_stride)


def _majority_labels(label_vox: Any, stride: int) -> np.ndarray:
    """Most common label in each ``stride``^3 block of a (X, Y, Z) long tensor (ties: the smaller id)."""
    best_share = None
    best_label = None
    for value in torch.unique(label_vox).tolist():
        share = F.avg_pool3d((label_vox == value).float()[None, None], stride)[0, 0]
        if best_share is None:
            best_share, best_label = share, torch.full_like(share, value, dtype=torch.long)
        else:
            better = share > best_share
            best_share = torch.where(better, share, best_share)
            best_label = torch.where(better, torch.full_like(best_label, value), best_label)
    assert best_label is not None
    return best_label.numpy()


def clusters_on_input(token_clusters: np.ndarray, tokens: TokenFeatures) -> np.ndarray:
    """A (d, h, w) token map (e.g. cluster id + 1, 0 = none) resampled onto the input CT's grid (nearest)."""
    src = MetaTensor(torch.as_tensor(token_clusters, dtype=torch.float32)[None], affine=tokens.token_affine)
    out = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)(
        src, dst_affine=tokens.input_affine, spatial_size=tokens.input_shape
    )
    return np.rint(out.as_tensor()[0].numpy()).astype(np.int16)


def load_label_names(path: str | Path | None, ids: Sequence[int]) -> dict[int, str]:
    """Names for label ids from a JSON ``{"id": "name"}`` (or ``{"labels": {...}}``, the phantoms' file).

    Ids the file does not name (or every id, without a file) are called ``label <id>``.
    """
    names: dict[int, str] = {}
    if path is not None:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(path, f"not a readable JSON file ({exc})") from None
        table = data.get("labels", data) if isinstance(data, dict) else None
        if not isinstance(table, dict):
            raise InputError(path, 'expected {"id": "name", ...} or {"labels": {"id": "name", ...}}')
        try:
            names = {int(k): str(v) for k, v in table.items()}
        except ValueError:
            raise InputError(path, "label ids must be integers") from None
    return {int(i): names.get(int(i), f"label {int(i)}") for i in ids}


def find_label_names(labels: Path) -> Path | None:
    """``labels.json`` beside a label map, or in the folder above it (a data set's shared names file,
    as ``organs/labels.json`` for ``organs/CASE/organs.nii.gz``); None when neither exists."""
    for folder in (labels.parent, labels.parent.parent):
        if (folder / "labels.json").is_file():
            return folder / "labels.json"
    return None


#: Markers cycled once every colour of the palette is used, so each (colour, marker) pair is unique.
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def distinct_style(n: int) -> tuple[tuple[float, ...], str]:
    """Colour and marker of the ``n``-th legend entry: matplotlib's ``tab10`` colours (ten clearly
    different hues), with a new marker for each further ten entries; unique for 100 entries, after
    which markers repeat with a shifted colour."""
    palette = matplotlib.colormaps["tab10"].colors
    marker = MARKERS[(n // len(palette)) % len(MARKERS)]
    return tuple(palette[(n + n // (len(palette) * len(MARKERS))) % len(palette)]), marker


def save_tsne_png(
    features: np.ndarray,
    labels: np.ndarray,
    names: dict[int, str],
    path: str | Path,
    max_points: int = 1500,
    seed: int = 0,
    title: str = "",
) -> Path:
    """t-SNE scatter of ``features`` (N, C) by label name (a random subset of ``max_points``); each label
    gets its own colour and marker pair (:func:`distinct_style`)."""
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(features))[:max_points]
    x, y = np.asarray(features)[pick], np.asarray(labels)[pick]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    if len(x) > 3:
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    else:
        xy = np.column_stack([np.arange(len(x), dtype=float), np.zeros(len(x))])
    fig = Figure(figsize=(8, 6.5))
    ax = fig.subplots()
    ids = sorted(set(y.tolist()))
    for n, i in enumerate(ids):
        sel = y == i
        colour, marker = distinct_style(n)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, color=colour, marker=marker, label=names.get(i, f"label {i}"))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1 + len(ids) // 30)
    return save_figure(fig, path, dpi=90)


@dataclass
class OrganClustering:
    """k-means of a CT's foreground tokens, compared with their labels (:func:`cluster_organs`)."""

    tokens: TokenFeatures
    k: int
    clusters: np.ndarray  # (N,) cluster id 0..k-1 of each kept token, in the order of tokens.kept()
    scores: dict[str, float]  # nmi, ari, purity
    separation: dict[str, Any]  # centroid_separation of the features by label

    @property
    def labels(self) -> np.ndarray:
        """(N,) label of each kept token."""
        return self.tokens.labels[self.tokens.kept()]

    @property
    def features(self) -> np.ndarray:
        """(N, C) features of the kept tokens."""
        return self.tokens.features[self.tokens.kept()]

    @property
    def present(self) -> np.ndarray:
        """The labels that hold a token, sorted."""
        return np.unique(self.labels)


def cluster_organs(
    tokens: TokenFeatures, k: int | None = None, seed: int = 0, labels_path: str | Path = "the label map"
) -> OrganClustering:
    """k-means (:func:`kmeans_clusters`) of the tokens with a foreground label, ``k`` clusters (default:
    the number of labels present), scored against the labels and with the labels' centroid separation.

    Raises:
        InputError: fewer than two labels cover a token (``labels_path`` names the label map).
        SmartformerError: ``k`` is more than the labelled tokens.
    """
    kept = tokens.kept()
    labels = tokens.labels[kept]
    present = np.unique(labels)
    if present.size < 2:
        raise InputError(
            labels_path,
            f"fewer than 2 foreground labels cover a token ({present.size}); "
            "use a finer {setting} or a label map with more structures",
            setting="spacing",
        )
    k = k or int(present.size)
    if k > labels.size:
        raise SmartformerError(f"k={k} clusters are more than the {labels.size} labelled tokens")
    features = tokens.features[kept]
    clusters = kmeans_clusters(features, k, seed=seed)
    return OrganClustering(
        tokens=tokens,
        k=k,
        clusters=clusters,
        scores=clustering_scores(labels, clusters),
        separation=centroid_separation(features, labels),
    )


def write_clustering(
    result: OrganClustering,
    names: dict[int, str],
    out: Path,
    stem: str,
    sources: dict[str, Any],
    settings: dict[str, Any],
    tsne_points: int = 1500,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``STEM_clusters.nii.gz`` (cluster id + 1 per voxel of the CT, 0 = not clustered),
    ``STEM_tsne.png`` (at most ``tsne_points`` tokens, coloured by label ``names``) and
    ``STEM_clustering.json`` into ``out``; return what the JSON holds.

    ``sources`` (checkpoint, image, labels) come first in the JSON and ``settings`` last.
    """
    tokens, labels, scores, separation = result.tokens, result.labels, result.scores, result.separation
    out.mkdir(parents=True, exist_ok=True)
    token_map = np.zeros(tokens.labels.shape, dtype=np.int64)
    token_map[tokens.kept()] = result.clusters + 1
    cluster_path = write_nifti(
        clusters_on_input(token_map, tokens).astype(np.int16), tokens.input_affine, out / f"{stem}_clusters.nii.gz"
    )
    tsne = save_tsne_png(
        result.features,
        labels,
        names,
        out / f"{stem}_tsne.png",
        max_points=tsne_points,
        seed=seed,
        title=f"{stem}: tokens by label (NMI {scores['nmi']:.2f}, k={result.k})",
    )
    report = {
        **sources,
        "k": result.k,
        "tokens": int(labels.size),
        "tokens_per_label": {names[int(i)]: int((labels == i).sum()) for i in result.present},
        **scores,
        "centroid_separation": separation["mean_ratio"],
        "intra_distance": separation["intra_distance"],
        "inter_distance": separation["inter_distance"],
        "separation": {**separation, "names": [names[int(i)] for i in separation["labels"]]},
        "clusters_nifti": str(cluster_path),
        "tsne_png": str(tsne),
        "settings": settings,
    }
    (out / f"{stem}_clustering.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
