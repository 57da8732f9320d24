"""One self-contained HTML page of a training run and its interpretation results (``smartformer report``).

:func:`write_report` gathers a run directory's loss curves (``metrics.jsonl``, drawn by
:func:`curves_png`), attention snapshots (``snapshots/*.png``), its ``config.yaml``, and every
``localize`` (``summary.json``), ``cluster`` (``*_clustering.json``) and ``attention`` PNG found
below it or below further result folders, with the images embedded.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from smartformer.analysis.localization import METRICS
from smartformer.analysis.overlay import save_figure
from smartformer.errors import InputError
from smartformer.train.monitor import read_metrics
from smartformer.train.schedules import EFFECTIVE_LR_NOTE, read_effective_lr

__all__ = [
    "HEAD_DISTANCE_KEYS",
    "LOSS_KEYS",
    "MAX_SNAPSHOTS",
    "MONITOR_KEYS",
    "REFERENCE_KEYS",
    "SCHEDULE_KEYS",
    "Report",
    "curves_png",
    "pick_snapshots",
    "write_report",
]

#: Scalars drawn in the loss panel and the schedule panel of the curves figure, when logged.
LOSS_KEYS: tuple[str, ...] = ("loss", "loss_recon", "loss_patch", "loss_cls", "loss_global", "loss_koleo")
SCHEDULE_KEYS: tuple[str, ...] = ("lr", "momentum", "teacher_temp", "mask_ratio")
#: The collapse monitors (third row, when logged): target entropies as fractions of ln K, the
#: cosine between the teacher [CLS] of different volumes, the attention's share on air (dashed:
#: the share of air cells, what a uniform map would give).
MONITOR_KEYS: tuple[str, ...] = (
    "teacher_cls_entropy",
    "teacher_cls_batch_entropy",
    "teacher_patch_entropy",
    "teacher_patch_batch_entropy",
    "teacher_cls_cosine",
    "attn_air_share",
)
#: The SMART paper's head diversity (fourth row, when logged: train.head_distance_every): the
#: entropy of the teacher heads' attention distances per Swin stage, mean over heads.
HEAD_DISTANCE_KEYS: tuple[str, ...] = tuple(f"head_distance_entropy_s{k}" for k in range(1, 5))
#: A reference curve drawn dashed in a monitor's panel.
REFERENCE_KEYS: dict[str, str] = {"attn_air_share": "air_cell_share"}
#: At most this many attention snapshots are shown (evenly spaced over the run, the last one included).
MAX_SNAPSHOTS = 8


def _image(path: Path, caption: str, width: int = 900) -> str:
    """An ``<img>`` with ``path`` embedded as a base64 data URI, and a caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" style="max-width:{width}px;width:100%">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def curves_png(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per logged loss term (top row), per schedule (middle) and per collapse monitor (bottom,
    when logged) against the step, each on its own scale: terms that differ by orders of magnitude
    do not hide one another."""

    def series(key: str) -> list[tuple[float, float]]:
        return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]

    groups = [[k for k in keys if series(k)] or keys[:1] for keys in (LOSS_KEYS, SCHEDULE_KEYS)]
    monitors = [k for k in MONITOR_KEYS if series(k)]
    if monitors:
        groups.append(monitors)
    diversity = [k for k in HEAD_DISTANCE_KEYS if series(k)]
    if diversity:
        groups.append(diversity)
    cols = max(len(g) for g in groups)
    fig = Figure(figsize=(3.2 * cols, 2.8 * len(groups)))
    axes = fig.subplots(len(groups), cols, squeeze=False)
    for row, keys in zip(axes, groups):
        for ax, key in zip(row, keys):
            for name, style in ((key, "-"), (REFERENCE_KEYS.get(key), "--")):
                points = series(name) if name else []
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, style, marker="." if len(points) < 30 else None, label=name)
            if key in REFERENCE_KEYS and series(REFERENCE_KEYS[key]):
                ax.legend(fontsize=6)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in row[len(keys) :]:
            ax.axis("off")
    return save_figure(fig, path, dpi=80)


def pick_snapshots(paths: list[Path]) -> list[Path]:
    """Up to :data:`MAX_SNAPSHOTS` paths evenly spaced over ``paths``, first and last included."""
    if len(paths) <= MAX_SNAPSHOTS:
        return paths
    step = (len(paths) - 1) / (MAX_SNAPSHOTS - 1)
    return [paths[round(i * step)] for i in range(MAX_SNAPSHOTS)]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """An HTML table of ``rows`` under ``header`` (floats to 4 significant digits, text escaped)."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # 0.0005 stays 0.0005

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _name(path: Path, roots: list[Path]) -> str:
    """``path`` relative to the first of ``roots`` that holds it (else as given)."""
    for root in roots:
        if path.resolve().is_relative_to(root.resolve()):
            return str(path.resolve().relative_to(root.resolve()))
    return str(path)


def _localization_section(summary_path: Path, roots: list[Path]) -> str:
    """The means per method of a ``localize`` ``summary.json`` and its montage."""
    data = json.loads(summary_path.read_text())
    rows = [
        [m, e.get("cases", ""), *[(e[k]["mean"] if e.get(k) else "") for k in METRICS]]
        for m, e in data["methods"].items()
    ]
    parts = [
        f"<h3>Localization: {html.escape(_name(summary_path.parent, roots))}</h3>",
        f"<p>data: {html.escape(str(data.get('data', '')))}; metrics inside the body, means over cases</p>",
        _table(["method", "cases", *METRICS], rows),
    ]
    montage = summary_path.parent / "montage.png"
    if montage.is_file():
        parts.append(_image(montage, "axial slices through each lesion (green), one column per method"))
    return "\n".join(parts)


