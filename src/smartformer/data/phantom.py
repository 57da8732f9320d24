"""Synthetic chest and upper-abdomen CT phantoms with organ and lesion labels.

A phantom is a CT volume in Hounsfield units with coarse but plausible anatomy: a body outline
(skin, subcutaneous fat, muscle), two lungs with a branching vessel tree, trachea and main
bronchi, heart (chambers bright when the case is contrast enhanced), aorta, spine (vertebral
bodies with cortex, discs and posterior elements), ribs and sternum, a diaphragm, liver, kidneys
(brighter cortex), spleen, stomach and fat/bowel texture, plus 1-3 nodules or tumours in the
lungs and/or liver. It is smoothed by a Gaussian point spread function and gets correlated
Gaussian scanner noise; air outside the body is -1000 HU.

Everything is drawn in world millimetres (RAS: +x patient right, +y anterior, +z superior,
origin at the volume centre), so the anatomy keeps its physical size whatever the voxel spacing;
a field of view smaller than about 340 x 260 mm in-plane crops the body. All of a case's
randomness comes from one seed, so the same seed gives byte-identical arrays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from smartformer import __version__
from smartformer.errors import InputError, SmartformerError

LESION_ID = 11
"""Label value of every nodule/tumour voxel, whatever organ it lies in."""

LABELS: dict[int, str] = {
    0: "background",
    1: "body",
    2: "lung_left",
    3: "lung_right",
    4: "heart",
    5: "aorta",
    6: "spine",
    7: "ribs",
    8: "liver",
    9: "kidney_left",
    10: "kidney_right",
    LESION_ID: "lesion",
    12: "airway",
}
"""Every value of a phantom label map and its name. ``body`` is all soft tissue, fat, muscle, bowel
and minor organs that have no label of their own; ``ribs`` includes the sternum; ``airway`` is the
trachea and main bronchi."""

DEFAULT_SHAPE: tuple[int, int, int] = (144, 112, 112)
"""Voxels along x, y, z: with :data:`DEFAULT_SPACING` a 360 x 280 x 280 mm field of view."""
DEFAULT_SPACING: tuple[float, float, float] = (2.5, 2.5, 2.5)
ANISOTROPIC_SPACING: tuple[float, float, float] = (0.8, 0.8, 2.5)
"""Fine pixels and thick slices, as in a typical clinical reconstruction."""

_LABEL_ID = {name: value for value, name in LABELS.items()}
_LESION_ORGANS = ("lung_left", "lung_right", "liver")
_MIN_SHAPE = 8
_HU_MIN, _HU_MAX = -1024, 3071


@dataclass
class Phantom:
    """One synthetic case: CT, label map, geometry and what was placed where."""

    ct: np.ndarray
    """(X, Y, Z) int16 Hounsfield units."""
    labels: np.ndarray
    """(X, Y, Z) uint8 label map, values from :data:`LABELS`."""
    affine: np.ndarray
    """4 x 4 float64 voxel-to-world (RAS, mm) matrix, world origin at the volume centre."""
    lesions: list[dict[str, Any]]
    """One dict per lesion: index, organ, kind, density, centre_voxel, centre_mm, radius_mm
    (radius of the sphere of equal volume), extent_mm (largest distance of its surface from the
    centre), n_voxels, mean_hu and surround_hu (mean HU of a shell of its organ around it)."""
    label_names: dict[int, str]
    seed: int
    spacing: tuple[float, float, float]
    contrast: bool
    """Whether the case is contrast enhanced (bright heart chambers, aorta, kidney cortex)."""

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description of the case: label names, geometry, seed and lesions."""
        return {
            "labels": {str(value): name for value, name in self.label_names.items()},
            "lesion_id": LESION_ID,
            "seed": self.seed,
            "shape": list(self.ct.shape),
            "spacing_mm": list(self.spacing),
            "affine": self.affine.tolist(),
            "contrast": self.contrast,
            "lesions": self.lesions,
            "generator": f"smartformer {__version__} data phantom",
        }


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS voxel-to-world matrix with the given spacing whose world origin is the volume centre."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * np.asarray(spacing, dtype=np.float64)
    return affine


def same_extent_shape(
    shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]
) -> tuple[int, int, int]:
    """Voxel counts that cover the field of view of ``shape`` x ``spacing`` at ``new_spacing``."""
    extent = np.asarray(shape, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)
    counts = np.maximum(1, np.rint(extent / np.asarray(new_spacing, dtype=np.float64))).astype(int)
    return (int(counts[0]), int(counts[1]), int(counts[2]))


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a set generated with ``seed``; different sets never share cases."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def generate_phantom(
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    n_lesions: int | None = None,
    contrast: bool | None = None,
) -> Phantom:
    """Draw one synthetic CT case.

    The same seed and arguments give identical arrays. The anatomy (every organ's shape, size and
    HU, the vessel tree, lesion sizes and shapes) depends on the seed alone, so one seed on two
    grids gives the same patient; textures, noise and where lesions sit depend on the grid too.

    Args:
        seed: all randomness of the case, a whole number >= 0.
        shape: voxels along x, y, z.
        spacing: voxel size in mm along x, y, z.
        n_lesions: nodules/tumours to place; ``None`` draws 1-3. A lesion that fits in none of
            the lung/liver tissue inside the field of view, even at 3 mm, is left out.
        contrast: contrast enhanced or not; ``None`` draws it (even odds).

    Raises:
        SmartformerError: a shape below 8 voxels, a non-positive spacing, a negative seed or
            n_lesions.
    """
    grid_shape, grid_spacing = _checked_grid(shape, spacing)
    _check_seed(seed)
    if n_lesions is not None and n_lesions < 0:
        raise SmartformerError(f"n_lesions must be 0 or more, got {n_lesions}")
    geometry, fields = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(2))
    if contrast is None:
        contrast = bool(geometry.random() < 0.5)
    if n_lesions is None:
        n_lesions = int(geometry.integers(1, 4))
    scene = _Scene(_Grid(grid_shape, grid_spacing), geometry, fields, contrast)
    scene.draw_anatomy()
    placed = scene.place_lesions(n_lesions)
    ct = scene.render()
    lesions = [lesion.describe(scene.grid, scene.labels, ct, index) for index, lesion in enumerate(placed)]
    return Phantom(
        ct=ct,
        labels=scene.labels,
        affine=phantom_affine(grid_shape, grid_spacing),
        lesions=lesions,
        label_names=dict(LABELS),
        seed=int(seed),
        spacing=grid_spacing,
        contrast=contrast,
    )


