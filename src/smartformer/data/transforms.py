"""MONAI transforms that turn a CT file into pretraining views.

Two stages, so that the expensive one is cached on disk (see :mod:`smartformer.data.dataset`):

* :func:`preprocess_transforms` (deterministic): read, reorient to RAS, crop to the body,
  resample, window HU to [0, 1], pad to at least the ROI.
* :func:`view_transforms` (random): global views of ROI size with intensity and flip
  augmentations, stacked under ``"views"``, and optionally smaller local views (DINO's
  multi-crop) under ``"local_views"``.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    MapTransform,
    Orientationd,
    RandFlip,
    Randomizable,
    RandScaleIntensity,
    RandShiftIntensity,
    Resize,
    ScaleIntensityRanged,
    Spacingd,
    SpatialCrop,
    SpatialPadd,
    Transform,
)
from monai.utils import convert_to_tensor

from smartformer.data.io import read_ct
from smartformer.data.windows import parse_window
from smartformer.errors import ConfigError

#: Voxels above this HU value count as body (soft tissue, bone, also the table) for the
#: foreground crop; air (-1000) and lung parenchyma inside the body's bounding box are kept.
BODY_HU_THRESHOLD = -500.0


def body_level(window: str | Sequence[float]) -> float:
    """The windowed intensity (0..1) of :data:`BODY_HU_THRESHOLD`: above it, a voxel is body."""
    lo, hi = parse_window(window)
    return min(max((BODY_HU_THRESHOLD - lo) / (hi - lo), 0.0), 1.0)


def as_triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    """A scalar or 3-sequence (spacing, ROI) as a 3-tuple; ConfigError for other lengths."""
    values = [value] * 3 if isinstance(value, numbers.Real) else list(value)
    if len(values) != 3 or any(v <= 0 for v in values):
        raise ConfigError(f"{name} {value!r}: need one positive number or three")
    return values[0], values[1], values[2]


class LoadCTd(MapTransform):
    """Replace each path under ``keys`` by :func:`~smartformer.data.io.read_ct`'s MetaTensor."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = read_ct(d[key])
        return d


class BodySelect:
    """CropForeground ``select_fn``: voxels above ``threshold`` HU, or all voxels if none are.

    Keeping the whole volume when nothing is above the threshold (an all-air scan) avoids an
    empty crop. A class rather than a lambda so that the pipeline can be pickled to workers.
    """

    def __init__(self, threshold: float = BODY_HU_THRESHOLD) -> None:
        self.threshold = threshold

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        mask = image > self.threshold
        return mask if bool(mask.any()) else torch.ones_like(mask)


def preprocess_transforms(
    keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = (),
    spacing: float | Sequence[float] = (2.0, 2.0, 2.0),
    window: str | Sequence[float] = "wide",
    roi: int | Sequence[int] = (96, 96, 96),
    body_threshold: float = BODY_HU_THRESHOLD,
) -> Compose:
    """The deterministic (cacheable) part: file paths in, windowed RAS volumes out.

    Steps, applied to the images under ``keys`` and the label maps under ``label_keys`` alike:

    1. :class:`LoadCTd`: read as ``(1, X, Y, Z)`` float32 HU with a RAS affine.
    2. ``Orientationd``: reorder/flip axes to RAS.
    3. ``CropForegroundd``: crop to the bounding box of voxels above ``body_threshold`` HU in
       the first image key, before windowing (so the crop does not depend on the window) and
       before resampling (so that only the body is resampled). Labels get the same box.
    4. ``Spacingd`` to ``spacing`` mm: bilinear for images, nearest for labels.
    5. ``ScaleIntensityRanged``: the HU ``window`` (preset or ``"lo,hi"``) to [0, 1], clipped
       (images only).
    6. ``SpatialPadd`` to at least ``roi`` voxels per axis, with 0 (air after windowing; label
       background), centred; a volume smaller than the ROI is padded, never refused.
    """
    keys, label_keys = list(keys), list(label_keys)
    all_keys = keys + label_keys
    lo, hi = parse_window(window)
    modes = ["bilinear"] * len(keys) + ["nearest"] * len(label_keys)
    return Compose(
        [
            LoadCTd(all_keys),
            Orientationd(all_keys, axcodes="RAS", labels=None),  # labels from meta "space" (RAS)
            CropForegroundd(
                all_keys,
                source_key=keys[0],
                select_fn=BodySelect(body_threshold),
                allow_smaller=True,
                start_coord_key=None,
                end_coord_key=None,
            ),
            Spacingd(all_keys, pixdim=as_triple(spacing, "spacing"), mode=modes, dtype=np.float32),
            ScaleIntensityRanged(keys, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True),
            SpatialPadd(all_keys, spatial_size=[int(r) for r in as_triple(roi, "roi")], value=0),
        ]
    )


