"""Short runs and resumed runs say what their schedules will do; config.yaml states the effective lr."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from smartformer.config import load_config
from smartformer.data.phantom import write_phantoms
from smartformer.train.engine import build_schedules, pretrain
from smartformer.train.schedules import annotate_effective_lr, read_effective_lr, schedule_warnings

FAST = [
    "data.roi=[32,32,32]",
    "data.spacing=[5.0,5.0,5.0]",
    "data.num_workers=0",
    "train.log_every=1",
    "train.snapshot_every=1000",
    "train.checkpoint_every=1000",
    "optim.freeze_last_layer_steps=1",
]

pytestmark = pytest.mark.usefixtures("one_thread")


def _warnings(overrides: list[str], max_steps: int) -> list[str]:
    config = load_config("tiny", overrides)
    config.train.max_steps = max_steps
    return schedule_warnings(config, build_schedules(config, 1))


def test_a_50_step_tiny_run_warns_of_lr_and_masking():
    lr, masking = _warnings([], 50)
    assert (
        "lr only rises and ends at its peak" in lr
        and "effective peak lr 0.0005 = optim.lr 0.00025 x global batch 2" in lr
    )
    assert "attention-guided masking never switches on" in masking
    assert _warnings([], 60) == []  # the demo's 60 steps: 10 of cosine decay, attention masking from step 50
    assert _warnings([], 500) == []
    assert len(_warnings(["masking.strategy=random"], 50)) == 1


def test_config_yaml_states_the_effective_lr_and_still_loads(tmp_path: Path):
    config = load_config("tiny")
    text = annotate_effective_lr(config.to_yaml(), config, world_size=4)
    assert read_effective_lr(text) == pytest.approx(2.5e-4 * 2 * 4)
    (tmp_path / "config.yaml").write_text(text)
    assert load_config(str(tmp_path / "config.yaml")).optim.lr == pytest.approx(2.5e-4)


def test_resume_with_more_steps_warns_that_schedules_stretch(tmp_path: Path):
    write_phantoms(tmp_path / "ph", n=2, seed=0, shape=(48, 48, 40), spacing=(5.0, 5.0, 5.0), progress=False)
    config = load_config("tiny", FAST)
    config.train.max_steps = 2
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        pretrain(tmp_path / "ph", tmp_path / "run", config, progress=False)
    assert read_effective_lr((tmp_path / "run" / "config.yaml").read_text()) == pytest.approx(5e-4)
    assert not [w for w in first if "resuming" in str(w.message)]
    config.train.max_steps = 4
    with warnings.catch_warnings(record=True) as resumed:
        warnings.simplefilter("always")
        summary = pretrain(tmp_path / "ph", tmp_path / "run", config, resume=True, progress=False)
    assert summary["step"] == 4
    (message,) = [str(w.message) for w in resumed if "resuming" in str(w.message)]
    assert "resuming at step 2 with train.max_steps=4 instead of 2" in message
    assert "momentum 1 -> " in message  # the teacher's momentum had reached 1.0 and falls back
