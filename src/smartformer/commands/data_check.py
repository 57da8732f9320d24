"""``smartformer data check``: read every volume of a source and report what is in it."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from smartformer.data.sources import DEFAULT_EXCLUDE, list_volumes, skipped_label_maps
from smartformer.errors import InputError

DESCRIPTION = """\
Read every volume of a data source the way pretraining will, and print one row per volume:
path, shape (voxels), spacing (mm), orientation as stored, HU min..max, and "ok" or the reason
it cannot be used. A summary follows (counts, shape and spacing ranges).

SOURCE is a folder (searched recursively; each image file and each folder of DICOM files is
one volume; label maps such as labels/tumor/organs/*mask*/*seg* files are skipped, see
--exclude), a CSV file with an 'image' column, a JSON datalist ({"training": [{"image": ...}]})
or one image file.

Exit status: 0 if every volume is usable, 1 if any is not (with --skip-bad: 0 as long as at
least one is usable), 2 if the source itself cannot be read."""


@dataclass
class VolumeReport:
    """What ``data check`` found out about one volume."""

    path: str
    status: str  # "ok" or the reason the volume cannot be used
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    hu_min: float | None = None
    hu_max: float | None = None
    warning: str | None = None  # usable, but pretraining would learn nothing from it (constant)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``check`` to the ``smartformer data`` subcommands."""
    parser = subparsers.add_parser(
        "check", help="read every volume of a source and report shape, spacing, HU range",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", metavar="SOURCE", help="folder, CSV, JSON datalist or image file")
    parser.add_argument("--skip-bad", action="store_true",
                        help="list unusable volumes but exit 0 if at least one volume is usable")
    parser.add_argument("--json", metavar="FILE", type=Path,
                        help="also write the per-volume report and summary to FILE as JSON")
    parser.add_argument("--key", default="training",
                        help="the list to read from a JSON datalist (default: training)")
    parser.add_argument("--exclude", default=",".join(DEFAULT_EXCLUDE), metavar="PATTERNS",
                        help="comma-separated name patterns of label maps to skip in folders "
                             "(default: %(default)s; '' lists every image file)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check every volume of ``args.source``; print rows and a summary; return the exit code."""
    exclude = [p.strip() for p in args.exclude.split(",") if p.strip()]
    items = list_volumes(args.source, key=args.key, exclude=exclude)
    width = max(len(item["image"]) for item in items)
    reports = []
    for item in tqdm(items, desc="checking", unit="vol", file=sys.stderr, dynamic_ncols=True):
        report = check_volume(item["image"])
        reports.append(report)
        tqdm.write(format_row(report, width), file=sys.stdout)
    summary = summarize(reports)
    for line in format_summary(summary, skip_bad=args.skip_bad):
        print(line)
    skipped = skipped_label_maps(args.source, exclude)
    if skipped:
        print(skipped_line(skipped, exclude))
    if args.json is not None:
        _write_json(args.json, args.source, reports, summary)
    if summary["n_ok"] == 0:
        return 1
    return 0 if summary["n_failed"] == 0 or args.skip_bad else 1


def check_volume(path: str) -> VolumeReport:
    """Read one volume fully; a reading problem becomes the report's status, not an exception."""
    from smartformer.data.dataset import content_problem  # torch/MONAI only when checking
    from smartformer.data.io import read_ct

    try:
        image = read_ct(path)
    except InputError as exc:
        return VolumeReport(path=path, status=" ".join(exc.reason.split()))
    except Exception as exc:  # a reader failure we did not foresee must not stop the other files
        return VolumeReport(path=path, status=f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
    return VolumeReport(
        path=path,
        status="ok",
        shape=tuple(int(n) for n in image.shape[1:]),
        spacing=tuple(round(float(s), 4) for s in image.meta["spacing"]),
        orientation=image.meta["orientation"],
        hu_min=float(image.min()),
        hu_max=float(image.max()),
        warning=content_problem(image, image.meta["spacing"]),
    )


def format_row(report: VolumeReport, width: int) -> str:
    """One table row: path, shape, spacing, orientation, HU range, status."""
    if not report.ok:
        return f"{report.path:<{width}}  FAILED: {report.status}"
    shape = "x".join(str(n) for n in report.shape)
    spacing = "x".join(f"{s:.2f}" for s in report.spacing)
    hu = f"{report.hu_min:.0f}..{report.hu_max:.0f}"
    return f"{report.path:<{width}}  {shape:>13}  {spacing:>16} mm  {report.orientation}  " \
           f"HU {hu:>13}  ok" + (f" (warning: {report.warning})" if report.warning else "")


def summarize(reports: list[VolumeReport]) -> dict[str, Any]:
    """Counts, the failed paths with reasons, and per-axis shape and spacing ranges of good ones."""
    good = [r for r in reports if r.ok]
    summary: dict[str, Any] = {
        "n_ok": len(good),
        "n_failed": len(reports) - len(good),
        "failed": {r.path: r.status for r in reports if not r.ok},
    }
    if good:
        for field in ("shape", "spacing"):
            columns = list(zip(*(getattr(r, field) for r in good)))
            summary[f"{field}_min"] = [min(c) for c in columns]
            summary[f"{field}_max"] = [max(c) for c in columns]
    return summary


def format_summary(summary: dict[str, Any], skip_bad: bool) -> list[str]:
    """The closing lines: counts, ranges, and what happens to failed volumes."""
    lines = [f"{summary['n_ok']} ok, {summary['n_failed']} failed"]
    if summary["n_ok"]:
        def span(field: str, fmt: str) -> str:
            lo = "x".join(format(v, fmt) for v in summary[f"{field}_min"])
            hi = "x".join(format(v, fmt) for v in summary[f"{field}_max"])
            return lo if lo == hi else f"{lo} .. {hi}"
        lines.append(f"shape (voxels, per axis min .. max): {span('shape', 'd')}")
        lines.append(f"spacing (mm, per axis min .. max): {span('spacing', '.2f')}")
    if summary["n_failed"]:
        lines.append(f"{summary['n_failed']} volume(s) cannot be used"
                     + (" and would be skipped (--skip-bad)" if skip_bad else
                        "; fix or remove them, or pass --skip-bad"))
    return lines


def skipped_line(skipped: list[str], patterns: list[str], shown: int = 5) -> str:
    """The summary line naming the files left out as label maps (the first ``shown`` of them)."""
    from smartformer.wording import plural

    names = ", ".join(skipped[:shown]) + (f" and {len(skipped) - shown} more" if len(skipped) > shown else "")
    return (f"skipped {plural(len(skipped), 'file')} as label maps (names matching {','.join(patterns)}; "
            f"--exclude '' checks them too): {names}")


def _write_json(path: Path, source: str, reports: list[VolumeReport],
                summary: dict[str, Any]) -> None:
    content = {"source": str(source), "volumes": [asdict(r) for r in reports], "summary": summary}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    except OSError as exc:
        raise InputError(path, f"cannot write the JSON report ({exc.strerror})") from None