def save_phantom(phantom: Phantom, case_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``ct.nii.gz`` (int16), ``labels.nii.gz`` (uint8) and ``labels.json`` into ``case_dir``.

    ``extra`` entries are added to the JSON (e.g. the set's seed and the case index). The JSON is
    written last, so a folder with it is complete. Returns ``case_dir``.
    """
    case_dir = Path(case_dir)
    case_dir.mkdir(parents=True, exist_ok=True)
    for name, array in (("ct.nii.gz", phantom.ct), ("labels.nii.gz", phantom.labels)):
        image = nib.Nifti1Image(array, phantom.affine)
        image.set_qform(phantom.affine, code=1)
        image.set_sform(phantom.affine, code=1)
        image.header.set_xyzt_units(xyz="mm")
        nib.save(image, case_dir / name)
    metadata = phantom.metadata() | (extra or {})
    (case_dir / "labels.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return case_dir


def write_phantoms(
    out_dir: str | Path,
    n: int,
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    overwrite: bool = False,
    progress: bool = True,
    n_lesions: int | None = None,
    contrast: bool | None = None,
) -> list[Path]:
    """Generate ``n`` cases into ``out_dir/case_000``, ``case_001``, ... and return those folders.

    Case ``i`` is :func:`generate_phantom` with seed :func:`case_seed` ``(seed, i)``. Everything
    is checked before anything is written: existing case folders are refused unless
    ``overwrite`` (which replaces the three files of each case and leaves other files alone).
    ``progress`` shows a bar over cases on stderr.

    Raises:
        InputError: ``out_dir`` is a file, or a case folder exists and ``overwrite`` is off.
        SmartformerError: ``n`` below 1, a negative seed or a bad shape/spacing.
    """
    out = Path(out_dir)
    if n < 1:
        raise SmartformerError(f"the number of cases must be at least 1, got {n}")
    _check_seed(seed)
    _checked_grid(shape, spacing)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a directory")
    case_dirs = [out / f"case_{index:03d}" for index in range(n)]
    existing = [path for path in case_dirs if path.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise InputError(
            existing[0], f"already exists{more}; pass {{setting}} to replace it", setting="overwrite", value=True
        )
    for path in existing:
        if not path.is_dir():
            raise InputError(path, "exists and is not a directory")
    for index, case_dir in enumerate(tqdm(case_dirs, desc="phantoms", unit="case", disable=not progress)):
        phantom = generate_phantom(case_seed(seed, index), shape, spacing, n_lesions, contrast)
        save_phantom(phantom, case_dir, {"set_seed": seed, "case_index": index})
    return case_dirs


def _check_seed(seed: int) -> None:
    """Refuse a seed that numpy's seed sequences cannot take, with a one-line message."""
    if int(seed) != seed or seed < 0:
        raise SmartformerError(f"seed must be a whole number of at least 0, got {seed}")


def _checked_grid(
    shape: Sequence[int], spacing: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """``shape`` and ``spacing`` as 3-tuples, or a one-line error saying what is wrong."""
    if len(shape) != 3 or len(spacing) != 3:
        raise SmartformerError(f"shape and spacing need 3 values each, got {list(shape)} and {list(spacing)}")
    if any(int(n) != n or n < _MIN_SHAPE for n in shape):
        raise SmartformerError(f"shape must be whole numbers of at least {_MIN_SHAPE} voxels, got {list(shape)}")
    if any(not math.isfinite(s) or s <= 0 for s in spacing):
        raise SmartformerError(f"spacing must be positive millimetres, got {list(spacing)}")
    x, y, z = (int(n) for n in shape)
    sx, sy, sz = (float(s) for s in spacing)
    return (x, y, z), (sx, sy, sz)


class _Grid:
    """World coordinates (mm) of a voxel grid as broadcastable float32 axes."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.origin = phantom_affine(shape, spacing)[:3, 3]
        self.axes = [(self.origin[a] + self.spacing[a] * np.arange(n)).astype(np.float32) for a, n in enumerate(shape)]
        self.x = self.axes[0][:, None, None]
        self.y = self.axes[1][None, :, None]
        self.z = self.axes[2][None, None, :]
        self.fine = float(self.spacing.min())

    def window(self, low: np.ndarray, high: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box of the voxels inside the world box [low, high], or None if it misses the grid."""
        start = np.maximum(0, np.ceil((low - self.origin) / self.spacing)).astype(int)
        stop = np.minimum(self.shape, np.floor((high - self.origin) / self.spacing).astype(int) + 1)
        if np.any(stop <= start):
            return None
        return slice(start[0], stop[0]), slice(start[1], stop[1]), slice(start[2], stop[2])

    def local(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x, y, z coordinates of the voxels of an index box."""
        return self.x[box[0]], self.y[:, box[1]], self.z[:, :, box[2]]

    def ellipsoid(self, centre: Sequence[float], semi: Sequence[float], axes: np.ndarray | None = None) -> np.ndarray:
        """Sum of squared normalised coordinates (< 1 inside) of an ellipsoid.

        ``axes`` rows are the unit vectors of its semi-axes; None means aligned with x, y, z.
        """
        d = (self.x - np.float32(centre[0]), self.y - np.float32(centre[1]), self.z - np.float32(centre[2]))
        if axes is None:
            return sum((d[a] / np.float32(semi[a])) ** 2 for a in range(3))
        total = np.zeros(self.shape, dtype=np.float32)
        for axis, length in zip(axes, semi):
            q = d[0] * np.float32(axis[0]) + d[1] * np.float32(axis[1]) + d[2] * np.float32(axis[2])
            total += (q / np.float32(length)) ** 2
        return total

    def smooth_noise(self, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
        """Unit-variance Gaussian noise smoothed over ``sigma_mm``, made on a coarser grid if it can."""
        step = np.maximum(self.spacing, sigma_mm / 2.0)
        coarse = np.ceil((np.asarray(self.shape) - 1) * self.spacing / step - 1e-6).astype(int) + 1
        field = ndimage.gaussian_filter(
            rng.standard_normal(tuple(coarse), dtype=np.float32), sigma_mm / step, mode="wrap"
        )
        if np.any(coarse != self.shape):
            field = ndimage.zoom(field, np.asarray(self.shape) / coarse, order=1)
        field /= max(float(field.std()), 1e-6)
        return field


class _Tubes:
    """Signed distance (mm, negative inside) to a union of tapered tubes drawn one segment at a time."""

    def __init__(self, grid: _Grid) -> None:
        self.grid = grid
        self.sd = np.full(grid.shape, np.inf, dtype=np.float32)

    def segment(self, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> None:
        """Add a segment from ``p0`` (radius ``r0``) to ``p1`` (radius ``r1``)."""
        reach = max(r0, r1) + self.grid.fine
        box = self.grid.window(np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach)
        if box is None:
            return
        x, y, z = self.grid.local(box)
        d = (p1 - p0).astype(np.float32)
        length2 = max(float(d @ d), 1e-6)
        rx, ry, rz = x - np.float32(p0[0]), y - np.float32(p0[1]), z - np.float32(p0[2])
        t = np.clip((rx * d[0] + ry * d[1] + rz * d[2]) / np.float32(length2), 0.0, 1.0)
        dist = np.sqrt((rx - t * d[0]) ** 2 + (ry - t * d[1]) ** 2 + (rz - t * d[2]) ** 2)
        np.minimum(self.sd[box], dist - (np.float32(r0) + t * np.float32(r1 - r0)), out=self.sd[box])

    def polyline(self, points: Sequence[Sequence[float]], radii: Sequence[float]) -> None:
        """Add consecutive segments through ``points`` with the radius at each point."""
        pts = np.asarray(points, dtype=np.float64)
        for a in range(len(pts) - 1):
            self.segment(pts[a], pts[a + 1], float(radii[a]), float(radii[a + 1]))

    def inside(self, margin: float = 0.0) -> np.ndarray:
        """Voxels within the tubes grown by ``margin`` mm."""
        return self.sd < margin


def _unit(vector: Sequence[float]) -> np.ndarray:
    v = np.asarray(vector, dtype=np.float64)
    return v / np.linalg.norm(v)


def _frame(long_axis: Sequence[float]) -> np.ndarray:
    """Orthonormal rows whose first row is ``long_axis``."""
    e1 = _unit(long_axis)
    helper = np.array([0.0, 0.0, 1.0]) if abs(e1[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e2 = _unit(np.cross(helper, e1))
    return np.stack([e1, e2, np.cross(e1, e2)])


def _fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors."""
    k = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * k / n)
    azimuth = np.pi * (1.0 + 5.0**0.5) * k
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


@dataclass
class _Lesion:
    """A nodule/tumour: a star-shaped body whose surface radius varies with direction."""

    organ: str
    kind: str
    density: str
    hu: float
    texture: float
    radius: float
    """Radius (mm) of the sphere with the same volume."""
    directions: np.ndarray
    heights: np.ndarray
    sharpness: np.ndarray
    centre: np.ndarray | None = None
    scale: float = field(init=False)
    """Factor on the surface radius that makes the volume that of a sphere of ``radius``."""
    extent: float = field(init=False)
    """Largest distance (mm) of the surface from the centre, with a small safety margin."""

    def __post_init__(self) -> None:
        profile = self._profile(_fibonacci_sphere(4000))
        self.scale = float(np.mean(profile**3) ** (-1.0 / 3.0))
        self.extent = float(self.radius * self.scale * profile.max() * 1.03)

    def _profile(self, u: np.ndarray) -> np.ndarray:
        """Relative surface radius along unit vectors ``u`` (..., 3): 1 plus bumps and spikes."""
        profile = np.ones(u.shape[:-1], dtype=np.float64)
        for direction, height, sharp in zip(self.directions, self.heights, self.sharpness):
            profile += height * np.exp(sharp * (u @ direction - 1.0))
        return profile

    def surface(self, u: np.ndarray) -> np.ndarray:
        """Surface distance (mm) from the centre along unit vectors ``u`` (..., 3)."""
        return self.radius * self.scale * self._profile(u)

    def box(self, grid: _Grid, pad: float) -> tuple[tuple[slice, slice, slice], np.ndarray]:
        """Index box around the placed lesion grown by ``pad`` mm and the distances of its voxels (mm)."""
        assert self.centre is not None
        box = grid.window(self.centre - self.extent - pad, self.centre + self.extent + pad)
        assert box is not None  # the centre is a voxel of the grid
        x, y, z = grid.local(box)
        dist = np.sqrt((x - self.centre[0]) ** 2 + (y - self.centre[1]) ** 2 + (z - self.centre[2]) ** 2)
        return box, dist

    def paint(self, grid: _Grid, labels: np.ndarray, hu: np.ndarray, texture: np.ndarray) -> None:
        """Set the lesion label, blend its HU in with a one-voxel soft edge and set its texture."""
        assert self.centre is not None
        box, dist = self.box(grid, grid.fine)
        x, y, z = grid.local(box)
        offset = np.stack(np.broadcast_arrays(x - self.centre[0], y - self.centre[1], z - self.centre[2]), axis=-1)
        u = offset / np.maximum(dist, 1e-6)[..., None]
        margin = self.surface(u).astype(np.float32) - dist
        weight = np.clip(0.5 + margin / grid.fine, 0.0, 1.0)
        hu[box] = hu[box] * (1.0 - weight) + np.float32(self.hu) * weight
        inside = margin >= 0
        labels[box][inside] = LESION_ID
        texture[box][inside] = self.texture

    def describe(self, grid: _Grid, labels: np.ndarray, ct: np.ndarray, index: int) -> dict[str, Any]:
        """JSON-ready record of where the lesion is and what it looks like in the final CT."""
        assert self.centre is not None
        box, dist = self.box(grid, 2.0 * float(grid.spacing.max()) + 6.0)
        inside = (labels[box] == LESION_ID) & (dist <= self.extent + grid.fine)
        near = dist - self.extent
        shell = (
            (labels[box] == _LABEL_ID[self.organ])
            & (near > float(grid.spacing.max()))
            & (near <= float(grid.spacing.max()) + max(6.0, 2.0 * float(grid.spacing.max())))
        )
        voxel = np.rint((self.centre - grid.origin) / grid.spacing).astype(int)
        return {
            "index": index,
            "label": LESION_ID,
            "organ": self.organ,
            "kind": self.kind,
            "density": self.density,
            "centre_voxel": voxel.tolist(),
            "centre_mm": [round(float(c), 3) for c in self.centre],
            "radius_mm": round(self.radius, 3),
            "extent_mm": round(self.extent, 3),
            "n_voxels": int(inside.sum()),
            "mean_hu": round(float(ct[box][inside].mean()), 2),
            "surround_hu": round(float(ct[box][shell].mean()), 2) if shell.any() else None,
        }


class _Scene:
    """The painter of one case: label map, ideal HU and texture amplitude, filled organ by organ.

    Later paints win, so organs are painted from the outside in and from low to high priority.
    """

    def __init__(self, grid: _Grid, geometry: np.random.Generator, fields: np.random.Generator, contrast: bool) -> None:
        self.grid = grid
        self.geometry = geometry
        self.fields = fields
        self.contrast = contrast
        self.labels = np.zeros(grid.shape, dtype=np.uint8)
        self.hu = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.texture = np.zeros(grid.shape, dtype=np.float32)
        self.blood = self.u(220, 320) if contrast else self.u(35, 45)
        self._depth: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}

    def u(self, low: float, high: float) -> float:
        """One uniform draw."""
        return float(self.geometry.uniform(low, high))

    def paint(self, mask: np.ndarray, label: int, hu: float | np.ndarray, texture: float) -> None:
        """Give the voxels of ``mask`` (broadcastable to the grid) a label, HU and texture amplitude."""
        where = np.broadcast_to(mask, self.grid.shape)
        self.labels[where] = label
        self.hu[where] = np.broadcast_to(np.asarray(hu, dtype=np.float32), self.grid.shape)[where]
        self.texture[where] = texture

    def draw_anatomy(self) -> None:
        """Paint every organ of the case, from the outside in and from low to high priority."""
        self._body()
        self._layout_spine()
        self._abdomen()
        self._thorax()
        self._spine()
        self._ribs()

    def _body(self) -> None:
        """Elliptic-cylinder body with skin, fat and muscle; the inner cavity and the diaphragm."""
        g = self.grid
        self.yc = self.u(-14, -6)
        self.a = 150.0 * self.u(0.92, 1.06)
        self.b_ant = 108.0 * self.u(0.92, 1.06)
        self.b_post = 114.0 * self.u(0.95, 1.05)
        self.power = self.u(2.1, 2.6)
        self.fat = self.u(6, 24)
        self.muscle = self.u(8, 13)
        self.xm = self.u(-5, 5)
        x2, y2 = g.x[:, :, 0], g.y[:, :, 0] - np.float32(self.yc)
        theta = np.arctan2(y2, x2)
        depth = (self.outline(theta) - np.hypot(x2, y2)).astype(np.float32)
        wall = self.wall(theta)
        fat_edge = self.wall(theta, muscle=False)
        self.body2d = (depth > 0)[:, :, None]
        self.cavity2d = (depth > wall)[:, :, None]
        self.lung_wall2d = (depth > wall + 2.0)[:, :, None]
        self.paint(self.body2d, 1, 40.0, 6.0)
        self.paint((depth > 2.0)[:, :, None] & (depth <= fat_edge)[:, :, None], 1, -100.0, 10.0)
        self.paint((depth > fat_edge)[:, :, None] & ~self.cavity2d, 1, 45.0, 8.0)

        # Diaphragm: two paraboloid domes, the right one higher; thorax above, abdomen below.
        self.dome_right = self.u(-12, 8)
        self.dome_left = self.dome_right - self.u(5, 15)
        self.diaphragm = np.maximum(
            self.dome_right - 0.0055 * ((g.x[:, :, 0] - 55.0) ** 2 + y2**2),
            self.dome_left - 0.0055 * ((g.x[:, :, 0] + 55.0) ** 2 + y2**2),
        ).astype(np.float32)[:, :, None]
        self.thorax = self.cavity2d & (g.z > self.diaphragm)
        self.abdomen = self.cavity2d & (g.z < self.diaphragm - 5.0)
        self.paint(self.cavity2d & ~self.thorax & ~self.abdomen, 1, 45.0, 6.0)

        # Fat with strands of soft tissue in the mediastinum; fat, bowel loops and gas in the abdomen.
        self.mix = g.smooth_noise(self.fields, 9.0)
        self.paint(self.thorax, 1, np.where(self.mix > 1.0, 35.0, -90.0), 10.0)
        bowel = np.where(self.mix > 1.9, -900.0, np.where(self.mix > 0.0, 30.0, -95.0))
        self.paint(self.abdomen, 1, bowel, 10.0)

    def outline(self, angle: np.ndarray) -> np.ndarray:
        """Distance (mm) from the body axis to the skin along in-plane directions ``angle`` (rad)."""
        semi_y = np.where(np.sin(angle) >= 0, self.b_ant, self.b_post)
        return 1.0 / (np.abs(np.cos(angle) / self.a) ** self.power + np.abs(np.sin(angle) / semi_y) ** self.power) ** (
            1.0 / self.power
        )

    def wall(self, angle: np.ndarray, muscle: bool = True) -> np.ndarray:
        """Depth (mm) below the skin of the inner edge of the fat (or, with ``muscle``, of the muscle)."""
        depth = 2.0 + self.fat * (1.0 + 0.35 * np.sin(angle) + 0.25 * np.cos(2 * angle))
        return depth + self.muscle * (1.0 + 0.5 * np.maximum(0.0, np.sin(angle))) if muscle else depth

    def _layout_spine(self) -> None:
        """Where the spine is (organs are fitted around it before it is painted over them)."""
        g = self.grid
        self.y_vb = self.yc - self.b_post + 78.0 * self.u(0.95, 1.05)
        self.period = 27.0 * self.u(0.95, 1.05)
        self.phase = self.u(0, self.period)
        self.cancellous = self.u(220, 380)
        self.cortical = self.u(650, 950)
        self.lumbar = np.clip((self.dome_left - g.z) / 120.0, 0.0, 1.0)  # (1, 1, Z): 0 thoracic .. 1 lumbar
        self.vb_ax = 16.0 + 6.0 * self.lumbar
        self.vb_ay = 14.0 + 4.0 * self.lumbar
        self.canal_y = self.y_vb - 14.0 - 10.0

    def back_muscles(self, grow: float = 0.0) -> np.ndarray:
        """(X, Y, 1) mask of the paraspinal muscles on both sides of the spine, grown by ``grow`` mm."""
        g = self.grid
        mask = np.zeros((g.shape[0], g.shape[1], 1), dtype=bool)
        for side in (-1.0, 1.0):
            mask |= ((g.x - side * 33.0) / (26.0 + grow)) ** 2 + (
                (g.y - (self.canal_y - 16.0)) / (22.0 + grow)
            ) ** 2 < 1
        return mask

    def _abdomen(self) -> None:
        """Liver, spleen, stomach, back and psoas muscles, kidneys (cortex, medulla, sinus fat), IVC."""
        g = self.grid
        abdomen = self.abdomen
        # The liver fills the right upper quadrant under the right dome; its left lobe reaches
        # across the midline anteriorly.
        self.liver_hu = self.u(54, 66)
        liver = abdomen & (
            g.ellipsoid(
                (50.0, self.yc + 8.0, self.dome_right - 72.0),
                (95.0 * self.u(0.92, 1.05), 88.0, 90.0 * self.u(0.9, 1.1)),
            )
            < 1
        )
        liver &= g.x > 5.0 - 0.55 * (g.y - self.y_vb)
        self.paint(liver, 8, self.liver_hu, 7.0)

        spleen = g.ellipsoid(
            (-88.0, self.y_vb + 6.0, self.dome_left - 45.0), (45.0, 22.0, 50.0), _frame((0.5, 0.85, 0.1))
        )
        self.paint(abdomen & (spleen < 1), 1, self.u(42, 52) + (50.0 if self.contrast else 0.0), 7.0)
        # Stomach under the left dome: wall, fluid and, the patient lying supine, gas anteriorly.
        centre = np.array([-45.0, self.yc + 35.0, self.dome_left - 45.0])
        stomach = g.ellipsoid(centre, (38.0, 30.0, 42.0))
        self.paint(abdomen & (stomach < 1), 1, 45.0, 6.0)
        self.paint(
            abdomen & (stomach < (1 - 5.0 / 30.0) ** 2),
            1,
            np.where(g.y > centre[1] + self.u(0, 12), -1000.0, 15.0),
            4.0,
        )

        self.paint(self.back_muscles() & self.body2d, 1, 50.0, 8.0)
        psoas = np.zeros(g.shape, dtype=bool)
        for side in (-1.0, 1.0):
            psoas |= (
                (g.x - side * (self.vb_ax + 14.0)) ** 2 + (g.y - self.y_vb) ** 2 < (6.0 + 10.0 * self.lumbar) ** 2
            ) & (self.lumbar > 0.35)
        self.paint(psoas & abdomen, 1, 48.0, 8.0)

        cortex_hu = self.u(140, 190) if self.contrast else self.u(38, 48)
        medulla_hu = self.u(60, 90) if self.contrast else self.u(25, 33)
        for side, label, z_offset in ((1.0, 10, -100.0), (-1.0, 9, -88.0)):
            centre = np.array([side * 66.0, self.y_vb - 4.0, self.dome_right + z_offset + self.u(-8, 8)])
            frame = _frame((-side * 0.22, -0.12, 1.0))
            semi = np.array([52.0, 24.0, 19.0]) * self.u(0.9, 1.1)
            rho = g.ellipsoid(centre, semi, frame)
            self.paint(abdomen & (g.ellipsoid(centre, semi + 9.0, frame) < 1), 1, -95.0, 10.0)
            kidney = abdomen & (rho < 1)
            self.paint(kidney, label, cortex_hu, 6.0)
            self.paint(kidney & (rho < (1 - 7.0 / semi[2]) ** 2), label, medulla_hu, 5.0)
            hilum = _unit((-side, 0.7, 0.0))
            across = (g.x - centre[0]) * hilum[0] + (g.y - centre[1]) * hilum[1]
            along = sum((c - centre[a]) * frame[0][a] for a, c in enumerate((g.x, g.y, g.z)))
            self.paint(kidney & (across > 0.45 * semi[1]) & (np.abs(along) < 0.3 * semi[0]), 1, -80.0, 10.0)

        ivc = _Tubes(g)
        ivc.polyline(
            [
                (26.0, self.y_vb + 22.0, g.axes[2][0] - 10.0),
                (24.0, self.y_vb + 26.0, self.dome_right),
                (18.0, self.y_vb + 32.0, self.dome_right + 20.0),
            ],
            [10.0, 12.0, 12.0],
        )
        self.paint(ivc.inside() & self.cavity2d, 1, self.u(120, 160) if self.contrast else self.blood, 4.0)

    def _thorax(self) -> None:
        """Heart, aorta, oesophagus, airways and lungs with their vessel tree."""
        g = self.grid
        xm = self.xm
        # Heart: a tilted ellipsoid on the left dome, long axis pointing left, anterior and down.
        swing = math.radians(self.u(30, 50))
        frame = _frame((-math.cos(swing), math.sin(swing), -0.45))
        centre = np.array([xm - 22.0, self.yc + 32.0, self.dome_left + 42.0])
        semi = np.array([62.0, 46.0, 42.0]) * self.u(0.9, 1.1)
        heart = self.thorax & (g.ellipsoid(centre, semi, frame) < 1)
        self.paint(self.thorax & (g.ellipsoid(centre, semi + 5.0, frame) < 1), 1, -90.0, 10.0)
        self.paint(heart, 4, self.u(40, 50), 6.0)
        chambers = heart & (g.ellipsoid(centre, semi * 0.68, frame) < 1)
        septum = np.abs(sum((c - centre[a]) * frame[1][a] for a, c in enumerate((g.x, g.y, g.z)))) < 5.0
        self.paint(chambers & ~septum, 4, self.blood, 5.0)
        near_heart = g.ellipsoid(centre, semi + 7.0, frame) < 1

        # Airways: trachea down to the carina, then the two main bronchi to the hila.
        self.carina = self.dome_left + self.u(95, 110)
        y_trachea = self.y_vb + 32.0
        carina = np.array([xm + 6.0, y_trachea, self.carina])
        hila = {
            1.0: np.array([xm + 55.0, self.y_vb + 36.0, self.carina - 25.0]),
            -1.0: np.array([xm - 52.0, self.y_vb + 34.0, self.carina - 32.0]),
        }
        airway = _Tubes(g)
        airway.segment(np.array([xm + 6.0, y_trachea + 4.0, g.axes[2][-1] + 10.0]), carina, 9.0, 9.0)
        for hilum in hila.values():
            airway.segment(carina, hilum, 6.5, 5.0)

        # Aorta: up from the heart, the arch over the left bronchus, down along the spine.
        ascending = np.array([xm + 8.0, self.yc + 20.0, self.carina + 4.0])
        descending = np.array([xm - 30.0, self.y_vb + 6.0, self.carina + 4.0])
        middle = (ascending + descending) / 2.0
        arch = [
            middle + (ascending - middle) * math.cos(phi) + np.array([-10.0, 0.0, 22.0]) * math.sin(phi)
            for phi in np.linspace(0, math.pi, 9)
        ]
        aorta = _Tubes(g)
        aorta.polyline(
            [
                np.array([xm + 4.0, self.yc + 28.0, self.dome_left + 55.0]),
                *arch,
                np.array([xm - 26.0, self.y_vb + 10.0, self.dome_left - 20.0]),
                np.array([xm - 14.0, self.y_vb + 24.0, g.axes[2][0] - 10.0]),
            ],
            [15.0] + [14.5 - 0.25 * a for a in range(9)] + [11.0, 10.0],
        )
        oesophagus = _Tubes(g)
        oesophagus.segment(
            np.array([xm + 2.0, self.y_vb + 22.0, g.axes[2][-1] + 10.0]),
            np.array([xm - 8.0, self.y_vb + 24.0, self.dome_left - 15.0]),
            7.5,
            7.5,
        )

        # Lungs fill the thoracic cavity below the apices, apart from the mediastinum (a wedge,
        # narrow behind the sternum, with a wavy edge) and the spine.
        apex = self.u(112, 128) - 0.016 * ((np.abs(g.x) - 45.0) ** 2 + (g.y - self.yc + 5.0) ** 2)
        front, back = self.yc + self.b_ant, self.yc - self.b_post
        mediastinum = np.abs(g.x - xm) < 7.0 + 0.2 * np.maximum(front - 40.0 - g.y, 0.0) + 5.0 * self.mix
        spine = (
            ((g.x / (self.vb_ax + 7.0)) ** 2 + ((g.y - self.y_vb) / (self.vb_ay + 7.0)) ** 2 < 1)
            | (g.x**2 + (g.y - self.canal_y) ** 2 < 22.0**2)
            | self.back_muscles(4.0)
        )
        lungs = self.thorax & self.lung_wall2d & (g.z < apex) & ~spine & ~near_heart
        lungs &= ~(mediastinum & (g.z > self.dome_left - 10.0))
        lungs &= ~aorta.inside(4.0) & ~oesophagus.inside(4.0) & ~airway.inside(3.0)
        parenchyma = self.u(-885, -845) + self.u(20, 55) * np.clip((front - g.y) / (front - back), 0.0, 1.0)
        self.paint(lungs & (g.x < xm), 2, parenchyma, 14.0)
        self.paint(lungs & (g.x >= xm), 3, parenchyma, 14.0)

        # Vessels: a branching tree from each hilum, and a network of thin peripheral vessels (the
        # curves where two smooth random fields are both near zero), blended in as partial volume.
        vessels = _Tubes(g)
        for side, hilum in hila.items():
            for aim in ((0.3, 0.1, 1.0), (1.0, 0.2, 0.2), (0.6, -0.6, -0.7), (0.5, 0.8, -0.4), (0.5, -0.4, 0.5)):
                self._vessel_tree(vessels, hilum, _unit((side * aim[0], aim[1], aim[2])), 30.0, 5.5, 6)
        network = g.smooth_noise(self.fields, 4.0) ** 2 + g.smooth_noise(self.fields, 4.0) ** 2
        blend = np.maximum(np.clip(0.5 - vessels.sd / g.fine, 0.0, 1.0), 0.4 * np.exp(-network / 0.05))
        self.hu += blend * np.isin(self.labels, (2, 3)) * (np.float32(self.blood) - self.hu)

        self.paint(oesophagus.inside(), 1, 40.0, 5.0)
        self.paint(oesophagus.inside(-4.5), 1, -950.0, 0.0)
        self.paint(aorta.inside(), 5, self.blood, 4.0)
        self.paint(airway.inside(), 12, 40.0, 4.0)
        self.paint(airway.inside(-1.5), 12, -1000.0, 0.0)

    def _vessel_tree(
        self, tubes: _Tubes, start: np.ndarray, direction: np.ndarray, length: float, radius: float, levels: int
    ) -> None:
        """A vessel of ``levels`` binary generations, each shorter, thinner and turned at random."""
        end = start + direction * length * self.u(0.8, 1.2)
        tubes.segment(start, end, radius, radius * 0.85)
        if levels <= 1:
            return
        for _ in range(2):
            turn = _unit(np.cross(direction, self.geometry.standard_normal(3)))
            angle = math.radians(self.u(20, 42))
            child = _unit(direction * math.cos(angle) + turn * math.sin(angle))
            self._vessel_tree(tubes, end, child, length * 0.78, radius * 0.74, levels - 1)

    def _spine(self) -> None:
        """Vertebral bodies (cortex, end plates, cancellous bone), discs, canal and posterior elements."""
        g = self.grid
        cycle = (g.z - self.phase) / self.period
        from_disc = (0.5 - np.abs(cycle - np.round(cycle))) * self.period  # mm from the nearest disc centre
        disc = from_disc < 2.5
        rho = np.sqrt((g.x / self.vb_ax) ** 2 + ((g.y - self.y_vb) / self.vb_ay) ** 2)
        body = rho < 1.0
        cortex = (rho > 1.0 - 1.8 / self.vb_ay) | (from_disc < 4.0)
        self.paint(body & disc, 6, 90.0, 6.0)
        self.paint(body & ~disc & ~cortex, 6, self.cancellous, 35.0)
        self.paint(body & ~disc & cortex, 6, self.cortical, 40.0)

        posterior = 0.5 * (self.cancellous + self.cortical)
        ring = np.sqrt(g.x**2 + (g.y - self.canal_y) ** 2)
        self.paint((ring < 15.0) & (g.y < self.canal_y + 6.0) & ~disc, 6, posterior, 40.0)
        self.paint(ring < 8.5, 1, 15.0, 4.0)
        processes = _Tubes(g)
        self.rib_roots: list[tuple[float, float, np.ndarray]] = []
        for k in range(
            math.floor((g.axes[2][0] - 60.0 - self.phase) / self.period),
            math.ceil((g.axes[2][-1] + 60.0 - self.phase) / self.period) + 1,
        ):
            zc = self.phase + k * self.period
            processes.segment(
                np.array([0.0, self.canal_y - 12.0, zc]), np.array([0.0, self.canal_y - 34.0, zc - 14.0]), 4.5, 3.5
            )
            for side in (-1.0, 1.0):
                tip = np.array([side * 30.0, self.canal_y - 6.0, zc + 2.0])
                processes.segment(np.array([side * 10.0, self.canal_y, zc]), tip, 5.0, 4.0)
                self.rib_roots.append((side, zc, tip))
        self.paint(processes.inside() & self.body2d, 6, posterior, 40.0)

    def _ribs(self) -> None:
        """Ribs (cortex and marrow; costal cartilage to the sternum for the upper ones) and sternum."""
        g = self.grid
        ribs, cartilage = _Tubes(g), _Tubes(g)
        lowest = self.dome_left - 75.0
        drop = self.u(60, 90)
        for side, zc, tip in self.rib_roots:
            if zc < lowest:
                continue
            floating = zc < lowest + 2 * self.period
            end = math.radians(25.0 if floating else 72.0)
            t = np.linspace(0.0, 1.0, 18)
            angle = math.radians(-62.0) + t * (end - math.radians(-62.0))
            radial = self.outline(angle) - (self.wall(angle) - 5.0)
            points = np.stack(
                [
                    side * radial * np.cos(angle),
                    self.yc + radial * np.sin(angle),
                    zc + 4.0 * np.sin(np.pi * t) - drop * t**1.2,
                ],
                axis=1,
            )
            points = np.concatenate([tip[None], points])
            bone_end = len(points) if floating else len(points) - 3
            ribs.polyline(points[:bone_end], np.full(bone_end, 4.5))
            if not floating:
                cartilage.polyline(points[bone_end - 1 :], np.full(len(points) - bone_end + 1, 4.5))
        marrow = self.u(200, 300)
        self.paint(cartilage.inside() & self.body2d, 1, 120.0, 10.0)
        self.paint(ribs.inside() & self.body2d, 7, self.cortical, 40.0)
        self.paint(ribs.inside(-1.6) & self.body2d, 7, marrow, 30.0)

        front = self.yc + self.b_ant - self.wall(math.pi / 2) + 4.0
        sternum = (
            (((g.x - self.xm) / 14.0) ** 2 + ((g.y - front) / 6.0) ** 2 < 1)
            & (g.z > self.dome_right + 5.0)
            & (g.z < self.carina + 35.0)
        )
        self.paint(sternum, 7, self.cortical, 40.0)
        inner = ((g.x - self.xm) / 12.0) ** 2 + ((g.y - front) / 4.0) ** 2 < 1
        self.paint(sternum & inner, 7, marrow, 30.0)

    def place_lesions(self, count: int) -> list[_Lesion]:
        """Draw ``count`` lesions and paint each into lung or liver tissue with room for it.

        A lesion that does not fit in its organ is shrunk (down to 3 mm across), then redrawn for
        the other organs in turn; one that fits nowhere is left out.
        """
        placed: list[_Lesion] = []
        for _ in range(count):
            first = str(self.geometry.choice(_LESION_ORGANS, p=(0.3, 0.3, 0.4)))
            for organ in (first, *(o for o in _LESION_ORGANS if o != first)):
                lesion: _Lesion | None = self._draw_lesion(organ)
                while lesion is not None and not self._find_room(lesion, placed):
                    lesion = replace(lesion, radius=lesion.radius * 0.75) if lesion.radius > 2.0 else None
                if lesion is not None:
                    lesion.paint(self.grid, self.labels, self.hu, self.texture)
                    placed.append(lesion)
                    break
        return placed

    def _find_room(self, lesion: _Lesion, placed: list[_Lesion]) -> bool:
        """Set ``lesion.centre`` to a random voxel deep enough in its organ, away from ``placed``.

        Deep enough means that the lesion grown by two voxels stays inside the organ.
        """
        g = self.grid
        clearance = 2.0 * float(g.spacing.max())
        if lesion.organ not in self._depth:
            self._depth[lesion.organ] = self._organ_depth(_LABEL_ID[lesion.organ])
        found = self._depth[lesion.organ]
        if found is None:
            return False
        offset, depth = found
        candidates = np.argwhere(depth >= lesion.extent + clearance)
        if len(candidates) == 0:
            return False
        for pick in self.fields.choice(len(candidates), size=min(50, len(candidates)), replace=False):
            centre = g.origin + g.spacing * (candidates[pick] + offset)
            if all(
                np.linalg.norm(centre - other.centre) > lesion.extent + other.extent + clearance for other in placed
            ):
                lesion.centre = centre
                return True
        return False

    def _organ_depth(self, label: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Distance (mm) of each voxel of an organ to the nearest voxel outside it, computed over
        the organ's bounding box, with the box's first index; None if the organ is not in view."""
        mask = self.labels == label
        if not mask.any():
            return None
        bounds = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[[0, -1]] for a in range(3)]
        box = tuple(slice(low, high + 1) for low, high in bounds)
        depth = ndimage.distance_transform_edt(np.pad(mask[box], 1), sampling=self.grid.spacing)
        return np.array([low for low, _ in bounds]), depth[1:-1, 1:-1, 1:-1]

    def _draw_lesion(self, organ: str) -> _Lesion:
        """A random lesion of ``organ``: size (3-25 mm across), shape and density; not yet placed."""
        rng = self.geometry
        in_lung = organ != "liver"
        radius = 0.5 * math.exp(self.u(math.log(3.0 if in_lung else 8.0), math.log(25.0)))
        kinds = ("spherical", "lobulated", "spiculated") if in_lung else ("spherical", "lobulated")
        kind = str(rng.choice(kinds))
        bumps, spikes = {
            "spherical": (0, 0),
            "lobulated": (int(rng.integers(3, 7)), 0),
            "spiculated": (int(rng.integers(2, 4)), int(rng.integers(6, 15))),
        }[kind]
        mild = 0.15 if kind == "spiculated" else 0.4
        directions = _fibonacci_sphere(64)[rng.choice(64, bumps + spikes, replace=False)]
        heights = np.concatenate([rng.uniform(0.1, mild, bumps), rng.uniform(0.5, 1.2, spikes)])
        sharpness = np.concatenate([rng.uniform(3.0, 6.0, bumps), rng.uniform(60.0, 150.0, spikes)])
        if in_lung:
            density, hu, texture = (
                ("ground_glass", self.u(-650, -400), 30.0) if rng.random() < 0.25 else ("solid", self.u(20, 60), 8.0)
            )
        else:
            density, hu, texture = (
                ("hyperdense", self.liver_hu + self.u(25, 45), 6.0)
                if rng.random() < 0.25
                else ("hypodense", self.liver_hu - self.u(25, 55), 6.0)
            )
        return _Lesion(organ, kind, density, hu, texture, radius, directions, heights, sharpness)

    def render(self) -> np.ndarray:
        """Texture, point spread function, scanner noise and int16 quantisation of the painted scene."""
        g, rng = self.grid, self.fields
        hu = self.hu + self.texture * g.smooth_noise(rng, 2.5)
        in_plane = rng.uniform(0.8, 1.2)
        psf = np.array([in_plane, in_plane, 0.45 * g.spacing[2]])
        hu = ndimage.gaussian_filter(hu, psf / g.spacing, truncate=3.0)
        noise = ndimage.gaussian_filter(rng.standard_normal(g.shape, dtype=np.float32), (0.6, 0.6, 0.0), truncate=3.0)
        hu += noise * np.float32(rng.uniform(10, 20) / max(float(noise.std()), 1e-6))
        return np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int16)
