"""Preprocessing, random views, the cached pretraining dataset and its loader."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data.utils import affine_to_spacing

from smartformer.config import DataConfig
from smartformer.data.dataset import build_pretrain_dataset
from smartformer.data.io import read_ct
from smartformer.data.loader import build_pretrain_loader
from smartformer.data.transforms import (
    preprocess_transforms,
    view_transforms,
)
from smartformer.data.windows import WINDOWS, parse_window
from smartformer.errors import ConfigError, InputError, SmartformerError

# Non-RAS, permuted and anisotropic: i -> left, j -> inferior, k -> posterior (LPS, row-major).
SKEWED = {
    "spacing": (0.9, 2.5, 1.4),
    "origin": (20.0, -15.0, 35.0),
    "direction": (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0),
}
ROI = (24, 24, 24)


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    index = np.argwhere(mask).mean(axis=0)
    return (affine @ np.array([*index, 1.0]))[:3]


@pytest.fixture
def ct_and_label(tmp_path, write_volume, phantom_zyx) -> dict[str, str]:
    ct, label = phantom_zyx((20, 32, 28))
    return {
        "image": str(write_volume(tmp_path / "ct.nii.gz", ct, **SKEWED)),
        "label": str(write_volume(tmp_path / "label.nrrd", label, **SKEWED)),
    }


def test_parse_window():
    assert parse_window("wide") == (-1000.0, 1000.0)
    assert parse_window("lung") == WINDOWS["lung"]
    assert parse_window("-175,250") == (-175.0, 250.0)
    assert parse_window((-100, 300)) == (-100.0, 300.0)
    for bad in ("bone", "1,2,3", "400,-1000", "a,b"):
        with pytest.raises(ConfigError):
            parse_window(bad)


def test_preprocessing_invariants_and_label_alignment(ct_and_label):
    original = read_ct(ct_and_label["label"])
    out = preprocess_transforms(label_keys=("label",), spacing=1.5, window="wide", roi=ROI)(ct_and_label)
    image, label = out["image"], out["label"]

    assert image.shape == label.shape and image.shape[0] == 1
    assert all(n >= r for n, r in zip(image.shape[1:], ROI))
    assert torch.allclose(image.affine, label.affine, atol=1e-4)  # float32 NIfTI vs NRRD
    np.testing.assert_allclose(affine_to_spacing(image.affine).numpy(), (1.5, 1.5, 1.5), atol=1e-6)
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # the bright cube (700 HU -> 0.85) and its label coincide, and stay where they were in mm
    bright = (image[0] > (0.52 + 0.85) / 2).numpy()  # halfway between tissue and cube
    cube = (label[0] > 0.5).numpy()
    assert 2 * (bright & cube).sum() / (bright.sum() + cube.sum()) > 0.9  # Dice
    np.testing.assert_allclose(
        _world_centroid(cube, label.affine.numpy()),
        _world_centroid(original[0].numpy() > 0.5, original.affine.numpy()),
        atol=0.5,
    )
    assert set(np.unique(label.numpy())) <= {0.0, 1.0}


def test_body_crop_removes_air_margin(ct_and_label):
    out = preprocess_transforms(spacing=1.0, roi=(4, 4, 4))(ct_and_label)
    image = out["image"][0]
    # the soft-tissue box fills the crop: its faces are body, not air
    for axis in range(3):
        assert float(image.select(axis, 0).mean()) > 0.45
        assert float(image.select(axis, image.shape[axis] - 1).mean()) > 0.45


def test_small_volume_is_padded_with_air(tmp_path, write_volume, phantom_zyx):
    ct, _ = phantom_zyx((6, 9, 8))
    path = write_volume(tmp_path / "small.mha", ct, spacing=(2.0, 2.0, 2.0), origin=(0, 0, 0))
    out = preprocess_transforms(spacing=2.0, roi=ROI)({"image": str(path)})
    image = out["image"]
    assert tuple(image.shape) == (1, *ROI)
    assert float(image[0, 0, 0, 0]) == 0.0 and float(image.max()) > 0.5


def test_all_air_volume_is_kept_whole(tmp_path, write_volume):
    air = np.full((8, 10, 12), -1000, dtype=np.int16)
    path = write_volume(tmp_path / "air.nii.gz", air, spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0))
    out = preprocess_transforms(spacing=1.0, roi=(4, 4, 4))({"image": str(path)})
    assert tuple(out["image"].shape) == (1, 12, 10, 8)
    assert float(out["image"].max()) == 0.0


def _preprocessed(ct_and_label) -> dict:
    return preprocess_transforms(spacing=1.5, roi=ROI)({"image": ct_and_label["image"]})


def test_views_shape_range_and_reproducibility(ct_and_label):
    sample = _preprocessed(ct_and_label)
    views = view_transforms(roi=(16, 16, 16), num_views=3)

    first = views.set_random_state(seed=7)(sample)["views"]
    again = views.set_random_state(seed=7)(sample)["views"]
    other = views.set_random_state(seed=8)(sample)["views"]

    assert first.shape == (3, 1, 16, 16, 16) and first.dtype == torch.float32
    assert type(first) is torch.Tensor
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first[0], first[1])
    assert "image" not in views(sample)


def test_views_without_augmentation_reproduce_the_volume(ct_and_label):
    sample = _preprocessed(ct_and_label)
    image = sample["image"][:, :16, :16, :16]  # a volume exactly the size of the ROI
    views = view_transforms(
        roi=(16, 16, 16), num_views=2, intensity_scale=0.0, intensity_shift=0.0, flip_prob=0.0, max_scale=1.0
    )
    out = views({"image": image})["views"]
    assert torch.allclose(out[0], image.as_tensor()) and torch.allclose(out[1], image.as_tensor())


# --- the cached dataset and the loader ---------------------------------------------------------


@pytest.fixture
def volumes(tmp_path, write_volume, phantom_zyx) -> list[dict[str, str]]:
    ct, _ = phantom_zyx((12, 30, 26))
    return [{"image": str(write_volume(tmp_path / "src" / f"ct{i}.nii.gz", ct + 10 * i, **SKEWED))} for i in range(3)]


def _cache_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/*.pt"))


def test_dataset_yields_views_and_caches_each_volume_once(tmp_path, volumes):
    cache = tmp_path / "cache"
    dataset = build_pretrain_dataset(volumes, cache, spacing=2.0, window="wide", roi=16)

    assert len(dataset) == 3
    assert dataset[0]["views"].shape == (2, 1, 16, 16, 16)
    for index in range(3):
        dataset[index]
    cached = _cache_files(cache)
    assert len(cached) == 3

    # Second pass: replace a source by garbage of the same size and mtime. It still loads,
    # so it came from the cache and the file was not read again.
    source = Path(volumes[1]["image"])
    stat = source.stat()
    source.write_bytes(b"\0" * stat.st_size)
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dataset[1]["views"].shape == (2, 1, 16, 16, 16)
    assert _cache_files(cache) == cached

    # A changed file (new mtime) is a new cache key: it is read again, and now fails.
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(InputError, match=str(source)):
        dataset[1]


def test_changing_settings_changes_the_cache_folder(tmp_path, volumes):
    cache = tmp_path / "cache"
    for spacing, window in ((2.0, "wide"), (2.0, "wide"), (3.0, "wide"), (2.0, "lung")):
        build_pretrain_dataset(volumes[:1], cache, spacing=spacing, window=window, roi=16)[0]
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 3
    assert all((cache / f / "settings.json").is_file() for f in folders)
    assert len(_cache_files(cache)) == 3


def test_corrupt_volume_raises_input_error_naming_it(tmp_path, volumes):
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("not a volume")
    dataset = build_pretrain_dataset([*volumes[:1], {"image": str(broken)}], tmp_path / "c", roi=16)
    with pytest.raises(InputError) as caught:
        dataset[1]
    assert str(caught.value).startswith(f"{broken}: ")


def test_skip_bad_drops_unreadable_volumes_with_a_warning(tmp_path, volumes, write_volume):
    text = tmp_path / "text.nii.gz"
    text.write_text("not a volume")
    noise = np.random.default_rng(0).integers(-1000, 1000, (12, 30, 26), dtype=np.int16)
    data = write_volume(tmp_path / "noise.nii.gz", noise, **SKEWED).read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])  # header intact, voxels cut
    items = [*volumes[:2], {"image": str(text)}, {"image": str(truncated)}]

    with pytest.warns(UserWarning, match="text.nii.gz"):
        dataset = build_pretrain_dataset(items, tmp_path / "c", roi=16, skip_bad=True)
    assert len(dataset) == 3  # the header check catches the text file, not the truncated one
    with pytest.warns(UserWarning, match="truncated.nii.gz"):
        sample = dataset[2]
    assert sample["views"].shape == (2, 1, 16, 16, 16)

    with pytest.raises(SmartformerError, match="none of the 1 volumes"), pytest.warns(UserWarning):
        build_pretrain_dataset([{"image": str(text)}], tmp_path / "c", roi=16, skip_bad=True)


def _batches(
    tmp_path: Path, steps: int, seed: int = 3, workers: int = 0, rank: int = 0, world_size: int = 1, start_step: int = 0
) -> list[torch.Tensor]:
    """The views of ``steps`` batches of the pretraining stream over the ``volumes`` fixture's folder."""
    settings = DataConfig(roi=(16, 16, 16), batch_size=2, num_workers=workers)
    stream = build_pretrain_loader(tmp_path / "src", settings, tmp_path / "cache", seed, rank, world_size, start_step)
    assert stream.n_volumes == 3
    batches = iter(stream.loader)
    return [next(batches)["views"] for _ in range(steps)]


