"""Benchmark: does the [CLS] branch stay alive at 2 volumes per step? Remedies side by side (issue 14).

Every trial pretrains the ``tiny`` preset on 64^3 views of the same real CTs (../shared/data),
with the same seed, batch (2) and number of steps, one thread each, and differs from the
baseline by the overrides in :data:`TRIALS`. Each finished run is then measured the same way:

* the training log: medians over the last fifth of the run of the teacher's per-sample
  [CLS] target entropy (1.0 = uniform targets), the batch-mean target entropy (low = every
  input gets the same one-hot target), the cosine between the teacher [CLS] of the two volumes
  of a step, and the share of the attention on air;
* the probe set: the teacher [CLS] of the central 64^3 crop of five different real CTs (chest
  and abdomen): their mean pairwise cosine, the issue's goal being below 0.95 (random weights:
  about 0.95); the per-sample and batch-mean entropy of the final teacher's [CLS] targets on
  those crops (with the run's final center and temperature); the attention's share on air;
* with ``--probes``, the frozen-token probes of the quality benchmark (issue 14, part 3) on the
  final teacher: organ identity from the stride-16 tokens of the two organ-labelled CTs
  (balanced accuracy, spatially blocked folds) and the position of random crops in their CT
  (leave-one-CT-out R^2), next to the same for random weights.

Runs are cached under ``--work`` (default ``runs/collapse``) and resume from their last
checkpoint, so the trials span sessions. Results go to ``benchmarks/results/collapse.json``
and a markdown table for docs/BENCHMARKS.md.

Usage::

    python benchmarks/collapse.py                     # every trial still missing, then the report
    python benchmarks/collapse.py --only koleo        # one trial
    python benchmarks/collapse.py --report            # the table from what is finished
    python benchmarks/collapse.py --report --probes   # ... with the token probes (minutes per trial)
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

# the same corpus, crops and token probes as the quality benchmark (this folder is on sys.path)
from quality import cached, central_crop, corpus, organ_probes, position_probe_of

from smartformer.analysis.report import MONITOR_KEYS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "collapse.json"

#: Overrides of each trial, relative to the baseline (today's tiny recipe at batch 2).
TRIALS: dict[str, list[str]] = {
    "baseline": [],
    "koleo": ["loss.koleo_weight=0.1"],  # DINOv2's KoLeo on the student [CLS]
    "teacher_temp_0.04": ["loss.teacher_temp=0.04"],  # DINO's advice when the loss does not fall
    "koleo_temp_0.04": ["loss.koleo_weight=0.1", "loss.teacher_temp=0.04"],  # the two together
    # a 3D DINOv2 port that trains at batch 2 per GPU uses 0.01-0.03
    "teacher_temp_0.02": ["loss.teacher_temp=0.02", "loss.warmup_teacher_temp=0.02"],
    # 0.02 kept the [CLS] branch alive but drove the patch targets one-hot: keep the patch branch warm
    "cls_temp_0.02_patch_0.07": [
        "loss.teacher_temp=0.02",
        "loss.warmup_teacher_temp=0.02",
        "loss.patch_teacher_temp=0.07",
    ],
    "body_views": ["data.min_body_fraction=0.5", "data.min_view_overlap=0.5"],  # views that hold anatomy
    "prototypes_256": ["model.head_out_dim=256"],  # fewer prototypes for small data and batch
    "sinkhorn_queue": ["loss.centering=sinkhorn", "loss.cls_queue=2048"],  # SwAV's small-batch remedy
    "multicrop": ["data.local_views=4"],  # DINO's multi-crop: 4 local 32^3 views per volume for the student
    # the sharpening that kept the [CLS] targets informative, with the local views that taught position
    "cls_temp_0.02_multicrop": [
        "loss.teacher_temp=0.02",
        "loss.warmup_teacher_temp=0.02",
        "loss.patch_teacher_temp=0.07",
        "data.local_views=4",
    ],
    # more distinct volumes per step at smaller views: 8 volumes of 32^3 (half the voxels of 2 x 64^3)
    "batch_8_roi_32": ["data.batch_size=8", "data.roi=[32,32,32]"],
    # the published paper's fourth loss (GITD, weight 0.1) and its stronger teacher noise (patch drop 0.7)
    "paper_gitd_noise": ["loss.global_weight=0.1", "teacher.noise_ratio=0.7"],
}
#: Every trial: the same budget, seed and logging; one thread, so a trial runs beside other work.
COMMON = [
    "data.roi=[64,64,64]",
    "data.batch_size=2",
    "data.num_workers=1",
    "train.threads=1",
    "train.seed=0",
    "train.checkpoint_every=100",
    "train.snapshot_every=100",
    "train.log_every=10",
]
STEPS = 500
#: The probe set: five different real CTs (chest and abdomen), central 64^3 crop of each.
PROBE_CTS = [
    "chest/elastix_00.nii.gz",
    "chest/pancreas_ct_cb_001.nii.gz",
    "chest/crlm_ct_1004.nii.gz",
    "chest/lidc_idri_0314.nii.gz",
    "organs/ts_example/ct.nii.gz",
]


def pretrain(work: Path, name: str, steps: int) -> Path:
    """Run (or resume) one trial with the real CLI in a fresh process; returns its run directory."""
    run = work / "runs" / name
    done = run / "checkpoints" / "last.pt"
    if done.is_file() and _finished_step(run) >= steps:
        return run
    command = [
        sys.executable,
        "-m",
        "smartformer",
        "pretrain",
        "--data",
        str(corpus(work)),
        "--out",
        str(run),
        "--max-steps",
        str(steps),
        "--no-progress",
    ]
    # a resumed run continues with its own config.yaml, which the CLI does not let overrides change
    command += ["--resume"] if done.is_file() else [*COMMON, *TRIALS[name]]
    run.parent.mkdir(parents=True, exist_ok=True)
    with open(work / f"{name}.log", "a") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise SystemExit(f"trial {name} failed ({rc}); see {work / f'{name}.log'}")
    return run


def _finished_step(run: Path) -> int:
    from smartformer.train.monitor import read_metrics

    rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    return max((int(r.get("step", 0)) for r in rows), default=0)


# ---------------------------------------------------------------------------- measurements
def log_medians(
    run: Path,
    keys: tuple[str, ...] = (*MONITOR_KEYS, "air_cell_share", "loss_cls", "loss_recon", "head_diversity"),
) -> dict[str, float]:
    """Median of each monitor (the ones ``report`` draws, and more) over the last fifth of the logged steps."""
    from smartformer.train.monitor import read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    last = max(int(r["step"]) for r in rows)
    tail = [r for r in rows if int(r["step"]) > 0.8 * last]
    return {k: statistics.median(r[k] for r in tail if k in r) for k in keys if any(k in r for r in tail)}


def probe_crops(size: int = 64) -> Any:
    """(5, 1, size, size, size): the central crop of each probe CT, preprocessed as in training."""
    import torch

    from smartformer.data.transforms import preprocess_transforms

    pre = preprocess_transforms(spacing=(2.0, 2.0, 2.0), window="wide", roi=(size, size, size))
    crops = []
    for rel in PROBE_CTS:
        crops.append(central_crop(pre({"image": str(DATA / rel)})["image"].as_tensor(), size))
    return torch.stack(crops).float()


def mean_pairwise_cosine(x: Any) -> float:
    """Mean cosine over the distinct pairs of rows of ``x`` (N, C)."""
    import torch.nn.functional as F

    z = F.normalize(x.float(), dim=-1)
    pairs = list(itertools.combinations(range(z.shape[0]), 2))
    return float(sum(float(z[i] @ z[j]) for i, j in pairs) / len(pairs))


def probe_measures(run: Path | None, crops: Any, seed: int = 0, config: Any = None) -> dict[str, float]:
    """[CLS] cosine, target entropies and air share of the final teacher (``run=None``: random weights).

    ``config`` is the run's; by default the trial's of the same name.
    """
    import torch

    from smartformer.config import load_config
    from smartformer.train.checkpoint import load_checkpoint
    from smartformer.train.ssl_meta_arch import SMARTMetaArch, collapse_monitors

    if config is None:
        config = load_config("tiny", [*COMMON, *TRIALS[run.name if run is not None else "baseline"]])
    torch.manual_seed(seed)
    meta = SMARTMetaArch(config).eval()
    temp = config.loss.teacher_temp
    if run is not None:
        state = load_checkpoint(run / "checkpoints" / "last.pt")
        meta.teacher.load_state_dict(state["teacher"])
        if "losses" in state:
            meta.dino_loss.load_state_dict(state["losses"]["cls"])
        else:
            meta.dino_loss.center.copy_(state["centers"]["cls"])
    with torch.no_grad():
        out = meta.teacher(crops, return_attention=True, reconstruct=False)
        targets = meta.dino_loss.targets(out["cls_logits"], temp)
        monitors = collapse_monitors(
            crops, 1, out["cls"], out["tokens"], out["attn"], meta.body_level, meta.student.config.semantic_stride
        )
    # How far the logits of different CTs differ, per prototype, against the temperature that
    # sharpens them: a spread well below the temperature leaves every CT the same (uniform) target.
    spread = float(out["cls_logits"].float().std(0).mean())
    return {
        "cls_logit_spread_5ct": spread,
        "cls_logit_spread_over_temp": spread / temp,
        "cls_cosine_5ct": mean_pairwise_cosine(out["cls"]),
        "pooled_cosine_5ct": mean_pairwise_cosine(out["tokens"].mean(1)),
        "cls_entropy_5ct": meta.dino_loss.entropy_fraction(targets),
        "cls_batch_entropy_5ct": meta.dino_loss.batch_entropy(targets),
        "attn_air_share_5ct": monitors["attn_air_share"],
        "air_cell_share_5ct": monitors["air_cell_share"],
    }


def token_probes(work: Path, run: Path | None, seed: int = 0) -> dict[str, float]:
    """Organ-probe balanced accuracy (weighted by labelled tokens) and position-probe R^2 of the
    final teacher (``run=None``: seeded random weights); cached under the run's ``eval/``."""
    if run is None:
        import torch

        from smartformer.models.smartformer import SMARTFormer

        home, teacher = work / "random_tiny", work / "random_tiny" / "model"
        if not (teacher / "model.safetensors").is_file():
            torch.manual_seed(seed)
            SMARTFormer.from_preset("tiny").save_pretrained(teacher)
    else:
        home, teacher = run, run / "teacher"
    organ = cached(home / "eval" / "organ_probe.json", lambda: organ_probes(teacher))
    position = cached(home / "eval" / "position_probe.json", lambda: position_probe_of(teacher))
    tokens = sum(p["tokens"] for p in organ.values())
    return {
        "organ_probe_balanced_accuracy": sum(p["balanced_accuracy"] * p["tokens"] for p in organ.values()) / tokens,
        "position_probe_r2": position["r2"],
    }


