"""Turning a data source (folder, CSV, JSON datalist or one file) into a list of volume items.

Each item is a dict with at least ``"image"``: the path of one volume (an image file or a
folder holding a DICOM series), ready for :func:`smartformer.data.io.read_ct`. Readability is
not checked here: broken files are listed so that ``smartformer data check`` can report them.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from smartformer.data.io import is_dicom_file
from smartformer.data.naming import DEFAULT_EXCLUDE
from smartformer.data.suffixes import IMAGE_SUFFIXES
from smartformer.errors import InputError

#: Keys whose relative paths are resolved against the folder of a CSV or JSON source.
PATH_KEYS: tuple[str, ...] = ("image", "label")


def list_volumes(src: str | Path, key: str = "training", exclude: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """List the volumes of a data source as ``[{"image": path, ...}, ...]``.

    Args:
        src: one of
            * a folder, searched recursively (hidden entries skipped): every file named like an
              image (``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) is one
              volume, and every folder that directly holds DICOM files is one volume; other
              files (``.json``, ``.csv``, ``.txt``, ``.raw`` ...) are ignored;
            * a ``.csv`` file with an ``image`` column (other columns kept in each dict);
            * a ``.json`` MSD-style datalist ``{key: [{"image": ...}, ...]}`` (or a top-level
              list of such items or of plain paths);
            * a single image file.
            In CSV and JSON sources, relative ``image`` and ``label`` paths are resolved against
            the file's folder.
        key: the list to take from a JSON datalist.
        exclude: for folder sources only, name patterns of files and folders that are label
            maps, not CTs; default :data:`DEFAULT_EXCLUDE`; ``()`` lists everything.

    Raises:
        InputError: the source does not exist, cannot be parsed, or lists no volume.
    """
    src = Path(src)
    if not src.exists():
        raise InputError(src, "does not exist")
    patterns = DEFAULT_EXCLUDE if exclude is None else tuple(exclude)
    name = src.name.lower()
    if src.is_dir():
        items = _scan_folder(src, patterns)
    elif name.endswith(".csv"):
        items = _read_csv(src)
    elif name.endswith(".json"):
        items = _read_json(src, key)
    elif name.endswith(IMAGE_SUFFIXES):
        items = [{"image": str(src)}]
    else:
        raise InputError(
            src, f"is neither a folder, a .csv or .json list, nor an image file ({', '.join(IMAGE_SUFFIXES)})"
        )
    if not items:
        raise InputError(src, _nothing_found(src.is_dir(), patterns))
    return items


def _nothing_found(is_dir: bool, patterns: tuple[str, ...]) -> str:
    if not is_dir:
        return "lists no volumes"
    excluded = f"; names matching {', '.join(patterns)} are skipped as label maps" if patterns else ""
    return f"holds no image volumes (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM folders{excluded})"


def _scan_folder(root: Path, patterns: tuple[str, ...]) -> list[dict[str, Any]]:
    return _walk_folder(root, patterns)[0]


def skipped_label_maps(src: str | Path, exclude: Sequence[str] | None = None) -> list[str]:
    """The files and DICOM folders :func:`list_volumes` leaves out of a folder source as label maps
    (their names match ``exclude``, default :data:`DEFAULT_EXCLUDE`); empty for other sources."""
    src = Path(src)
    if not src.is_dir():
        return []
    return _walk_folder(src, DEFAULT_EXCLUDE if exclude is None else tuple(exclude))[1]


def _walk_folder(root: Path, patterns: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the volumes of a folder, the label maps left out), both in walking order."""
    items: list[dict[str, Any]] = []
    skipped: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(folder)
        files = sorted(f for f in files if not f.startswith("."))
        images = [f for f in files if f.lower().endswith(IMAGE_SUFFIXES)]
        others = [here / f for f in files if f not in images]
        if any(is_dicom_file(p) for p in others):
            if _excluded(here.name, patterns):
                skipped.append(str(here))
            else:
                items.append({"image": str(here)})
        for f in images:
            if _excluded(_strip_image_suffix(f), patterns):
                skipped.append(str(here / f))
            else:
                items.append({"image": str(here / f)})
    return items, skipped


def _strip_image_suffix(name: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name.lower(), pattern.lower()) for pattern in patterns)


def _resolve_paths(item: dict[str, Any], base: Path) -> dict[str, Any]:
    for path_key in PATH_KEYS:
        value = item.get(path_key)
        if isinstance(value, str) and value:
            path = Path(value).expanduser()
            item[path_key] = str(path if path.is_absolute() else base / path)
    return item


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        table = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not a readable CSV table ({' '.join(str(exc).split())})") from None
    if "image" not in table.columns:
        columns = ", ".join(map(str, table.columns))
        raise InputError(path, f"has no 'image' column (columns: {columns})")
    items = []
    for row, record in enumerate(table.to_dict("records"), start=2):  # row 1 is the header
        if not str(record["image"]).strip():
            raise InputError(path, f"row {row}: empty 'image' value")
        record["image"] = str(record["image"]).strip()
        items.append(_resolve_paths(record, path.parent))
    return items


def load_json(path: str | Path) -> Any:
    """The parsed content of a JSON file, or an InputError saying why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a text (JSON) file") from None


def _read_json(path: Path, key: str) -> list[dict[str, Any]]:
    content = load_json(path)
    if isinstance(content, dict):
        if key not in content:
            raise InputError(path, f"has no {key!r} list (keys: {', '.join(map(str, content))})")
        content = content[key]
    if not isinstance(content, list):
        raise InputError(path, f"the datalist must be a list of items, got {type(content).__name__}")
    items = []
    for index, entry in enumerate(content):
        item = {"image": entry} if isinstance(entry, str) else entry
        image = item.get("image") if isinstance(item, dict) else None
        if not image or not isinstance(image, str):
            raise InputError(path, f"item {index} of {key!r} has no 'image' path")
        items.append(_resolve_paths(dict(item), path.parent))
    return items