class RandGlobalViewsd(Randomizable, Transform):
    """Random global views of a preprocessed volume, stacked as ``(num_views, 1, *roi)``.

    Each view (SMIT/DINO-style "global crop"): a box whose side along each axis is the ROI side
    times an independent uniform factor in ``[1, max_scale]`` (capped at the volume size) is
    placed uniformly at random and resized (trilinear) to the ROI; then each axis is flipped
    with probability ``flip_prob``, intensities are multiplied by ``1 + U(-s, s)`` and shifted
    by ``U(-t, t)`` (``s = intensity_scale``, ``t = intensity_shift``) and clipped to [0, 1].
    ``max_scale = 1`` gives plain random ROI crops.

    Two options keep the views informative for self-distillation:

    * ``min_body_fraction``: a view box with fewer body voxels (windowed intensity above
      ``body_level``) than this fraction is redrawn, up to ``max_tries`` times (the last draw
      is kept), so limb crops and padded volumes do not train on air;
    * ``min_view_overlap``: every view after the first overlaps the first box by at least this
      fraction of its own side along each axis, so the views of a volume share anatomy (DINO's
      [CLS] loss asks views to agree; far-apart views of a chest CT show different organs).

    ``local_views`` > 0 adds DINO's multi-crop: that many local views of ``local_roi``, each a
    box of ``local_roi`` times an independent factor in ``[1, max_scale]`` per axis, placed at
    random inside the first global view's box (so that a local view shows part of what the
    global views show) and augmented like the global views. The student alone sees them; its
    [CLS] of each local view is trained towards the teacher's targets of the global views. They
    are drawn after the global views, so the global views do not depend on ``local_views``.

    The output dict is the input without ``image_key`` (its size varies, which would break
    batching) plus ``views_key``: a float32 tensor, and ``local_views_key`` when
    ``local_views`` > 0. Seed with :meth:`set_random_state`; all draws come from one
    ``RandomState``, shared with the MONAI sub-transforms.
    """

    def __init__(
        self,
        roi: int | Sequence[int] = (96, 96, 96),
        num_views: int = 2,
        max_scale: float = 1.5,
        intensity_scale: float = 0.1,
        intensity_shift: float = 0.1,
        flip_prob: float = 0.5,
        image_key: str = "image",
        views_key: str = "views",
        min_body_fraction: float = 0.0,
        body_level: float = 0.25,
        min_view_overlap: float = 0.0,
        max_tries: int = 10,
        local_views: int = 0,
        local_roi: int | Sequence[int] = (32, 32, 32),
        local_views_key: str = "local_views",
    ) -> None:
        if num_views < 1 or max_scale < 1.0:
            raise ConfigError(f"views: need num_views >= 1 and max_scale >= 1, got {num_views} and {max_scale}")
        if not 0.0 <= min_body_fraction <= 1.0 or not 0.0 <= min_view_overlap <= 1.0:
            raise ConfigError(
                f"views: min_body_fraction and min_view_overlap must lie in [0, 1], got "
                f"{min_body_fraction} and {min_view_overlap}"
            )
        self.local_roi = tuple(int(r) for r in as_triple(local_roi, "local_roi"))
        if local_views < 0 or (local_views and any(lr > r for lr, r in zip(self.local_roi, as_triple(roi, "roi")))):
            raise ConfigError(
                f"views: need local_views >= 0 and local_roi {list(self.local_roi)} no larger than "
                f"roi {[int(r) for r in as_triple(roi, 'roi')]}, got local_views={local_views}"
            )
        self.local_views, self.local_views_key = int(local_views), local_views_key
        self._local_resize = Resize(self.local_roi, mode="trilinear")
        self.min_body_fraction = min_body_fraction
        self.body_level = body_level
        self.min_view_overlap = min_view_overlap
        self.max_tries = max(1, max_tries)
        self.roi = tuple(int(r) for r in as_triple(roi, "roi"))
        self.num_views = num_views
        self.max_scale = max_scale
        self.image_key, self.views_key = image_key, views_key
        self._resize = Resize(self.roi, mode="trilinear")
        self._flips = [RandFlip(prob=flip_prob, spatial_axis=axis) for axis in range(3)]
        self._scale = RandScaleIntensity(factors=intensity_scale, prob=1.0)
        self._shift = RandShiftIntensity(offsets=intensity_shift, prob=1.0)
        self._boxes: list[tuple[list[int], list[int]]] = []
        self.set_random_state()

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandGlobalViewsd:
        super().set_random_state(seed, state)
        for sub in (*self._flips, self._scale, self._shift):
            sub.set_random_state(state=self.R)
        return self

    def randomize(self, data: Sequence[int], image: torch.Tensor | None = None) -> None:
        """Draw one crop box ``(start, end)`` per view for a volume of spatial shape ``data``.

        ``image`` (1, X, Y, Z) is needed for ``min_body_fraction``; without it the option is
        not applied. With it, the first view is centred on a random body voxel (as MONAI's
        ``RandCropByPosNegLabeld`` centres on foreground), and a view below the fraction is
        redrawn; after ``max_tries`` the draw with the most body is kept.
        """
        self._boxes = []
        check = image is not None and self.min_body_fraction > 0
        # candidate centres on every 4th voxel: a chest CT has millions of body voxels, and listing
        # them all for every sample would cost more than the view itself
        body = torch.nonzero(image[0, ::4, ::4, ::4] > self.body_level) * 4 if check else None
        for i in range(self.num_views):
            anchor = self._boxes[0] if i and self.min_view_overlap > 0 else None
            best, best_fraction = None, -1.0
            for _ in range(self.max_tries if check else 1):
                centre = None
                if body is not None and len(body) and anchor is None:
                    centre = body[int(self.R.randint(0, len(body)))].tolist()
                box = self._draw(data, anchor, centre)
                if not check:
                    best = box
                    break
                fraction = self.body_fraction(image, box)
                if fraction > best_fraction:
                    best, best_fraction = box, fraction
                if fraction >= self.min_body_fraction:
                    break
            assert best is not None
            self._boxes.append(best)

    def _draw(
        self, shape: Sequence[int], anchor: tuple[list[int], list[int]] | None, centre: Sequence[int] | None = None
    ) -> tuple[list[int], list[int]]:
        """A random box; it overlaps ``anchor`` by ``min_view_overlap`` or is centred near ``centre``."""
        scale = self.R.uniform(1.0, self.max_scale, size=3)
        size = [min(int(round(r * s)), n) for r, s, n in zip(self.roi, scale, shape)]
        start = []
        for axis, (n, z) in enumerate(zip(shape, size)):
            lo, hi = 0, n - z
            if anchor is not None:  # overlap the anchor box by >= min_view_overlap * z along this axis
                a0, a1 = anchor[0][axis], anchor[1][axis]
                need = min(int(np.ceil(self.min_view_overlap * z)), a1 - a0)
                lo, hi = max(lo, a0 + need - z), min(hi, a1 - need)
            elif centre is not None:
                lo = hi = min(max(int(centre[axis]) - z // 2, 0), n - z)
            start.append(int(self.R.randint(lo, hi + 1)))
        return start, [a + z for a, z in zip(start, size)]

    def body_fraction(self, image: torch.Tensor, box: tuple[list[int], list[int]]) -> float:
        """The fraction of the voxels of ``box`` in ``image`` (1, X, Y, Z) that are body."""
        (x0, y0, z0), (x1, y1, z1) = box
        return float((image[:, x0:x1, y0:y1, z0:z1] > self.body_level).float().mean())

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = {k: v for k, v in data.items() if k != self.image_key}
        image = convert_to_tensor(data[self.image_key], track_meta=False)
        self.randomize(image.shape[1:], image)
        views = [self._view(image, start, end) for start, end in self._boxes]
        d[self.views_key] = convert_to_tensor(torch.stack(views), dtype=torch.float32, track_meta=False)
        if self.local_views:
            local = [
                self._view(image, *self._local_box(self._boxes[0]), resize=self._local_resize)
                for _ in range(self.local_views)
            ]
            d[self.local_views_key] = convert_to_tensor(torch.stack(local), dtype=torch.float32, track_meta=False)
        return d

    def _local_box(self, within: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
        """A random local-view box inside the box ``within`` (``local_roi`` times ``[1, max_scale]``)."""
        (lo, hi), scale = within, self.R.uniform(1.0, self.max_scale, size=3)
        size = [min(int(round(r * s)), b - a) for r, s, a, b in zip(self.local_roi, scale, lo, hi)]
        start = [int(self.R.randint(a, b - z + 1)) for a, b, z in zip(lo, hi, size)]
        return start, [a + z for a, z in zip(start, size)]

    def _view(
        self, image: torch.Tensor, start: list[int], end: list[int], resize: Resize | None = None
    ) -> torch.Tensor:
        view = (resize or self._resize)(SpatialCrop(roi_start=start, roi_end=end)(image))
        for flip in self._flips:
            view = flip(view)
        view = self._shift(self._scale(view))
        return torch.clamp(view, 0.0, 1.0)


def view_transforms(
    roi: int | Sequence[int] = (96, 96, 96),
    num_views: int = 2,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
    flip_prob: float = 0.5,
    max_scale: float = 1.5,
    min_body_fraction: float = 0.0,
    body_level: float = 0.25,
    min_view_overlap: float = 0.0,
    local_views: int = 0,
    local_roi: int | Sequence[int] = (32, 32, 32),
) -> RandGlobalViewsd:
    """The random part: a preprocessed ``{"image": (1, X, Y, Z)}`` dict to ``{"views": ...}``.

    Returns a :class:`RandGlobalViewsd` (callable, MONAI ``Randomizable``); see there for the
    view recipe. ``views`` has shape ``(num_views, 1, *roi)``, float32 in [0, 1]; with
    ``local_views`` > 0, ``local_views`` has shape ``(local_views, 1, *local_roi)``.
    """
    return RandGlobalViewsd(
        roi=roi,
        num_views=num_views,
        max_scale=max_scale,
        intensity_scale=intensity_scale,
        intensity_shift=intensity_shift,
        flip_prob=flip_prob,
        min_body_fraction=min_body_fraction,
        body_level=body_level,
        min_view_overlap=min_view_overlap,
        local_views=local_views,
        local_roi=local_roi,
    )
