"""``smartformer data lesions`` on phantoms and small hand-made cases (real NIfTI files)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from smartformer.cli import main
from smartformer.data.builders import world_to_voxel
from smartformer.data.builders.lesions import SamplingOptions, build_lesion_set
from smartformer.data.io import read_ct, write_nifti
from smartformer.data.phantom import LESION_ID, write_phantoms

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STS = DATA / "sts"
OPTIONS = SamplingOptions(negatives_per_case=6, min_distance_mm=25.0, mask_label=LESION_ID, min_lesion_voxels=5, seed=3)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantoms(root, 3, seed=7, shape=(64, 56, 56), spacing=(4.0, 4.0, 4.0), n_lesions=2, progress=False)
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _centre(row: dict[str, str]) -> np.ndarray:
    return np.array([float(row[k]) for k in ("center_x", "center_y", "center_z")])


def test_positives_in_lesions_negatives_far_from_them_in_the_body(phantoms, tmp_path):
    path, results = build_lesion_set(phantoms, tmp_path / "out", OPTIONS, progress=False)
    rows = _rows(path)
    assert {r["patient"] for r in rows} == {"case_000", "case_001", "case_002"}
    for patient in ("case_000", "case_001", "case_002"):
        ct = read_ct(phantoms / patient / "ct.nii.gz")
        labels = read_ct(phantoms / patient / "labels.nii.gz")[0].numpy()
        affine = ct.affine.numpy()
        lesion_mm = np.argwhere(labels == LESION_ID) @ affine[:3, :3].T + affine[:3, 3]
        mine = [r for r in rows if r["patient"] == patient]
        assert all(r["image"] == str(phantoms / patient / "ct.nii.gz") for r in mine)
        positives = [r for r in mine if r["label"] == "1"]
        negatives = [r for r in mine if r["label"] == "0"]
        assert len(positives) >= 1 and len(negatives) == 6
        for row in positives:
            assert row["kind"] == "lesion"
            voxel = tuple(int(v) for v in np.rint(world_to_voxel(affine, _centre(row))))
            assert labels[voxel] == LESION_ID
        for row in negatives:
            assert row["kind"] == "normal"
            centre = _centre(row)
            voxel = tuple(int(v) for v in np.rint(world_to_voxel(affine, centre)))
            assert ct[0][voxel] > -500 and labels[voxel] != LESION_ID
            nearest = np.sqrt(((lesion_mm - centre) ** 2).sum(axis=1)).min()
            assert nearest >= 25.0 - 1e-6
            assert float(row["distance_mm"]) == pytest.approx(nearest, abs=1e-3)


def test_same_seed_same_table_other_seed_other_negatives(phantoms, tmp_path):
    first, _ = build_lesion_set(phantoms, tmp_path / "a", OPTIONS, progress=False)
    again, _ = build_lesion_set(phantoms, tmp_path / "b", OPTIONS, progress=False)
    assert first.read_text() == again.read_text()
    other, _ = build_lesion_set(
        phantoms, tmp_path / "c", SamplingOptions(**{**OPTIONS.__dict__, "seed": 4}), progress=False
    )
    a, c = _rows(first), _rows(other)
    assert [r for r in a if r["label"] == "1"] == [r for r in c if r["label"] == "1"]
    assert [_centre(r).tolist() for r in a if r["label"] == "0"] != [
        _centre(r).tolist() for r in c if r["label"] == "0"
    ]


def _case(folder: Path, mask: np.ndarray, hu_body: float = 40.0) -> Path:
    """A 2 mm CT of body tissue (air border) and its lesion mask, RAS affine with an offset."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-30.0, 12.0, 100.0)
    ct = np.full(mask.shape, -1000, np.int16)
    ct[2:-2, 2:-2, 2:-2] = hu_body
    ct[mask > 0] = 60
    write_nifti(ct, affine, folder / "ct.nii.gz")
    write_nifti(mask.astype(np.uint8), affine, folder / "tumor.nii.gz")
    return folder


