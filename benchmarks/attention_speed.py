"""Benchmark: ``smartformer attention`` end to end on a full chest CT (issue 6's speed target).

The target: the attention maps of ../shared/data/chest/elastix_00.nii.gz (486 x 358 x 141
voxels) with the ``base`` preset in at most 60 s on 2 CPU cores, end to end -- the command a
user types, from process start to the last file written (NIfTI mean map, 4D per-head map, PNG).

The model is the ``base`` preset with seeded random weights (the cost does not depend on the
weights), saved with ``save_pretrained`` like any checkpoint. Each repeat runs the real CLI in
a fresh process; a separate in-process pass splits the time into reading, the sliding-window
network passes, resampling back onto the CT's grid, and writing.

Usage::

    python benchmarks/attention_speed.py --repeats 3 --json benchmarks/results/attention_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain_step import hardware  # same folder; run as a script

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGET_S = 60.0


def phases(checkpoint: Path, image: Path, out: Path, overlap: float) -> dict[str, float]:
    """Seconds per phase of one in-process run (the CLI's own steps, timed separately)."""
    import monai.inferers.utils as sw_utils

    import smartformer.analysis.attention as attention
    from smartformer.data.io import read_ct
    from smartformer.models.smartformer import SMARTFormer

    times: dict[str, float] = {}
    network = sw_utils.sliding_window_inference

    def timed_network(*args, **kwargs):
        t = time.perf_counter()
        result = network(*args, **kwargs)
        times["network"] = time.perf_counter() - t
        return result

    attention.sliding_window_inference = timed_network
    try:
        t = time.perf_counter()
        model = SMARTFormer.from_pretrained(checkpoint).eval()
        times["load_model"] = time.perf_counter() - t
        t = time.perf_counter()
        ct = read_ct(image)
        times["read_ct"] = time.perf_counter() - t
        t = time.perf_counter()
        result = attention.attention_volume(model, ct, overlap=overlap)
        times["prep_and_resample"] = time.perf_counter() - t - times["network"]
        t = time.perf_counter()
        attention.write_attention(result, out, stem="phases")
        times["write"] = time.perf_counter() - t
    finally:
        attention.sliding_window_inference = network
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DATA / "chest" / "elastix_00.nii.gz")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.image.is_file():
        raise SystemExit(f"{args.image}: not found (this benchmark needs ../shared/data)")

    from smartformer.models.smartformer import SMARTFormer

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "model"
        torch.manual_seed(0)
        SMARTFormer.from_preset(args.preset).save_pretrained(checkpoint)
        command = [sys.executable, "-m", "smartformer", "attention", "--checkpoint", str(checkpoint),
                   "--image", str(args.image), "--out", str(Path(tmp) / "out"), "--overlap", str(args.overlap)]
        walls = []
        for i in range(args.repeats):
            t = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            walls.append(time.perf_counter() - t)
            print(f"run {i + 1}/{args.repeats}: {walls[-1]:.1f} s end to end", flush=True)
        split = phases(checkpoint, args.image, Path(tmp) / "phases", args.overlap)
        sizes = {p.name: p.stat().st_size for p in (Path(tmp) / "out").iterdir()}

    import nibabel as nib

    result = {
        "image": str(args.image.name),
        "shape": list(nib.load(str(args.image)).shape),
        "preset": args.preset,
        "overlap": args.overlap,
        "end_to_end_s": {"best": min(walls), "median": statistics.median(walls), "all": walls},
        "phases_s": split,
        "output_bytes": sizes,
        "target_s": TARGET_S,
        "meets_target": min(walls) <= TARGET_S,
        "hardware": hardware(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
