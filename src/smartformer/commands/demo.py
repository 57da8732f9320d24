"""``smartformer demo``: the main job on built-in data, end to end, on a laptop CPU in minutes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="phantom CTs -> SMART pretraining (tiny) -> teacher attention maps",
        description=(
            "Write a few synthetic chest/abdomen CTs with tumours, pretrain the tiny SMARTFormer on "
            "them, and write attention maps (NIfTI on the CT's grid + PNG) for a phantom with a "
            "tumour: those of smart-tiny-ct, the model shipped with smartformer (pretrained on real "
            "CTs for hours), and those of the teacher just trained. Everything lands in --out."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default: runs/demo)")
    p.add_argument("-n", "--cases", type=int, default=4, help="phantom CTs to generate (default: 4)")
    p.add_argument(
        "--max-steps", type=int, default=60, help="pretraining steps (default: 60, a few minutes on 2 cores)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of phantoms and training (default: 0)")
    p.add_argument(
        "--spacing",
        type=float,
        default=2.0,
        help="isotropic voxel size in mm for training and attention maps (default: 2; coarser is faster)",
    )
    p.add_argument("--fresh", action="store_true", help="delete a previous demo run in --out first")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import shutil

    import nibabel as nib

    from smartformer.analysis.zero_shot import attention_with_baselines
    from smartformer.config import load_config
    from smartformer.data.phantom import LESION_ID, write_phantoms
    from smartformer.errors import SmartformerError
    from smartformer.models.smartformer import PRETRAINED, SMARTFormer
    from smartformer.train.engine import pretrain

    if args.cases < 1 or args.max_steps < 1:
        raise SmartformerError("--cases and --max-steps must be at least 1")
    out: Path = args.out
    run_dir = out / "run"
    if args.fresh and out.exists():
        shutil.rmtree(out)
    progress = not args.no_progress
    print(f"[1/3] writing {args.cases} phantom CTs to {out / 'phantoms'}")
    cases = write_phantoms(
        out / "phantoms", n=args.cases, seed=args.seed, overwrite=True, progress=progress, n_lesions=None
    )

    if args.spacing <= 0:
        raise SmartformerError("--spacing must be positive")
    config = load_config(
        "tiny", [f"train.seed={args.seed}", f"data.cache_dir={out / 'cache'}", f"data.spacing={args.spacing}"]
    )
    config.train.max_steps = args.max_steps
    resume = (run_dir / "checkpoints" / "last.pt").is_file()
    print(
        f"[2/3] pretraining tiny SMARTFormer for {args.max_steps} steps in {run_dir}"
        + (" (resuming the previous demo run)" if resume else "")
    )
    summary = pretrain(out / "phantoms", run_dir, config, resume=resume, progress=progress)
    if summary["status"] != "completed":
        print(f"stopped at step {summary['step']}; run the same command again to continue")
        return 130

    case = next((c for c in cases if (nib.load(str(c / "labels.nii.gz")).get_fdata() == LESION_ID).any()), cases[0])
    shipped = PRETRAINED[0]
    models = {
        shipped: (SMARTFormer.from_pretrained(shipped), f"{shipped} (shipped, pretrained on real CT)"),
        "demo_run": (SMARTFormer.from_pretrained(run_dir / "teacher"), f"demo teacher after {summary['step']} steps"),
    }
    print(
        f"[3/3] attention maps of {shipped} and of the demo teacher for {case / 'ct.nii.gz'}, "
        "next to a centre prior and the same network with random weights"
    )
    scored = attention_with_baselines(case, models, config, out / "attention", seed=args.seed)
    report = {
        "phantoms": str(out / "phantoms"),
        "run_dir": summary["run_dir"],
        "teacher": summary["teacher"],
        "metrics": str(run_dir / "metrics.jsonl"),
        "snapshots": str(run_dir / "snapshots"),
        "final_metrics": summary["metrics"],
        "attention": {name: entry for name, entry in scored.items() if name in models},
        "baselines": {name: entry for name, entry in scored.items() if name not in models},
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\ndone. Where everything is:")
    for key in ("phantoms", "run_dir", "teacher", "metrics", "snapshots"):
        print(f"  {key:<22} {report[key]}")
    for name, entry in report["attention"].items():
        print(f"  {name + ' maps':<22} {entry['png']}  (+ {Path(entry['mean']).name}, {Path(entry['heads']).name})")
    print(f"  {'summary':<22} {out / 'demo.json'}")
    for line in localization_lines(scored):
        print(line)
    return 0


def localization_lines(entries: dict[str, dict[str, Any]]) -> list[str]:
    """The summary's table: each map's tumour AUROC and enrichment next to the baselines'."""
    lines = [
        "",
        "  how well each map points at the tumour (inside the body; chance: AUROC 0.5, enrichment 1.0):",
        f"  {'method':<16} {'AUROC':>6} {'enrichment':>11} {'mean in body':>13} {'mean in air':>12}",
    ]
    for name, e in entries.items():

        def number(key: str, width: int, e: dict = e) -> str:
            value = e.get(key)
            return f"{value:>{width}.3f}" if isinstance(value, float) else f"{'-':>{width}}"

        lines.append(
            f"  {name:<16} {number('auroc', 6)} {number('tumour_enrichment', 11)} "
            f"{number('body_mean', 13)} {number('air_mean', 12)}  {e['what']}"
        )
    baselines = ", ".join(name for name, e in entries.items() if e["what"] in ("centre prior", "random weights"))
    lines.append(f"  a map localizes the tumour only where it beats both baselines ({baselines})")
    return lines
