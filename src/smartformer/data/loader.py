"""The pretraining data stream: data source -> cached, preprocessed volumes -> seeded views -> batches.

:func:`build_pretrain_loader` is what ``smartformer pretrain`` iterates: an endless stream of
batches whose content at step ``s`` is a pure function of ``(seed, s)`` (see
:mod:`smartformer.data.sampler`), so a resumed run sees what an uninterrupted one would have.
A file that turns out to be bad while loading arrives as a batch ``{"error": ..., "bad_file":
...}`` instead of an exception, so that its one-line message crosses worker processes intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from smartformer.config import DataConfig
from smartformer.data.dataset import build_pretrain_dataset, check_volumes, seed_worker
from smartformer.data.sampler import ResumableSampler, SeededViews
from smartformer.data.sources import list_volumes
from smartformer.errors import InputError, SmartformerError

__all__ = ["PretrainLoader", "build_pretrain_loader", "default_cache_dir"]


def default_cache_dir(run_dir: str | Path) -> Path:
    """Where a run keeps its decoded volumes unless ``data.cache_dir`` says: next to the run directory."""
    return Path(run_dir).resolve().parent / ".smartformer-cache"


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    for item in batch:
        if "error" in item:
            return {"error": item["error"], "bad_file": item["bad_file"]}
    return default_collate(batch)


class _ErrorsAsData(SeededViews):
    """Return a bad file's one-line error as data, so that it crosses worker processes intact."""

    def __getitem__(self, key: int) -> Any:
        try:
            return super().__getitem__(key)
        except SmartformerError as exc:
            return {"error": str(exc), "bad_file": isinstance(exc, InputError)}  # not a full cache disk


@dataclass
class PretrainLoader:
    """The batches of a pretraining run, and what else the run needs to know about its data."""

    views: SeededViews  #: key -> one volume's views (``views[0]`` is the fixed snapshot volume)
    loader: DataLoader  #: endless; ``batch["views"]`` is (B, 2, 1, *roi)
    n_volumes: int  #: volumes listed by the source (before ``skip_bad`` leaves any out)


def build_pretrain_loader(
    source: str | Path,
    settings: DataConfig,
    cache_dir: str | Path,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
) -> PretrainLoader:
    """The batches of process ``rank`` of ``world_size``, from step ``start_step`` on.

    Every file is checked (exists, has a usable header) before the first batch unless
    ``settings.skip_bad``, which checks and leaves out bad files itself.

    Raises:
        InputError: a bad file (one line naming it), without ``skip_bad``.
    """
    items = list_volumes(source)
    if not settings.skip_bad:
        check_volumes([str(item["image"]) for item in items])
    dataset = build_pretrain_dataset(
        items,
        cache_dir=cache_dir,
        spacing=settings.spacing,
        window=settings.window,
        roi=settings.roi,
        num_views=2,
        skip_bad=settings.skip_bad,
        intensity_scale=settings.intensity_scale,
        intensity_shift=settings.intensity_shift,
        flip_prob=settings.flip_prob,
        min_body_fraction=settings.min_body_fraction,
        min_view_overlap=settings.min_view_overlap,
        local_views=settings.local_views,
        local_roi=settings.local_roi,
    )
    views = _ErrorsAsData(dataset, seed=seed)
    sampler = ResumableSampler(len(views), seed, rank, world_size, start=start_step * settings.batch_size)
    loader = DataLoader(
        views,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=settings.num_workers,
        persistent_workers=settings.num_workers > 0,
        worker_init_fn=seed_worker,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
    )
    return PretrainLoader(views, loader, len(items))
