"""Zero-shot tumour localization of attention maps over a set of cases, next to baselines.

:mod:`smartformer.analysis.localization` scores one map against one lesion; this module runs
that over cases and networks, as ``smartformer localize`` and ``smartformer demo`` report it:

* :func:`localization_methods`: the networks of the given checkpoints plus the same network with
  random weights (``random_PRESET``), and every method's name in table order (the checkpoints,
  :data:`CENTRE`, :data:`INTENSITY`, the random baseline);
* :func:`score_cases`: the mean attention of each network on each CT's grid, scored inside the
  body (whole CT, or random windows holding part of the lesion) with the two priors beside it;
* :func:`summarize` and :func:`write_localization`: mean, std and median per method and metric,
  and the files (``cases.csv``, ``summary.json``, ``comparison.csv`` / ``.md``, ``montage.png``);
* :func:`attention_with_baselines`: the demo's version for one phantom, which also writes the
  maps of each network.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from smartformer.analysis.attention import attention_volume, write_attention
from smartformer.analysis.localization import (
    METRICS,
    centre_prior,
    intensity_prior,
    lesion_windows,
    localization_metrics,
)
from smartformer.analysis.overlay import save_figure
from smartformer.data.cases import Case, lesion_value
from smartformer.data.io import read_ct
from smartformer.data.masks import read_mask_on
from smartformer.data.phantom import LESION_ID
from smartformer.data.transforms import BODY_HU_THRESHOLD
from smartformer.models.hub import checkpoint_names, load_encoder, random_baseline, resolve_checkpoint

if TYPE_CHECKING:
    from smartformer.config import PretrainConfig
    from smartformer.models.smartformer import SMARTFormer

__all__ = [
    "CENTRE",
    "INTENSITY",
    "MONTAGE_ROWS",
    "LocalizationResult",
    "ScoringSettings",
    "attention_with_baselines",
    "localization_methods",
    "montage_panel",
    "score_case",
    "score_cases",
    "summarize",
    "write_comparison",
    "write_localization",
    "write_montage",
]

#: Names of the two map-free baselines.
CENTRE, INTENSITY = "centre_prior", "intensity_prior"
#: Cases shown in montage.png.
MONTAGE_ROWS = 8


@dataclass(frozen=True)
class ScoringSettings:
    """How each map is scored against its lesion (see :func:`localization_metrics`).

    ``windows`` > 0 scores that many boxes of ``window_mm`` per side at random offsets, each holding
    part of the lesion (for lesion-centred crops such as STS), and averages them; 0 scores the whole CT.
    """

    tolerance_mm: float = 10.0
    top_k_percent: float = 5.0
    windows: int = 0
    window_mm: float = 100.0


@dataclass
class LocalizationResult:
    """The scores of :func:`score_cases`: one row per scored case and method (``case``, ``method`` and
    each of :data:`METRICS`), the cases left out with the reason, and the montage panels."""

    methods: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    panels: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cases(self) -> int:
        """The number of cases scored."""
        return len(self.rows) // len(self.methods)


def localization_methods(
    checkpoints: Sequence[str], seed: int = 0, random_weights: bool = True
) -> tuple[list[str], dict[str, SMARTFormer], list[str]]:
    """The checkpoints' names, their networks (with attention maps), and every method in table order.

    With ``random_weights``, and unless a checkpoint is itself ``random:PRESET``, the first network's
    architecture with random weights (seeded by ``seed``) is added as ``random_PRESET``. Returns
    ``(names, models, methods)``: methods are the names, :data:`CENTRE`, :data:`INTENSITY`, then
    the random baseline.
    """
    names = checkpoint_names(list(checkpoints), reserved=(CENTRE, INTENSITY))
    models = {name: load_encoder(spec, seed=seed, need_attention=True) for name, spec in zip(names, checkpoints)}
    given = any(resolve_checkpoint(spec).kind == "random" for spec in checkpoints)
    baseline: list[str] = []
    if random_weights and not given:
        name, model = random_baseline(models[names[0]], seed, like=names[0])
        baseline, models[name] = [name], model
    return names, models, [*names, CENTRE, INTENSITY, *baseline]


def score_case(
    maps: dict[str, np.ndarray],
    lesion: np.ndarray,
    image_hu: np.ndarray,
    spacing: tuple[float, float, float],
    settings: ScoringSettings,
    rng: np.random.Generator,
) -> dict[str, dict[str, float]]:
    """Metrics per method for one case: whole CT, or the mean over random lesion windows.

    ``maps`` holds every method but the centre prior, which is built for each scored box.
    """
    if settings.windows <= 0:
        boxes = [tuple(slice(0, n) for n in lesion.shape)]
    else:
        size = [max(1, int(round(settings.window_mm / s))) for s in spacing]
        boxes = lesion_windows(lesion, size, settings.windows, rng)
    scores: dict[str, dict[str, list[float]]] = {m: {k: [] for k in METRICS} for m in [*maps, CENTRE]}
    for box in boxes:
        for method in scores:
            crop = centre_prior(lesion[box].shape, spacing) if method == CENTRE else maps[method][box]
            values = localization_metrics(
                crop, lesion[box], image_hu[box], spacing, settings.tolerance_mm, settings.top_k_percent
            )
            for key, v in values.items():
                scores[method][key].append(v)
    return {
        m: {k: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan") for k, v in d.items()}
        for m, d in scores.items()
    }


def score_cases(
    models: dict[str, SMARTFormer],
    methods: list[str],
    cases: Sequence[Case],
    lesion_label: int | None = None,
    settings: ScoringSettings | None = None,
    inference: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> LocalizationResult:
    """Score every network's mean attention, and the priors, against each case's lesion.

    Args:
        models: name -> network (with attention maps), e.g. from :func:`localization_methods`.
        methods: every method in table order (the models' names, :data:`CENTRE`, :data:`INTENSITY`).
        cases: CTs with lesion masks or label maps (:func:`smartformer.data.cases.find_cases`).
        lesion_label: the lesion's value in the maps (see :func:`~smartformer.data.cases.lesion_value`).
        settings: how maps are scored (default: :class:`ScoringSettings`).
        inference: keyword arguments of :func:`~smartformer.analysis.attention.attention_volume`.
        seed: seed of the lesion windows.
        progress: show a progress bar.

    A case whose mask is empty on its CT's grid is left out (``skipped``); the first
    :data:`MONTAGE_ROWS` scored cases get a montage panel.
    """
    settings = settings or ScoringSettings()
    rng = np.random.default_rng(seed)
    result = LocalizationResult(methods=list(methods))
    for case in tqdm(cases, desc="localize", unit="case", disable=not progress):
        ct = read_ct(case.image)
        lesion = read_mask_on(case.mask, ct, lesion_value(case, lesion_label), allow_empty=True)
        if not lesion.any():
            result.skipped.append({"case": case.case, "reason": f"empty mask {case.mask}"})
            continue
        image_hu = ct.as_tensor()[0].numpy()
        spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(ct.affine)[:3, :3], axis=0))
        maps = {name: attention_volume(model, ct, **(inference or {})).mean for name, model in models.items()}
        maps[INTENSITY] = intensity_prior(image_hu)
        scores = score_case(maps, lesion, image_hu, spacing, settings, rng)  # type: ignore[arg-type]
        for method in methods:
            result.rows.append({"case": case.case, "method": method, **scores[method]})
        if len(result.panels) < MONTAGE_ROWS:
            maps[CENTRE] = centre_prior(lesion.shape, spacing)
            result.panels.append(montage_panel(case.case, image_hu, lesion, maps, spacing))  # type: ignore[arg-type]
    return result


def montage_panel(
    case: str,
    image_hu: np.ndarray,
    lesion: np.ndarray,
    maps: dict[str, np.ndarray],
    spacing: tuple[float, float, float],
) -> dict[str, Any]:
    """The axial slice with the most lesion voxels of the CT, the lesion and every map (kept small)."""
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


def write_montage(panels: list[dict[str, Any]], methods: list[str], path: Path) -> Path:
    """One row per case (see :func:`montage_panel`): the CT, then each method's map on it."""
    cols = 1 + len(methods)
    fig = Figure(figsize=(2.4 * cols, 2.4 * len(panels)))
    axes = fig.subplots(len(panels), cols, squeeze=False)
    for row, panel in zip(axes, panels):
        lo, hi = panel["window"]
        for ax, name in zip(row, ["CT", *methods]):
            ax.imshow(panel["image"].T, cmap="gray", origin="lower", vmin=lo, vmax=hi, aspect=panel["aspect"])
            if name != "CT":
                heat, vmin, vmax = panel["maps"][name]
                ax.imshow(
                    heat.T,
                    cmap="jet",
                    origin="lower",
                    alpha=0.45,
                    aspect=panel["aspect"],
                    vmin=vmin,
                    vmax=vmax if vmax > vmin else vmin + 1.0,
                )
            if panel["lesion"].any():
                ax.contour(panel["lesion"].T.astype(float), levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
            ax.set_title(panel["case"] if name == "CT" else name, fontsize=8)
            ax.axis("off")
    return save_figure(fig, path, dpi=80)


def summarize(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, dict[str, Any]]:
    """Mean, std and median of every metric per method over the cases (NaN cases left out)."""
    summary: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"cases": len(mine)}
        for key in METRICS:
            values = np.asarray([r[key] for r in mine], dtype=np.float64)
            values = values[np.isfinite(values)]
            entry[key] = (
                {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values))}
                if values.size
                else None
            )
        summary[method] = entry
    return summary


