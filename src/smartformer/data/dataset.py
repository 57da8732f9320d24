"""The pretraining dataset (preprocessing cached on disk, random views on top) and its loader."""

from __future__ import annotations

import hashlib
import json
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import PersistentDataset
from monai.data.utils import set_rnd
from monai.transforms import Compose, MapTransform
from monai.utils import convert_to_tensor

from smartformer.data.io import validate_volume
from smartformer.data.transforms import (
    BODY_HU_THRESHOLD,
    LoadCTd,
    as_triple,
    body_level,
    parse_window,
    preprocess_transforms,
    view_transforms,
)
from smartformer.errors import InputError, SettingWarning, SmartformerError
from smartformer.io_utils import atomic_write_bytes, torch_bytes

#: A volume whose field of view fills less than this fraction of the ROI trains mostly on padding.
MIN_ROI_COVERAGE = 0.25
#: Where :class:`CheckContentd` leaves its finding in a preprocessed (cached) item.
CONTENT_KEY = "content_problem"

#: Bumped whenever :func:`~smartformer.data.transforms.preprocess_transforms` changes what it
#: produces, so that caches written by older code are not reused.
PREPROCESS_VERSION = 1


def preprocess_settings(
    spacing: float | Sequence[float], window: str | Sequence[float], roi: int | Sequence[int]
) -> dict[str, Any]:
    """The settings that determine a cached preprocessed volume, in canonical form."""
    return {
        "version": PREPROCESS_VERSION,
        "spacing": [float(s) for s in as_triple(spacing, "spacing")],
        "window": list(parse_window(window)),
        "roi": [int(r) for r in as_triple(roi, "roi")],
        "body_threshold": BODY_HU_THRESHOLD,
    }


def cache_subdir(cache_dir: str | Path, settings: dict[str, Any]) -> Path:
    """``cache_dir/pre-<hash of settings>``: one folder per preprocessing configuration."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"pre-{digest}"


def file_fingerprint(item: dict[str, Any]) -> bytes:
    """PersistentDataset ``hash_func``: hash of the volume's absolute path, size and mtime.

    For a DICOM folder, the names, sizes and mtimes of the files in it. Editing or replacing a
    file changes its fingerprint and therefore its cache entry; a missing path hashes to a
    key of its own (and then fails to load with a clear error).
    """
    path = Path(item["image"]).absolute()
    entries = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    parts = [str(path)]
    for entry in entries:
        try:
            stat = entry.stat()
            parts.append(f"{entry.name}:{stat.st_size}:{stat.st_mtime_ns}")
        except OSError:
            parts.append(f"{entry.name}:missing")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest().encode()


def _input_error_in(exc: BaseException) -> InputError | None:
    """The InputError behind MONAI's 'applying transform' RuntimeError wrappers, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, InputError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _preprocessing_error(path: str, exc: BaseException) -> InputError | None:
    """A failure inside MONAI's preprocessing of one volume (e.g. absurd voxel sizes that would
    resample to petabytes), as an InputError naming the volume and the root cause; None for our
    own errors (a full cache disk), which are not the volume's fault."""
    root: BaseException = exc
    while root.__cause__ or root.__context__:
        if isinstance(root, SmartformerError):
            return None
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    if isinstance(root, SmartformerError):
        return None
    reason = " ".join(str(root).split())[:200]
    return InputError(path, f"cannot be preprocessed ({type(root).__name__}: {reason})")


