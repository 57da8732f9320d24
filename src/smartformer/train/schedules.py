"""Per-step schedules (learning rate, weight decay, teacher momentum, teacher temperature)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _check_steps(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0
) -> np.ndarray:
    """Linear warm-up then cosine decay, one value per step (DINO's ``cosine_scheduler``, per step).

    Steps ``0 .. warmup_steps-1`` go linearly from ``start_warmup`` to ``base`` (both included);
    the remaining ``L = total_steps - warmup_steps`` steps follow
    ``final + (base - final) * (1 + cos(pi * i / (L - 1))) / 2``, ``i = 0 .. L-1``, so they start
    exactly at ``base`` and, unlike DINO (which stops one step short), end exactly at ``final``
    on the last step. A cosine part of a single step is ``[base]``.

    Args:
        base: value at the end of the warm-up / start of the cosine.
        final: value at the last step.
        total_steps: length of the schedule.
        warmup_steps: number of warm-up steps.
        start_warmup: value at step 0 when ``warmup_steps > 0``.

    Returns:
        float64 array of shape ``(total_steps,)``.
    """
    _check_steps(total_steps, warmup_steps)
    warmup = np.linspace(start_warmup, base, warmup_steps)
    n_cos = total_steps - warmup_steps
    if n_cos == 1:
        cosine = np.array([base], dtype=np.float64)
    else:
        # Weight of ``base``: exactly 1 at the first step and 0 at the last (cos(pi) == -1.0), so
        # both ends are exact in floating point.
        w = 0.5 * (1.0 + np.cos(np.pi * np.arange(n_cos) / (n_cos - 1)))
        cosine = base * w + final * (1.0 - w)
    return np.concatenate([warmup, cosine])


def linear_warmup_then_constant(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Linear from ``start`` to ``end`` over ``warmup_steps`` steps (both included), then ``end``.

    Used for the teacher temperature (0.04 -> 0.07), as DINO's ``teacher_temp_schedule`` per step.

    Returns:
        float64 array of shape ``(total_steps,)``.
    """
    _check_steps(total_steps, warmup_steps)
    return np.concatenate([np.linspace(start, end, warmup_steps), np.full(total_steps - warmup_steps, end)])


def momentum_schedule(total_steps: int, base: float = 0.996, final: float = 1.0) -> np.ndarray:
    """Teacher EMA momentum: cosine from ``base`` to ``final`` over the whole run.

    Not reset per epoch (SMIT's per-epoch reset is a bug). Starts at ``base`` on step 0 and is
    exactly ``final`` on the last step.

    Returns:
        float64 array of shape ``(total_steps,)``.
    """
    return cosine_schedule(base, final, total_steps)


@dataclass(frozen=True)
class Schedules:
    """The per-step schedules of a run, looked up by step.

    Attributes:
        lr: learning rate per step.
        wd: weight decay per step.
        momentum: teacher EMA momentum per step.
        teacher_temp: teacher temperature per step.
    """

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    def __post_init__(self) -> None:
        for name in ("lr", "wd", "momentum", "teacher_temp"):
            values = getattr(self, name)
            if values.ndim != 1 or values.size == 0:
                raise ValueError(f"schedule {name!r} must be a non-empty 1-D array, got shape {values.shape}")

    def at(self, step: int) -> dict[str, float]:
        """Values at ``step``; a step past the end of a schedule gets its last value.

        Returns:
            ``{"lr": ..., "wd": ..., "momentum": ..., "teacher_temp": ...}`` as Python floats.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return {
            name: float(values[min(step, values.size - 1)])
            for name, values in (
                ("lr", self.lr),
                ("wd", self.wd),
                ("momentum", self.momentum),
                ("teacher_temp", self.teacher_temp),
            )
        }
