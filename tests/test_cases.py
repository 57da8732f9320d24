"""``smartformer.data.cases``: the one reader of case lists (a CT + its map) for every command.

Real NIfTI files written with nibabel into tmp_path: each layout of the convention, and each
one-line error.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smartformer.data.cases import Case, find_cases, lesion_value, read_csv_cases
from smartformer.data.phantom import LESION_ID
from smartformer.errors import InputError


def _nifti(path: Path, value: int = 0) -> Path:
    """A 4^3 NIfTI volume at ``path`` (written under a lower-case name, which nibabel needs, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = path.with_name(path.name.lower())
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, np.int16), np.eye(4)), str(written))
    return written.rename(path)


def _case_folder(folder: Path, *names: str) -> Path:
    for name in names:
        if name.endswith(".txt"):
            (folder / name).write_text("not an image", encoding="utf-8")
        else:
            _nifti(folder / name, -100 if name.lower().startswith(("ct", "image", "img")) else 1)
    return folder


def _error(source: Path, **kwargs) -> str:
    with pytest.raises(InputError) as info:
        find_cases(source, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------- folders


def test_folder_of_phantom_and_sts_case_folders(tmp_path: Path) -> None:
    _case_folder(tmp_path / "case_000", "ct.nii.gz", "labels.nii.gz")
    _case_folder(tmp_path / "STS_001", "ct.nii.gz", "tumor.nii.gz")
    found = find_cases(tmp_path)
    assert [c.case for c in found] == ["STS_001", "case_000"]  # sorted folder names
    sts, phantom = found
    assert sts == Case(
        case="STS_001",
        image=tmp_path / "STS_001" / "ct.nii.gz",
        patient="STS_001",
        mask=tmp_path / "STS_001" / "tumor.nii.gz",
        kind="mask",
    )
    assert phantom.mask == tmp_path / "case_000" / "labels.nii.gz" and phantom.kind == "labels"
    assert phantom.row is None and phantom.fields == {}
    # the lesion's value: every voxel > 0 of a lesion mask, the phantoms' lesion id in a label map
    assert lesion_value(sts) is None and lesion_value(phantom) == LESION_ID
    assert lesion_value(sts, 3) == 3 and lesion_value(phantom, 3) == 3


def test_folder_names_any_suffix_and_case_and_the_folder_itself(tmp_path: Path) -> None:
    _case_folder(tmp_path, "ct.nii.gz", "mask.nii")  # the folder itself is a case too
    _case_folder(tmp_path / "a", "IMAGE.NII.GZ", "GTV.nii.gz")
    _case_folder(tmp_path / "b", "img.nii", "segmentation.nii.gz", "notes.txt")
    _case_folder(tmp_path / ".hidden", "ct.nii.gz", "tumor.nii.gz")  # skipped
    _case_folder(tmp_path / "no_ct", "scan.nii.gz", "tumor.nii.gz")  # no CT by name: skipped
    found = find_cases(tmp_path)
    assert [c.case for c in found] == [tmp_path.name, "a", "b"]
    assert [(c.image.name, c.mask.name, c.kind) for c in found] == [
        ("ct.nii.gz", "mask.nii", "mask"),
        ("IMAGE.NII.GZ", "GTV.nii.gz", "mask"),
        ("img.nii", "segmentation.nii.gz", "labels"),
    ]


def test_folder_prefers_a_lesion_mask_or_with_prefer_labels_a_label_map(tmp_path: Path) -> None:
    _case_folder(tmp_path / "c", "ct.nii.gz", "labels.nii.gz", "tumor.nii.gz")
    (case,) = find_cases(tmp_path)
    assert case.mask.name == "tumor.nii.gz" and case.kind == "mask"
    (case,) = find_cases(tmp_path, prefer="labels")  # segmentation: the label map first
    assert case.mask.name == "labels.nii.gz" and case.kind == "labels"


def test_folder_exact_names(tmp_path: Path) -> None:
    _case_folder(tmp_path / "c1", "scan.nii.gz", "organs.nii.gz")
    _case_folder(tmp_path / "c2", "ct.nii.gz", "tumor.nii.gz")  # no scan.nii.gz: not a case
    (case,) = find_cases(tmp_path, image_name="scan.nii.gz", mask_name="organs.nii.gz")
    assert case.case == "c1" and case.image.name == "scan.nii.gz" and case.mask.name == "organs.nii.gz"
    (case,) = find_cases(tmp_path / "c1", image_name="scan.nii.gz", mask_name="labels.nii.gz", need_mask=False)
    assert case.mask is None and case.kind is None


def test_folder_without_maps_when_none_is_needed(tmp_path: Path) -> None:
    _case_folder(tmp_path / "c1", "ct.nii.gz")
    _case_folder(tmp_path / "c2", "ct.nii.gz", "tumor.nii.gz")
    found = find_cases(tmp_path, need_mask=False)
    assert [(c.case, c.mask and c.mask.name) for c in found] == [("c1", None), ("c2", "tumor.nii.gz")]


# ----------------------------------------------------------------------------------------- CSVs


def test_csv_image_mask_with_relative_paths_case_and_patient(tmp_path: Path) -> None:
    _case_folder(tmp_path / "scans" / "a", "ct.nii.gz", "tumor.nii.gz")
    _case_folder(tmp_path / "scans" / "b", "ct.nii.gz", "tumor.nii.gz")
    csv = tmp_path / "lists" / "cases.csv"
    csv.parent.mkdir()
    csv.write_text(
        "image, mask ,case,patient,note\n"
        "../scans/a/ct.nii.gz,../scans/a/tumor.nii.gz,A,P1,x\n"
        f"{tmp_path}/scans/b/ct.nii.gz,{tmp_path}/scans/b/tumor.nii.gz,B,,y\n",
        encoding="utf-8",
    )
    a, b = find_cases(csv)
    assert a.image == csv.parent / "../scans/a/ct.nii.gz" and a.image.exists()
    assert (a.case, a.patient, a.kind, a.row) == ("A", "P1", "mask", 2)
    assert (b.case, b.patient, b.row) == ("B", "B", 3)  # patient defaults to the case id
    assert b.mask == tmp_path / "scans" / "b" / "tumor.nii.gz"
    assert a.fields["note"] == "x" and b.fields["mask"] == str(b.mask)


def test_csv_image_label_holds_label_maps_where_a_map_is_needed(tmp_path: Path) -> None:
    _case_folder(tmp_path / "case_000", "ct.nii.gz", "labels.nii.gz")
    csv = tmp_path / "seg.csv"
    csv.write_text("image,label\ncase_000/ct.nii.gz,case_000/labels.nii.gz\n", encoding="utf-8")
    (case,) = find_cases(csv)
    assert case.mask == tmp_path / "case_000" / "labels.nii.gz" and case.kind == "labels"
    assert lesion_value(case) == LESION_ID
    # where no map is needed, label is a class, not a path
    (case,) = read_csv_cases(csv, need_mask=False)
    assert case.mask is None and case.fields["label"] == "case_000/labels.nii.gz"


def test_csv_mask_column_wins_over_a_label_column_of_classes(tmp_path: Path) -> None:
    _case_folder(tmp_path / "a", "ct.nii.gz", "tumor.nii.gz")
    csv = tmp_path / "lesions.csv"
    csv.write_text("image,label,mask\na/ct.nii.gz,1,a/tumor.nii.gz\na/ct.nii.gz,0,a/tumor.nii.gz\n", encoding="utf-8")
    first, second = find_cases(csv)
    assert first.mask == tmp_path / "a" / "tumor.nii.gz" and first.kind == "mask"
    assert [first.fields["label"], second.fields["label"]] == ["1", "0"]
    assert [first.case, second.case] == ["ct_r2", "ct_r3"]  # one image on two rows: the row is added


def test_csv_ids_from_image_names(tmp_path: Path) -> None:
    _case_folder(tmp_path / "p1", "ct.nii.gz")
    _case_folder(tmp_path / "p2", "ct.nii.gz")
    _nifti(tmp_path / "other.nii.gz")
    csv = tmp_path / "scans.csv"
    csv.write_text("image,mask\np1/ct.nii.gz,\np2/ct.nii.gz,\nother.nii.gz,\n", encoding="utf-8")
    found = find_cases(csv, need_mask=False)
    assert [c.case for c in found] == ["p1/ct", "p2/ct", f"{tmp_path.name}/other"]  # names repeat: folder added
    assert all(c.mask is None and c.kind is None for c in found)
    csv.write_text("image\nother.nii.gz\n", encoding="utf-8")
    assert [c.case for c in find_cases(csv, need_mask=False)] == ["other"]


# --------------------------------------------------------------------------------------- errors


def test_source_errors_name_the_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert _error(missing) == f"{missing}: does not exist"
    image = _nifti(tmp_path / "ct.nii.gz")
    assert _error(image).startswith(f"{image}: is an image, not a list of cases")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _error(empty).startswith(f"{empty}: holds no case")


def test_folder_errors_name_the_folder(tmp_path: Path) -> None:
    _case_folder(tmp_path / "c1", "ct.nii.gz", "tumor.nii.gz")
    _case_folder(tmp_path / "c2", "ct.nii.gz")
    message = _error(tmp_path)
    assert message.startswith(f"{tmp_path / 'c2'}: has ct.nii.gz but no map") and "tumor" in message
    message = _error(tmp_path / "c1", mask_name="labels.nii.gz")
    assert message.startswith(f"{tmp_path / 'c1'}: has ct.nii.gz but no map (labels.nii.gz)")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "not a readable CSV"),
        ("image,mask\n", "has no rows"),
        ("mask\nm.nii.gz\n", "missing column(s) image; found mask"),
        ("image,patient\nct.nii.gz,p\n", "has no 'mask' column (nor a 'label' column of label maps)"),
        ("image,mask\n,m.nii.gz\n", "row 2: empty image"),
        ("image,mask\nct.nii.gz,\n", "row 2: empty mask"),
        ("image,mask\nct.nii.gz,gone.nii.gz\n", "row 2: mask gone.nii.gz does not exist"),
        ("image,label\nct.nii.gz,m.nii.gz\nlost.nii.gz,m.nii.gz\n", "row 3: image lost.nii.gz does not exist"),
        ("image,mask,case\nct.nii.gz,m.nii.gz,A\nct.nii.gz,m.nii.gz,A\n", "row 3: case 'A' repeats row 2"),
        ("image,mask,case\nct.nii.gz,m.nii.gz,\n", "row 2: empty case"),
    ],
)
def test_csv_errors_are_one_line_naming_the_csv_and_row(tmp_path: Path, content: str, message: str) -> None:
    _nifti(tmp_path / "ct.nii.gz")
    _nifti(tmp_path / "m.nii.gz", 1)
    csv = tmp_path / "cases.csv"
    csv.write_text(content, encoding="utf-8")
    line = _error(csv)
    assert line.startswith(f"{csv}: ") and message in line, line