def test_pretrain_loader_is_a_function_of_seed_and_step(tmp_path, volumes):
    first = _batches(tmp_path, steps=3)  # 6 samples of 3 volumes: into the second epoch
    assert first[0].shape == (2, 2, 1, 16, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, _batches(tmp_path, steps=3)))
    assert not torch.equal(first[0], _batches(tmp_path, steps=1, seed=4)[0])
    # A run resumed at step 1 sees what the uninterrupted run saw from step 1 on ...
    assert all(torch.equal(a, b) for a, b in zip(first[1:], _batches(tmp_path, steps=2, start_step=1)))
    # ... and so does one whose samples a worker process loads.
    assert all(torch.equal(a, b) for a, b in zip(first, _batches(tmp_path, steps=3, workers=1)))


def test_pretrain_loader_gives_each_process_its_own_samples(tmp_path, volumes):
    rank0, rank1 = (_batches(tmp_path, steps=1, rank=rank, world_size=2)[0] for rank in (0, 1))
    assert rank0.shape == rank1.shape == (2, 2, 1, 16, 16, 16)
    assert not torch.equal(rank0, rank1)


def _corner_body(shape=(96, 96, 96), body=40) -> dict:
    """A preprocessed-like volume: air (0) except a cube of body (0.6) in one corner."""
    image = torch.zeros(1, *shape)
    image[:, :body, :body, :body] = 0.6
    return {"image": image}


