"""``smartformer pretrain``: SMART self-supervised pretraining on a folder, CSV or datalist of CTs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smartformer.config.preset_files import available_presets  # torch-free: --help stays fast
from smartformer.errors import SmartformerError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised SMART pretraining",
        description=(
            "Pretrain a SMARTFormer (noisy EMA teacher, attention-guided masking, reconstruction + "
            "patch + [CLS] distillation) on CT volumes. Multi-GPU / multi-node: "
            "torchrun --standalone --nproc_per_node N -m smartformer pretrain ... (one node), "
            "or torchrun --nnodes M --rdzv-backend c10d --rdzv-endpoint HOST:PORT ... (several)"
        ),
        epilog=(
            "Overrides are dotted keys, e.g. masking.strategy=random loss.cls_weight=0 "
            "model.semantic_attention=false teacher.noise=none data.roi=[64,64,64] train.device=cuda. "
            "Outputs in RUN_DIR: config.yaml, metrics.jsonl, tensorboard/, snapshots/, checkpoints/, teacher/."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        help="a folder of CTs (recursive), a CSV with an 'image' column, or an MSD-style JSON datalist",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (RUN_DIR)")
    p.add_argument(
        "--config",
        default="tiny",
        help=f"preset ({', '.join(available_presets())}) or a YAML file (default: tiny)",
    )
    p.add_argument("--max-steps", type=int, help="total optimisation steps (overrides train.max_steps)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR/checkpoints/last.pt (or the newest good step_N.pt if last.pt is "
        "damaged); refused if RUN_DIR holds no run",
    )
    p.add_argument(
        "--resume-or-start", action="store_true", help="like --resume, but start a new run when RUN_DIR holds none"
    )
    p.add_argument("--skip-bad", action="store_true", help="leave unreadable volumes out (listed) instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run)


# Overrides that --resume accepts: the time budget, which changes when a run stops, and the thread
# count, which changes its speed; neither changes what it computes.
RESUME_OVERRIDES = ("train.max_minutes=", "train.threads=")


def run(args: argparse.Namespace) -> int:
    from smartformer.config import load_config
    from smartformer.train.engine import pretrain

    overrides = list(args.overrides)
    has_run = (args.out / "config.yaml").is_file()
    if args.resume and not has_run and not args.resume_or_start:
        raise SmartformerError(
            f"{args.out}: no run to resume there (no config.yaml); drop --resume to start one, "
            "or pass --resume-or-start"
        )
    args.resume = args.resume or args.resume_or_start
    if args.resume and has_run:
        # Continue with the run's own resolved config; only the step and time budgets may change.
        if any(not o.startswith(RESUME_OVERRIDES) for o in overrides):
            raise SmartformerError(
                "--resume continues with RUN_DIR/config.yaml; overrides are not allowed "
                "(only --max-steps, --skip-bad, train.max_minutes=... and train.threads=...)"
            )
        config = load_config(str(args.out / "config.yaml"), overrides)
    else:
        config = load_config(args.config, overrides)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise SmartformerError("--max-steps must be at least 1")
        config.train.max_steps = args.max_steps
    if args.skip_bad:
        config.data.skip_bad = True
    summary = pretrain(args.data, args.out, config, resume=args.resume, progress=not args.no_progress)
    if summary["world_size"] == 1 or _is_main():
        print(f"{summary['status']} at step {summary['step']}/{summary['max_steps']}")
        print(f"  run directory : {summary['run_dir']}")
        print(f"  checkpoint    : {summary['checkpoint']}")
        print(f"  teacher       : {summary['teacher']}  (SMARTFormer.from_pretrained)")
        run_dir = Path(summary["run_dir"])
        print(f"  metrics       : {run_dir / 'metrics.jsonl'}  (tensorboard --logdir {run_dir / 'tensorboard'})")
        if summary["metrics"]:
            print("  last metrics  : " + json.dumps({k: round(v, 4) for k, v in summary["metrics"].items()}))
    return 0 if summary["status"] in ("completed", "time_budget") else 130


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
