"""Reading CT volumes into MONAI tensors with a RAS affine, and writing NIfTI back.

Every reader in this module goes through nibabel (NIfTI) or SimpleITK (NRRD, MHA/MHD, DICOM
series); no file format is parsed here. All of them end in the same place: a
:class:`monai.data.MetaTensor` of shape ``(1, X, Y, Z)``, float32, whose ``.affine`` maps a voxel
index ``(i, j, k)`` to RAS millimetres (MONAI's convention). Anything that is not a readable 3D
single-channel volume raises :class:`~smartformer.errors.InputError` with a one-line reason.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from smartformer.data.suffixes import IMAGE_SUFFIXES, NIFTI_SUFFIXES
from smartformer.errors import InputError
from smartformer.io_utils import atomic_write

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DICOM_MAGIC_OFFSET = 128
#: No deflate stream expands more than about 1032:1, so a compressed file of N bytes never holds
#: more than this many times N bytes of voxels; a header that claims more is refused unread.
_MAX_EXPANSION = 1100


def is_volume_path(path: str | Path) -> bool:
    """True if ``path`` names one volume: an image file by its suffix, or a folder of DICOM files.

    Only the name (and, for folders, the DICOM preamble of the files directly inside) is looked
    at; whether the volume is actually readable is for :func:`read_ct` to say.
    """
    path = Path(path)
    if path.is_dir():
        return any(is_dicom_file(child) for child in path.iterdir() if child.is_file())
    return path.is_file() and _has_image_suffix(path)


def is_dicom_file(path: str | Path) -> bool:
    """True if ``path`` is a file ending in ``.dcm`` or carrying the ``DICM`` preamble marker."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with path.open("rb") as handle:
            handle.seek(_DICOM_MAGIC_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _has_image_suffix(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def read_ct(path: str | Path, series_uid: str | None = None) -> MetaTensor:
    """Read a 3D CT volume as a ``(1, X, Y, Z)`` float32 MetaTensor in Hounsfield units.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``) or MetaImage
            (``.mha``, ``.mhd``) file, or a folder holding one DICOM series.
        series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to read.

    Returns:
        A MetaTensor whose ``.affine`` (4x4, float64) maps voxel indices to RAS mm and whose
        ``.meta`` has ``filename_or_obj``, ``spacing`` (3 floats, mm) and ``orientation``
        (the axis code of the array as stored, e.g. ``"LPS"``).

    Raises:
        InputError: the path is missing, unreadable, truncated, not an image, or not a 3D
            single-channel volume.
    """
    path = Path(path)
    array, affine = _read_array_and_affine(path, series_uid)
    return _to_metatensor(path, array, affine)


def validate_volume(path: str | Path, series_uid: str | None = None) -> tuple[int, int, int]:
    """Check a volume from its header only (cheap) and return its voxel grid shape ``(X, Y, Z)``.

    Catches missing and non-image files, unreadable headers, 2D, 4D and multi-channel images and
    empty volumes without decoding the voxels; a file whose voxel data is truncated passes here
    and fails in :func:`read_ct`.

    Raises:
        InputError: as :func:`read_ct`, for everything that the header reveals.
    """
    path = Path(path)
    if path.is_dir():
        files = _dicom_series_files(path, series_uid)
        with _quiet_itk(), _itk_errors(path):
            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            components = reader.GetNumberOfComponents()
            size = reader.GetSize()
        shape: tuple[int, ...] = (size[0], size[1], len(files))
        _check_grid(path, shape, components)
    elif path.name.lower().endswith(NIFTI_SUFFIXES):
        image = _load_nifti(path)
        shape, components = _nifti_shape_and_components(path, image)
        _check_grid(path, shape, components)
        _check_nifti_header(path, image)
    else:
        reader = _itk_header(path)
        shape, components = tuple(reader.GetSize()), reader.GetNumberOfComponents()
        _check_grid(path, shape, components)
        _check_itk_header(path, reader)
    return _spatial_shape(shape)


def write_nifti(
    array: np.ndarray | torch.Tensor,
    affine: np.ndarray | torch.Tensor,
    path: str | Path,
    as_uint8: bool = False,
    as_uint16: bool = False,
) -> Path:
    """Write ``array`` with a RAS ``affine`` to a NIfTI file; returns the path written.

    ``array`` is (X, Y, Z), (1, X, Y, Z), or (C, X, Y, Z) with C > 1, which is written as a 4D
    image with one volume per channel (channels last, as NIfTI and 3D Slicer expect). The
    affine is stored exactly (as both sform and qform, code "scanner"), so the output overlays
    the volume that the affine came from. ``as_uint8`` stores non-negative maps in 8 bits with a
    scale factor (``max / 255``), 4x smaller than float32 and finer than any colour map;
    ``as_uint16`` the same in 16 bits (``max / 65535``, 2x smaller, ~5 significant digits). The
    factor is the header's ``scl_slope`` (``scl_inter`` 0): viewers and nibabel show true values.
    ``.nii.gz`` is appended when ``path`` has no NIfTI suffix; ``.nii.gz`` files are compressed
    on all cores (see :func:`write_gzip`) and every file is written atomically.
    """
    data = torch.as_tensor(array.detach().cpu() if isinstance(array, torch.Tensor) else np.asarray(array))
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim not in (3, 4):
        raise ValueError(f"write_nifti needs an (X, Y, Z) or (C, X, Y, Z) array, got {tuple(data.shape)}")
    matrix = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        path = path.with_name(path.name + ".nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(data.shape[1:]) + (data.shape[0],) if data.ndim == 4 else tuple(data.shape))
    header.set_sform(matrix, code="scanner")
    header.set_qform(matrix, code="scanner")
    header.set_xyzt_units("mm")
    # NIfTI stores the first axis fastest (Fortran order): (X, Y, Z[, C]) in Fortran order is
    # the C order of the reversed axes. A caller that keeps its maps in that memory order (see
    # analysis.attention) makes this permute, and the reductions below, copy-free and fast.
    data = data.permute(*((0, 3, 2, 1) if data.ndim == 4 else (2, 1, 0)))
    if as_uint8 or as_uint16:
        levels, dtype = (255, torch.uint8) if as_uint8 else (65535, torch.uint16)
        top = float(data.max()) if data.numel() else 0.0
        if data.numel() and float(data.min()) < 0:
            raise ValueError(f"write_nifti(as_uint{8 if as_uint8 else 16}=True) needs non-negative values")
        slope = top / levels if top > 0 else 1.0
        data = (data.float() / slope).round_().clamp_(0, levels).to(dtype)
        header.set_slope_inter(slope, 0.0)
    elif data.dtype == torch.bool:
        data = data.to(torch.uint8)
    raw = data.contiguous().numpy()
    header.set_data_dtype(raw.dtype)
    header["vox_offset"] = 352  # 348-byte header + the 4-byte "no extensions" flag
    blocks = [header.binaryblock + b"\0" * 4, memoryview(raw).cast("B")]
    if path.name.lower().endswith(".gz"):
        write_gzip(path, blocks)
    else:
        atomic_write(path, lambda fh: fh.writelines(blocks))
    return path


def write_gzip(path: str | Path, blocks: list[bytes | memoryview], level: int = 1, chunk: int = 1 << 24) -> Path:
    """Gzip the concatenation of ``blocks`` to ``path`` (atomically), compressing chunks on all cores.

    Each chunk of ``chunk`` bytes becomes one gzip member; a file of several members is a
    valid gzip stream (RFC 1952) that gzip, zlib, nibabel, ITK and 3D Slicer read as the
    plain concatenation. zlib releases the GIL, so threads compress in parallel. Level 1, as
    nibabel uses: for maps and CTs it compresses almost as well as level 6, several times faster.
    """

    def member(piece: memoryview) -> bytes:
        z = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip header and trailer
        return z.compress(piece) + z.flush()

    pieces = [memoryview(b).cast("B") for b in blocks]
    chunks = [p[i : i + chunk] for p in pieces for i in range(0, len(p), chunk)]
    workers = min(len(chunks), torch.get_num_threads(), os.cpu_count() or 1) or 1

    def write(fh: Any) -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for compressed in pool.map(member, chunks):
                fh.write(compressed)

    return atomic_write(path, write)


def _read_array_and_affine(path: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray]:
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        return _read_dicom_series(path, series_uid)
    if path.stat().st_size == 0:
        raise InputError(path, "is an empty (0-byte) file")
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    return _read_itk_file(path)


# --- NIfTI through nibabel ------------------------------------------------------------------


def _load_nifti(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for non-NIfTI or damaged headers
        raise InputError(path, f"not a readable NIfTI file ({_one_line(exc)})") from None


def _check_nifti_header(path: Path, image: nib.Nifti1Image) -> None:
    """Refuse a NIfTI header whose geometry or voxel size cannot be right, naming the field.

    The raw header is read again without nibabel's silent repairs (which turn a zero pixdim
    into 1 and a negative one positive), so that such a file is refused instead of moved.
    """
    with nib.openers.ImageOpener(str(path)) as fh:
        raw = type(image.header).from_fileobj(fh, check=False)
    if int(raw["sform_code"]) != 0:
        field = "sform (srow_x/y/z)"
    else:
        field = "qform (pixdim, quatern)" if int(raw["qform_code"]) != 0 else "pixdim"
        pixdim = [float(v) for v in raw["pixdim"][1:4]]
        if not all(np.isfinite(pixdim)) or min(pixdim) <= 0:
            raise InputError(path, f"header field pixdim[1:4] = {pixdim}: voxel sizes must be positive")
    _check_affine(path, np.asarray(image.affine, dtype=np.float64), field)
    itemsize = image.get_data_dtype().itemsize
    needed = int(raw["vox_offset"]) + int(np.prod(image.shape, dtype=np.int64)) * itemsize
    _check_data_size(path, needed, compressed=path.name.lower().endswith(".gz"))


def _check_data_size(path: Path, needed: int, compressed: bool) -> None:
    """Refuse a header that declares more voxel bytes than the file can hold (before allocating them)."""
    size = path.stat().st_size
    limit = size * _MAX_EXPANSION if compressed else size
    if needed > limit:
        raise InputError(
            path,
            f"header declares {needed / 1e6:.1f} MB of voxel data but the "
            f"{size}-byte file {'cannot hold' if compressed else 'holds less'}: "
            "corrupt header or truncated file",
        )


def _check_affine(path: Path, affine: np.ndarray, field: str) -> None:
    """Refuse a voxel-to-world matrix that is not finite or maps an axis to nothing (zero column)."""
    matrix = affine[:3, :3]
    if not np.isfinite(affine).all():
        raise InputError(path, f"header field {field}: the affine holds non-finite values")
    norms = np.linalg.norm(matrix, axis=0)
    if (norms <= 0).any():
        axis = int(np.argmin(norms))
        raise InputError(path, f"header field {field}: the affine's column for axis {axis} is zero (voxel size 0 mm)")
    if abs(np.linalg.det(matrix / norms)) < 1e-6:
        raise InputError(path, f"header field {field}: the affine is singular (two axes point the same way)")


def _nifti_shape_and_components(path: Path, image: nib.Nifti1Image) -> tuple[tuple[int, ...], int]:
    dtype = image.get_data_dtype()
    components = len(dtype.fields) if dtype.fields else 1
    shape = tuple(int(n) for n in image.shape)
    if len(shape) == 5 and shape[3] == 1:  # NIfTI stores vectors along the 5th dimension
        shape, components = shape[:3], components * shape[4]
    return shape, components


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = _load_nifti(path)
    shape, components = _nifti_shape_and_components(path, image)
    _check_grid(path, shape, components)
    _check_nifti_header(path, image)
    try:
        array = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated gzip streams and short files surface here
        raise InputError(path, f"voxel data cannot be read, file truncated or corrupt ({_one_line(exc)})") from None
    return array.reshape(array.shape[:3]), np.asarray(image.affine, dtype=np.float64)


# --- NRRD / MetaImage / DICOM through SimpleITK ----------------------------------------------


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Keep ITK's warnings and MetaIO's raw C++ messages off stderr while reading.

    ITK's own warnings are switched off through SimpleITK; MetaIO writes to the C++ error stream
    directly, so file descriptor 2 is pointed at /dev/null for the duration (then restored).
    """
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    saved_fd = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


@contextlib.contextmanager
def _itk_errors(path: Path, what: str = "not a readable image") -> Iterator[None]:
    """Turn SimpleITK's RuntimeError (a multi-line C++ trace) into a one-line InputError."""
    try:
        yield
    except RuntimeError as exc:
        raise InputError(path, f"{what} ({_itk_reason(exc)})") from None


def _itk_reason(exc: Exception) -> str:
    """The informative part of a SimpleITK error: the text after the last 'ITK ERROR: ...:'."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR" in line:
            return _one_line(line.split("): ", 1)[-1])
    return _one_line(lines[-1] if lines else exc)


def _one_line(exc: object, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _itk_header(path: Path) -> sitk.ImageFileReader:
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with _quiet_itk(), _itk_errors(path):
        reader.ReadImageInformation()
    return reader


def _check_itk_header(path: Path, reader: sitk.ImageFileReader) -> None:
    """Geometry (spacing, direction) and declared data size of a NRRD / MetaImage header."""
    dim = reader.GetDimension()
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)[:3]
    if not np.isfinite(spacing).all() or (spacing <= 0).any():
        raise InputError(path, f"header field spacing = {spacing.tolist()}: voxel sizes must be positive")
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    _check_affine(path, affine, "direction")
    if _voxels_in_header_file(path):
        with _quiet_itk():
            itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * dim, reader.GetPixelID())).itemsize
        _check_data_size(path, int(np.prod(reader.GetSize(), dtype=np.int64)) * itemsize, compressed=True)


def _voxels_in_header_file(path: Path) -> bool:
    """True for a .mha / .nrrd whose voxels follow the header in the same file (not detached)."""
    suffix = path.suffix.lower()
    if suffix not in (".mha", ".nrrd"):
        return False
    with path.open("rb") as fh:
        head = fh.read(1 << 16).lower()
    if suffix == ".mha":
        return b"elementdatafile = local" in b" = ".join(part.strip() for part in head.split(b"="))
    return b"data file:" not in head and b"datafile:" not in head


def _read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = _itk_header(path)
    _check_grid(path, tuple(reader.GetSize()), reader.GetNumberOfComponents())
    _check_itk_header(path, reader)
    with _quiet_itk(), _itk_errors(path, "voxel data cannot be read, file truncated or corrupt"):
        image = reader.Execute()
    return _itk_to_array_and_affine(image)


def _dicom_series_files(folder: Path, series_uid: str | None) -> list[str]:
    """The slice files of the requested (or only) DICOM series in ``folder``, sorted by GDCM."""
    with _quiet_itk(), _itk_errors(folder, "DICOM folder cannot be scanned"):
        series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
        files = {uid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series_ids}
    if not series_ids:
        reason = (
            "is an empty folder"
            if not any(folder.iterdir())
            else "holds no DICOM image series (and is not an image file)"
        )
        raise InputError(folder, reason)
    listing = ", ".join(f"{uid!r} ({len(files[uid])} slices)" for uid in series_ids)
    if series_uid is None:
        if len(series_ids) > 1:
            raise InputError(
                folder,
                f"holds {len(series_ids)} DICOM series: {listing}; choose one "
                "with read_ct(path, series_uid=...) or put each series in "
                "its own folder",
            )
        series_uid = series_ids[0]
    if series_uid not in files:
        raise InputError(folder, f"has no DICOM series {series_uid!r}; it holds {listing}")
    return list(files[series_uid])


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray]:
    files = _dicom_series_files(folder, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    with _quiet_itk(), _itk_errors(folder, "DICOM series cannot be read"):
        image = reader.Execute()
    _check_grid(folder, tuple(image.GetSize()), image.GetNumberOfComponentsPerPixel())
    return _itk_to_array_and_affine(image)


def _itk_to_array_and_affine(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Array in (x, y, z) order, and the LPS geometry of SimpleITK turned into a RAS affine."""
    array = sitk.GetArrayViewFromImage(image)  # (z, y, x), or with trailing singleton dims
    array = np.ascontiguousarray(array.reshape(array.shape[-3:]).transpose(2, 1, 0), dtype=np.float32)
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)[:3]
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing  # column j = spacing_j * direction of axis j
    lps[:3, 3] = np.asarray(image.GetOrigin(), dtype=np.float64)[:3]
    return array, _LPS_TO_RAS @ lps


# --- common checks and output ---------------------------------------------------------------


def _check_grid(path: Path, shape: tuple[int, ...], components: int) -> None:
    """Refuse anything but a non-empty 3D single-channel grid (trailing size-1 axes allowed)."""
    size = "x".join(str(n) for n in shape)
    if components != 1:
        raise InputError(
            path, f"has {components} components per voxel (vector / multi-channel image); need a single-channel CT"
        )
    if any(n == 0 for n in shape):
        raise InputError(path, f"is an empty volume (size {size})")
    if len(shape) < 3:
        raise InputError(path, f"is a {len(shape)}D image (size {size}); need a 3D volume")
    if any(n > 1 for n in shape[3:]):
        raise InputError(
            path,
            f"is a {len(shape)}D image (size {size}, e.g. a time series or "
            "multi-channel stack); need a single 3D volume",
        )
    if min(shape[:3]) == 1:
        raise InputError(
            path,
            f"is a single 2D slice (size {size}); need a 3D volume "
            "(for DICOM, give the folder of the series, not one file)",
        )


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    return int(shape[0]), int(shape[1]), int(shape[2])


def _to_metatensor(path: Path, array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    _check_affine(path, affine, "geometry (spacing, orientation)")
    finite = np.isfinite(array)
    if not finite.all():
        raise InputError(
            path,
            f"has {int(array.size - finite.sum())} non-finite voxels (NaN or infinity) "
            f"of {array.size}: corrupt or not a CT in HU",
        )
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    meta: dict[str, Any] = {
        "filename_or_obj": str(path),
        "spacing": spacing,
        "orientation": "".join(nib.orientations.aff2axcodes(affine)),
        "original_affine": torch.as_tensor(affine, dtype=torch.float64),
        "spatial_shape": tuple(int(n) for n in array.shape),
        "space": "RAS",
    }
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine), meta=meta)
