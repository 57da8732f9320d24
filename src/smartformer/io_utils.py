"""Writing output files safely: atomic replacement, and one-line errors for output locations.

:func:`atomic_write` is the one way smartformer writes a file that must never be seen half
written (checkpoints, cache entries, exported weights): the bytes go to a temporary file in the
same folder, are flushed and fsynced, and only then renamed over the target (``os.replace``,
atomic on POSIX). On any failure the temporary file is removed and the target is untouched. The
file gets the permissions the umask gives any other file (not the temporary file's 0600), so
colleagues on a shared server can read weights as they read the rest.
Operating-system errors (a full disk, a path under a regular file, a read-only folder) become
:class:`~smartformer.errors.OutputError`, one line naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from smartformer.errors import OutputError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "torch_bytes",
    "output_error",
    "os_reason",
    "make_dir",
    "output_errors",
    "current_umask",
]

_REASONS = {
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "exists and is not a folder",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
}


def os_reason(exc: OSError) -> str:
    """What an ``OSError`` means, in words (e.g. "no space left on the device (disk full)")."""
    return _REASONS.get(exc.errno or 0, exc.strerror or str(exc))


def output_error(path: str | Path, exc: OSError, doing: str = "cannot write") -> OutputError:
    """A one-line :class:`OutputError` for ``exc`` raised while writing ``path``."""
    reason = os_reason(exc)
    where = exc.filename if exc.errno == errno.ENOTDIR and exc.filename else path
    return OutputError(where, f"{doing}: {reason}")


@contextlib.contextmanager
def output_errors(path: str | Path, doing: str = "cannot write") -> Iterator[None]:
    """Turn an ``OSError`` raised in the block into a one-line :class:`OutputError` naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise output_error(path, exc, doing) from None


def make_dir(path: str | Path) -> Path:
    """``mkdir -p path``, with a one-line :class:`OutputError` (e.g. the path is an existing file)."""
    path = Path(path)
    with output_errors(path, "cannot create this folder"):
        path.mkdir(parents=True, exist_ok=True)
    return path


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary file in the same folder,
    which is fsynced and renamed over ``path``; on any failure it is removed, ``path`` untouched.

    Raises:
        OutputError: the folder cannot be written (full disk, read-only, not a folder, ...).
    """
    path = Path(path)
    make_dir(path.parent)
    with output_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: give it the mode open() would
    try:
        with output_errors(path):
            with os.fdopen(fd, "wb", buffering=0) as fh:
                write(_RawWriter(fh))
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def current_umask() -> int:
    """The process's umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """:func:`atomic_write` of a bytes-like object."""
    return atomic_write(path, lambda fh: fh.write(data))


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` into memory, for :func:`atomic_write_bytes` (one serialisation, many files).

    Serialising first keeps torch's own writer away from the disk, so that a full disk surfaces
    as the operating system's error, not as a wrapped ``RuntimeError``.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class _RawWriter(io.RawIOBase):
    """A writable file object whose writes go through :func:`_write_all` (every byte, or OSError)."""

    def __init__(self, fh: Any) -> None:
        super().__init__()
        self._fh = fh

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        _write_all(self._fh.fileno(), view)
        return len(view)
