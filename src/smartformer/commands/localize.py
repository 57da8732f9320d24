"""``smartformer localize``: zero-shot tumour localization of attention maps against tumour masks.

For every (CT, mask) pair and every checkpoint, the mean semantic attention on the CT's grid is
scored with :func:`smartformer.analysis.localization.localization_metrics` (inside the body),
side by side with three baselines: a centre prior, an intensity prior and the same network with
random weights (named ``random_PRESET``, as ``--checkpoint random:PRESET`` is; given such a checkpoint,
it is the random baseline). Writes ``cases.csv`` (one row per case and method), ``summary.json`` (mean, std
and median per method and metric), ``comparison.csv`` / ``comparison.md`` (methods x mean
metrics) and ``montage.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartformer.commands._options import (
    add_checkpoint_argument,
    add_inference_arguments,
    check_inference_arguments,
    inference_kwargs,
)
from smartformer.errors import SmartformerError
from smartformer.wording import plural

if TYPE_CHECKING:
    import numpy as np

CENTRE, INTENSITY = "centre_prior", "intensity_prior"
#: Cases shown in montage.png.
MONTAGE_ROWS = 8


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "localize",
        help="zero-shot tumour localization of attention maps vs tumour masks",
        description=(
            "Score the mean semantic attention of one or more checkpoints against tumour masks "
            "(voxel AUROC, pointing game, Dice/IoU at Otsu and at the top-k percent, bounding-box IoU, "
            "enrichment, energy pointing), all inside the body (HU > -500 plus the lesion), next to "
            "a centre prior, an intensity prior and the network with random weights. --data is a CSV "
            "with image and mask columns (mask paths relative to the CSV's folder) or a folder of case "
            "folders, each with ct.* and either tumor.*/mask.*/lesion.* (voxels > 0) or labels.* "
            "(the lesion is --lesion-label, default 11 as in the built-in phantoms)."
        ),
    )
    add_checkpoint_argument(p, many=True)
    p.add_argument("--data", required=True, type=Path, help="CSV (image,mask) or a folder of case folders")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    add_inference_arguments(p)
    p.add_argument("--lesion-label", type=int, default=None, metavar="ID",
                   help="label value of the lesion in label maps (default: 11 for labels.* files, "
                        "every voxel > 0 for mask files and CSV masks)")
    p.add_argument("--tolerance-mm", type=float, default=10.0,
                   help="pointing game: distance from the lesion still counted as a hit (default: 10)")
    p.add_argument("--top-k", type=float, default=5.0, help="percent of body voxels for top-k Dice/IoU (default: 5)")
    p.add_argument("--windows", type=int, default=0,
                   help="score N windows per case at random offsets that hold part of the lesion, for "
                        "lesion-centred crops such as STS (default: 0, the whole CT)")
    p.add_argument("--window-mm", type=float, default=100.0, help="side of those windows in mm (default: 100)")
    p.add_argument("--max-cases", type=int, default=None, help="only the first N cases")
    p.add_argument("--no-random-baseline", action="store_true",
                   help="skip the random-weights network (random_PRESET: the first checkpoint's architecture; "
                        "a random:PRESET checkpoint replaces it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and windows (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _score_case(maps: dict[str, "np.ndarray"], lesion: "np.ndarray", image_hu: "np.ndarray",
                spacing: tuple[float, float, float], args: argparse.Namespace,
                rng: "np.random.Generator") -> dict[str, dict[str, float]]:
    """Metrics per method for one case: whole CT, or the mean over random lesion windows.

    ``maps`` holds every method but the centre prior, which is built for each scored box.
    """
    import numpy as np

    from smartformer.analysis.localization import METRICS, centre_prior, lesion_windows, localization_metrics

    if args.windows <= 0:
        boxes = [tuple(slice(0, n) for n in lesion.shape)]
    else:
        size = [max(1, int(round(args.window_mm / s))) for s in spacing]
        boxes = lesion_windows(lesion, size, args.windows, rng)
    scores: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in [*maps, CENTRE]}
    for box in boxes:
        for method in scores:
            crop = centre_prior(lesion[box].shape, spacing) if method == CENTRE else maps[method][box]
            values = localization_metrics(crop, lesion[box], image_hu[box], spacing, args.tolerance_mm, args.top_k)
            for key, v in values.items():
                scores[method][key].append(v)
    return {m: {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in d.items()}
            for m, d in scores.items()}


def montage_panel(case: str, image_hu: "np.ndarray", lesion: "np.ndarray", maps: dict[str, "np.ndarray"],
                  spacing: tuple[float, float, float]) -> dict[str, Any]:
    """The axial slice with the most lesion voxels of the CT, the lesion and every map (kept small)."""
    import numpy as np

    z = int(np.argmax(lesion.sum(axis=(0, 1))))
    lo, hi = np.percentile(image_hu, [1, 99])
    return {
        "case": case,
        "image": image_hu[:, :, z].copy(),
        "window": (float(lo), float(hi)),
        "lesion": lesion[:, :, z].copy(),
        "maps": {name: (m[:, :, z].copy(), float(m.min()), float(m.max())) for name, m in maps.items()},
        "aspect": spacing[1] / spacing[0],
    }


def _montage(panels: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    """One row per case (see :func:`montage_panel`): the CT, then each method's map on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smartformer.analysis.overlay import save_figure

    cols = 1 + len(methods)
    fig, axes = plt.subplots(len(panels), cols, figsize=(2.4 * cols, 2.4 * len(panels)), squeeze=False)
    for row, panel in zip(axes, panels):
        lo, hi = panel["window"]
        for ax, name in zip(row, ["CT", *methods]):
            ax.imshow(panel["image"].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=panel["aspect"])
            if name != "CT":
                heat, vmin, vmax = panel["maps"][name]
                ax.imshow(heat.T, cmap="jet", origin="lower", alpha=0.45, aspect=panel["aspect"], vmin=vmin,
                          vmax=vmax if vmax > vmin else vmin + 1.0)
            if panel["lesion"].any():
                ax.contour(panel["lesion"].T.astype(float), levels=[0.5], colors="lime", linewidths=1.0,
                           origin="lower")
            ax.set_title(panel["case"] if name == "CT" else name, fontsize=8)
            ax.axis("off")
    return save_figure(fig, path, dpi=80)


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Mean, std and median of every metric per method over the cases (NaN cases left out)."""
    import numpy as np

    from smartformer.analysis.localization import METRICS

    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"cases": len(mine)}
        for key in METRICS:
            values = np.asarray([r[key] for r in mine], dtype=np.float64)
            values = values[np.isfinite(values)]
            entry[key] = ({"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values))}
                          if values.size else None)
        summary[method] = entry
    return summary


def _comparison(summary: dict[str, dict[str, Any]], out: Path) -> None:
    """``comparison.csv`` and ``comparison.md``: one row per method, the mean of each metric."""
    from smartformer.analysis.localization import METRICS

    def cell(entry: dict[str, Any] | None) -> str:
        return "" if entry is None else f"{entry['mean']:.3f}"

    lines = ["method,cases," + ",".join(METRICS)]
    md = ["| method | cases | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 2) + "|"]
    for method, entry in summary.items():
        cells = [cell(entry[k]) for k in METRICS]
        lines.append(",".join([method, str(entry["cases"]), *cells]))
        md.append("| " + " | ".join([method, str(entry["cases"]), *cells]) + " |")
    (out / "comparison.csv").write_text("\n".join(lines) + "\n")
    (out / "comparison.md").write_text("\n".join(md) + "\n")


def run(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import pandas as pd
    from tqdm.auto import tqdm

    from smartformer.analysis.attention import attention_volume
    from smartformer.analysis.localization import METRICS, centre_prior, intensity_prior
    from smartformer.data.cases import find_cases, lesion_value
    from smartformer.data.io import read_ct
    from smartformer.data.masks import read_mask_on
    from smartformer.models.hub import checkpoint_names, load_encoder, random_baseline, resolve_checkpoint

    check_inference_arguments(args)
    if args.tolerance_mm < 0 or not 0 < args.top_k <= 100:
        raise SmartformerError("--tolerance-mm must be >= 0 and --top-k in (0, 100]")
    if args.windows < 0 or args.window_mm <= 0 or (args.max_cases is not None and args.max_cases < 1):
        raise SmartformerError("--windows must be >= 0, --window-mm > 0 and --max-cases >= 1")
    names = checkpoint_names(args.checkpoint, reserved=(CENTRE, INTENSITY))
    models = {name: load_encoder(spec, seed=args.seed, need_attention=True)
              for name, spec in zip(names, args.checkpoint)}
    cases = find_cases(args.data)[: args.max_cases]
    given = any(resolve_checkpoint(spec).kind == "random" for spec in args.checkpoint)
    baseline: list[str] = []
    if not args.no_random_baseline and not given:
        name, model = random_baseline(models[names[0]], args.seed, like=names[0])
        baseline, models[name] = [name], model
    methods = [*names, CENTRE, INTENSITY, *baseline]
    kwargs = inference_kwargs(args)
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    panels: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)
    for case in tqdm(cases, desc="localize", unit="case", disable=args.no_progress):
        ct = read_ct(case.image)
        lesion = read_mask_on(case.mask, ct, lesion_value(case, args.lesion_label), allow_empty=True)
        if not lesion.any():
            skipped.append({"case": case.case, "reason": f"empty mask {case.mask}"})
            continue
        image_hu = ct.as_tensor()[0].numpy()
        spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(ct.affine)[:3, :3], axis=0))
        maps = {name: attention_volume(model, ct, **kwargs).mean for name, model in models.items()}
        maps[INTENSITY] = intensity_prior(image_hu)
        scores = _score_case(maps, lesion, image_hu, spacing, args, rng)  # type: ignore[arg-type]
        for method in methods:
            rows.append({"case": case.case, "method": method, **scores[method]})
        if len(panels) < MONTAGE_ROWS:
            maps[CENTRE] = centre_prior(lesion.shape, spacing)
            panels.append(montage_panel(case.case, image_hu, lesion, maps, spacing))  # type: ignore[arg-type]
    if not rows:
        raise SmartformerError(f"{args.data}: every mask was empty on its CT's grid; nothing to score")
    pd.DataFrame(rows, columns=["case", "method", *METRICS]).to_csv(args.out / "cases.csv", index=False)
    summary = summarize(rows, methods)
    report = {
        "checkpoints": {name: resolve_checkpoint(spec).source for name, spec in zip(names, args.checkpoint)},
        "data": str(args.data),
        "settings": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()},
                     "tolerance_mm": args.tolerance_mm, "top_k_percent": args.top_k, "windows": args.windows,
                     "window_mm": args.window_mm, "seed": args.seed, "region": "body (HU > -500) + lesion"},
        "skipped": skipped,
        "methods": summary,
    }
    (args.out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    _comparison(summary, args.out)
    _montage(panels, methods, args.out / "montage.png")
    print((args.out / "comparison.md").read_text(), end="")
    print(f"{plural(len(rows) // len(methods), 'case')} scored, {len(skipped)} skipped; results in {args.out}")
    return 0
