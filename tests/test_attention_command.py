"""``smartformer attention``: maps on the input's own grid for RAS, non-RAS and DICOM input; clean refusals."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from smartformer.cli import main
from smartformer.data.io import read_ct
from smartformer.data.phantom import LESION_ID, write_phantoms
from smartformer.models.smartformer import SMARTFormer

FAST = ["--spacing", "5", "--roi", "32", "--overlap", "0.25"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """One 64 x 64 x 48 phantom case at 5 mm with at least one lesion."""
    root = tmp_path_factory.mktemp("phantoms")
    (case,) = write_phantoms(
        root, n=1, seed=3, shape=(64, 64, 48), spacing=(5.0, 5.0, 5.0), progress=False, n_lesions=1
    )
    return case


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny model, saved as a training run directory would hold it (RUN/teacher)."""
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("run")
    SMARTFormer.from_preset("tiny").save_pretrained(run_dir / "teacher")
    return run_dir


def _attention(checkpoint: Path, image: Path, out: Path, *extra: str) -> int:
    return main(["attention", "--checkpoint", str(checkpoint), "--image", str(image), "--out", str(out), *FAST, *extra])


def test_ras_nifti_keeps_shape_and_affine(phantom, checkpoint, tmp_path):
    image = phantom / "ct.nii.gz"
    assert (
        _attention(
            checkpoint / "teacher",
            image,
            tmp_path,
            "--mask",
            str(phantom / "labels.nii.gz"),
            "--mask-label",
            str(LESION_ID),
        )
        == 0
    )
    src = nib.load(str(image))
    mean = nib.load(str(tmp_path / "ct_mean.nii.gz"))
    heads = nib.load(str(tmp_path / "ct_heads.nii.gz"))
    assert mean.shape == src.shape
    np.testing.assert_allclose(mean.affine, src.affine, atol=1e-5)
    assert heads.shape == (*src.shape, SMARTFormer.from_preset("tiny").config.semantic_heads)
    data = np.asarray(mean.dataobj)
    assert np.isfinite(data).all() and data.max() > 0
    assert (tmp_path / "ct.png").stat().st_size > 1000
    assert (tmp_path / "ct.json").is_file()


def test_run_directory_and_non_ras_nifti_give_the_same_map(phantom, checkpoint, tmp_path):
    """An LPS-stored copy of the CT gets a map with the copy's affine whose voxels are the flipped RAS map."""
    src = nib.load(str(phantom / "ct.nii.gz"))
    data = np.asarray(src.dataobj)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(data.shape[:2]) - 1  # voxel i -> n-1-i along x and y
    lps_affine = src.affine @ flip
    lps_path = tmp_path / "lps.nii.gz"
    nib.save(nib.Nifti1Image(data[::-1, ::-1, :].copy(), lps_affine), str(lps_path))

    assert _attention(checkpoint, phantom / "ct.nii.gz", tmp_path / "ras") == 0  # run dir: uses teacher/
    assert _attention(checkpoint, lps_path, tmp_path / "lps") == 0
    ras_map = nib.load(str(tmp_path / "ras" / "ct_mean.nii.gz"))
    lps_map = nib.load(str(tmp_path / "lps" / "lps_mean.nii.gz"))
    assert lps_map.shape == data.shape
    np.testing.assert_allclose(lps_map.affine, lps_affine, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lps_map.dataobj)[::-1, ::-1, :], np.asarray(ras_map.dataobj), atol=1e-4)


def test_dicom_series(write_dicom_series, phantom, checkpoint, tmp_path):
    ct = np.asarray(nib.load(str(phantom / "ct.nii.gz")).dataobj)[:, :, 10:26]  # 16 slices keep it quick
    folder = write_dicom_series(
        tmp_path / "series",
        np.ascontiguousarray(ct.transpose(2, 1, 0)),
        spacing=(5.0, 5.0, 5.0),
        origin=(10.0, -20.0, 30.0),
    )
    assert _attention(checkpoint, folder, tmp_path / "out") == 0
    out = nib.load(str(tmp_path / "out" / "series_mean.nii.gz"))
    expected = np.diag([-5.0, -5.0, 5.0, 1.0])  # LPS identity directions, in RAS
    expected[:3, 3] = (-10.0, 20.0, 30.0)
    assert out.shape == ct.shape
    np.testing.assert_allclose(out.affine, expected, atol=1e-4)
    np.testing.assert_allclose(out.affine, np.asarray(read_ct(folder).affine), atol=1e-5)


def test_mask_on_another_grid_is_resampled(phantom):
    """--mask on a coarser grid lands on the CT's voxels of the same structure (here the body)."""
    from smartformer.data.masks import read_mask_on

    ct = read_ct(phantom / "ct.nii.gz")
    labels = nib.load(str(phantom / "labels.nii.gz"))
    body = np.asarray(labels.dataobj) > 0
    assert np.array_equal(read_mask_on(phantom / "labels.nii.gz", ct), body)
    lesion = np.asarray(labels.dataobj) == LESION_ID
    assert lesion.any() and np.array_equal(read_mask_on(phantom / "labels.nii.gz", ct, LESION_ID), lesion)
    coarse_path = phantom.parent / "body_2x.nii.gz"
    nib.save(
        nib.Nifti1Image(body[::2, ::2, ::2].astype(np.uint8), labels.affine @ np.diag([2.0, 2.0, 2.0, 1.0])),
        str(coarse_path),
    )
    on_ct = read_mask_on(coarse_path, ct)
    dice = 2 * (on_ct & body).sum() / (on_ct.sum() + body.sum())
    assert dice > 0.9
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = body.shape[0] - 1
    nib.save(nib.Nifti1Image(body[::-1].astype(np.uint8), labels.affine @ flipped), str(coarse_path))
    assert np.array_equal(read_mask_on(coarse_path, ct), body)  # stored L-R flipped: same voxels


