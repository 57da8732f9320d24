"""``smartformer data check``: read every volume of a source and report what is in it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from smartformer.data.naming import DEFAULT_EXCLUDE

if TYPE_CHECKING:
    from smartformer.data.check import VolumeReport

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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``check`` to the ``smartformer data`` subcommands."""
    parser = subparsers.add_parser(
        "check",
        help="read every volume of a source and report shape, spacing, HU range",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="folder, CSV, JSON datalist or image file")
    parser.add_argument(
        "--skip-bad", action="store_true", help="list unusable volumes but exit 0 if at least one volume is usable"
    )
    parser.add_argument(
        "--json", metavar="FILE", type=Path, help="also write the per-volume report and summary to FILE as JSON"
    )
    parser.add_argument("--key", default="training", help="the list to read from a JSON datalist (default: training)")
    parser.add_argument(
        "--exclude",
        default=",".join(DEFAULT_EXCLUDE),
        metavar="PATTERNS",
        help="comma-separated name patterns of label maps to skip in folders "
        "(default: %(default)s; '' lists every image file)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check every volume of ``args.source``; print rows and a summary; return the exit code."""
    from smartformer.data.check import check_volume, summarize, write_check_report
    from smartformer.data.sources import list_volumes, skipped_label_maps

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
        write_check_report(args.json, args.source, reports, summary)
    if summary["n_ok"] == 0:
        return 1
    return 0 if summary["n_failed"] == 0 or args.skip_bad else 1


def format_row(report: VolumeReport, width: int) -> str:
    """One table row: path, shape, spacing, orientation, HU range, status."""
    if not report.ok:
        return f"{report.path:<{width}}  FAILED: {report.status}"
    shape = "x".join(str(n) for n in report.shape)
    spacing = "x".join(f"{s:.2f}" for s in report.spacing)
    hu = f"{report.hu_min:.0f}..{report.hu_max:.0f}"
    return f"{report.path:<{width}}  {shape:>13}  {spacing:>16} mm  {report.orientation}  HU {hu:>13}  ok" + (
        f" (warning: {report.warning})" if report.warning else ""
    )


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
        lines.append(
            f"{summary['n_failed']} volume(s) cannot be used"
            + (" and would be skipped (--skip-bad)" if skip_bad else "; fix or remove them, or pass --skip-bad")
        )
    return lines


def skipped_line(skipped: list[str], patterns: list[str], shown: int = 5) -> str:
    """The summary line naming the files left out as label maps (the first ``shown`` of them)."""
    from smartformer.wording import plural

    names = ", ".join(skipped[:shown]) + (f" and {len(skipped) - shown} more" if len(skipped) > shown else "")
    return (
        f"skipped {plural(len(skipped), 'file')} as label maps (names matching {','.join(patterns)}; "
        f"--exclude '' checks them too): {names}"
    )
