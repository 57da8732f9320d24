"""Run directories: exclusive lock, atomic full-state checkpoints, RNG state capture.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so it loads with
``torch.load(weights_only=True)``: resuming never executes code from the file.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smartformer.errors import SmartformerError
from smartformer.io_utils import atomic_write_bytes, make_dir, output_errors, torch_bytes
from smartformer.models.convert import load_weights

__all__ = [
    "RunLock",
    "save_checkpoint",
    "load_checkpoint",
    "last_checkpoint",
    "resume_checkpoint",
    "step_checkpoints",
    "is_run_checkpoint",
    "check_state_fits",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
_STEP_FILE = re.compile(r"step_(\d+)\.pt")

#: File descriptors of run locks this process holds. A forked child (a DataLoader worker) closes
#: its copies at once, so that the lock lives exactly as long as the process that took it: a
#: ``flock`` belongs to the open file, and would otherwise stay held by orphaned workers for
#: seconds after the main process is killed.
_HELD_LOCK_FDS: set[int] = set()


def _release_inherited_locks() -> None:
    if not _HELD_LOCK_FDS:
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd in _HELD_LOCK_FDS:
        os.dup2(devnull, fd)  # drops this process's reference to the lock; the fd number stays valid
    os.close(devnull)
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_release_inherited_locks)


class RunLock:
    """An exclusive ``flock`` on ``RUN_DIR/.lock`` held for the whole run.

    A second process writing into the same run directory is refused at once; the lock goes
    away with the process, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self._fh: Any = None

    def __enter__(self) -> RunLock:
        make_dir(self.path.parent)
        with output_errors(self.path, "cannot create the run lock"):
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
        _HELD_LOCK_FDS.add(fh.fileno())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            _HELD_LOCK_FDS.discard(self._fh.fileno())
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
        (
            "MT19937",
            state["numpy"].numpy().astype(np.uint32),
            state["numpy_pos"],
            int(state["numpy_gauss"][0]),
            float(state["numpy_gauss"][1]),
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def save_checkpoint(state: dict[str, Any], run_dir: Path, step: int, keep: bool) -> Path:
    """Write ``checkpoints/last.pt`` atomically (temp file, fsync, rename); also ``step_N.pt`` if ``keep``.

    ``last.pt`` and ``step_N.pt`` are independent files (not links), so damaging or replacing
    one never changes the other.

    Raises:
        OutputError: the checkpoint folder cannot be written (full disk, ...); no temp file stays.
    """
    folder = make_dir(run_dir / CHECKPOINT_DIR)
    data = torch_bytes(state)
    if keep:
        atomic_write_bytes(folder / f"step_{step:07d}.pt", data)
    return atomic_write_bytes(folder / LAST, data)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only``: no code runs)."""
    state = load_weights(path)
    if not isinstance(state, dict) or "student" not in state or "step" not in state:
        raise SmartformerError(f"{path}: not a smartformer training checkpoint")
    return state


def last_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The ``step_N.pt`` files of a run, newest step first."""
    folder = run_dir / CHECKPOINT_DIR
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := _STEP_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def resume_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume ``run_dir`` from, loaded and verified; None if the run has none.

    ``last.pt`` is used when it loads; when it is missing or corrupt (a truncated copy, a full
    disk), the newest ``step_N.pt`` that loads is taken instead, with a warning that names both.

    Raises:
        SmartformerError: checkpoints exist but none of them loads.
    """
    candidates = [p for p in [last_checkpoint(run_dir)] if p is not None] + step_checkpoints(run_dir)
    problems: list[str] = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except SmartformerError as exc:
            text = " ".join(str(exc).split())
            problems.append(text if len(text) <= 200 else text[:197] + "...")  # torch's reasons run long
            continue
        if problems:
            warnings.warn(
                f"{problems[0]}; resuming from {path.name} (step {int(state['step'])}), the newest "
                "checkpoint that loads",
                stacklevel=2,
            )
        return path, state
    if problems:
        raise SmartformerError(
            f"{run_dir}: no checkpoint of this run loads ({problems[0]}"
            + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
            + ")"
        )
    return None


def is_run_checkpoint(path: Path) -> bool:
    """True if ``path`` is (or would be) a checkpoint file of a run: ``RUN_DIR/checkpoints/*.pt``."""
    return path.parent.name == CHECKPOINT_DIR and (path.parent.parent / "config.yaml").is_file()


def check_state_fits(expected: Mapping[str, Any], state: Mapping[str, Any], config: str, checkpoint: str) -> None:
    """Refuse, in one line, weights whose keys or shapes do not fit the network a config builds.

    ``expected`` is the network's ``state_dict()``; ``config`` and ``checkpoint`` name where the
    architecture and the weights come from, for the message.

    Raises:
        SmartformerError: naming both, how many tensors disagree, and the first disagreement.
    """
    wrong = [
        (k, tuple(v.shape), tuple(state[k].shape))
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if not (wrong or missing or unexpected):
        return
    if wrong:
        key, want, got = wrong[0]
        detail = (
            f"{len(wrong)} tensor(s) differ in shape, e.g. {key} is {list(got)} in the checkpoint, "
            f"{list(want)} for the config"
        )
    elif missing:
        detail = f"{len(missing)} tensor(s) of the config are missing from the checkpoint, e.g. {missing[0]}"
    else:
        detail = f"the checkpoint has {len(unexpected)} tensor(s) the config does not, e.g. {unexpected[0]}"
    raise SmartformerError(f"{checkpoint} does not fit {config}: {detail}")
