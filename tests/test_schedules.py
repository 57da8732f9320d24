"""Per-step schedules: endpoints, shape, monotonicity, whole-run momentum, lookup."""

from __future__ import annotations

import numpy as np
import pytest

from smartformer.train.schedules import (
    Schedules,
    cosine_schedule,
    linear_warmup_then_constant,
    momentum_schedule,
)


def test_cosine_schedule_warmup_then_cosine() -> None:
    s = cosine_schedule(1.0, 0.1, total_steps=15, warmup_steps=5, start_warmup=0.2)
    assert s.shape == (15,)
    np.testing.assert_allclose(s[:5], [0.2, 0.4, 0.6, 0.8, 1.0])
    assert s[5] == 1.0 and s[-1] == 0.1
    assert s[10] == pytest.approx(0.1 + 0.45 * (1.0 + np.cos(np.pi * 5 / 9)))  # step i = 5 of the 10-step cosine
    assert np.all(np.diff(s[5:]) < 0)


def test_cosine_schedule_midpoint_and_no_warmup() -> None:
    s = cosine_schedule(2.0, 0.0, total_steps=11)
    assert s[0] == 2.0 and s[-1] == 0.0
    assert s[5] == pytest.approx(1.0)  # cos(pi/2) at the middle step
    assert s[2] == pytest.approx(1.0 + np.cos(np.pi * 2 / 10))
    assert cosine_schedule(0.5, 0.0, total_steps=4, warmup_steps=4).tolist() == pytest.approx([0, 1 / 6, 1 / 3, 0.5])
    assert cosine_schedule(0.5, 0.0, total_steps=1).tolist() == [0.5]


def test_cosine_schedule_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=4)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, total_steps=0)


def test_teacher_temperature_warmup() -> None:
    t = linear_warmup_then_constant(0.04, 0.07, warmup_steps=4, total_steps=10)
    assert t.shape == (10,)
    np.testing.assert_allclose(t[:4], [0.04, 0.05, 0.06, 0.07])
    assert np.all(t[3:] == 0.07)
    assert np.all(np.diff(t) >= 0)


def test_momentum_runs_once_over_the_whole_run() -> None:
    for total in (2, 7, 1000, 12345):
        m = momentum_schedule(total)
        assert m.shape == (total,)
        assert m[0] == 0.996 and m[-1] == 1.0
        assert np.all(np.diff(m) > 0)  # strictly increasing: never reset (per epoch or otherwise)
    assert momentum_schedule(1001)[500] == pytest.approx(0.998)


def test_schedules_lookup_clamps_past_the_end() -> None:
    sched = Schedules(
        lr=cosine_schedule(1e-3, 1e-5, 10, warmup_steps=2),
        wd=cosine_schedule(0.04, 0.4, 10),
        momentum=momentum_schedule(10),
        teacher_temp=linear_warmup_then_constant(0.04, 0.07, 3, 10),
    )
    first = sched.at(0)
    assert first == {"lr": 0.0, "wd": 0.04, "momentum": 0.996, "teacher_temp": 0.04}
    assert all(isinstance(v, float) for v in first.values())
    last = sched.at(9)
    assert last == {"lr": pytest.approx(1e-5), "wd": pytest.approx(0.4), "momentum": 1.0, "teacher_temp": 0.07}
    assert sched.at(50) == last
    with pytest.raises(ValueError, match="step"):
        sched.at(-1)
    with pytest.raises(ValueError, match="non-empty"):
        Schedules(lr=np.array([]), wd=np.ones(2), momentum=np.ones(2), teacher_temp=np.ones(2))
