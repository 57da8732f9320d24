"""``smartformer features`` and the crops behind every downstream command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from downstream_cases import case_csv, run_downstream, tiny_checkpoint  # noqa: F401  (fixtures)

from smartformer.cli import main
from smartformer.data.io import write_nifti
from smartformer.downstream.cases import CropOptions, build_crops, read_cases

pytestmark = pytest.mark.usefixtures("one_thread")

FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture
def marked_ct(tmp_path, write_volume) -> tuple[Path, tuple[float, float, float]]:
    """A NIfTI stored as RPS (y flipped against RAS): a 1000 HU cube and, 9 mm towards RAS -y, a marker voxel.

    Returns the file and the cube's centre in RAS mm.
    """
    array = np.full((40, 50, 60), -1000, dtype=np.int16)  # (z, y, x)
    array[10:15, 20:25, 30:35] = 1000  # cube, centre index (x, y, z) = (32, 22, 12)
    array[12, 28, 32] = 1000  # marker: +6 voxels along the stored y axis, which points to LPS +y = RAS -y
    spacing, origin = (1.5, 1.5, 2.5), (10.0, -20.0, 30.0)
    path = write_volume(tmp_path / "marked.nii.gz", array, spacing, origin, FLIP_X)
    # LPS world of index (32, 22, 12) with the x axis along LPS -x, then LPS -> RAS.
    lps = (10.0 - 32 * 1.5, -20.0 + 22 * 1.5, 30.0 + 12 * 2.5)
    return path, (-lps[0], -lps[1], lps[2])


def test_lesion_crop_is_centred_and_ras(marked_ct, tmp_path):
    path, (x, y, z) = marked_ct
    csv = tmp_path / "cases.csv"
    csv.write_text(f"image,center_x,center_y,center_z\n{path.name},{x},{y},{z}\n")
    crop = build_crops(
        read_cases(csv, require_labels=False), CropOptions(size=(32, 32, 32), spacing=(1.5, 1.5, 1.5)), progress=False
    )[0, 0].astype(np.float32)
    assert crop.shape == (32, 32, 32)
    bright = np.argwhere(crop[:, :, 14:18] > 0.5)  # the cube's slab (2.5 mm slices resampled to 1.5 mm)
    cube = bright[bright[:, 1] > 12]
    assert np.allclose(cube[:, :2].mean(axis=0), 16, atol=0.6)  # 5 voxels (7.5 mm) around the crop centre
    marker = bright[bright[:, 1] <= 12]
    assert len(marker) and np.allclose(marker[:, :2].mean(axis=0), [16, 16 - 6], atol=0.6)  # crop axes are RAS
    assert crop.min() == 0.0 and crop.max() <= 1.0  # wide window: -1000 HU -> 0


def test_mask_locates_like_the_centre(marked_ct, tmp_path):
    from smartformer.data.io import read_ct

    path, (x, y, z) = marked_ct
    ct = read_ct(path)
    cube = np.zeros(ct.shape[1:], dtype=np.uint8)
    cube[30:35, 20:25, 10:15] = 1
    write_nifti(cube, ct.affine, tmp_path / "mask.nii.gz")
    csv = tmp_path / "cases.csv"
    csv.write_text(f"image,mask,center_x,center_y,center_z\n{path.name},mask.nii.gz,,,\n{path.name},,{x},{y},{z}\n")
    table = read_cases(csv, require_labels=False)
    assert table.cases[0].mask is not None and table.cases[1].center_mm is not None
    crops = build_crops(table, CropOptions(size=(32, 32, 32), spacing=(2.0, 2.0, 2.0)), progress=False)
    assert np.array_equal(crops[0], crops[1])


def test_whole_scan_fits_the_crop(marked_ct, tmp_path):
    path, _ = marked_ct
    csv = tmp_path / "cases.csv"
    csv.write_text(f"image\n{path.name}\n")
    crop = build_crops(read_cases(csv, require_labels=False), CropOptions(size=(32, 32, 32)), progress=False)[0, 0]
    assert crop.shape == (32, 32, 32)
    body = np.argwhere(crop > 0.5)
    assert body.size and body.max(axis=0).max() - body.min(axis=0).min() >= 28  # scaled up to fill the crop


def test_centre_outside_the_scan(marked_ct, tmp_path, capsys):
    path, _ = marked_ct
    csv = tmp_path / "cases.csv"
    csv.write_text(f"image,center_x,center_y,center_z\n{path.name},500,0,0\n")
    assert run_downstream("features", csv, "random:tiny", tmp_path / "f.csv") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(csv) in err[0] and "row 2" in err[0] and "outside the scan" in err[0]
    assert not (tmp_path / "f.csv").exists()


def test_features_csv_and_parquet(case_csv, tiny_checkpoint, tmp_path):
    assert run_downstream("features", case_csv, tiny_checkpoint, tmp_path / "f.csv") == 0
    table = pd.read_csv(tmp_path / "f.csv")
    assert list(table.columns[:3]) == ["case", "label", "patient"] and "note" not in table.columns
    assert len(table) == 24 and table["case"].is_unique
    assert table["case"].iloc[0] == "case_000/ct_r2"  # image stems repeat: folder + stem + CSV row
    assert set(table["label"]) == {"lesion", "air"}
    cls = table.filter(like="cls_").to_numpy()
    pooled = table.filter(like="pooled_").to_numpy()
    assert cls.shape == pooled.shape == (24, 192)
    assert np.isfinite(cls).all() and cls.std(axis=0).max() > 0
    assert run_downstream("features", case_csv, tiny_checkpoint, tmp_path / "f.parquet") == 0
    again = pd.read_parquet(tmp_path / "f.parquet")
    assert list(again.columns) == list(table.columns)
    assert np.allclose(
        again.iloc[:, 3:].to_numpy(), table.iloc[:, 3:].to_numpy(), rtol=1e-6, atol=1e-7
    )  # deterministic


def test_features_cls_only_with_case_column(tmp_path, marked_ct):
    path, _ = marked_ct
    csv = tmp_path / "cases.csv"
    csv.write_text(f"case,image\nA,{path}\nB,{path.name}\n")  # absolute and relative path
    assert run_downstream("features", csv, "random:tiny", tmp_path / "out" / "f.csv", "--features", "cls") == 0
    table = pd.read_csv(tmp_path / "out" / "f.csv")
    assert list(table["case"]) == ["A", "B"] and table.shape == (2, 1 + 192)
    assert np.array_equal(table.iloc[0, 1:].to_numpy(), table.iloc[1, 1:].to_numpy())


@pytest.mark.parametrize(
    "content, message",
    [
        ("label\n0\n", "missing column(s) image"),
        ("image\nnowhere.nii.gz\n", "row 2: image nowhere.nii.gz does not exist"),
        ("image,center_x\nx.nii.gz,1\n", "needs all of center_x, center_y, center_z"),
    ],
)
def test_bad_csv(tmp_path, capsys, content, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    assert main(["features", "--data", str(csv), "--checkpoint", "random:tiny", "--out", str(tmp_path / "f.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(csv) in err[0] and message in err[0]


def test_bad_output_name(case_csv, tmp_path, capsys):
    assert (
        main(["features", "--data", str(case_csv), "--checkpoint", "random:tiny", "--out", str(tmp_path / "f.txt")])
        == 2
    )
    assert ".csv or .parquet" in capsys.readouterr().err


def test_distances_score_the_features_by_label(case_csv, tmp_path, capsys):
    # the SMART paper's organ-clustering measures, on crop features (here lesion vs air)
    from smartformer.analysis.clustering import centroid_separation

    out = tmp_path / "f.csv"
    assert run_downstream("features", case_csv, "random:tiny", out, "--distances") == 0
    assert "intra-cluster" in capsys.readouterr().out
    result = json.loads((tmp_path / "f.distances.json").read_text())
    table = pd.read_csv(out)
    for kind in ("cls", "pooled"):
        sep = centroid_separation(table.filter(like=f"{kind}_").to_numpy(), table["label"].to_numpy())
        assert result[kind]["labels"] == ["air", "lesion"]
        for key in ("intra_distance", "inter_distance"):
            assert result[kind][key] == pytest.approx(sep[key], rel=1e-5)
    unlabelled = tmp_path / "nolabel.csv"
    cases = pd.read_csv(case_csv).drop(columns=["label"])
    cases["image"] = [str(case_csv.parent / image) for image in cases["image"]]
    cases.to_csv(unlabelled, index=False)
    assert run_downstream("features", unlabelled, "random:tiny", tmp_path / "g.csv", "--distances") == 2
    assert "no label column" in capsys.readouterr().err and not (tmp_path / "g.csv").exists()
