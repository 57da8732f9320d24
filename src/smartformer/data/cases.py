"""Cases: a CT and, where the task has one, a map on its grid (a lesion mask or a label map).

One convention for every command that reads cases (``segment train``, ``localize``, ``data lesions``,
and the CSVs of ``probe``, ``finetune`` and ``features``). A source is either

* a **CSV**, one row per case (relative paths resolve against the CSV's folder):

  - ``image`` (required): the CT, an image file or a DICOM series folder;
  - ``mask``: the case's map, a lesion mask (voxels > 0) or a label map, on the CT's grid. Where a
    command needs a map and the CSV has no ``mask`` column, the ``label`` column holds it
    (``image,label``, as in MSD datalists: a label map); otherwise ``label`` is a class;
  - ``case``: the case id (default: the image's file name without its suffix, with its folder
    where two images share a name, and with ``_r<row>`` where one image is on several rows);
  - ``patient``: groups cases for patient-level splits (default: the case id);
  - any other column is kept, as text, in :attr:`Case.fields`;

* or a **folder of case folders** (the folder itself counts too): a folder is a case when it holds a
  CT named ``ct.*``, ``image.*`` or ``img.*`` (any image suffix, any letter case); its map is the
  first file named ``tumor``, ``tumour``, ``lesion``, ``lesions``, ``mask`` or ``gtv`` (a lesion
  mask), else ``labels``, ``label``, ``seg`` or ``segmentation`` (a label map); ``prefer="labels"``
  looks for a label map first. The folder's name is the case id and the patient. ``image_name`` /
  ``mask_name`` name the files exactly instead. Hidden folders and folders without a CT are
  skipped; a CT without its map is an error. The phantoms (``case_000/ct.nii.gz`` +
  ``labels.nii.gz``) and the STS data (``STS_001/ct.nii.gz`` + ``tumor.nii.gz``) are such folders.

:func:`find_cases` checks the whole source before anything is computed (columns, empty cells, that
every file exists, unique case ids); each problem is one :class:`~smartformer.errors.InputError`
line naming the CSV (and its row) or the folder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from smartformer.data.naming import volume_stem
from smartformer.data.phantom import LESION_ID
from smartformer.data.suffixes import IMAGE_SUFFIXES
from smartformer.errors import InputError

__all__ = [
    "Case",
    "find_cases",
    "read_csv_cases",
    "cases_from_table",
    "read_table",
    "require_columns",
    "resolve_csv_path",
    "lesion_value",
    "IMAGE_NAMES",
    "MASK_NAMES",
    "LABEL_MAP_NAMES",
]

#: Names (before the image suffix, any letter case) of the CT in a case folder, in order of preference.
IMAGE_NAMES: tuple[str, ...] = ("ct", "image", "img")
#: Names of a lesion mask (voxels > 0 are the lesion) in a case folder.
MASK_NAMES: tuple[str, ...] = ("tumor", "tumour", "lesion", "lesions", "mask", "gtv")
#: Names of a label map (one value per structure) in a case folder.
LABEL_MAP_NAMES: tuple[str, ...] = ("labels", "label", "seg", "segmentation")


@dataclass(frozen=True)
class Case:
    """One case: a CT and, optionally, its map; checked to exist."""

    case: str
    """Unique case id."""
    image: Path
    """The CT (absolute, or relative to the working directory)."""
    patient: str
    """Patient id: all cases of one patient land on the same side of a split."""
    mask: Path | None = None
    """The map on the CT's grid: a lesion mask or a label map (see :attr:`kind`)."""
    kind: str | None = None
    """``"mask"`` (a lesion mask: ``tumor.*`` ..., a CSV's ``mask`` column) or ``"labels"`` (a label
    map: ``labels.*`` ..., a CSV's ``label`` column); None without a map."""
    row: int | None = None
    """Line of the case in its CSV (the header is line 1), for messages; None in a folder source."""
    fields: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Every cell of the case's CSV row, stripped (empty in a folder source)."""


def lesion_value(case: Case, lesion_label: int | None = None) -> int | None:
    """The value that marks the lesion in ``case.mask``: ``lesion_label`` when given; else, in a label
    map, the built-in phantoms' lesion id (11); in a lesion mask None (every voxel > 0)."""
    if lesion_label is not None:
        return lesion_label
    return LESION_ID if case.kind == "labels" else None


def find_cases(
    source: str | Path,
    need_mask: bool = True,
    image_name: str | None = None,
    mask_name: str | None = None,
    prefer: str = "mask",
) -> list[Case]:
    """The cases of a CSV or a folder of case folders (see the module docstring), every file checked.

    Args:
        source: a CSV file or a folder.
        need_mask: every case must have a map (else a map is attached where there is one).
        image_name, mask_name: in a folder source, the exact file names of the CT and the map in
            each case folder, instead of the search by name.
        prefer: in a folder source, ``"mask"`` looks for a lesion mask before a label map,
            ``"labels"`` for a label map first (segmentation).

    Raises:
        InputError: one line naming the CSV (and row) or folder: a missing source, an image file given
            as the source, missing columns, empty cells, missing files, repeated case ids, no case.
    """
    source = Path(source)
    if prefer not in ("mask", "labels"):
        raise ValueError(f"prefer must be 'mask' or 'labels', got {prefer!r}")
    if not source.exists():
        raise InputError(source, "does not exist")
    if source.is_dir():
        return _folder_cases(source, need_mask, image_name, mask_name, prefer)
    if source.name.lower().endswith(IMAGE_SUFFIXES):
        raise InputError(
            source,
            "is an image, not a list of cases: give a CSV with image and mask columns, or a folder of case folders",
        )
    return read_csv_cases(source, need_mask)


