"""Weights and other outputs get the permissions the umask gives any file (not 0600), so colleagues on a
shared server can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from smartformer.io_utils import atomic_write_bytes


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int) -> None:
    path = atomic_write_bytes(tmp_path / "export.pt", b"weights")
    (tmp_path / "plain.txt").write_text("x")
    assert _mode(path) == 0o666 & ~umask == _mode(tmp_path / "plain.txt")


def test_segmentation_weights_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from smartformer.downstream.segmentation import CONFIG_FILE, WEIGHTS_FILE, SegmentationConfig, _save_model

    config = SegmentationConfig(label_ids=[1], encoder={}, spacing=[2.0] * 3, window="wide", roi=[32] * 3)
    _save_model(torch.nn.Linear(2, 2), config, tmp_path)
    assert _mode(tmp_path / WEIGHTS_FILE) == 0o666 & ~umask == _mode(tmp_path / CONFIG_FILE)


def test_save_pretrained_weights_follow_the_umask(tmp_path: Path, umask: int) -> None:
    from smartformer.models.smartformer import WEIGHTS_NAME, SMARTFormer

    SMARTFormer.from_preset("tiny").save_pretrained(tmp_path / "teacher")
    assert _mode(tmp_path / "teacher" / WEIGHTS_NAME) == 0o666 & ~umask
