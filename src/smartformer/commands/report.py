"""``smartformer report``: one self-contained HTML page for a training run and its interpretation results.

The page is :func:`smartformer.analysis.report.write_report`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report of a run: loss curves, attention snapshots, localization/clustering results",
        description=(
            "Gather a run directory's loss curves (metrics.jsonl), attention snapshots (snapshots/*.png), "
            "and every 'smartformer localize' (summary.json) or 'smartformer cluster' (*_clustering.json) "
            "result and 'smartformer attention' PNG found below it or below --results, into one "
            "self-contained HTML page (images embedded)."
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a 'smartformer pretrain' output folder")
    p.add_argument(
        "--results",
        type=Path,
        nargs="+",
        default=[],
        metavar="DIR",
        help="more folders to search for localize, cluster and attention outputs (e.g. the --out of "
        "'smartformer localize' when it is not inside RUN_DIR)",
    )
    p.add_argument("--out", type=Path, default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from smartformer.analysis.report import write_report

    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        raise InputError(run_dir, "is not a folder")
    for folder in args.results:
        if not folder.is_dir():
            raise InputError(folder, "is not a folder (--results)")
    report = write_report(run_dir, args.results, args.out)
    print(
        f"wrote {report.path} ({report.snapshots} snapshots, {report.localizations} localization and "
        f"{report.clusterings} clustering results)"
    )
    return 0
