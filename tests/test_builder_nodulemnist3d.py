"""``smartformer data nodulemnist3d`` on small files in the exact MedMNIST .npz format."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from smartformer.cli import main
from smartformer.data.builders.nodulemnist3d import ORGAN_CLASSES, build_nodulemnist3d, load_npz
from smartformer.errors import InputError

COUNTS = {"train": 5, "val": 2, "test": 3}


def _write_npz(path: Path, size: int = 28, seed: int = 0, **overrides: np.ndarray) -> Path:
    """A MedMNIST-style file: uint8 (N, S, S, S) images and (N, 1) uint8 labels per split."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in COUNTS.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, size, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8).reshape(n, 1)
    arrays.update(overrides)
    np.savez_compressed(path, **arrays)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("size", [28, 64])
def test_every_volume_becomes_a_nifti_row_with_its_label_and_split(tmp_path, size):
    npz = _write_npz(tmp_path / "nodulemnist3d.npz", size=size)
    csv_path, labels = build_nodulemnist3d(npz, tmp_path / "out", progress=False)
    rows = _rows(csv_path)
    assert [r["split"] for r in rows] == [s for s, n in COUNTS.items() for _ in range(n)]
    assert {s: len(v) for s, v in labels.items()} == COUNTS
    source = np.load(npz)
    for row in rows:
        split, index = row["split"], int(row["index"])
        assert int(row["label"]) == int(source[f"{split}_labels"][index, 0])
        assert row["patient"] == f"{split}_{index:05d}"
        image = nib.load(csv_path.parent / row["image"])
        assert image.shape == (size, size, size)
        assert np.allclose(image.header.get_zooms(), 1.0)
        hu = np.asarray(image.dataobj)
        expected = np.rint(-1000 + source[f"{split}_images"][index] / 255 * 1400)
        assert np.array_equal(hu, expected)
    # The crop centre is the world origin, so centring downstream lands on the nodule.
    assert np.allclose(image.affine[:3, :3] @ np.full(3, (size - 1) / 2) + image.affine[:3, 3], 0)


def test_the_cli_prints_counts_per_split(tmp_path, capsys):
    npz = _write_npz(tmp_path / "n.npz")
    assert (
        main(
            [
                "data",
                "nodulemnist3d",
                "--npz",
                str(npz),
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
                "--hu-range",
                "-1024",
                "600",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "train: 5 nodules (2 malignant, 3 benign)" in out and "test: 3 nodules" in out
    first = nib.load(tmp_path / "o" / "images" / "train_00000.nii.gz").get_fdata()
    raw = np.load(npz)["train_images"][0]
    assert first[raw == 0].max() == -1024 and first[raw == 255].min() == 600


def _assert_one_line_error(capsys, npz: Path, out: Path, fragment: str) -> None:
    assert main(["data", "nodulemnist3d", "--npz", str(npz), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(npz) in err[0] and fragment in err[0], err
    assert not (out / "nodulemnist3d.csv").exists()


def test_a_truncated_file_is_one_line_error_and_writes_nothing(tmp_path, capsys):
    npz = _write_npz(tmp_path / "n.npz")
    data = npz.read_bytes()
    npz.write_bytes(data[: len(data) // 2])
    _assert_one_line_error(capsys, npz, tmp_path / "o", "npz")


def test_missing_keys_are_named(tmp_path, capsys):
    npz = tmp_path / "wrong.npz"
    np.savez(npz, x_train=np.zeros((2, 28, 28, 28), np.uint8), y_train=np.zeros((2, 1), np.uint8))
    _assert_one_line_error(capsys, npz, tmp_path / "o", "no train_images")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ({"val_labels": np.zeros((3, 1), np.uint8)}, "val_labels has shape (3, 1)"),
        ({"test_images": np.zeros((3, 28, 28, 28), np.float32)}, "test_images must be uint8"),
        ({"train_labels": np.full((5, 1), 2, np.uint8)}, "must be 0/1"),
        ({"val_images": np.zeros((2, 64, 64, 64), np.uint8)}, "other splits 28^3"),
    ],
)
def test_inconsistent_arrays_are_refused(tmp_path, override, fragment):
    npz = _write_npz(tmp_path / "n.npz", **override)
    with pytest.raises(InputError, match=re.escape(fragment)):
        load_npz(npz)


def test_organmnist3d_keeps_eleven_labels_and_names_them(tmp_path, capsys):
    labels = {split: (np.arange(n) * 3 % 11).astype(np.uint8).reshape(n, 1) for split, n in COUNTS.items()}
    npz = _write_npz(tmp_path / "organmnist3d.npz", **{f"{s}_labels": v for s, v in labels.items()})
    assert main(["data", "organmnist3d", "--npz", str(npz), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train: 5 crops (liver 1, kidney-right 1, kidney-left 0, femur-right 1," in printed  # labels 0 3 6 9 1
    rows = _rows(tmp_path / "o" / "organmnist3d.csv")
    assert [int(r["label"]) for r in rows] == [int(v) for s in COUNTS for v in labels[s].ravel()]
    names = json.loads((tmp_path / "o" / "labels.json").read_text())
    assert names["0"] == "liver" and names["10"] == "pancreas" and len(names) == 11
    bad = _write_npz(tmp_path / "bad.npz", train_labels=np.full((5, 1), 11, np.uint8))
    with pytest.raises(InputError, match=re.escape("must be 0-10 integers")):
        load_npz(bad, ORGAN_CLASSES)
