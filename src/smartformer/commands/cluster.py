"""``smartformer cluster``: k-means on frozen token features of a CT, compared with an organ label map."""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.commands._options import (
    add_checkpoint_argument,
    add_roi,
    add_spacing_window,
    check_sizes,
    check_spacing_window,
)
from smartformer.data.naming import volume_stem
from smartformer.errors import InputError, SmartformerError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cluster",
        help="unsupervised organ clustering of frozen token features vs a label map",
        description=(
            "Cut the CT into non-overlapping windows, take the semantic-stage tokens (stride 16) of "
            "the frozen network, give each token the majority label of the voxels it covers, and run "
            "k-means on the tokens with a foreground label (k: the number of labels present). Writes "
            "NAME_clusters.nii.gz (cluster id + 1 per voxel, 0 = not clustered; the CT's shape and "
            "affine), NAME_tsne.png (t-SNE coloured by label name) and NAME_clustering.json (NMI, ARI, "
            "purity, centroid distance relative to within-label spread)."
        ),
    )
    add_checkpoint_argument(p)
    p.add_argument("--image", required=True, type=Path, help="the CT: NIfTI, NRRD, MetaImage or a DICOM folder")
    p.add_argument("--labels", required=True, type=Path, help="label map (any grid; resampled to the CT's)")
    p.add_argument("--names", type=Path, default=None,
                   help='JSON {"id": "name"} (or {"labels": {...}}); default: labels.json next to --labels or in '
                        'the folder above it; without one the legend shows label ids, with a warning')
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("-k", "--clusters", type=int, default=None, help="number of clusters (default: labels present)")
    add_spacing_window(p)
    add_roi(p, "window size")
    p.add_argument("--tsne-points", type=int, default=1500, help="tokens drawn in the t-SNE (default: 1500)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and t-SNE (default: 0)")
    p.add_argument("--name", default=None, help="file name stem of the outputs (default: from --image)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def find_label_names(labels: Path) -> Path | None:
    """``labels.json`` beside a label map, or in the folder above it (a data set's shared names file,
    as ``organs/labels.json`` for ``organs/CASE/organs.nii.gz``); None when neither exists."""
    for folder in (labels.parent, labels.parent.parent):
        if (folder / "labels.json").is_file():
            return folder / "labels.json"
    return None


def run(args: argparse.Namespace) -> int:
    import json
    import warnings

    import numpy as np

    from smartformer.analysis.clustering import (
        centroid_separation,
        clustering_scores,
        clusters_on_input,
        kmeans_clusters,
        load_label_names,
        save_tsne_png,
        token_features,
    )
    from smartformer.data.io import write_nifti
    from smartformer.models.hub import load_encoder, resolve_checkpoint

    check_spacing_window(args)
    check_sizes(args.roi, "roi")
    if args.tsne_points < 2 or (args.clusters is not None and args.clusters < 2):
        raise SmartformerError("--tsne-points and -k/--clusters must be at least 2")
    names_path = args.names if args.names is not None else find_label_names(args.labels)
    if names_path is not None and not names_path.is_file():
        raise InputError(names_path, "does not exist")
    model = load_encoder(args.checkpoint)  # tokens only: pooled-token models too
    tokens = token_features(model, args.image, args.labels,
                            spacing=args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing),
                            window=args.window, roi=args.roi[0] if len(args.roi) == 1 else tuple(args.roi),
                            progress=not args.no_progress)
    kept = tokens.kept()
    labels = tokens.labels[kept]
    present = np.unique(labels)
    if present.size < 2:
        raise InputError(args.labels, f"fewer than 2 foreground labels cover a token ({present.size}); "
                                      "use a finer --spacing or a label map with more structures")
    k = args.clusters or int(present.size)
    if k > labels.size:
        raise SmartformerError(f"-k {k} is more than the {labels.size} labelled tokens")
    features = tokens.features[kept]
    clusters = kmeans_clusters(features, k, seed=args.seed)
    if names_path is None:
        warnings.warn(f"{args.labels}: no labels.json beside it or in the folder above, and no --names; "
                      "the legend shows label ids (label 1, label 2, ...)", stacklevel=1)
    names = load_label_names(names_path, present.tolist())
    scores = clustering_scores(labels, clusters)
    separation = centroid_separation(features, labels)

    stem = args.name or volume_stem(args.image)
    args.out.mkdir(parents=True, exist_ok=True)
    token_map = np.zeros(tokens.labels.shape, dtype=np.int64)
    token_map[kept] = clusters + 1
    cluster_path = write_nifti(clusters_on_input(token_map, tokens).astype(np.int16), tokens.input_affine,
                               args.out / f"{stem}_clusters.nii.gz")
    tsne = save_tsne_png(features, labels, names, args.out / f"{stem}_tsne.png", max_points=args.tsne_points,
                         seed=args.seed, title=f"{stem}: tokens by label (NMI {scores['nmi']:.2f}, k={k})")
    counts = {names[int(i)]: int((labels == i).sum()) for i in present}
    report = {
        "checkpoint": resolve_checkpoint(args.checkpoint).source,
        "image": str(args.image),
        "labels": str(args.labels),
        "k": k,
        "tokens": int(labels.size),
        "tokens_per_label": counts,
        **scores,
        "centroid_separation": separation["mean_ratio"],
        "intra_distance": separation["intra_distance"],
        "inter_distance": separation["inter_distance"],
        "separation": {**separation, "names": [names[int(i)] for i in separation["labels"]]},
        "clusters_nifti": str(cluster_path),
        "tsne_png": str(tsne),
        "settings": {"spacing": args.spacing, "window": args.window, "roi": args.roi, "seed": args.seed},
    }
    (args.out / f"{stem}_clustering.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{labels.size} tokens, {present.size} labels, k={k}: NMI {scores['nmi']:.3f}  ARI {scores['ari']:.3f}  "
          f"purity {scores['purity']:.3f}  centroid separation {separation['mean_ratio']:.2f}")
    intra, inter = separation["intra_distance"], separation["inter_distance"]
    print(f"  distances (as the SMART paper): intra-cluster {intra['mean']:.2f} +- {intra['sd']:.2f}, "
          f"inter-cluster {inter['mean']:.2f} +- {inter['sd']:.2f}")
    print(f"  clusters {cluster_path}\n  t-SNE    {tsne}\n  metrics  {args.out / f'{stem}_clustering.json'}")
    return 0
