"""Benchmark: real training steps of a preset (``paper``: 128^3 views) on this machine (issues 13, 15).

Runs ``smartformer pretrain --config PRESET`` on the CTs of ../shared/data for ``--steps`` steps in
a temporary run directory and reports the pretraining throughput, steps/s and volumes/s (from the
run's own ``steps_per_s``, so the one-off start-up and data caching are left out), and the peak
resident memory of the training process (``getrusage`` of the child). Results go to
``benchmarks/results/PRESET_step.json``.

Usage::

    python benchmarks/paper_step.py                    # 1 step at 128^3, batch 2, 1 thread
    python benchmarks/paper_step.py --steps 2 --threads 2
    python benchmarks/paper_step.py --preset tiny --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="paper", help="the preset to train (default: paper)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/PRESET_step.json")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="the preprocessed-volume cache to use (default: a fresh one in the temporary run folder)",
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: not found; this benchmark needs ../shared/data")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "smartformer",
            "pretrain",
            "--data",
            str(DATA),
            "--out",
            str(run),
            "--config",
            args.preset,
            "--max-steps",
            str(args.steps),
            "--no-progress",
            "data.num_workers=1",
            f"train.threads={args.threads}",
            "train.snapshot_every=1000000",
            "train.head_distance_every=0",
        ]
        if args.cache_dir is not None:
            cmd.append(f"data.cache_dir={args.cache_dir}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"pretrain failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if "steps_per_s" in r][-1]
        data = yaml.safe_load((run / "config.yaml").read_text())["data"]
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    result = {
        "preset": args.preset,
        "roi": data["roi"],
        "batch_size": data["batch_size"],
        "steps": args.steps,
        "threads": args.threads,
        "seconds_per_step": 1.0 / last["steps_per_s"],
        "steps_per_s": last["steps_per_s"],
        "volumes_per_s": last["volumes_per_s"],
        "peak_rss_gb": peak_kb / 1024**2,
        "wall_seconds": wall,
        "loss": last["loss"],
        "terms": {k: v for k, v in last.items() if k.startswith("loss_")},
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out = args.out or RESULTS / f"{args.preset}_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