@pytest.mark.parametrize("case", ["missing_image", "not_an_image", "bad_checkpoint", "bad_roi", "empty_mask"])
def test_bad_input_is_one_line_and_exit_2(case, phantom, checkpoint, tmp_path, capsys):
    image, ckpt, extra = phantom / "ct.nii.gz", checkpoint, []
    if case == "missing_image":
        image = tmp_path / "nope.nii.gz"
    elif case == "not_an_image":
        image = tmp_path / "notes.nii.gz"
        image.write_text("not a volume")
    elif case == "bad_checkpoint":
        ckpt = tmp_path
    elif case == "bad_roi":
        extra = ["--roi", "48"]
    else:
        empty = tmp_path / "empty.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((64, 64, 48), np.uint8), nib.load(str(image)).affine), str(empty))
        extra = ["--mask", str(empty)]
    rc = main(
        [
            "attention",
            "--checkpoint",
            str(ckpt),
            "--image",
            str(image),
            "--out",
            str(tmp_path / "o"),
            "--spacing",
            "5",
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("smartformer: error:")
    assert not (tmp_path / "o").exists()


def test_png_is_drawn_in_ras_whatever_the_storage_order(tmp_path):
    """The same anatomy stored LPS or with swapped axes gives the same PNG as its RAS copy."""
    import matplotlib.image as mpimg

    from smartformer.analysis.overlay import save_overlay_png

    rng = np.random.default_rng(0)
    image, heat = rng.random((12, 10, 8)), rng.random((12, 10, 8))
    mask = heat > 0.9
    ras = np.diag([1.0, 2.0, 3.0, 1.0])
    reference = mpimg.imread(save_overlay_png(image, heat, tmp_path / "ras.png", title="t", mask=mask, affine=ras))
    lps = np.diag([-1.0, -2.0, 3.0, 1.0])
    lps[:3, 3] = (11.0, 18.0, 0.0)  # the same world as the RAS copy (titles give world mm)
    swapped = np.array([[0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1]])  # stored (y, x, z)
    for name, affine, store in (
        ("lps", lps, lambda a: a[::-1, ::-1]),
        ("swapped", swapped, lambda a: a.transpose(1, 0, 2)),
    ):
        png = save_overlay_png(
            store(image), store(heat), tmp_path / f"{name}.png", title="t", mask=store(mask), affine=affine
        )
        np.testing.assert_array_equal(mpimg.imread(png), reference)


def test_progress_bar_over_windows_unless_disabled(phantom, checkpoint, tmp_path, capsys):
    assert _attention(checkpoint, phantom / "ct.nii.gz", tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert "it/s" in err or "s/it" in err
    assert _attention(checkpoint, phantom / "ct.nii.gz", tmp_path / "b", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "it/s" not in err and "s/it" not in err


def test_normalize_option_reaches_the_maps_and_the_json(phantom, checkpoint, tmp_path):
    """--normalize max reproduces maps measured before issue 17 (each window scaled to its peak)."""
    import json

    for mode in ("uniform", "max"):
        assert _attention(checkpoint, phantom / "ct.nii.gz", tmp_path / mode, "--normalize", mode, "--no-progress") == 0
        assert json.loads((tmp_path / mode / "ct.json").read_text())["normalize"] == mode
    peak = np.asarray(nib.load(str(tmp_path / "max" / "ct_mean.nii.gz")).dataobj)
    uniform = np.asarray(nib.load(str(tmp_path / "uniform" / "ct_mean.nii.gz")).dataobj)
    assert peak.max() <= 1.0 + 1e-3 < uniform.max()


def test_mode_option_reaches_the_maps_and_the_json(phantom, checkpoint, tmp_path):
    """--mode picks how the network meets the CT; the CLI's maps are the library's for that mode."""
    import json

    from smartformer.analysis.attention import attention_volume

    model = SMARTFormer.from_pretrained(checkpoint / "teacher").eval()
    means = {}
    for mode in ("whole", "sliding"):
        assert _attention(checkpoint, phantom / "ct.nii.gz", tmp_path / mode, "--mode", mode, "--no-progress") == 0
        assert json.loads((tmp_path / mode / "ct.json").read_text())["mode"] == mode
        means[mode] = np.asarray(nib.load(str(tmp_path / mode / "ct_mean.nii.gz")).dataobj, dtype=np.float32)
        expected = attention_volume(model, phantom / "ct.nii.gz", spacing=5.0, roi=32, mode=mode).mean
        step = float(expected.max()) / 65535  # the 16-bit storage: max / 65535 per level
        np.testing.assert_allclose(means[mode], expected, atol=step)
    assert not np.allclose(means["whole"], means["sliding"], atol=1e-3)  # two ways, two maps
