"""``smartformer report``: one self-contained HTML page for a training run and its interpretation results."""

from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Any

from smartformer.errors import InputError

#: Scalars drawn in the loss panel and the schedule panel of the curves figure, when logged.
LOSS_KEYS: tuple[str, ...] = ("loss", "loss_recon", "loss_patch", "loss_cls")
SCHEDULE_KEYS: tuple[str, ...] = ("lr", "momentum", "teacher_temp", "mask_ratio")
#: At most this many attention snapshots are shown (evenly spaced over the run, the last one included).
MAX_SNAPSHOTS = 8


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report of a run: loss curves, attention snapshots, localization/clustering results",
        description=(
            "Gather a run directory's loss curves (metrics.jsonl), attention snapshots (snapshots/*.png), "
            "and every 'smartformer localize' (summary.json) or 'smartformer cluster' (*_clustering.json) "
            "result and 'smartformer attention' PNG found below it, into one self-contained HTML page "
            "(images embedded)."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a 'smartformer pretrain' output folder")
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=run)


def _image(path: Path, caption: str, width: int = 900) -> str:
    """An ``<img>`` with ``path`` embedded as a base64 data URI, and a caption."""
    import base64

    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" style="max-width:{width}px;width:100%">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _curves_png(rows: list[dict[str, Any]], path: Path) -> Path:
    """Loss terms (log scale when positive) and schedules against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smartformer.analysis.overlay import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for ax, keys in ((left, LOSS_KEYS), (right, SCHEDULE_KEYS)):
        drawn = False
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=key, marker="." if len(points) < 30 else None)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    left.set_title("losses")
    right.set_title("schedules")
    for ax, keys in ((left, LOSS_KEYS), (right, SCHEDULE_KEYS)):  # lr and momentum differ by 1e3 and more
        if all(v > 0 for r in rows for k, v in r.items() if k in keys and isinstance(v, (int, float))):
            ax.set_yscale("log")
    return save_figure(fig, path, dpi=80)


def _pick_snapshots(paths: list[Path]) -> list[Path]:
    """Up to :data:`MAX_SNAPSHOTS` paths evenly spaced over ``paths``, first and last included."""
    if len(paths) <= MAX_SNAPSHOTS:
        return paths
    step = (len(paths) - 1) / (MAX_SNAPSHOTS - 1)
    return [paths[round(i * step)] for i in range(MAX_SNAPSHOTS)]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _localization_section(summary_path: Path, run_dir: Path) -> str:
    from smartformer.analysis.localization import METRICS

    data = json.loads(summary_path.read_text())
    rows = [[m, e.get("cases", ""), *[(e[k]["mean"] if e.get(k) else "") for k in METRICS]]
            for m, e in data["methods"].items()]
    parts = [f"<h3>Localization: {html.escape(str(summary_path.parent.relative_to(run_dir)))}</h3>",
             f"<p>data: {html.escape(str(data.get('data', '')))}; metrics inside the body, means over cases</p>",
             _table(["method", "cases", *METRICS], rows)]
    montage = summary_path.parent / "montage.png"
    if montage.is_file():
        parts.append(_image(montage, "axial slices through each lesion (green), one column per method"))
    return "\n".join(parts)


def _clustering_section(result_path: Path, run_dir: Path) -> str:
    data = json.loads(result_path.read_text())
    rows = [[data.get("image", ""), data.get("k", ""), data.get("tokens", ""), data.get("nmi", ""),
             data.get("ari", ""), data.get("purity", ""), data.get("centroid_separation", "")]]
    parts = [f"<h3>Clustering: {html.escape(str(result_path.relative_to(run_dir)))}</h3>",
             _table(["image", "k", "tokens", "NMI", "ARI", "purity", "centroid separation"], rows)]
    tsne = result_path.parent / Path(str(data.get("tsne_png", ""))).name  # beside the JSON, wherever it moved
    if data.get("tsne_png") and tsne.is_file():
        parts.append(_image(tsne, "t-SNE of the token features, coloured by label", width=700))
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise InputError(run_dir, "is not a folder")
    metrics = run_dir / "metrics.jsonl"
    snapshots = sorted((run_dir / "snapshots").glob("*.png")) if (run_dir / "snapshots").is_dir() else []
    localizations = sorted(p for p in run_dir.rglob("summary.json") if '"methods"' in p.read_text())
    clusterings = sorted(run_dir.rglob("*_clustering.json"))
    attention_pngs = sorted(p for p in run_dir.rglob("*.png")
                            if p.with_name(p.stem + "_mean.nii.gz").is_file())
    if not (metrics.is_file() or snapshots or localizations or clusterings or attention_pngs):
        raise InputError(run_dir, "holds no metrics.jsonl, snapshots, attention, localization or clustering results")
    out: Path = args.out or run_dir / "report.html"
    parts = [f"<h1>smartformer run: {html.escape(str(run_dir.resolve()))}</h1>"]

    if metrics.is_file():
        from smartformer.train.monitor import read_metrics

        rows = read_metrics(metrics)
        if rows:
            png = _curves_png(rows, out.parent / (out.stem + "_files") / "curves.png")
            last = rows[-1]
            parts.append("<h2>Training</h2>")
            parts.append(f"<p>{len(rows)} logged steps, last step {last.get('step', '?')}</p>")
            parts.append(_table(["scalar", "last value"],
                                [[k, v] for k, v in last.items() if k != "step" and isinstance(v, (int, float))]))
            parts.append(_image(png, "loss terms and schedules"))
    config = run_dir / "config.yaml"
    if config.is_file():
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(config.read_text())}</pre></details>")
    if snapshots:
        parts.append("<h2>Teacher attention during training</h2>")
        parts.extend(_image(p, p.stem, width=700) for p in _pick_snapshots(snapshots))
    if attention_pngs:
        parts.append("<h2>Attention maps</h2>")
        parts.extend(_image(p, str(p.relative_to(run_dir))) for p in attention_pngs)
    if localizations or clusterings:
        parts.append("<h2>Interpretation</h2>")
        parts.extend(_localization_section(p, run_dir) for p in localizations)
        parts.extend(_clustering_section(p, run_dir) for p in clusterings)

    style = ("body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
             "font-size:12px}figure{margin:0.5em 0}figcaption{font-size:12px;color:#555}")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>smartformer report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    print(f"wrote {out} ({len(snapshots)} snapshots, {len(localizations)} localization and "
          f"{len(clusterings)} clustering results)")
    return 0
