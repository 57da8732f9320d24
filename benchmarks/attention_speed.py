"""Benchmark: the attention maps of a full CT, end to end, per phase, in both modes (issues 6 and 15).

The target (issue 15): the attention maps of ../shared/data/chest/elastix_00.nii.gz (486 x 358 x
141 voxels) with the ``base`` preset in at most 20 s on 2 CPU cores, end to end -- from process
start to the last file written (NIfTI mean map, 4D per-head map, PNG) -- with maps that agree with
the sliding-window maps of before (voxel Pearson >= 0.9 on elastix_00 and on 5 STS cases) or
localize the STS tumours at least as well.

Timing: the model is the ``base`` preset with seeded random weights (the cost does not depend on
the weights), saved with ``save_pretrained`` like any checkpoint. Each repeat runs, in a fresh
process, what ``smartformer attention`` runs (load, read, ``attention_volume``, ``write_attention``)
with ``mode=whole`` and ``mode=sliding`` in turn, and splits its time into phases: process start +
imports, loading the model, reading the CT, preprocessing, the network (``whole``: the backbone
once over the CT + the semantic attention per window; ``sliding``: the network per window), the
upsampling and Gaussian blending of the windows' maps, resampling back onto the CT's grid, and
writing. ``--cli`` adds fresh-process runs of the real command (its default mode).

Agreement (``--agreement``, on by default): the mean maps of both modes on the CT's grid, voxel
Pearson, for elastix_00 and STS_001..005, with the shipped ``smart-tiny-ct`` and with seeded
random ``base`` weights; for the STS cases also each mode's tumour AUROC inside the body.

Usage::

    python benchmarks/attention_speed.py --repeats 2 --json benchmarks/results/attention_speed.json
    python benchmarks/attention_speed.py --device cuda --repeats 2 --no-agreement
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
from pretrain_step import hardware  # noqa: E402  (same folder; run as a script)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TARGET_S = 20.0
MODES = ("whole", "sliding")
STS_CASES = ("STS_001", "STS_002", "STS_003", "STS_004", "STS_005")


def child(args: argparse.Namespace) -> None:
    """One run of what ``smartformer attention`` does, in this (fresh) process; prints its phases as JSON."""
    import smartformer.analysis.attention as attention
    from smartformer.data.io import read_ct
    from smartformer.models.smartformer import SMARTFormer

    spent: dict[str, float] = defaultdict(float)

    def timed(owner, name: str, phase: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                spent[phase] += time.perf_counter() - t

        setattr(owner, name, wrapper)

    timed(SMARTFormer, "semantic_input", "network_whole_volume")  # whole: the backbone once
    timed(SMARTFormer, "attention_maps", "network_per_window")  # sliding: the whole network per window
    timed(SMARTFormer, "token_attention_maps", "network_per_window")  # whole: the semantic attention per window
    timed(attention, "sliding_window_inference", "windows")  # includes the per-window network calls
    timed(attention, "resample_to_grid", "resample_to_ct_grid")
    t = time.perf_counter()
    imports = t - T0  # torch, smartformer, MONAI
    model = SMARTFormer.from_pretrained(args.checkpoint).eval()
    spent["load_model"] = time.perf_counter() - t
    t = time.perf_counter()
    ct = read_ct(args.image)
    spent["read_ct"] = time.perf_counter() - t
    t = time.perf_counter()
    result = attention.attention_volume(model, ct, mode=args.child, device=args.device)
    total = time.perf_counter() - t
    spent["network_whole_volume"] += 0.0  # present (0) in sliding mode too
    windows = spent.pop("windows")
    spent["upsample_and_blend"] = windows - spent["network_per_window"]
    spent["preprocess"] = total - spent["network_whole_volume"] - windows - spent["resample_to_ct_grid"]
    t = time.perf_counter()
    attention.write_attention(result, args.out, stem=args.child)
    spent["write"] = time.perf_counter() - t
    spent["imports"] = imports
    print(json.dumps(dict(spent)))


def run_child(mode: str, checkpoint: Path, image: Path, out: Path, device: str) -> dict[str, float]:
    t = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--checkpoint",
            str(checkpoint),
            "--image",
            str(image),
            "--out",
            str(out),
            "--device",
            device,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    phases = json.loads(done.stdout.strip().splitlines()[-1])
    phases["process_start_and_imports"] = wall - sum(v for k, v in phases.items() if k != "imports")
    del phases["imports"]
    phases["end_to_end"] = wall
    return phases


def pearson(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def agreement(device: str) -> list[dict]:
    """Pearson of the two modes' mean maps, and the STS tumour AUROC of each."""
    from smartformer.analysis.attention import attention_volume
    from smartformer.analysis.localization import auroc, body_region
    from smartformer.data.io import read_ct
    from smartformer.models.smartformer import SMARTFormer

    torch.manual_seed(0)
    models = {
        "smart-tiny-ct": SMARTFormer.from_pretrained("smart-tiny-ct"),
        "random base": SMARTFormer.from_preset("base", heads=False, decoder=False),
    }
    cases = [("elastix_00", DATA / "chest" / "elastix_00.nii.gz", None)]
    cases += [(c, DATA / "sts" / c / "ct.nii.gz", DATA / "sts" / c / "tumor.nii.gz") for c in STS_CASES]
    rows = []
    for name, model in models.items():
        for case, image, mask_path in cases:
            if not image.is_file():
                print(f"{case}: not found, skipped", flush=True)
                continue
            ct = read_ct(image)
            maps = {mode: attention_volume(model, ct, mode=mode, device=device).mean for mode in MODES}
            row = {"model": name, "case": case, "pearson": pearson(maps["whole"], maps["sliding"])}
            if mask_path is not None:
                lesion = read_ct(mask_path).as_tensor()[0].numpy() > 0.5  # read as the CT: same grid
                region = body_region(ct.as_tensor()[0].numpy(), lesion)
                for mode in MODES:
                    row[f"auroc_{mode}"] = auroc(maps[mode], lesion, region)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, default=DATA / "chest" / "elastix_00.nii.gz")
    parser.add_argument("--preset", default="base")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cli", action="store_true", help="also time the real `smartformer attention` command")
    parser.add_argument("--no-agreement", dest="agreement", action="store_false")
    parser.add_argument("--no-timing", dest="timing", action="store_false")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not args.image.is_file():
        raise SystemExit(f"{args.image}: not found (this benchmark needs ../shared/data)")

    from smartformer.models.smartformer import SMARTFormer

    result: dict = {"image": args.image.name, "preset": args.preset, "device": args.device, "target_s": TARGET_S}
    if args.timing:
        runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
        cli: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(tmp) / "model"
            torch.manual_seed(0)
            SMARTFormer.from_preset(args.preset).save_pretrained(checkpoint)
            for i in range(args.repeats):
                for mode in MODES:  # interleaved, so that both modes see the same machine
                    phases = run_child(mode, checkpoint, args.image, Path(tmp) / "out", args.device)
                    runs[mode].append(phases)
                    print(
                        f"run {i + 1}/{args.repeats} {mode:>7}: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()),
                        flush=True,
                    )
                if args.cli:
                    t = time.perf_counter()
                    subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "smartformer",
                            "attention",
                            "--checkpoint",
                            str(checkpoint),
                            "--image",
                            str(args.image),
                            "--out",
                            str(Path(tmp) / "cli"),
                            "--no-progress",
                        ],
                        check=True,
                        stdout=subprocess.DEVNULL,
                    )
                    cli.append(time.perf_counter() - t)
                    print(f"run {i + 1}/{args.repeats} CLI (default mode): {cli[-1]:.1f} s", flush=True)
            sizes = {p.name: p.stat().st_size for p in (Path(tmp) / "out").iterdir()}
        result["runs"] = runs
        result["best_s"] = {mode: min(r["end_to_end"] for r in runs[mode]) for mode in MODES}
        result["median_phases_s"] = {
            mode: {k: statistics.median(r[k] for r in runs[mode]) for k in runs[mode][0]} for mode in MODES
        }
        if cli:
            result["cli_s"] = cli
        result["output_bytes"] = sizes
        result["meets_target"] = {mode: result["best_s"][mode] <= TARGET_S for mode in MODES}
        print("\nmedian seconds per phase:")
        keys = list(runs["whole"][0])
        print(f"{'phase':<28}" + "".join(f"{m:>10}" for m in MODES))
        for k in keys:
            print(f"{k:<28}" + "".join(f"{result['median_phases_s'][m][k]:>10.2f}" for m in MODES))
    if args.agreement:
        rows = agreement(args.device)
        result["agreement"] = rows
        for row in rows:
            extra = "".join(f"  AUROC {m} {row[f'auroc_{m}']:.3f}" for m in MODES if f"auroc_{m}" in row)
            print(f"{row['model']:<14} {row['case']:<11} Pearson whole vs sliding {row['pearson']:.3f}{extra}")
    result["hardware"] = hardware()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