def write_comparison(summary: dict[str, dict[str, Any]], out: Path) -> None:
    """``comparison.csv`` and ``comparison.md`` in ``out``: one row per method, the mean of each metric."""

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


def write_localization(
    result: LocalizationResult, out: Path, checkpoints: dict[str, str], data: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """Write ``cases.csv``, ``summary.json``, ``comparison.csv`` / ``.md`` and ``montage.png`` into ``out``.

    ``checkpoints`` (name -> source), ``data`` and ``settings`` are recorded in ``summary.json``
    beside the cases left out and each method's summary (:func:`summarize`); returns that report.
    """
    pd.DataFrame(result.rows, columns=["case", "method", *METRICS]).to_csv(out / "cases.csv", index=False)
    summary = summarize(result.rows, result.methods)
    report = {
        "checkpoints": checkpoints,
        "data": data,
        "settings": settings,
        "skipped": result.skipped,
        "methods": summary,
    }
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    write_comparison(summary, out)
    write_montage(result.panels, result.methods, out / "montage.png")
    return report


def attention_with_baselines(
    case: Path, models: dict[str, tuple[SMARTFormer, str]], config: PretrainConfig, out: Path, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Attention maps (NIfTI + PNG) of each model for the phantom ``case``, and how well each map and
    two baselines (as ``smartformer localize`` has them) point at its tumour.

    ``models`` maps a name to (network, description). Returns, per method (each model, then the first
    model's architecture with random weights, ``random_PRESET`` as :func:`~smartformer.models.hub.random_baseline`
    names it, then :data:`CENTRE`): ``auroc`` and ``tumour_enrichment`` (mean attention in the tumour / in
    the body, 1.0 is chance), and ``body_mean`` / ``air_mean``; the models also get their ``png``,
    ``mean`` and ``heads`` files.
    """
    lesion = np.asarray(nib.load(str(case / "labels.nii.gz")).dataobj) == LESION_ID
    first_name, (first, _) = next(iter(models.items()))
    random_name, random_model = random_baseline(first, seed, like=first_name)
    methods: dict[str, tuple[SMARTFormer | None, str]] = {
        **models,
        random_name: (random_model, "random weights"),
        CENTRE: (None, "centre prior"),
    }
    entries: dict[str, dict[str, Any]] = {}
    image_hu = spacing = None
    for name, (model, what) in methods.items():
        entry: dict[str, Any] = {"what": what}
        if model is None:
            heat = centre_prior(lesion.shape, spacing)
        else:
            result = attention_volume(
                model,
                case / "ct.nii.gz",
                spacing=config.data.spacing,
                window=config.data.window,
                roi=config.data.roi,
                overlap=0.25,
            )
            image_hu, heat = result.image_hu, result.mean
            spacing = tuple(float(s) for s in np.linalg.norm(result.affine[:3, :3], axis=0))
            if name in models:
                files = write_attention(
                    result,
                    out,
                    stem=f"{case.name}_{name}",
                    mask=lesion,
                    title=f"{case.name}: {what}",
                    mask_label="tumour",
                )
                entry.update({k: str(v) for k, v in files.items()})
        body = image_hu > BODY_HU_THRESHOLD
        entry.update(
            {"body_mean": float(heat[body].mean()), "air_mean": float(heat[~body].mean()) if (~body).any() else None}
        )
        if lesion.any():
            scores = localization_metrics(heat, lesion, image_hu, spacing)
            entry.update({"auroc": scores["auroc"], "tumour_enrichment": scores["enrichment"]})
        entries[name] = entry
    return entries