def test_min_body_fraction_redraws_views_that_are_mostly_air():
    sample = _corner_body()
    plain = view_transforms(roi=(32, 32, 32), num_views=2, max_scale=1.0)
    picky = view_transforms(roi=(32, 32, 32), num_views=2, max_scale=1.0, min_body_fraction=0.5, body_level=0.25)

    def fractions(views) -> list[float]:
        out = []
        for seed in range(30):
            views.set_random_state(seed=seed)
            views.randomize(sample["image"].shape[1:], sample["image"])
            out += [views.body_fraction(sample["image"], box) for box in views._boxes]
        return out

    assert np.mean(fractions(plain)) < 0.2  # a 40^3 body corner of a 96^3 volume
    picked = fractions(picky)
    assert np.mean(picked) > 0.5 and np.mean(np.array(picked) >= 0.5) > 0.9
    assert view_transforms(roi=(32, 32, 32), min_body_fraction=0.5)(sample)["views"].shape == (2, 1, 32, 32, 32)


def test_min_view_overlap_keeps_the_views_of_a_volume_on_shared_anatomy():
    shape = (160, 160, 160)
    independent = view_transforms(roi=(32, 32, 32), num_views=3)
    paired = view_transforms(roi=(32, 32, 32), num_views=3, min_view_overlap=0.5)

    def overlaps(views) -> list[float]:
        out = []
        for seed in range(40):
            views.set_random_state(seed=seed)
            views.randomize(shape)
            (a0, a1), rest = views._boxes[0], views._boxes[1:]
            for s, e in rest:
                out.append(min((min(e[i], a1[i]) - max(s[i], a0[i])) / (e[i] - s[i]) for i in range(3)))
        return out

    assert min(overlaps(independent)) < 0  # disjoint views happen
    assert min(overlaps(paired)) >= 0.5 - 1e-9


def test_local_views_lie_inside_the_first_global_view_and_leave_the_global_views_unchanged():
    sample = {"image": torch.rand(1, 120, 110, 100, generator=torch.Generator().manual_seed(0))}
    plain = view_transforms(roi=(64, 64, 64), num_views=2)
    multi = view_transforms(roi=(64, 64, 64), num_views=2, local_views=4, local_roi=(32, 32, 32))
    for seed in range(5):
        plain.set_random_state(seed=seed)
        multi.set_random_state(seed=seed)
        a, b = plain(dict(sample)), multi(dict(sample))
        assert "local_views" not in a and b["local_views"].shape == (4, 1, 32, 32, 32)
        assert torch.equal(a["views"], b["views"])  # drawn after the global views
        assert not torch.equal(b["local_views"][0], b["local_views"][1])
        (g0, g1) = multi._boxes[0]
        for _ in range(20):
            start, end = multi._local_box(multi._boxes[0])
            assert all(g0[i] <= start[i] < end[i] <= g1[i] for i in range(3))
            assert all(32 <= end[i] - start[i] <= min(48, g1[i] - g0[i]) for i in range(3))


def test_view_options_are_range_checked():
    with pytest.raises(ConfigError, match="local_roi"):
        view_transforms(roi=(32, 32, 32), local_views=2, local_roi=(64, 32, 32))
    with pytest.raises(ConfigError, match="min_body_fraction"):
        view_transforms(min_body_fraction=1.5)
