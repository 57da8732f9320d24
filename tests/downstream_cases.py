"""Phantom data for the downstream command tests: lesion crops vs crops of air outside the body.

The phantoms are written once per test session (a few seconds) and shared by the probe, finetune and
features tests. Each phantom case is one patient with two lesions and two air points; the labels are
the strings ``air`` (class 0) and ``lesion`` (class 1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from smartformer.cli import main
from smartformer.data.io import read_ct
from smartformer.data.phantom import write_phantoms
from smartformer.models.smartformer import SMARTFormer

N_PHANTOMS = 6
#: Fast crop options for every command: 32^3 voxels of 3 mm, no progress bars.
FAST = ["--crop", "32", "--spacing", "3", "--no-progress", "--batch-size", "8"]


def run_downstream(command: str, data: Path, checkpoint: str | Path | list, out: Path, *options: str) -> int:
    """``smartformer COMMAND --data DATA --checkpoint CHECKPOINT... --out OUT OPTIONS... FAST``, in this
    process; its exit status. ``checkpoint`` is one checkpoint or a list of them."""
    checkpoints = checkpoint if isinstance(checkpoint, list) else [checkpoint]
    argv = [command, "--data", str(data), "--checkpoint", *map(str, checkpoints), "--out", str(out)]
    return main([*argv, *options, *FAST])


def _air_points(case_dir: Path, n: int, rng: np.random.Generator) -> list[list[float]]:
    """World mm of ``n`` air voxels (label 0) at least 30 mm from the body: crops that are mostly air."""
    labels = read_ct(case_dir / "labels.nii.gz")
    affine = np.asarray(labels.affine)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    distance = ndimage.distance_transform_edt(labels.as_tensor()[0].numpy() == 0, sampling=spacing)
    voxels = np.argwhere(distance > 30)
    picked = voxels[rng.choice(len(voxels), size=n, replace=False)]
    return (picked @ affine[:3, :3].T + affine[:3, 3]).round(1).tolist()


def write_case_csv(root: Path) -> Path:
    """Phantoms under ``root`` and ``root/cases.csv`` (image relative, centre in mm, label, patient,
    an extra column)."""
    write_phantoms(
        root, n=N_PHANTOMS, seed=11, shape=(48, 48, 48), spacing=(6.0, 6.0, 6.0), progress=False, n_lesions=2
    )
    rng = np.random.default_rng(0)
    lines = ["image,label,center_x,center_y,center_z,patient,note"]
    for i in range(N_PHANTOMS):
        case_dir = root / f"case_{i:03d}"
        found = json.loads((case_dir / "labels.json").read_text())["lesions"]
        lesions = np.asarray([lesion["centre_mm"] for lesion in found])
        for x, y, z in lesions.tolist():
            lines.append(f"case_{i:03d}/ct.nii.gz,lesion,{x},{y},{z},p{i},ignored")
        for x, y, z in _air_points(case_dir, len(lesions), rng):
            lines.append(f"case_{i:03d}/ct.nii.gz,air,{x},{y},{z},p{i},ignored")
    csv = root / "cases.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


@pytest.fixture(scope="session")
def case_csv(tmp_path_factory) -> Path:
    """The shared phantom CSV (written on first use in a session)."""
    root = tmp_path_factory.getbasetemp() / "downstream_phantoms"
    csv = root / "cases.csv"
    if not csv.is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_case_csv(root)
    return csv


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A seeded tiny model written with save_pretrained."""
    import torch

    path = tmp_path_factory.getbasetemp() / "downstream_tiny"
    if not (path / "config.json").is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            SMARTFormer.from_preset("tiny").save_pretrained(path)
    return path
