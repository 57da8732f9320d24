"""Synthetic phantoms: determinism, plausible HU per organ, lesion geometry, the files and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from smartformer.cli import main
from smartformer.data.phantom import (
    ANISOTROPIC_SPACING,
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    LABELS,
    LESION_ID,
    Phantom,
    case_seed,
    generate_phantom,
    same_extent_shape,
    write_phantoms,
)
from smartformer.errors import SmartformerError

ID = {name: value for value, name in LABELS.items()}
# A coarse grid with the default field of view: ~0.1 s a case.
SMALL_SHAPE, SMALL_SPACING = (72, 56, 56), (5.0, 5.0, 5.0)
SMALL = ["--shape", "72", "56", "56", "--spacing", "5", "5", "5", "--no-progress"]


@pytest.fixture(scope="module")
def default_case() -> Phantom:
    return generate_phantom(3)


@pytest.fixture(scope="module")
def cases(default_case: Phantom) -> list[Phantom]:
    """The default-grid case and coarse ones with three lesions each, for lesion checks."""
    coarse = [generate_phantom(seed, SMALL_SHAPE, SMALL_SPACING, n_lesions=3) for seed in range(4)]
    return [default_case, *coarse]


def _world_extent(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """World (mm) box covered by the voxels, edges included: (2, 3) low/high corners."""
    spacing = np.abs(np.diag(affine)[:3])
    centres = np.array([affine @ [0, 0, 0, 1], affine @ [*(np.array(shape) - 1), 1]])[:, :3]
    return np.array([centres.min(0) - spacing / 2, centres.max(0) + spacing / 2])


def _lesion_mask(phantom: Phantom, lesion: dict) -> np.ndarray:
    """Lesion voxels within the lesion's extent (plus a voxel) of its centre."""
    index = np.indices(phantom.labels.shape, sparse=True)
    dist = np.sqrt(sum(((index[a] - lesion["centre_voxel"][a]) * phantom.spacing[a]) ** 2 for a in range(3)))
    return (phantom.labels == LESION_ID) & (dist <= lesion["extent_mm"] + max(phantom.spacing))


def test_same_seed_gives_identical_arrays_and_other_seeds_differ() -> None:
    first = generate_phantom(11, SMALL_SHAPE, SMALL_SPACING)
    again = generate_phantom(11, SMALL_SHAPE, SMALL_SPACING)
    other = generate_phantom(12, SMALL_SHAPE, SMALL_SPACING)
    assert first.ct.tobytes() == again.ct.tobytes()
    assert first.labels.tobytes() == again.labels.tobytes()
    assert first.lesions == again.lesions
    assert first.ct.tobytes() != other.ct.tobytes()
    assert first.labels.tobytes() != other.labels.tobytes()
    assert case_seed(0, 1) != case_seed(1, 0)


def test_arrays_geometry_and_names(default_case: Phantom) -> None:
    assert default_case.ct.shape == default_case.labels.shape == DEFAULT_SHAPE
    assert default_case.ct.dtype == np.int16 and default_case.labels.dtype == np.uint8
    assert np.allclose(np.diag(default_case.affine)[:3], DEFAULT_SPACING)
    assert np.allclose(default_case.affine @ np.r_[(np.array(DEFAULT_SHAPE) - 1) / 2, 1], [0, 0, 0, 1])
    assert nib.aff2axcodes(default_case.affine) == ("R", "A", "S")
    assert default_case.label_names == LABELS and LABELS[LESION_ID] == "lesion"
    assert set(np.unique(default_case.labels)) == set(LABELS)