def test_a_hollow_lesion_is_sampled_on_its_shell_and_largest_only_keeps_one(tmp_path):
    grid = np.indices((40, 40, 40)).transpose(1, 2, 3, 0)
    radius = np.sqrt(((grid - 12) ** 2).sum(axis=-1))
    mask = ((radius >= 6) & (radius <= 8)).astype(np.uint8)  # a shell: its centroid is outside
    mask[30:33, 30:33, 30:33] = 1  # a second, smaller component
    _case(tmp_path / "data" / "P1", mask)
    options = SamplingOptions(negatives_per_case=2, min_distance_mm=10.0)
    path, _ = build_lesion_set(tmp_path / "data", tmp_path / "out", options, progress=False)
    positives = [r for r in _rows(path) if r["label"] == "1"]
    affine = read_ct(tmp_path / "data" / "P1" / "ct.nii.gz").affine.numpy()
    assert [r["component"] for r in positives] == ["1", "2"]
    assert [int(r["lesion_voxels"]) for r in positives] == [int(((radius >= 6) & (radius <= 8)).sum()), 27]
    for row in positives:
        voxel = tuple(int(v) for v in np.rint(world_to_voxel(affine, _centre(row))))
        assert mask[voxel] == 1
    assert np.allclose(world_to_voxel(affine, _centre(positives[1])), 31)
    path, _ = build_lesion_set(
        tmp_path / "data", tmp_path / "one", SamplingOptions(negatives_per_case=0, largest_only=True), progress=False
    )
    assert [r["component"] for r in _rows(path)] == ["1"]


def test_csv_source_with_relative_paths_and_patient_column(tmp_path):
    mask = np.zeros((24, 24, 24), np.uint8)
    mask[5:9, 5:9, 5:9] = 1
    _case(tmp_path / "scans" / "a", mask)
    table = tmp_path / "cases.csv"
    table.write_text("image,mask,patient\nscans/a/ct.nii.gz,scans/a/tumor.nii.gz,PAT-7\n")
    path, _ = build_lesion_set(
        table, tmp_path / "out", SamplingOptions(negatives_per_case=3, min_distance_mm=8.0), progress=False
    )
    rows = _rows(path)
    assert {r["patient"] for r in rows} == {"PAT-7"}
    assert [r["label"] for r in rows] == ["1", "0", "0", "0"]
    assert Path(rows[0]["image"]) == tmp_path / "scans" / "a" / "ct.nii.gz"


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_inputs_are_one_line_errors_and_write_no_table(phantoms, tmp_path, capsys):
    out = tmp_path / "out"
    line = _one_line_error(capsys, ["data", "lesions", "--data", str(phantoms), "--out", str(out), "--no-progress"])
    assert "labels.nii.gz" in line and "--mask-label" in line
    mask = np.zeros((20, 20, 20), np.uint8)
    _case(tmp_path / "bad" / "c1", mask)
    write_nifti(np.zeros((20, 20, 18), np.uint8), np.eye(4), tmp_path / "bad" / "c1" / "tumor.nii.gz")
    line = _one_line_error(
        capsys, ["data", "lesions", "--data", str(tmp_path / "bad"), "--out", str(out), "--no-progress"]
    )
    assert "tumor.nii.gz" in line and "differs from the CT" in line
    table = tmp_path / "no_mask.csv"
    table.write_text("image\nx.nii.gz\n")
    line = _one_line_error(capsys, ["data", "lesions", "--data", str(table), "--out", str(out)])
    assert "no_mask.csv" in line and "'mask'" in line
    assert not (out / "lesions.csv").exists()


@pytest.mark.realdata
@pytest.mark.skipif(not STS.is_dir(), reason=f"real CT data not found at {STS}")
def test_every_sts_case_gives_lesion_and_normal_samples(tmp_path):
    options = SamplingOptions(negatives_per_case=2, min_distance_mm=30.0)
    path, results = build_lesion_set(STS, tmp_path, options, progress=False)
    assert len(results) == 51
    rows = _rows(path)
    for result in results:
        assert result.n_positive >= 1 and result.n_negative == 2, result.case.patient
    assert len({r["patient"] for r in rows}) == 51
    assert all(float(r["hu"]) > -500 for r in rows if r["label"] == "0")


def test_rare_far_voxels_are_all_found_and_a_short_case_is_reported(tmp_path):
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[10, 10, 10] = 1
    _case(tmp_path / "data" / "P2", mask)  # body voxels 2..17; only (2, 2, 2) is >= 27 mm away
    options = SamplingOptions(negatives_per_case=3, min_distance_mm=27.0, min_lesion_voxels=1)
    path, results = build_lesion_set(tmp_path / "data", tmp_path / "out", options, progress=False)
    negatives = [r for r in _rows(path) if r["label"] == "0"]
    affine = read_ct(tmp_path / "data" / "P2" / "ct.nii.gz").affine.numpy()
    assert len(negatives) == 1
    assert np.allclose(world_to_voxel(affine, _centre(negatives[0])), 2)
    assert float(negatives[0]["distance_mm"]) == pytest.approx(np.sqrt(3) * 16)
    from smartformer.data.builders.lesions import summarize

    assert "1 case with fewer than 3 normal-tissue voxels" in "\n".join(summarize(results, 3))
