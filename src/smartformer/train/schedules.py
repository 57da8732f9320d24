"""Per-step schedules (learning rate, weight decay, teacher momentum, teacher temperature)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

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


# --- what a user would not expect of a run's schedules --------------------------------------

#: How ``config.yaml`` states the effective peak lr (see :func:`annotate_effective_lr`).
EFFECTIVE_LR_NOTE = "effective peak lr"


def effective_lr(config: Any, world_size: int = 1) -> float:
    """The peak lr a run uses: ``optim.lr`` is per sample and scaled by the global batch
    (``data.batch_size`` x processes), as in DINO."""
    return float(config.optim.lr) * int(config.data.batch_size) * int(world_size)


def _lr_note(config: Any, world_size: int) -> str:
    return (
        f"{EFFECTIVE_LR_NOTE} {effective_lr(config, world_size):.6g} = optim.lr {config.optim.lr:.6g} x global "
        f"batch {config.data.batch_size * world_size} ({config.data.batch_size} per process x {world_size})"
    )


def annotate_effective_lr(text: str, config: Any, world_size: int = 1) -> str:
    """``config.yaml`` text with the effective peak lr as a comment on ``optim.lr``'s line (still valid YAML)."""
    lines, section = text.splitlines(), None
    for i, line in enumerate(lines):
        if not line.startswith(" "):
            section = line.split(":")[0]
        elif section == "optim" and line.strip().startswith("lr:"):
            lines[i] = f"{line}  # per sample; {_lr_note(config, world_size)}"
            break
    return "\n".join(lines) + "\n"


def read_effective_lr(text: str) -> float | None:
    """The effective peak lr stated in a ``config.yaml`` written by :func:`annotate_effective_lr`, if any."""
    found = re.search(rf"{EFFECTIVE_LR_NOTE} ([0-9.eE+-]+)", text)
    return float(found.group(1)) if found else None


def schedule_warnings(
    config: Any, schedules: Schedules, world_size: int = 1, start_step: int = 0, previous: dict[str, Any] | None = None
) -> list[str]:
    """One line for each way the run's schedules will surprise: a warm-up that fills the whole
    run (the lr only rises; attention-guided masking never starts) and, when resuming, schedules
    re-stretched to a changed ``train.max_steps``. (The teacher temperature's warm-up is shortened
    to the run, so it always arrives.)

    Args:
        config: the run's :class:`~smartformer.config.PretrainConfig`.
        schedules: the schedules the run will follow (:func:`~smartformer.train.engine.build_schedules`).
        world_size: processes, for the effective lr.
        start_step: the step the run starts (or resumes) at.
        previous: the schedules stored in the checkpoint being resumed (name -> per-step values).
    """
    steps, o, m = config.train.max_steps, config.optim, config.masking
    out: list[str] = []
    if o.warmup_fraction == 0 and o.warmup_steps >= steps - 1:
        out.append(
            f"optim.warmup_steps={o.warmup_steps} spans the whole run of train.max_steps={steps}: the lr only "
            f"rises and ends at its peak, {_lr_note(config, world_size)}; give more steps or a shorter "
            "warm-up for a cosine decay"
        )
    if m.strategy.startswith("attention") and m.warmup_steps >= steps:
        out.append(
            f"masking.strategy={m.strategy} starts after masking.warmup_steps={m.warmup_steps}, but the run "
            f"has train.max_steps={steps}: it masks at random throughout (attention-guided masking never "
            "switches on)"
        )
    if previous is not None and start_step > 0:
        old_length = len(previous["lr"])
        if old_length != steps:

            def at(values: Any, step: int) -> float:
                return float(values[min(step, len(values) - 1)])

            now = schedules.at(start_step)
            changes = [
                f"{name} {at(previous[name], start_step):.6g} -> {now[name]:.6g}"
                for name in ("lr", "momentum", "teacher_temp", "wd")
                if name in previous
                and not math.isclose(at(previous[name], start_step), now[name], rel_tol=1e-9, abs_tol=1e-12)
            ]
            out.append(
                f"resuming at step {start_step} with train.max_steps={steps} instead of {old_length}: every "
                f"schedule is stretched over the new length"
                + (f" ({', '.join(changes)} at this step)" if changes else "")
            )
    return out