# ------------------------------------------------------------------------------------------- CSV


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV as strings (no NaN conversion) or raise a one-line :class:`InputError`."""
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True, encoding="utf-8")
    except Exception as exc:  # pandas raises several parser error types
        raise InputError(
            path, f"not a readable CSV ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty:
        raise InputError(path, "has no rows")
    return table


def resolve_csv_path(csv: Path, row: int, column: str, value: str) -> Path:
    """A path cell of ``csv`` (line ``row``) resolved against the CSV's folder; refuses empty cells
    and missing files."""
    if not value:
        raise InputError(csv, f"row {row}: empty {column}")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else csv.parent / path
    if not path.exists():
        raise InputError(csv, f"row {row}: {column} {value} does not exist (looked for {path})")
    return path


def read_csv_cases(csv: str | Path, need_mask: bool = True) -> list[Case]:
    """The cases of a CSV (see the module docstring).

    Raises:
        InputError: naming the CSV (and row) for a missing column, an empty ``image`` (or needed map)
            cell, a file that does not exist, or a repeated case id.
    """
    csv = Path(csv)
    return cases_from_table(csv, read_table(csv), need_mask)


def require_columns(csv: Path, table: pd.DataFrame, columns: Sequence[str]) -> None:
    """Refuse a table that lacks any of ``columns``, naming them and the columns it has."""
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(csv, f"missing column(s) {', '.join(missing)}; found {', '.join(table.columns)}")


def cases_from_table(csv: Path, table: pd.DataFrame, need_mask: bool = True) -> list[Case]:
    """:func:`read_csv_cases` of a table already read by :func:`read_table` (which names ``csv``)."""
    require_columns(csv, table, ["image"])
    mask_column = "mask" if "mask" in table.columns else "label" if need_mask and "label" in table.columns else None
    if need_mask and mask_column is None:
        raise InputError(
            csv, f"has no 'mask' column (nor a 'label' column of label maps); found {', '.join(table.columns)}"
        )
    records = [{k: str(v).strip() for k, v in record.items()} for record in table.to_dict("records")]
    images = [resolve_csv_path(csv, row, "image", record["image"]) for row, record in enumerate(records, start=2)]
    ids = _case_ids(csv, records, images)
    cases = []
    for row, (record, image, case) in enumerate(zip(records, images, ids), start=2):
        value = record[mask_column] if mask_column else ""
        mask = resolve_csv_path(csv, row, mask_column, value) if mask_column and (value or need_mask) else None
        cases.append(
            Case(
                case=case,
                image=image,
                patient=record.get("patient", "") or case,
                mask=mask,
                kind=None if mask is None else "mask" if mask_column == "mask" else "labels",
                row=row,
                fields=record,
            )
        )
    return cases


def _case_ids(csv: Path, records: list[dict[str, str]], images: list[Path]) -> list[str]:
    """The ``case`` column, or ids from the image names (see the module docstring); refuses repeats."""
    if records and "case" in records[0]:
        ids = [record["case"] for record in records]
        empty = [row for row, value in enumerate(ids, start=2) if not value]
        if empty:
            raise InputError(csv, f"row {empty[0]}: empty case")
    else:
        stems = [volume_stem(p) for p in images]
        if len(set(stems)) < len(set(images)):  # two different images share a name: add the folder
            stems = [f"{p.parent.name}/{s}" for p, s in zip(images, stems)]
        ids = [s if stems.count(s) == 1 else f"{s}_r{row}" for row, s in enumerate(stems, start=2)]
    seen: dict[str, int] = {}
    for row, value in enumerate(ids, start=2):
        if value in seen:
            raise InputError(csv, f"row {row}: case {value!r} repeats row {seen[value]}")
        seen[value] = row
    return ids


# ---------------------------------------------------------------------------------------- folder


def _folder_cases(
    root: Path, need_mask: bool, image_name: str | None, mask_name: str | None, prefer: str
) -> list[Case]:
    map_names = LABEL_MAP_NAMES + MASK_NAMES if prefer == "labels" else MASK_NAMES + LABEL_MAP_NAMES
    cases: list[Case] = []
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        files = _images_by_name(folder)
        image = folder / image_name if image_name else _first(files, IMAGE_NAMES)
        if image is None or not image.is_file():
            continue
        mask = folder / mask_name if mask_name else _first(files, map_names)
        if mask is not None and not mask.exists():
            mask = None
        if mask is None and need_mask:
            wanted = mask_name or "/".join(map_names) + ".*"
            raise InputError(folder, f"has {image.name} but no map ({wanted})")
        kind = None if mask is None else "labels" if volume_stem(mask).lower() in LABEL_MAP_NAMES else "mask"
        cases.append(Case(case=folder.name, image=image, patient=folder.name, mask=mask, kind=kind))
    if not cases:
        wanted = image_name or "/".join(IMAGE_NAMES) + ".*"
        raise InputError(
            root, f"holds no case: no case folder with {wanted}{' and its map' if need_mask else ''} (nor is it a CSV)"
        )
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case in seen:
            raise InputError(root, f"case {case.case!r} appears twice ({seen[case.case]} and {case.image})")
        seen[case.case] = case.image
    return cases


def _images_by_name(folder: Path) -> dict[str, Path]:
    """The image files of ``folder`` by lower-case name without suffix (the first in sorted order wins)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        lower = path.name.lower()
        suffix = next((s for s in IMAGE_SUFFIXES if lower.endswith(s)), None)
        if suffix and path.is_file():
            files.setdefault(lower[: -len(suffix)], path)
    return files


def _first(files: dict[str, Path], names: Sequence[str]) -> Path | None:
    return next((files[name] for name in names if name in files), None)
