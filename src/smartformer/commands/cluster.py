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
    p.add_argument(
        "--names",
        type=Path,
        default=None,
        help='JSON {"id": "name"} (or {"labels": {...}}); default: labels.json next to --labels or in '
        "the folder above it; without one the legend shows label ids, with a warning",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("-k", "--clusters", type=int, default=None, help="number of clusters (default: labels present)")
    add_spacing_window(p)
    add_roi(p, "window size")
    p.add_argument("--tsne-points", type=int, default=1500, help="tokens drawn in the t-SNE (default: 1500)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and t-SNE (default: 0)")
    p.add_argument("--name", default=None, help="file name stem of the outputs (default: from --image)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from smartformer.analysis.clustering import (
        cluster_organs,
        find_label_names,
        load_label_names,
        token_features,
        write_clustering,
    )
    from smartformer.models.hub import load_encoder, resolve_checkpoint

    check_spacing_window(args)
    check_sizes(args.roi, "roi")
    if args.tsne_points < 2 or (args.clusters is not None and args.clusters < 2):
        raise SmartformerError("--tsne-points and -k/--clusters must be at least 2")
    names_path = args.names if args.names is not None else find_label_names(args.labels)
    if names_path is not None and not names_path.is_file():
        raise InputError(names_path, "does not exist")
    model = load_encoder(args.checkpoint)  # tokens only: pooled-token models too
    tokens = token_features(
        model,
        args.image,
        args.labels,
        spacing=args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing),
        window=args.window,
        roi=args.roi[0] if len(args.roi) == 1 else tuple(args.roi),
        progress=not args.no_progress,
    )
    result = cluster_organs(tokens, args.clusters, seed=args.seed, labels_path=args.labels)
    if names_path is None:
        warnings.warn(
            f"{args.labels}: no labels.json beside it or in the folder above, and no --names; "
            "the legend shows label ids (label 1, label 2, ...)",
            stacklevel=1,
        )
    names = load_label_names(names_path, result.present.tolist())
    stem = args.name or volume_stem(args.image)
    report = write_clustering(
        result,
        names,
        args.out,
        stem,
        sources={
            "checkpoint": resolve_checkpoint(args.checkpoint).source,
            "image": str(args.image),
            "labels": str(args.labels),
        },
        settings={"spacing": args.spacing, "window": args.window, "roi": args.roi, "seed": args.seed},
        tsne_points=args.tsne_points,
        seed=args.seed,
    )
    scores, separation = result.scores, result.separation
    print(
        f"{report['tokens']} tokens, {result.present.size} labels, k={result.k}: NMI {scores['nmi']:.3f}  "
        f"ARI {scores['ari']:.3f}  purity {scores['purity']:.3f}  centroid separation {separation['mean_ratio']:.2f}"
    )
    intra, inter = separation["intra_distance"], separation["inter_distance"]
    print(
        f"  distances (as the SMART paper): intra-cluster {intra['mean']:.2f} +- {intra['sd']:.2f}, "
        f"inter-cluster {inter['mean']:.2f} +- {inter['sd']:.2f}"
    )
    print(
        f"  clusters {report['clusters_nifti']}\n  t-SNE    {report['tsne_png']}\n"
        f"  metrics  {args.out / f'{stem}_clustering.json'}"
    )
    return 0