def test_hu_per_organ_is_plausible(default_case: Phantom) -> None:
    ct, labels = default_case.ct, default_case.labels
    median = {name: float(np.median(ct[labels == value])) for value, name in LABELS.items()}
    assert median["background"] == pytest.approx(-1000, abs=5)
    for lung in ("lung_left", "lung_right"):
        assert -900 <= median[lung] <= -750
    assert 40 <= median["liver"] <= 80
    assert median["spine"] > 200 and median["ribs"] > 200
    assert np.percentile(ct[labels == ID["spine"]], 95) > 500
    for soft in ("heart", "kidney_left", "kidney_right"):
        assert 20 <= median[soft] <= 200
    assert np.percentile(ct[labels == ID["airway"]], 25) < -700  # air inside the walls
    body_air = ct[labels == ID["body"]]
    assert np.mean((body_air > -130) & (body_air < -70)) > 0.05  # a fat layer exists


def test_contrast_brightens_blood_only_when_asked() -> None:
    plain = generate_phantom(4, SMALL_SHAPE, SMALL_SPACING, contrast=False)
    enhanced = generate_phantom(4, SMALL_SHAPE, SMALL_SPACING, contrast=True)
    assert not plain.contrast and enhanced.contrast
    assert np.median(plain.ct[plain.labels == ID["aorta"]]) < 80
    assert np.median(enhanced.ct[enhanced.labels == ID["aorta"]]) > 150


def test_lesions_are_labelled_sized_inside_their_organ_and_visible(cases: list[Phantom]) -> None:
    for phantom in cases:
        assert 1 <= len(phantom.lesions) <= 3
        voxel = max(phantom.spacing)
        for lesion in phantom.lesions:
            assert lesion["organ"] in ("lung_left", "lung_right", "liver")
            assert 1.5 <= lesion["radius_mm"] <= 12.5
            centre = tuple(lesion["centre_voxel"])
            assert phantom.labels[centre] == LESION_ID
            world = phantom.affine @ np.r_[centre, 1]
            assert np.allclose(world[:3], lesion["centre_mm"], atol=1e-3)

            mask = _lesion_mask(phantom, lesion)
            assert mask.sum() == lesion["n_voxels"]
            equivalent = (3 * mask.sum() * np.prod(phantom.spacing) / (4 * np.pi)) ** (1 / 3)
            assert equivalent == pytest.approx(lesion["radius_mm"], abs=0.5 * voxel)

            ring = ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool)) & ~mask
            assert set(np.unique(phantom.labels[ring])) == {ID[lesion["organ"]]}

            assert phantom.ct[mask].mean() == pytest.approx(lesion["mean_hu"], abs=0.01)
            if mask.sum() >= 60:  # small low-contrast lesions may drown in partial volume and noise
                sign = -1 if lesion["density"] == "hypodense" else 1
                assert sign * (lesion["mean_hu"] - lesion["surround_hu"]) > 10
                assert sign * (phantom.ct[mask].mean() - phantom.ct[ring].mean()) > 5


def test_anisotropic_grid_keeps_extent_and_anatomy() -> None:
    assert same_extent_shape(DEFAULT_SHAPE, DEFAULT_SPACING, ANISOTROPIC_SPACING) == (450, 350, 112)
    fine_spacing = (2.5, 2.5, 5.0)
    fine_shape = same_extent_shape(SMALL_SHAPE, SMALL_SPACING, fine_spacing)
    coarse = generate_phantom(8, SMALL_SHAPE, SMALL_SPACING, n_lesions=0)
    fine = generate_phantom(8, fine_shape, fine_spacing, n_lesions=0)
    assert fine.ct.shape == (144, 112, 56)
    assert np.allclose(_world_extent(coarse.affine, coarse.ct.shape), _world_extent(fine.affine, fine.ct.shape))
    for organ in ("lung_left", "lung_right", "heart", "liver"):
        volumes = [(p.labels == ID[organ]).sum() * np.prod(p.spacing) for p in (coarse, fine)]
        assert volumes[1] == pytest.approx(volumes[0], rel=0.05)