def _clustering_section(result_path: Path, roots: list[Path]) -> str:
    """The scores of a ``cluster`` result (``*_clustering.json``) and its t-SNE."""
    data = json.loads(result_path.read_text())

    def mean_sd(key: str) -> str:  # the paper's intra/inter-cluster distances, in results since issue 13
        value = data.get(key)
        return f"{value['mean']:.2f} ± {value['sd']:.2f}" if isinstance(value, dict) else ""

    rows = [
        [
            data.get("image", ""),
            data.get("k", ""),
            data.get("tokens", ""),
            data.get("nmi", ""),
            data.get("ari", ""),
            data.get("purity", ""),
            data.get("centroid_separation", ""),
            mean_sd("intra_distance"),
            mean_sd("inter_distance"),
        ]
    ]
    parts = [
        f"<h3>Clustering: {html.escape(_name(result_path, roots))}</h3>",
        _table(
            [
                "image",
                "k",
                "tokens",
                "NMI",
                "ARI",
                "purity",
                "centroid separation",
                "intra-cluster distance",
                "inter-cluster distance",
            ],
            rows,
        ),
    ]
    tsne = result_path.parent / Path(str(data.get("tsne_png", ""))).name  # beside the JSON, wherever it moved
    if data.get("tsne_png") and tsne.is_file():
        parts.append(_image(tsne, "t-SNE of the token features, coloured by label", width=700))
    return "\n".join(parts)


def _found(roots: list[Path], pattern: str, keep: Any = None) -> list[Path]:
    """Files matching ``pattern`` below any of ``roots`` (each once, sorted), those ``keep`` accepts."""
    found = {p.resolve(): p for root in roots for p in root.rglob(pattern) if keep is None or keep(p)}
    return [found[k] for k in sorted(found)]


def _peak_lr(run_dir: Path, rows: list[dict[str, Any]]) -> str:
    """``; peak lr X (...)``: the effective lr config.yaml states, else the largest logged lr."""
    config = run_dir / "config.yaml"
    stated = read_effective_lr(config.read_text()) if config.is_file() else None
    if stated is not None:
        return f"; {EFFECTIVE_LR_NOTE} {stated:.4g} (optim.lr per sample x global batch)"
    logged = [r["lr"] for r in rows if isinstance(r.get("lr"), (int, float))]
    return f"; largest logged lr {max(logged):.4g}" if logged else ""


@dataclass
class Report:
    """What :func:`write_report` put on the page: where it is and how many of each result it holds."""

    path: Path
    snapshots: int
    localizations: int
    clusterings: int


def write_report(run_dir: Path, results: list[Path] | None = None, out: Path | None = None) -> Report:
    """Write the HTML page of ``run_dir`` and the results below it or below ``results`` to ``out``
    (default: ``run_dir/report.html``; its curves figure goes to ``<stem>_files/`` beside it).

    Raises:
        InputError: ``run_dir`` holds nothing to show (no metrics, snapshots or results).
    """
    roots = [run_dir, *(results or [])]
    metrics = run_dir / "metrics.jsonl"
    snapshots = sorted((run_dir / "snapshots").glob("*.png")) if (run_dir / "snapshots").is_dir() else []
    localizations = _found(roots, "summary.json", lambda p: '"methods"' in p.read_text())
    clusterings = _found(roots, "*_clustering.json")
    attention_pngs = _found(roots, "*.png", lambda p: p.with_name(p.stem + "_mean.nii.gz").is_file())
    if not (metrics.is_file() or snapshots or localizations or clusterings or attention_pngs):
        raise InputError(run_dir, "holds no metrics.jsonl, snapshots, attention, localization or clustering results")
    out = out or run_dir / "report.html"
    parts = [f"<h1>smartformer run: {html.escape(str(run_dir.resolve()))}</h1>"]

    if metrics.is_file():
        rows = read_metrics(metrics)
        if rows:
            png = curves_png(rows, out.parent / (out.stem + "_files") / "curves.png")
            last = rows[-1]
            parts.append("<h2>Training</h2>")
            parts.append(f"<p>{len(rows)} logged steps, last step {last.get('step', '?')}{_peak_lr(run_dir, rows)}</p>")
            parts.append(
                _table(
                    ["scalar", "last value"],
                    [[k, v] for k, v in last.items() if k != "step" and isinstance(v, (int, float))],
                )
            )
            parts.append(_image(png, "loss terms and schedules"))
    config = run_dir / "config.yaml"
    if config.is_file():
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(config.read_text())}</pre></details>")
    if snapshots:
        parts.append("<h2>Teacher attention during training</h2>")
        parts.extend(_image(p, p.stem, width=700) for p in pick_snapshots(snapshots))
    if attention_pngs:
        parts.append("<h2>Attention maps</h2>")
        parts.extend(_image(p, _name(p, roots)) for p in attention_pngs)
    if localizations or clusterings:
        parts.append("<h2>Interpretation</h2>")
        parts.extend(_localization_section(p, roots) for p in localizations)
        parts.extend(_clustering_section(p, roots) for p in clusterings)

    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
        "font-size:12px}figure{margin:0.5em 0}figcaption{font-size:12px;color:#555}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>smartformer report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")  # the page says utf-8; the locale may be ASCII
    return Report(path=out, snapshots=len(snapshots), localizations=len(localizations), clusterings=len(clusterings))
