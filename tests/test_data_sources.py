"""list_volumes on folders, CSV tables and JSON datalists built from real (tiny) files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from smartformer.data.sources import DEFAULT_EXCLUDE, list_volumes
from smartformer.errors import InputError

GEOMETRY = {"spacing": (1.0, 1.0, 2.0), "origin": (0.0, 0.0, 0.0)}
TINY = np.zeros((4, 5, 6), dtype=np.int16)


@pytest.fixture
def tree(tmp_path, write_volume, write_dicom_series) -> Path:
    """A study folder mixing CTs, label maps, a DICOM series, broken and non-image files."""
    root = tmp_path / "study"
    write_volume(root / "case_000" / "ct.nii.gz", TINY, **GEOMETRY)
    write_volume(root / "case_000" / "labels.nii.gz", TINY, **GEOMETRY)
    write_volume(root / "case_001" / "ct.nrrd", TINY, **GEOMETRY)
    write_volume(root / "case_001" / "tumor.nii.gz", TINY, **GEOMETRY)
    write_volume(root / "case_001" / "ct_mask.mha", TINY, **GEOMETRY)
    write_volume(root / "organs" / "scan.mhd", TINY, **GEOMETRY)  # a folder named like a label
    write_volume(root / "organs" / "organs.nii.gz", TINY, **GEOMETRY)
    write_dicom_series(root / "case_002" / "dicom", TINY, suffix="", **GEOMETRY)
    (root / "broken.nii.gz").write_text("not an image")
    (root / "notes.txt").write_text("notes")
    (root / "dataset.json").write_text("{}")
    (root / "table.csv").write_text("a,b\n")
    write_volume(root / ".hidden" / "ct.nii.gz", TINY, **GEOMETRY)
    return root


def _relative(items: list[dict], root: Path) -> list[str]:
    return [str(Path(item["image"]).relative_to(root)) for item in items]


def test_folder_lists_images_and_dicom_folders_not_labels(tree):
    assert _relative(list_volumes(tree), tree) == [
        "broken.nii.gz",
        "case_000/ct.nii.gz",
        "case_001/ct.nrrd",
        "case_002/dicom",
        "organs/scan.mhd",
    ]


def test_exclude_can_be_replaced_or_switched_off(tree):
    everything = _relative(list_volumes(tree, exclude=()), tree)
    assert "case_000/labels.nii.gz" in everything and "case_001/tumor.nii.gz" in everything
    assert "case_001/ct_mask.mha" in everything and "organs/organs.nii.gz" in everything
    assert len(everything) == 9
    only_ct = _relative(list_volumes(tree, exclude=["ct*"]), tree)
    assert "case_000/ct.nii.gz" not in only_ct and "case_000/labels.nii.gz" in only_ct
    assert "*label*" in DEFAULT_EXCLUDE


def test_single_image_file_is_a_source(tree):
    path = tree / "case_001" / "ct.nrrd"
    assert list_volumes(path) == [{"image": str(path)}]


def test_csv_resolves_relative_paths_and_keeps_columns(tree, tmp_path):
    table = tree / "lists" / "train.csv"
    table.parent.mkdir()
    absolute = tree / "case_001" / "ct.nrrd"
    table.write_text(f"image,label,site\n../case_000/ct.nii.gz,../case_000/labels.nii.gz,A\n{absolute},,B\n")

    items = list_volumes(table)

    assert [Path(i["image"]).resolve() for i in items] == [
        (tree / "case_000" / "ct.nii.gz").resolve(),
        absolute.resolve(),
    ]
    assert Path(items[0]["label"]).resolve() == (tree / "case_000" / "labels.nii.gz").resolve()
    assert [i["site"] for i in items] == ["A", "B"]


def test_csv_without_image_column_is_refused(tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("path,site\na.nii.gz,A\n")
    with pytest.raises(InputError, match="no 'image' column.*path, site"):
        list_volumes(table)


def test_json_datalist_with_key_and_relative_paths(tree):
    datalist = tree / "dataset.json"
    datalist.write_text(
        json.dumps(
            {
                "training": [
                    {"image": "case_000/ct.nii.gz", "label": "case_000/labels.nii.gz"},
                    {"image": str(tree / "case_001" / "ct.nrrd")},
                ],
                "validation": ["case_002/dicom"],
            }
        )
    )

    training = list_volumes(datalist)
    validation = list_volumes(datalist, key="validation")

    assert training[0] == {"image": str(tree / "case_000/ct.nii.gz"), "label": str(tree / "case_000/labels.nii.gz")}
    assert training[1]["image"] == str(tree / "case_001" / "ct.nrrd")
    assert validation == [{"image": str(tree / "case_002/dicom")}]
    with pytest.raises(InputError, match="no 'test' list"):
        list_volumes(datalist, key="test")


@pytest.mark.parametrize(
    "content, reason",
    [
        ("{not json", "not valid JSON"),
        ('{"training": [{"label": "x.nii.gz"}]}', "item 0 of 'training' has no 'image'"),
        ('{"training": {"image": "x.nii.gz"}}', "must be a list"),
        ('{"training": []}', "lists no volumes"),
    ],
)
def test_bad_json_datalists(tmp_path, content, reason):
    datalist = tmp_path / "list.json"
    datalist.write_text(content)
    with pytest.raises(InputError, match=reason):
        list_volumes(datalist)


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "labels_only").mkdir()
    (tmp_path / "labels_only" / "labels.nii.gz").write_text("x")
    with pytest.raises(InputError, match="holds no image volumes"):
        list_volumes(tmp_path / "empty")
    with pytest.raises(InputError, match=r"\*label\*"):
        list_volumes(tmp_path / "labels_only")
    with pytest.raises(InputError, match="does not exist"):
        list_volumes(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="neither a folder"):
        list_volumes(tmp_path / "notes.txt")