# ---------------------------------------------------------------------------- report
def report(work: Path, probes: bool = False) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    crops = probe_crops()
    result: dict[str, Any] = {
        "steps": STEPS,
        "common": COMMON,
        "probe_cts": PROBE_CTS,
        "random_init": probe_measures(None, crops),
        "trials": {},
    }
    if probes:
        result["random_init"]["tokens"] = token_probes(work, None)
    for name, overrides in TRIALS.items():
        run = work / "runs" / name
        if not (run / "checkpoints" / "last.pt").is_file() or _finished_step(run) < STEPS:
            continue
        result["trials"][name] = {"overrides": overrides, "log": log_medians(run), "probe": probe_measures(run, crops)}
        if probes:
            result["trials"][name]["tokens"] = token_probes(work, run)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if probes:
        print(tokens_markdown(result))
    return result


def tokens_markdown(result: dict[str, Any]) -> str:
    """The token probes of each trial against random weights."""
    rows = [("random weights", result["random_init"])] + list(result["trials"].items())
    lines = ["| trial | organ probe, balanced accuracy | position probe, R^2 |", "|---|---|---|"]
    for name, entry in rows:
        t = entry.get("tokens")
        if t:
            lines.append(f"| {name} | {t['organ_probe_balanced_accuracy']:.3f} | {t['position_probe_r2']:.3f} |")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "n/a"

    head = (
        "| trial | [CLS] entropy (log) | batch-mean entropy (log) | patch entropy (log) "
        "| [CLS] cosine, 2 volumes (log) "
        "| attention on air (log) / air cells | [CLS] cosine, 5 CTs | [CLS] entropy, 5 CTs "
        "| logit spread across the 5 CTs / temperature | attention on air, 5 CTs |"
    )
    lines = [head, "|" + "---|" * 10]
    r = result["random_init"]
    lines.append(
        f"| random weights | | | | | | {f(r['cls_cosine_5ct'])} | {f(r['cls_entropy_5ct'])} "
        f"| {f(r['cls_logit_spread_over_temp'])} | {f(r['attn_air_share_5ct'])} / {f(r['air_cell_share_5ct'])} |"
    )
    for name, t in result["trials"].items():
        lg, pr = t["log"], t["probe"]
        lines.append(
            f"| {name} | {f(lg.get('teacher_cls_entropy'))} | {f(lg.get('teacher_cls_batch_entropy'))} "
            f"| {f(lg.get('teacher_patch_entropy'))} | {f(lg.get('teacher_cls_cosine'))} "
            f"| {f(lg.get('attn_air_share'))} / {f(lg.get('air_cell_share'))} | {f(pr['cls_cosine_5ct'])} "
            f"| {f(pr['cls_entropy_5ct'])} | {f(pr.get('cls_logit_spread_over_temp'))} "
            f"| {f(pr['attn_air_share_5ct'])} / {f(pr['air_cell_share_5ct'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "collapse")
    parser.add_argument("--only", nargs="*", choices=list(TRIALS), help="run only these trials")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--report", action="store_true", help="only write the report of finished trials")
    parser.add_argument(
        "--probes",
        action="store_true",
        help="add the frozen-token probes (organ identity, crop position) to the report",
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: the shared real-CT data is not there; this benchmark needs it")
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report:
        for name in args.only or list(TRIALS):
            print(f"trial {name}: {args.steps} steps", flush=True)
            pretrain(args.work, name, args.steps)
    report(args.work, probes=args.probes)


if __name__ == "__main__":
    main()
