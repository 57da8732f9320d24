"""Builders of labelled data sets for the downstream commands (``probe``, ``finetune``, ...).

Every builder ends in a CSV table with the columns the downstream commands read:

* ``image``: the path of a volume (absolute, or relative to the CSV's folder);
* ``label``: 0 or 1;
* ``patient``: a patient id, for patient-level splits;
* for lesion-centred tasks on whole scans, ``center_x``, ``center_y``, ``center_z``: the lesion
  (or sample) centre in world millimetres, in the RAS frame of
  :func:`smartformer.data.io.read_ct`'s affine. Builders that write ready-made crops leave
  these columns out: the downstream command then uses the whole crop.

Extra columns (``split``, ``kind``, ...) say more about each row and are ignored downstream.

* :mod:`~smartformer.data.builders.lidc`: LIDC-IDRI nodule crops, malignancy labels;
* :mod:`~smartformer.data.builders.nodulemnist3d`: MedMNIST NoduleMNIST3D ``.npz`` files;
* :mod:`~smartformer.data.builders.lesions`: lesion vs. normal tissue from CT + lesion masks.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smartformer.errors import InputError
from smartformer.io_utils import atomic_write_bytes

CENTER_COLUMNS: tuple[str, str, str] = ("center_x", "center_y", "center_z")


def prepare_out_dir(out: str | Path) -> Path:
    """``out`` as a folder that exists (created if missing), or an InputError if it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(out, f"cannot create the output folder ({exc.strerror})") from None
    return out


def csv_path(path: str | Path, csv_dir: str | Path) -> str:
    """How a CSV in ``csv_dir`` names ``path`` so that every reader finds it.

    Readers resolve a relative cell against the CSV's folder, so an absolute ``path`` is kept
    as it is and a relative one (relative to the working directory, as typed on the command
    line) is rewritten relative to ``csv_dir``.
    """
    path = Path(path)
    if path.is_absolute():
        return str(path)
    return os.path.relpath(os.path.abspath(path), os.path.abspath(csv_dir))


def write_csv_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` (dicts; missing keys empty) to ``path`` under a temporary name, then rename.

    A reader never sees a half-written table: the file either keeps its old content or has the
    new one in full. Floats are written with 4 decimals (0.1 µm for millimetres).
    """
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(value) for key, value in row.items()})
    return atomic_write_bytes(path, table.getvalue().encode("utf-8"))


def _cell(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    if isinstance(value, np.integer):
        return int(value)
    return value


def voxel_to_world(affine: np.ndarray, ijk: Sequence[float] | np.ndarray) -> np.ndarray:
    """World (RAS mm) coordinates of voxel indices ``ijk`` ((3,) or (N, 3)) under ``affine``."""
    points = np.asarray(ijk, dtype=np.float64)
    return points @ np.asarray(affine, dtype=np.float64)[:3, :3].T + np.asarray(affine)[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: Sequence[float] | np.ndarray) -> np.ndarray:
    """Voxel indices (float) of world RAS points ``xyz`` ((3,) or (N, 3)) under ``affine``."""
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    points = np.asarray(xyz, dtype=np.float64)
    return points @ inverse[:3, :3].T + inverse[:3, 3]