class PretrainDataset(PersistentDataset):
    """A PersistentDataset that reports unreadable volumes as :class:`InputError`.

    With ``skip_bad``, a volume that fails only when its voxels are decoded (e.g. a truncated
    ``.nii.gz`` with an intact header) is reported once with a warning and replaced by the next
    readable one, so that a long run does not stop on one bad file.
    """

    def __init__(
        self, data: Sequence[dict[str, Any]], transform: Compose, cache_dir: Path, skip_bad: bool = False
    ) -> None:
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, hash_func=file_fingerprint)
        self.skip_bad = skip_bad
        self._bad: set[int] = set()

    def _transform(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.data)):
            candidate = (index + offset) % len(self.data)
            if candidate in self._bad:
                continue
            try:
                return super()._transform(candidate)
            except Exception as exc:
                error = _input_error_in(exc) or _preprocessing_error(self.data[candidate]["image"], exc)
                if error is None:
                    raise
                if not self.skip_bad:
                    raise error from None
                self._bad.add(candidate)
                warnings.warn(f"skipping unreadable volume {error}", stacklevel=2)
        raise SmartformerError(f"none of the {len(self.data)} volumes could be read")

    def _cachecheck(self, item_transformed: dict[str, Any]) -> Any:
        """MONAI's cache lookup, made safe against partial files.

        An entry that does not load (a full disk or a kill while it was written by older code)
        is a miss: it is rebuilt with a warning naming the volume. New entries are written
        atomically in the cache folder itself, so a reader never sees half a file.

        Raises:
            OutputError: the cache folder cannot be written (e.g. the disk is full), naming it.
        """
        hashfile = Path(self.cache_dir) / f"{self.hash_func(item_transformed).decode()}{self.transform_hash}.pt"
        path = item_transformed["image"]
        if hashfile.is_file():
            try:
                return self._judge_content(torch.load(hashfile, weights_only=self.weights_only), path)
            except InputError:
                raise
            except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... for damage
                reason = " ".join(str(exc).split())[:160]
                warnings.warn(
                    f"{path}: its cache entry {hashfile} is unreadable ({reason}); rebuilding it", stacklevel=2
                )
        result = self._pre_transform(dict(item_transformed))
        data = torch_bytes(convert_to_tensor(result, convert_numeric=False, track_meta=self.track_meta))
        atomic_write_bytes(hashfile, data)
        return self._judge_content(result, path)

    def _judge_content(self, item: Any, path: str) -> Any:
        """Act on what :class:`CheckContentd` recorded (kept in the cache, so a cached volume is
        judged as a new one is): refuse it with ``skip_bad``, else warn (once per volume)."""
        problem = item.pop(CONTENT_KEY, "") if isinstance(item, dict) else ""
        if problem and self.skip_bad:
            raise InputError(path, problem)
        if problem:
            warnings.warn(
                SettingWarning(
                    f"{path}: {problem} (pass {{setting}} to leave such volumes out)", setting="skip_bad", value=True
                ),
                stacklevel=3,
            )
        return item


