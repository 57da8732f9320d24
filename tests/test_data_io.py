"""read_ct / write_nifti / validate_volume on real files written by SimpleITK, nibabel and GDCM."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from smartformer.data.io import is_volume_path, read_ct, validate_volume, write_nifti
from smartformer.errors import InputError

# Anisotropic spacing, an off-centre origin, and a direction (LPS, row-major) that permutes and
# flips the axes: i -> inferior, j -> left, k -> anterior (axis code "ILA").
SPACING = (0.7, 1.3, 2.5)
ORIGIN = (12.5, -30.0, 40.0)
GEOMETRY = {"spacing": SPACING, "origin": ORIGIN}
PERMUTED_DIRECTION = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0, 0.0)
SHAPE_ZYX = (16, 24, 20)  # a (X, Y, Z) = (20, 24, 16) volume
VOXEL = (3, 17, 11)  # an (i, j, k) index to follow through the readers


def _ct_values() -> np.ndarray:
    return (np.arange(np.prod(SHAPE_ZYX)).reshape(SHAPE_ZYX) % 3000 - 1000).astype(np.int16)


def _lps_to_ras(point: tuple[float, ...]) -> np.ndarray:
    return np.array([-point[0], -point[1], point[2]])


def _assert_geometry(image, itk_image: sitk.Image, atol: float = 1e-4) -> None:
    """The RAS affine maps VOXEL to the world point ITK gives, and the values agree."""
    world = _lps_to_ras(itk_image.TransformIndexToPhysicalPoint(VOXEL))
    mapped = image.affine.numpy() @ np.array([*VOXEL, 1.0])
    np.testing.assert_allclose(mapped[:3], world, atol=atol)
    np.testing.assert_allclose(image.meta["spacing"], itk_image.GetSpacing(), atol=atol)
    i, j, k = VOXEL
    assert float(image[0, i, j, k]) == float(sitk.GetArrayViewFromImage(itk_image)[k, j, i])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize(
    "direction, code",
    [
        ((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), "LPS"),
        (PERMUTED_DIRECTION, "ILA"),
    ],
)
def test_sitk_written_formats_round_trip(tmp_path, write_volume, suffix, direction, code):
    path = write_volume(tmp_path / f"ct{suffix}", _ct_values(), direction=direction, **GEOMETRY)
    image = read_ct(path)

    assert image.shape == (1, 20, 24, 16)
    assert image.dtype == torch.float32
    assert image.affine.shape == (4, 4)
    assert image.meta["orientation"] == code
    assert image.meta["filename_or_obj"] == str(path)
    assert len(image.meta["spacing"]) == 3
    _assert_geometry(image, sitk.ReadImage(str(path)))
    assert np.array_equal(image[0].numpy(), _ct_values().transpose(2, 1, 0))


def test_nibabel_nifti_keeps_affine_and_values(tmp_path):
    data = _ct_values().transpose(2, 1, 0)  # (X, Y, Z)
    affine = np.array(
        [
            [0.0, 0.0, -2.5, 40.0],  # i -> anterior, j -> superior, k -> left
            [0.7, 0.0, 0.0, -30.0],
            [0.0, 1.3, 0.0, 12.5],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    path = tmp_path / "nib.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    image = read_ct(path)

    np.testing.assert_allclose(image.affine.numpy(), affine, atol=1e-6)
    assert image.meta["orientation"] == "ASL"
    np.testing.assert_allclose(image.meta["spacing"], (0.7, 1.3, 2.5), atol=1e-6)
    assert np.array_equal(image[0].numpy(), data)


def test_nifti_scaling_is_applied(tmp_path):
    data = np.full((6, 7, 8), 100, dtype=np.int16)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(1.0, -1024.0)
    nib.save(image, str(tmp_path / "scaled.nii.gz"))
    assert float(read_ct(tmp_path / "scaled.nii.gz").max()) == -924.0


@pytest.mark.parametrize(
    "direction, code",
    [
        ((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), "LPS"),
        ((1.0, 0, 0, 0, -1.0, 0, 0, 0, -1.0), "LAI"),
    ],
)
def test_dicom_series_round_trip(tmp_path, write_dicom_series, direction, code):
    values = _ct_values()
    folder = write_dicom_series(tmp_path / "series", values, direction=direction, **GEOMETRY)
    reference = sitk.GetImageFromArray(values)
    reference.SetSpacing(SPACING)
    reference.SetOrigin(ORIGIN)
    reference.SetDirection(direction)

    image = read_ct(folder)

    assert image.shape == (1, 20, 24, 16)
    assert image.meta["orientation"] == code
    np.testing.assert_allclose(image.meta["spacing"], SPACING, atol=1e-4)  # incl. slice spacing
    _assert_geometry(image, reference)
    assert np.array_equal(image[0].numpy(), values.transpose(2, 1, 0))  # rescale applied


def test_dicom_files_without_extension_are_found(tmp_path, write_dicom_series):
    folder = write_dicom_series(tmp_path / "noext", _ct_values(), suffix="", **GEOMETRY)
    assert is_volume_path(folder)
    assert read_ct(folder).shape == (1, 20, 24, 16)


def test_two_series_in_one_folder_need_a_choice(tmp_path, write_dicom_series):
    folder = tmp_path / "mixed"
    write_dicom_series(folder, _ct_values(), series_uid="1.2.3.100", prefix="a", **GEOMETRY)
    write_dicom_series(
        folder, _ct_values()[:5], series_uid="1.2.3.200", prefix="b", spacing=(0.7, 1.3, 1.0), origin=ORIGIN
    )

    with pytest.raises(InputError) as caught:
        read_ct(folder)
    message = str(caught.value)
    assert str(folder) in message and "\n" not in message
    assert "1.2.3.100" in message and "16 slices" in message
    assert "1.2.3.200" in message and "5 slices" in message
    assert "series_uid" in message

    second = read_ct(folder, series_uid="1.2.3.200")
    assert second.shape == (1, 20, 24, 5)
    np.testing.assert_allclose(second.meta["spacing"], (0.7, 1.3, 1.0), atol=1e-4)
    with pytest.raises(InputError, match="no DICOM series '9.9'"):
        read_ct(folder, series_uid="9.9")


def _truncated_nifti(tmp_path: Path, write_volume) -> Path:
    good = write_volume(tmp_path / "good.nii.gz", _ct_values(), **GEOMETRY)
    data = good.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_input(tmp_path: Path, kind: str, write_volume, write_dicom_series) -> Path:
    """Create one kind of unusable input and return its path."""
    if kind == "truncated":
        return _truncated_nifti(tmp_path, write_volume)
    if kind == "text":
        path = tmp_path / "notes.nii.gz"
        path.write_text("this is not an image\n")
        return path
    if kind == "zero-byte":
        path = tmp_path / "empty.nrrd"
        path.write_bytes(b"")
        return path
    if kind == "2d":
        return write_volume(
            tmp_path / "slice.nrrd", _ct_values()[0], spacing=(1, 1), origin=(0, 0), direction=(1, 0, 0, 1)
        )
    if kind == "single-slice":
        return write_volume(tmp_path / "thin.nii.gz", _ct_values()[:1], **GEOMETRY)
    if kind == "4d":
        path = tmp_path / "series4d.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((6, 7, 8, 3), np.int16), np.eye(4)), str(path))
        return path
    if kind == "vector":
        path = tmp_path / "vector.mha"
        sitk.WriteImage(sitk.Image([6, 7, 8], sitk.sitkVectorFloat32, 3), str(path))
        return path
    if kind == "empty-volume":
        path = tmp_path / "zero.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((0, 7, 8), np.int16), np.eye(4)), str(path))
        return path
    if kind == "empty-folder":
        path = tmp_path / "nothing"
        path.mkdir()
        return path
    if kind == "folder-without-dicom":
        path = tmp_path / "docs"
        path.mkdir()
        (path / "readme.txt").write_text("hello")
        return path
    if kind == "one-dicom-file":
        folder = write_dicom_series(tmp_path / "one", _ct_values(), **GEOMETRY)
        return folder / "slice000.dcm"
    assert kind == "missing"
    return tmp_path / "missing.nii.gz"


BAD_KINDS = {
    "truncated": "truncated",
    "text": "not a readable NIfTI",
    "zero-byte": "empty",
    "2d": "2D image",
    "single-slice": "2D slice",
    "4d": "4D image",
    "vector": "3 components",
    "empty-volume": "empty volume",
    "empty-folder": "empty folder",
    "folder-without-dicom": "no DICOM",
    "one-dicom-file": "2D slice",
    "missing": "does not exist",
}


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_inputs_raise_one_line_input_error(tmp_path, write_volume, write_dicom_series, kind):
    path = _bad_input(tmp_path, kind, write_volume, write_dicom_series)
    with pytest.raises(InputError) as caught:
        read_ct(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert BAD_KINDS[kind] in message
    assert "\n" not in message and "Traceback" not in message and "itk::" not in message


@pytest.mark.parametrize("kind", sorted(set(BAD_KINDS) - {"truncated"}))
def test_header_check_catches_all_but_truncated_voxels(tmp_path, write_volume, write_dicom_series, kind):
    path = _bad_input(tmp_path, kind, write_volume, write_dicom_series)
    with pytest.raises(InputError, match=BAD_KINDS[kind]):
        validate_volume(path)


def test_header_check_returns_shape(tmp_path, write_volume, write_dicom_series):
    shape = (20, 24, 16)
    assert validate_volume(write_volume(tmp_path / "a.mha", _ct_values(), **GEOMETRY)) == shape
    assert validate_volume(write_volume(tmp_path / "a.nii.gz", _ct_values(), **GEOMETRY)) == shape
    assert validate_volume(write_dicom_series(tmp_path / "d", _ct_values(), **GEOMETRY)) == shape
    assert validate_volume(_truncated_nifti(tmp_path, write_volume)) == (20, 24, 16)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_write_nifti_keeps_affine(tmp_path, write_volume, as_tensor):
    source = read_ct(write_volume(tmp_path / "src.nrrd", _ct_values(), **GEOMETRY))
    array = source if as_tensor else source[0].numpy()  # (1, X, Y, Z) tensor or (X, Y, Z)

    out = write_nifti(array, source.affine if as_tensor else source.affine.numpy(), tmp_path / "maps" / "attention")

    assert out.name == "attention.nii.gz"
    np.testing.assert_allclose(nib.load(str(out)).affine, source.affine.numpy(), atol=1e-5)
    back = read_ct(out)
    np.testing.assert_allclose(back.affine.numpy(), source.affine.numpy(), atol=1e-5)
    assert torch.equal(back.as_tensor(), source.as_tensor())


def test_write_nifti_refuses_wrong_rank(tmp_path):
    with pytest.raises(ValueError, match="X, Y, Z"):
        write_nifti(np.zeros((2, 3, 4, 5, 6)), np.eye(4), tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="X, Y, Z"):
        write_nifti(np.zeros((3, 4)), np.eye(4), tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="non-negative"):
        write_nifti(-np.ones((3, 4, 5)), np.eye(4), tmp_path / "x.nii.gz", as_uint8=True)
    assert not list(tmp_path.iterdir())


def test_is_volume_path(tmp_path, write_volume, write_dicom_series):
    assert is_volume_path(write_volume(tmp_path / "a.nii.gz", _ct_values(), **GEOMETRY))
    upper = write_volume(tmp_path / "b.mha", _ct_values(), **GEOMETRY).rename(tmp_path / "B.MHA")
    assert is_volume_path(upper)
    assert is_volume_path(write_dicom_series(tmp_path / "dicom", _ct_values()[:3], **GEOMETRY))
    (tmp_path / "notes.txt").write_text("x")
    assert not is_volume_path(tmp_path / "notes.txt")
    assert not is_volume_path(tmp_path / "absent.nii.gz")
    (tmp_path / "empty").mkdir()
    assert not is_volume_path(tmp_path / "empty")


def test_write_nifti_4d_uint8_and_multimember_gzip(tmp_path: Path) -> None:
    """A 4D channels-first map comes back channels-last, within half a quantisation step, from
    nibabel and SimpleITK alike; the multi-member gzip is one valid stream."""
    import gzip

    import SimpleITK as sitk

    from smartformer.data.io import write_gzip, write_nifti

    rng = np.random.default_rng(0)
    maps = rng.random((3, 9, 7, 5)).astype(np.float32) * 0.4
    affine = np.array([[-1.5, 0, 0, 10], [0, 0, 2.0, -4], [0, 1.2, 0, 3], [0, 0, 0, 1]])
    path = write_nifti(maps, affine, tmp_path / "maps.nii.gz", as_uint8=True)
    img = nib.load(path)
    assert img.shape == (9, 7, 5, 3) and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, affine)
    slope = maps.max() / 255
    np.testing.assert_allclose(img.get_fdata(), np.moveaxis(maps, 0, -1), atol=slope / 2 + 1e-7)
    itk = sitk.ReadImage(str(path))
    assert itk.GetSize() == (9, 7, 5, 3)
    # write_gzip: small chunks make many members; gzip reads back the plain concatenation.
    payload = rng.integers(0, 255, 100_000, dtype=np.uint8).tobytes()
    write_gzip(tmp_path / "x.gz", [b"head", payload], chunk=4096)
    assert gzip.decompress((tmp_path / "x.gz").read_bytes()) == b"head" + payload
    assert (tmp_path / "x.gz").read_bytes().count(b"\x1f\x8b\x08") >= 25


def test_write_nifti_keeps_dtype_and_3d_shape(tmp_path: Path) -> None:
    from smartformer.data.io import write_nifti

    labels = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60
    path = write_nifti(labels[None], np.diag([2.0, 2.0, 3.0, 1.0]), tmp_path / "labels")
    assert path.name == "labels.nii.gz"
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16 and img.shape == (4, 5, 6)
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels)
    assert img.header.get_slope_inter() == (None, None)
