"""Run directories: exclusive lock, atomic full-state checkpoints, RNG state capture.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
``torch.load(weights_only=True)``: resuming never executes code from the file.
"""

from __future__ import annotations

import fcntl
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smartformer.errors import SmartformerError
from smartformer.models.convert import load_weights

__all__ = ["RunLock", "save_checkpoint", "load_checkpoint", "last_checkpoint", "rng_state", "set_rng_state"]

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` held for the whole run.

    A second process writing into the same run directory is refused at once; the lock goes
    away with the process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fh: Any = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise SmartformerError(f"{self.path.parent}: run directory is in use by {owner}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Python, NumPy, torch (CPU, CUDA) and an optional generator's state, as plain types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
         int(state["numpy_gauss"][0]), float(state["numpy_gauss"][1]))
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: bool) -> Path:
    """Write ``checkpoints/last.pt`` atomically (temp file, fsync, rename); also ``step_N.pt`` if ``keep``."""
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{LAST}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if keep:
        # A hard link to the finished, fsynced file: the same bytes under a second name.
        step_file = folder / f"step_{step:07d}.pt"
        step_file.unlink(missing_ok=True)
        os.link(tmp, step_file)
    tmp.replace(folder / LAST)
    return folder / LAST


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs)."""
    state = load_weights(path)
    if not isinstance(state, dict) or "student" not in state or "step" not in state:
        raise SmartformerError(f"{path}: not a smartformer training checkpoint")
    return state


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None
