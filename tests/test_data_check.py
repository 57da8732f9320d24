"""``smartformer data check`` through the CLI entry point and as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smartformer.cli import main

GEOMETRY = {"spacing": (0.8, 0.8, 2.0), "origin": (0.0, 0.0, 0.0)}


@pytest.fixture
def source(tmp_path, write_volume, write_dicom_series) -> Path:
    """Two good volumes (NIfTI, DICOM), a label map, and one broken file."""
    root = tmp_path / "data"
    ct = np.full((6, 10, 12), 40, dtype=np.int16)
    ct[0, 0, 0] = -1000
    write_volume(root / "a" / "ct.nii.gz", ct, **GEOMETRY)
    write_volume(root / "a" / "labels.nii.gz", np.zeros((6, 10, 12), np.uint8), **GEOMETRY)
    write_dicom_series(root / "b" / "dicom", ct[:4], **GEOMETRY)
    (root / "c").mkdir()
    (root / "c" / "ct.nii.gz").write_text("not an image")
    return root


def _rows(text: str) -> dict[str, str]:
    """Table rows keyed by the name of the volume (last two path parts)."""
    rows = {}
    for line in text.splitlines():
        first = line.split()[0] if line.split() else ""
        if "/" in first:
            rows["/".join(Path(first).parts[-2:])] = line
    return rows


def test_reports_every_volume_and_fails_on_a_bad_one(source, capsys):
    code = main(["data", "check", str(source)])
    out = capsys.readouterr().out

    assert code == 1
    rows = _rows(out)
    assert set(rows) == {"a/ct.nii.gz", "b/dicom", "c/ct.nii.gz"}
    assert "12x10x6" in rows["a/ct.nii.gz"] and "0.80x0.80x2.00" in rows["a/ct.nii.gz"]
    assert "LPS" in rows["a/ct.nii.gz"] and "-1000..40" in rows["a/ct.nii.gz"]
    assert rows["a/ct.nii.gz"].endswith("ok")
    assert "12x10x4" in rows["b/dicom"] and rows["b/dicom"].endswith("ok")
    assert "FAILED: not a readable NIfTI file" in rows["c/ct.nii.gz"]
    assert "Traceback" not in out
    assert "2 ok, 1 failed" in out
    assert "12x10x4 .. 12x10x6" in out


def test_skip_bad_exits_zero_and_writes_json(source, tmp_path, capsys):
    report = tmp_path / "out" / "report.json"
    code = main(["data", "check", str(source), "--skip-bad", "--json", str(report)])
    out = capsys.readouterr().out

    assert code == 0
    assert "would be skipped" in out
    content = json.loads(report.read_text())
    assert content["summary"]["n_ok"] == 2 and content["summary"]["n_failed"] == 1
    failed = [v for v in content["volumes"] if v["status"] != "ok"]
    assert len(failed) == 1 and failed[0]["path"].endswith("c/ct.nii.gz")
    good = next(v for v in content["volumes"] if v["path"].endswith("a/ct.nii.gz"))
    assert good["shape"] == [12, 10, 6] and good["orientation"] == "LPS"
    assert good["hu_min"] == -1000.0 and good["hu_max"] == 40.0


def test_all_good_exits_zero(source, capsys):
    assert main(["data", "check", str(source / "a")]) == 0
    assert "1 ok, 0 failed" in capsys.readouterr().out


def test_skip_bad_still_fails_without_any_good_volume(source, capsys):
    assert main(["data", "check", str(source / "c"), "--skip-bad"]) == 1
    assert "0 ok, 1 failed" in capsys.readouterr().out


def test_unreadable_source_is_one_error_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["data", "check", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no image volumes" in err[0]


def test_csv_source_and_help(source, tmp_path, capsys):
    table = source / "list.csv"
    table.write_text("image\na/ct.nii.gz\nb/dicom\n")
    assert main(["data", "check", str(table)]) == 0
    assert "2 ok, 0 failed" in capsys.readouterr().out
    with pytest.raises(SystemExit) as caught:
        main(["data", "check", "--help"])
    assert caught.value.code == 0
    assert "--skip-bad" in capsys.readouterr().out


@pytest.mark.slow
def test_module_entry_point_in_a_subprocess(source):
    run = subprocess.run(
        [sys.executable, "-m", "smartformer", "data", "check", str(source)],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert run.returncode == 1
    assert "FAILED" in run.stdout and "2 ok, 1 failed" in run.stdout
    assert "Traceback" not in run.stderr + run.stdout


def test_summary_names_the_label_maps_it_skipped(source, capsys):
    main(["data", "check", str(source)])
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("skipped")]
    assert line.startswith("skipped 1 file as label maps") and line.endswith(str(source / "a" / "labels.nii.gz"))
    main(["data", "check", str(source), "--exclude", ""])
    assert "skipped" not in capsys.readouterr().out