def build_pretrain_dataset(
    items: Sequence[dict[str, Any] | str | Path],
    cache_dir: str | Path,
    spacing: float | Sequence[float] = (2.0, 2.0, 2.0),
    window: str | Sequence[float] = "wide",
    roi: int | Sequence[int] = (96, 96, 96),
    num_views: int = 2,
    skip_bad: bool = False,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
    flip_prob: float = 0.5,
    max_scale: float = 1.5,
    min_body_fraction: float = 0.0,
    min_view_overlap: float = 0.0,
    local_views: int = 0,
    local_roi: int | Sequence[int] = (32, 32, 32),
) -> PretrainDataset:
    """Dataset of ``{"views": (num_views, 1, *roi)}`` samples for pretraining.

    Each volume is read and preprocessed
    (:func:`~smartformer.data.transforms.preprocess_transforms`) once, then cached under
    ``cache_dir/pre-<settings hash>/`` (a ``settings.json`` there says which settings); the
    cache file name hashes the volume's path, size and mtime, so edited files and changed
    settings are recomputed. The random views
    (:func:`~smartformer.data.transforms.view_transforms`) are drawn after the cache, anew for
    every access. Only the ``"image"`` of each item is used.

    Args:
        items: dicts with ``"image"`` (as from :func:`~smartformer.data.sources.list_volumes`)
            or plain paths.
        skip_bad: check every volume's header first (cheap) and drop, with one warning listing
            them, those that cannot be used; a volume that fails later, when decoded, is
            skipped with a warning too. Without it, a bad volume raises :class:`InputError`
            naming the file when it is loaded.
        min_body_fraction, min_view_overlap, local_views, local_roi: see
            :class:`~smartformer.data.transforms.RandGlobalViewsd` (0 = off).

    Raises:
        InputError: ``items`` is empty.
        SmartformerError: with ``skip_bad``, no volume passed the header check.
    """
    paths = [str(item["image"] if isinstance(item, dict) else item) for item in items]
    if not paths:
        raise InputError(cache_dir, "no volumes given to build the pretraining dataset from")
    if skip_bad:
        paths = check_volumes(paths, skip_bad=True)
    settings = preprocess_settings(spacing, window, roi)
    subdir = cache_subdir(cache_dir, settings)
    subdir.mkdir(parents=True, exist_ok=True)
    (subdir / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    preprocess = preprocess_transforms(spacing=spacing, window=window, roi=roi).transforms
    roi_mm = [r * s for r, s in zip(as_triple(roi, "roi"), as_triple(spacing, "spacing"))]
    after_read = next(i for i, t in enumerate(preprocess) if isinstance(t, LoadCTd)) + 1
    transform = Compose(
        [
            *preprocess[:after_read],
            CheckContentd(roi_mm),
            *preprocess[after_read:],
            view_transforms(
                roi=roi,
                num_views=num_views,
                intensity_scale=intensity_scale,
                intensity_shift=intensity_shift,
                flip_prob=flip_prob,
                max_scale=max_scale,
                min_body_fraction=min_body_fraction,
                body_level=body_level(window),
                min_view_overlap=min_view_overlap,
                local_views=local_views,
                local_roi=local_roi,
            ),
        ]
    )
    return PretrainDataset([{"image": p} for p in paths], transform, subdir, skip_bad=skip_bad)


def check_volumes(paths: Sequence[str], skip_bad: bool = False) -> list[str]:
    """Check every volume from its header (exists, readable, 3D, plausible size): the usable paths.

    Cheap (no voxels are decoded), so a run finds a missing or broken file before its first step
    rather than when the file is first sampled.

    Raises:
        InputError: without ``skip_bad``, for the first unusable volume, with the count of others.
        SmartformerError: with ``skip_bad``, when no volume is usable (the others are dropped
            with one warning listing them).
    """
    good, bad, first = [], [], None
    for path in paths:
        try:
            validate_volume(path)
            good.append(path)
        except InputError as exc:
            bad.append(str(exc))
            first = first or exc
    if bad and not skip_bad:
        assert first is not None
        more = f"; {len(bad) - 1} more of the {len(paths)} volumes cannot be used either" if len(bad) > 1 else ""
        raise InputError(
            first.path,
            f"{first.reason}{more} (pass {{setting}} to leave such files out)",
            setting="skip_bad",
            value=True,
        )
    if bad:
        warnings.warn(f"skipping {len(bad)} unreadable volume(s):\n  " + "\n  ".join(bad), stacklevel=3)
    if not good:
        raise SmartformerError(
            f"none of the {len(paths)} volumes is readable: {bad[0]}"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
        )
    return good


def content_problem(image: torch.Tensor, spacing: Sequence[float], roi_mm: Sequence[float] | None = None) -> str | None:
    """Why a readable volume would teach pretraining nothing, or None.

    A constant volume (every voxel the same value), or one whose field of view fills less than
    :data:`MIN_ROI_COVERAGE` of an ROI of ``roi_mm`` (its views would be mostly padding).
    """
    lo, hi = float(image.min()), float(image.max())
    if lo == hi:
        return f"is a constant volume (every voxel {lo:g}): nothing to learn from"
    if roi_mm is not None:
        extent = [n * s for n, s in zip(image.shape[-3:], spacing)]
        coverage = float(np.prod([min(1.0, e / r) for e, r in zip(extent, roi_mm)]))
        if coverage < MIN_ROI_COVERAGE:
            size = "x".join(f"{e:.0f}" for e in extent)
            roi = "x".join(f"{r:.0f}" for r in roi_mm)
            return f"covers {size} mm, {coverage:.0%} of the {roi} mm ROI: its views would be mostly padding"
    return None


class CheckContentd(MapTransform):
    """After reading: record under ``"content_problem"`` what :func:`content_problem` finds wrong
    with the volume ("" when nothing). Part of the cached preprocessing, so the finding travels
    with the cache entry; :class:`PretrainDataset` warns about it or skips the volume."""

    def __init__(self, roi_mm: Sequence[float], keys: Sequence[str] = ("image",)) -> None:
        super().__init__(keys)
        self.roi_mm = list(roi_mm)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        problems = [
            content_problem(data[key], data[key].meta["spacing"], self.roi_mm) for key in self.key_iterator(data)
        ]
        data[CONTENT_KEY] = "; ".join(p for p in problems if p)
        return data


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python, NumPy and the MONAI transforms of a worker.

    The seed is the worker's torch seed (the loader's base seed + ``worker_id``), so runs with
    the same loader seed repeat and workers differ.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        set_rnd(info.dataset, seed=seed)
