"""What ``smartformer data check`` finds out about each volume of a data source, read as pretraining reads it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from smartformer.data.dataset import content_problem
from smartformer.data.io import read_ct
from smartformer.errors import InputError

__all__ = ["VolumeReport", "check_volume", "summarize", "write_check_report"]


@dataclass
class VolumeReport:
    """What ``data check`` found out about one volume."""

    path: str
    status: str  # "ok" or the reason the volume cannot be used
    shape: tuple[int, int, int] | None = None
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    hu_min: float | None = None
    hu_max: float | None = None
    warning: str | None = None  # usable, but pretraining would learn nothing from it (constant)

    @property
    def ok(self) -> bool:
        """Whether the volume can be used."""
        return self.status == "ok"


def check_volume(path: str) -> VolumeReport:
    """Read one volume fully; a reading problem becomes the report's status, not an exception."""
    try:
        image = read_ct(path)
    except InputError as exc:
        return VolumeReport(path=path, status=" ".join(exc.reason.split()))
    except Exception as exc:  # a reader failure we did not foresee must not stop the other files
        detail = " ".join(str(exc).split())[:200]
        return VolumeReport(path=path, status=f"cannot be read ({type(exc).__name__}: {detail})")
    return VolumeReport(
        path=path,
        status="ok",
        shape=tuple(int(n) for n in image.shape[1:]),
        spacing=tuple(round(float(s), 4) for s in image.meta["spacing"]),
        orientation=image.meta["orientation"],
        hu_min=float(image.min()),
        hu_max=float(image.max()),
        warning=content_problem(image, image.meta["spacing"]),
    )


def summarize(reports: list[VolumeReport]) -> dict[str, Any]:
    """Counts, the failed paths with reasons, and per-axis shape and spacing ranges of good ones."""
    good = [r for r in reports if r.ok]
    summary: dict[str, Any] = {
        "n_ok": len(good),
        "n_failed": len(reports) - len(good),
        "failed": {r.path: r.status for r in reports if not r.ok},
    }
    if good:
        for field in ("shape", "spacing"):
            columns = list(zip(*(getattr(r, field) for r in good)))
            summary[f"{field}_min"] = [min(c) for c in columns]
            summary[f"{field}_max"] = [max(c) for c in columns]
    return summary


def write_check_report(path: Path, source: str, reports: list[VolumeReport], summary: dict[str, Any]) -> None:
    """``path`` as JSON: the source, every volume's report and the :func:`summarize` of them."""
    content = {"source": str(source), "volumes": [asdict(r) for r in reports], "summary": summary}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    except OSError as exc:
        raise InputError(path, f"cannot write the JSON report ({exc.strerror})") from None