def test_bad_generator_arguments_raise_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SmartformerError, match="spacing"):
        generate_phantom(0, SMALL_SHAPE, (5.0, -1.0, 5.0))
    with pytest.raises(SmartformerError, match="shape"):
        generate_phantom(0, (4, 56, 56), SMALL_SPACING)
    with pytest.raises(SmartformerError, match="seed"):
        generate_phantom(-1, SMALL_SHAPE, SMALL_SPACING)
    with pytest.raises(SmartformerError, match="at least 1"):
        write_phantoms(tmp_path, 0, 0, SMALL_SHAPE, SMALL_SPACING)


def test_written_files_match_the_generator_and_json(tmp_path: Path) -> None:
    folders = write_phantoms(tmp_path / "set", 2, seed=1, shape=SMALL_SHAPE, spacing=SMALL_SPACING, progress=False)
    assert folders == [tmp_path / "set" / "case_000", tmp_path / "set" / "case_001"]
    for index, folder in enumerate(folders):
        ct, labels = nib.load(folder / "ct.nii.gz"), nib.load(folder / "labels.nii.gz")
        meta = json.loads((folder / "labels.json").read_text())
        assert ct.get_data_dtype() == np.int16 and labels.get_data_dtype() == np.uint8
        assert ct.shape == labels.shape == SMALL_SHAPE
        assert np.array_equal(ct.affine, labels.affine) and nib.aff2axcodes(ct.affine) == ("R", "A", "S")
        assert ct.header.get_zooms() == SMALL_SPACING
        expected = generate_phantom(case_seed(1, index), SMALL_SHAPE, SMALL_SPACING)
        assert np.asanyarray(ct.dataobj).tobytes() == expected.ct.tobytes()
        assert np.asanyarray(labels.dataobj).tobytes() == expected.labels.tobytes()
        assert {int(k): v for k, v in meta["labels"].items()} == LABELS and meta["lesion_id"] == LESION_ID
        assert meta["shape"] == list(SMALL_SHAPE) and meta["spacing_mm"] == list(SMALL_SPACING)
        assert (meta["seed"], meta["set_seed"], meta["case_index"]) == (case_seed(1, index), 1, index)
        assert np.allclose(meta["affine"], ct.affine)
        assert meta["lesions"] == expected.lesions


def test_cli_writes_cases_refuses_existing_and_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "phantoms"
    argv = ["data", "phantom", "--out", str(out), "-n", "2", "--seed", "5", *SMALL]
    assert main(argv) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["case_000", "case_001"]
    first = nib.load(out / "case_001" / "ct.nii.gz").get_fdata()

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "case_000" in err and "--overwrite" in err

    assert main([*argv, "--overwrite"]) == 0
    assert np.array_equal(nib.load(out / "case_001" / "ct.nii.gz").get_fdata(), first)


def test_cli_anisotropic_keeps_the_field_of_view(tmp_path: Path) -> None:
    out = tmp_path / "aniso"
    assert (
        main(
            [
                "data",
                "phantom",
                "--out",
                str(out),
                "--shape",
                "32",
                "24",
                "16",
                "--anisotropic",
                "--lesions",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    ct = nib.load(out / "case_000" / "ct.nii.gz")
    assert np.allclose(ct.header.get_zooms(), ANISOTROPIC_SPACING)
    assert ct.shape == (100, 75, 16)
    assert np.allclose(_world_extent(ct.affine, ct.shape)[1] - _world_extent(ct.affine, ct.shape)[0], [80, 60, 40])


@pytest.mark.parametrize("extra", [["-n", "0"], ["--spacing", "1", "0", "1"], ["--seed", "-2"], ["--out-is-file"]])
def test_cli_bad_arguments_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    out = tmp_path / "out"
    if extra == ["--out-is-file"]:
        out.write_text("not a folder")
        extra = []
    argv = ["data", "phantom", "--out", str(out), "--shape", "16", "16", "16", "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("smartformer: error:") and err.count("\n") == 1


def test_cli_spacing_and_anisotropic_exclude_each_other(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "phantom", "--out", str(tmp_path), "--spacing", "1", "1", "1", "--anisotropic"])
    assert exit_info.value.code == 2
