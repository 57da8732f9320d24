"""Benchmark: the paper's ablations in miniature, on the real CTs of ../shared/data (issue 7).

Every variant pretrains the ``tiny`` preset on 64^3 views of the same corpus (all STS cases,
both chest CTs, both organ CTs) for the same compute budget, then is evaluated the same way:

* zero-shot localization of the STS tumours (``smartformer localize``, windows at random
  offsets holding part of the tumour, so a centre prior scores ~0.5): voxel AUROC, pointing game;
* organ clustering on both organ CTs (``smartformer cluster``): NMI, ARI, purity, centroid
  separation;
* the STS lesion-vs-normal-tissue probe (``smartformer data lesions`` + ``smartformer probe``,
  patient-level 5-fold): AUC;
* attention-head diversity of the teacher on fixed corpus crops (mean pairwise cosine distance);
* few-label STS tumour segmentation: SwinUNETR from the run's encoder trained on 5 and on 10
  patients (3 seeded patient splits, the same for every run, validated on its own training
  cases, so the test patients choose nothing), Dice on each of 16 fixed held-out patients,
  compared with random weights by a paired bootstrap over patients;
* frozen-token probes: organ identity from the stride-16 tokens of both organ CTs (logistic
  regression, folds in slabs along S/I), and the position of random crops in their body (ridge
  regression, leave-one-CT-out R^2).

The budget. Wall-clock minutes measured while other jobs share the 2 cores would favour
whichever variant ran on a quiet machine, so the budget is fixed in *steps*: each variant's
step time is measured side by side, interleaved, in one process (``calibrate``), and a
variant gets ``budget_minutes * 60 / step_seconds`` steps -- what it completes in that many
minutes on the idle machine. The calibration is cached and reused by every later session.

Runs span sessions: each pretraining run and each evaluation is cached under ``--work``
(default ``runs/quality``) and skipped once finished; an interrupted pretraining run resumes
from its last checkpoint. Results go to ``benchmarks/results/quality.json`` and a table plus
plots for docs/BENCHMARKS.md.

Usage::

    python benchmarks/quality.py                         # everything still missing, then the report
    python benchmarks/quality.py --only smart_full:0     # one run
    python benchmarks/quality.py --report                # the report from what is finished
    python benchmarks/quality.py --evaluations probes    # leave the (slow) segmentation out
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ROOT / "docs"

#: The published paper's method on the tiny backbone (see docs/PAPER.md).
PAPER = [
    "model.semantic_form=vit",
    "model.semantic_stage=3",
    "loss.global_weight=0.1",
    "teacher.noise_ratio=0.7",
    "masking.ratio=0.7",
    "masking.hint_ratio=0.1",
]
#: The sharper [CLS] teacher temperature of issue 14, the patch branch left at DINO's 0.07.
CLS_TEMP_0_02 = ["loss.teacher_temp=0.02", "loss.warmup_teacher_temp=0.02", "loss.patch_teacher_temp=0.07"]
#: Config overrides of each variant (``None``: no pretraining, the random-init baseline).
VARIANTS: dict[str, list[str] | None] = {
    "random_init": None,
    "smit_like": ["masking.strategy=random", "model.semantic_attention=false", "teacher.noise=none"],
    "smart_no_noise": ["teacher.noise=none"],
    # Attention-guided masking needs the semantic module, so without it masking is random.
    "smart_no_semantic": ["model.semantic_attention=false", "masking.strategy=random"],
    "smart_random_mask": ["masking.strategy=random"],
    "smart_full": [],
    # CaiT's LayerScale start: the [CLS] is input-independent, so its distillation collapses to
    # uniform targets at once -- SMART with a dead [CLS] branch and a fixed random query (the
    # default before the fix; kept as the ablation it turned out to be).
    "smart_layerscale_1e-4": ["model.semantic_layer_scale=0.0001"],
    # -- issue 14's candidate recipes (`--suite issue14`), from the collapse trials
    # (benchmarks/collapse.py): the 0.02 [CLS] temperature kept its targets informative at batch
    # 2, the patch branch kept at 0.07 avoids its one-hot collapse, and DINO's multi-crop (four
    # 32^3 local views per volume) was the one trial whose features placed a crop in its body
    # better than random weights.
    "smart_cls0.02": [*CLS_TEMP_0_02],
    "smart_cls0.02_multicrop": [*CLS_TEMP_0_02, "data.local_views=4"],
    # Over 1500 steps the recipe's [CLS] drifted back towards uniform targets while the lr was
    # still high (target entropy 0.96-0.99 of ln K and teacher [CLS] cosine 0.97 between the two
    # volumes of a step by step 500): the embeddings themselves converge, which KoLeo acts on.
    "smart_cls0.02_multicrop_koleo": [*CLS_TEMP_0_02, "data.local_views=4", "loss.koleo_weight=0.1"],
    # -- the published paper's ablations (issue 13; `--suite paper`), on the tiny backbone: its
    # method is ViT semantic attention in stage 3 (stride 8), GITD, noise 0.7, mask 0.7 / hint 0.1.
    **{
        f"paper_{name}": [*PAPER, *extra]
        for name, extra in {
            "all_four": [],
            # the loss table (their Table 3): AMIP alone; +AMPD; +AMPD+AITD; without AMPD; without AMIP
            "amip_only": ["loss.patch_weight=0", "loss.cls_weight=0", "loss.global_weight=0"],
            "amip_ampd": ["loss.cls_weight=0", "loss.global_weight=0"],
            "amip_ampd_aitd": ["loss.global_weight=0"],
            "no_ampd": ["loss.patch_weight=0"],
            "no_amip": ["loss.recon_weight=0"],
            # SA placement (their Fig. 6): stages 2 and 4 (stage 3 is all_four)
            "sa_stage2": ["model.semantic_stage=2"],
            "sa_stage4": ["model.semantic_stage=4"],
            # SA form: today's CaiT class attention in place of the ViT blocks
            "sa_class_attention": ["model.semantic_form=class_attention"],
            # the teacher's patch-drop ratio: 0.7 as stated, or 0.1 (it may echo the mask ratio)
            "noise_0.1": ["teacher.noise_ratio=0.1"],
            # masking: random (SMIT), block (iBOT), high (AttMask without hint), low (MST)
            "mask_random": ["masking.strategy=random"],
            "mask_block": ["masking.strategy=block"],
            "mask_high": ["masking.strategy=attention_high"],
            "mask_low": ["masking.strategy=attention_low"],
        }.items()
    },
}
#: Runs of ``--suite paper``: one seed each of the paper's ablations.
PAPER_ORDER = [f"{name}:0" for name in VARIANTS if name.startswith("paper_")]
#: Variants whose step costs the same as another's (only an initial value differs): they share
#: its calibrated step time, so the cached calibration stays valid when one is added.
SAME_COST = {"smart_layerscale_1e-4": "smart_full"}
#: Order of the runs: the comparisons that matter most first, second seeds last (a second random
#: init costs only its evaluation, and tells how much the maps of untrained weights vary).
ORDER = [
    "random_init:0",
    "smart_full:0",
    "smit_like:0",
    "smart_no_noise:0",
    "smart_no_semantic:0",
    "smart_random_mask:0",
    "smart_layerscale_1e-4:0",
    "smart_full:1",
    "smit_like:1",
    "random_init:1",
]
#: ``--suite issue14``: the candidate recipe at the issue's budget, three pretraining seeds (the
#: localization is averaged over them) against three random inits; the costly few-label
#: segmentation runs on seed 0 of each (``"all"``), the other seeds get the rest (``"probes"``).
ISSUE14 = {
    "random_init:0": "all",
    "smart_cls0.02_multicrop:0": "all",
    "smart_cls0.02_multicrop:1": "probes",
    "smart_cls0.02_multicrop:2": "probes",
    "random_init:1": "probes",
    "random_init:2": "probes",
}
#: Each suite: its runs in order, a fixed step budget (None: calibrated from ``--budget-minutes``),
#: and where its report goes.
SUITES: dict[str, dict[str, Any]] = {
    "issue7": {"order": ORDER, "steps": None, "results": "quality.json", "plot": "quality.png"},
    "paper": {"order": PAPER_ORDER, "steps": None, "results": "quality.json", "plot": "quality.png"},
    # Issue 14's budget is at most 2 CPU-hours of pretraining per run: 1500 steps of the recipe
    # take about 1.6 hours on one thread of this machine (3.9 s each, multi-crop included).
    "issue14": {
        "order": list(ISSUE14),
        "steps": 1500,
        "evaluations": ISSUE14,
        "results": "quality_issue14.json",
        "plot": "quality_issue14.png",
    },
}
#: Few-label segmentation: seeded patient splits, training-set sizes, and the fine-tuning schedule.
SEG_SPLITS = (0, 1, 2)
SEG_TRAIN_SIZES = (5, 10)
SEG_TEST_PATIENTS = 16
SEG_STEPS = 300
#: Training patch of the few-label fine-tuning: 64 x 32 x 32 voxels (128 x 64 x 64 mm at 2 mm), a
#: quarter of a 64^3 patch and of its cost (2.2 s per step on one thread instead of 13 s: SwinUNETR's
#: full-resolution decoder convolutions dominate), so the 12 fine-tunings of one random-init and one
#: pretrained checkpoint take ~3 thread-hours instead of ~13. Inference is sliding-window over each
#: whole held-out CT at the same patch.
SEG_ROI = (64, 32, 32)
#: CTs whose random crops the position probe reads (big enough for crops to differ in place).
POSITION_CTS = (
    "chest/elastix_00.nii.gz",
    "chest/pancreas_ct_cb_001.nii.gz",
    "chest/crlm_ct_1004.nii.gz",
    "chest/crlm_ct_1006.nii.gz",
    "chest/lidc_idri_0314.nii.gz",
    "organs/ts_example/ct.nii.gz",
)
POSITION_CROPS = 12
#: Which evaluations ``evaluate`` runs: all of them, or without the costly segmentation.
EVALUATIONS = {
    "all": ("localize", "cluster", "probe", "diversity", "tokens", "segmentation"),
    "probes": ("localize", "cluster", "probe", "diversity", "tokens"),
}
#: Evaluations added after the first runs, by the key they write: an eval.json without it is completed.
NEWER_KEYS = {"tokens": "cls_probe", "segmentation": "fewlabel"}
COMMON = [
    "data.roi=[64,64,64]",
    "data.num_workers=1",
    "train.checkpoint_every=50",
    "train.snapshot_every=100",
    "train.log_every=10",
]


def corpus(work: Path) -> Path:
    """CSV of every real CT in ../shared/data (the DICOM example as its NIfTI twin, once)."""
    images = (
        sorted(DATA.glob("sts/*/ct.nii.gz"))
        + sorted(DATA.glob("chest/*.nii.gz"))
        + [DATA / "organs" / "ts_example" / "ct.nii.gz", DATA / "organs" / "ts_dicom_example" / "ct.nii.gz"]
    )
    path = work / "corpus.csv"
    path.write_text("image\n" + "".join(f"{p}\n" for p in images))
    return path


def smartformer(*args: str, log: Path | None = None) -> None:
    """Run the real CLI in a fresh process (one OpenMP pool, memory returned when done)."""
    command = [sys.executable, "-m", "smartformer", *args]
    with open(log, "a") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:
        rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        raise SystemExit(f"failed ({rc}): {' '.join(command)}" + (f"; see {log}" if log else ""))


# ---------------------------------------------------------------------------- budget
def calibrate(work: Path, repeats: int = 4) -> dict[str, float]:
    """Seconds per training step of each pretrained variant, interleaved in one process (cached).

    Variants added after the cache was written are measured interleaved with ``smart_full`` and
    scaled by its cached time, so the earlier runs' budgets stay as they were.
    """
    path = work / "calibration.json"
    wanted = [n for n, o in VARIANTS.items() if o is not None and n not in SAME_COST]
    cached = json.loads(path.read_text()) if path.is_file() else None
    if cached is not None:
        missing = [n for n in wanted if n not in cached["step_seconds"]]
        if not missing:
            return cached["step_seconds"]
        now = _measure(["smart_full", *missing], repeats)
        scale = cached["step_seconds"]["smart_full"] / now["smart_full"]
        step_seconds = {**cached["step_seconds"], **{n: now[n] * scale for n in missing}}
        path.write_text(
            json.dumps(
                {
                    **cached,
                    "step_seconds": step_seconds,
                    "added": {**cached.get("added", {}), **{n: time.strftime("%Y-%m-%d %H:%M") for n in missing}},
                },
                indent=2,
            )
            + "\n"
        )
        return step_seconds
    step_seconds = _measure(wanted, repeats)
    path.write_text(
        json.dumps(
            {
                "step_seconds": step_seconds,
                "threads": _threads(),
                "repeats": repeats,
                "date": time.strftime("%Y-%m-%d %H:%M"),
            },
            indent=2,
        )
        + "\n"
    )
    return step_seconds


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _measure(names: list[str], repeats: int) -> dict[str, float]:
    """Median seconds of a training step of each variant in ``names``, interleaved in this process."""
    import torch

    from smartformer.config import load_config
    from smartformer.train.ssl_meta_arch import SMARTMetaArch

    metas = {}
    for name in names:
        cfg = load_config("tiny", [*COMMON, *VARIANTS[name], "masking.warmup_steps=0"])
        torch.manual_seed(0)
        meta = SMARTMetaArch(cfg).train()
        metas[name] = (meta, torch.optim.AdamW(meta.param_groups(), lr=1e-4))
    views = torch.rand(2, 2, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in metas}
    for r in range(repeats + 1):  # the first round warms up
        for name, (meta, opt) in metas.items():
            t = time.perf_counter()
            out = meta(views, 100, 0.04, generator=gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            meta.after_step(out, 0.996)
            if r:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


# ---------------------------------------------------------------------------- runs
def git_commit() -> str | None:
    """The checked-out commit of this repository (None outside a git checkout)."""
    proc = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def checkpoint_of(work: Path, name: str, seed: int) -> Path:
    """The save_pretrained directory evaluated for a run (random init: seeded fresh weights)."""
    if VARIANTS[name] is not None:
        return work / "runs" / f"{name}-s{seed}" / "teacher"
    path = work / "runs" / f"{name}-s{seed}" / "model"
    if not (path / "model.safetensors").is_file():
        import torch

        from smartformer.models.smartformer import SMARTFormer

        torch.manual_seed(seed)
        SMARTFormer.from_preset("tiny").save_pretrained(path)
    return path


def pretrain(work: Path, name: str, seed: int, steps: int, threads: int | None = None) -> dict[str, Any]:
    """Pretrain one variant for ``steps`` steps (resuming an interrupted run); cached.

    ``threads`` sets ``train.threads`` (the run's results do not depend on it, only its speed).
    """
    run = work / "runs" / f"{name}-s{seed}"
    done = run / "pretrain.json"
    if done.is_file():
        return json.loads(done.read_text())
    overrides = VARIANTS[name]
    if overrides is None:
        checkpoint_of(work, name, seed)
        summary = {"steps": 0, "train_seconds": 0.0}
    else:
        resume = (run / "checkpoints" / "last.pt").is_file()
        args = ["pretrain", "--data", str(corpus(work)), "--out", str(run), "--max-steps", str(steps), "--no-progress"]
        args += (
            ["--resume"]
            if resume
            else ["--config", "tiny", f"train.seed={seed}", f"data.cache_dir={work / 'cache'}", *COMMON, *overrides]
        )
        args += [f"train.threads={threads}"] if threads else []
        print(f"[{name}:{seed}] pretraining {steps} steps" + (" (resuming)" if resume else ""), flush=True)
        smartformer(*args, log=run.parent / f"{name}-s{seed}.log")
        from smartformer.train.checkpoint import load_checkpoint

        state = load_checkpoint(run / "checkpoints" / "last.pt")
        if int(state["step"]) < steps:
            raise SystemExit(f"[{name}:{seed}] stopped at step {state['step']} of {steps}; run again to resume")
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses = [r for r in rows if "loss" in r]
        summary = {
            "steps": int(state["step"]),
            "train_seconds": float(state.get("train_seconds", 0.0)),
            "final": losses[-1] if losses else {},
        }
    summary["commit"] = git_commit()  # which code trained it: stale runs can be told apart
    done.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------- evaluations
def lesion_task(work: Path) -> Path:
    """The STS lesion-vs-normal CSV (``smartformer data lesions``), built once."""
    out = work / "lesions"
    if not (out / "lesions.csv").is_file():
        smartformer(
            "data", "lesions", "--data", str(DATA / "sts"), "--out", str(out), "--seed", "0", log=work / "lesions.log"
        )
    return out / "lesions.csv"


def localization_cases(work: Path) -> Path:
    path = work / "sts_masks.csv"
    rows = [f"{d / 'ct.nii.gz'},{d / 'tumor.nii.gz'}\n" for d in sorted(DATA.glob("sts/STS_*"))]
    path.write_text("image,mask\n" + "".join(rows))
    return path


def evaluate(work: Path, name: str, seed: int, which: tuple[str, ...] = EVALUATIONS["all"]) -> dict[str, Any]:
    """The evaluations ``which`` of one run; each one cached in the run's eval/ folder."""
    ckpt = checkpoint_of(work, name, seed)
    ev = work / "runs" / f"{name}-s{seed}" / "eval"
    log = ev / "eval.log"
    ev.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {}
    semantic = json.loads((ckpt / "config.json").read_text())["model"]["semantic_attention"]

    # Zero-shot localization: only models with the semantic attention module have maps.
    if semantic:
        if not (ev / "localize" / "summary.json").is_file():
            smartformer(
                "localize",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(localization_cases(work)),
                "--out",
                str(ev / "localize"),
                "--windows",
                "3",
                "--no-random-baseline",
                "--no-progress",
                log=log,
            )
        result["localization"] = localization_summary(ev / "localize")
    else:
        result["localization"] = None  # no semantic attention, no attention maps (pooled token)

    clustering = {}
    for organ in ("ts_example", "ts_dicom_example"):
        folder = DATA / "organs" / organ
        out = ev / "cluster" / organ
        if not (out / f"{organ}_clustering.json").is_file():
            smartformer(
                "cluster",
                "--checkpoint",
                str(ckpt),
                "--image",
                str(folder / "ct.nii.gz"),
                "--labels",
                str(folder / "organs.nii.gz"),
                "--names",
                str(DATA / "organs" / "labels.json"),
                "--out",
                str(out),
                "--name",
                organ,
                "--no-progress",
                log=log,
            )
        clustering[organ] = json.loads((out / f"{organ}_clustering.json").read_text())
    result["clustering"] = clustering

    if not (ev / "probe" / "metrics.json").is_file():
        smartformer(
            "probe",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(lesion_task(work)),
            "--out",
            str(ev / "probe"),
            "--folds",
            "5",
            "--seed",
            "0",
            "--no-progress",
            log=log,
        )
    result["probe"] = json.loads((ev / "probe" / "metrics.json").read_text())
    result["head_diversity"] = head_diversity(work, ckpt) if semantic else None
    if "tokens" in which:
        result["cls_probe"] = cached(ev / "cls_probe.json", lambda: cls_probe(work, name, seed))
        result["organ_probe"] = cached(ev / "organ_probe.json", lambda: organ_probes(ckpt))
        result["position_probe"] = cached(ev / "position_probe.json", lambda: position_probe_of(ckpt))
    if "segmentation" in which:
        result["fewlabel"] = fewlabel_segmentation(ckpt, ev / "fewlabel")
    return result


def cached(path: Path, compute: Any) -> Any:
    """``compute()``'s JSON result, kept in ``path`` (computed once)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compute(), indent=2) + "\n")
    return json.loads(path.read_text())


def cls_probe(work: Path, name: str, seed: int) -> dict[str, float]:
    """Issue 14's collapse goals on the final teacher: the [CLS] cosine between the central 64^3
    crops of five different CTs, and the entropy of its [CLS] targets on them (``collapse.py``)."""
    from collapse import probe_crops, probe_measures

    from smartformer.config import load_config

    if VARIANTS[name] is None:  # random weights of the same seed
        return probe_measures(None, probe_crops(), seed)
    run = work / "runs" / f"{name}-s{seed}"
    return probe_measures(run, probe_crops(), seed, config=load_config(str(run / "config.yaml")))


def organ_probes(ckpt: Path) -> dict[str, Any]:
    """Organ identity from frozen tokens of both organ CTs (spatially blocked folds)."""
    from smartformer.analysis.clustering import token_features
    from smartformer.downstream.token_probes import organ_probe
    from smartformer.models.smartformer import SMARTFormer

    model = SMARTFormer.from_pretrained(ckpt).eval()
    out = {}
    for organ in ("ts_example", "ts_dicom_example"):
        folder = DATA / "organs" / organ
        tokens = token_features(model, folder / "ct.nii.gz", folder / "organs.nii.gz", progress=False)
        # the 20-slice DICOM CT is 1-2 tokens high: its folds are slabs along A/P instead of S/I
        out[organ] = organ_probe(tokens, n_blocks=4, axis=2 if organ == "ts_example" else 1)
    return out


def position_crops(size: int = 64, seed: int = 0) -> tuple[Any, Any, Any]:
    """(N, 1, size^3) random crops of :data:`POSITION_CTS`, their centres' relative positions, their CT."""
    import numpy as np

    from smartformer.data.transforms import preprocess_transforms

    prep = preprocess_transforms(spacing=2.0, roi=size)
    rng = np.random.default_rng(seed)
    crops, positions, groups = [], [], []
    for g, rel in enumerate(POSITION_CTS):
        volume = prep({"image": str(DATA / rel)})["image"].as_tensor().numpy()
        shape = np.asarray(volume.shape[1:])
        for _ in range(POSITION_CROPS):
            start = np.array([rng.integers(0, n - size + 1) for n in shape])
            x, y, z = start
            crops.append(volume[:, x : x + size, y : y + size, z : z + size])
            positions.append((start + size / 2) / shape)
            groups.append(g)
    return np.stack(crops), np.stack(positions), np.asarray(groups)


def position_probe_of(ckpt: Path) -> dict[str, Any]:
    """Leave-one-CT-out R^2 of the crop position from the frozen [CLS] + mean token."""
    from smartformer.downstream.features import extract_features
    from smartformer.downstream.token_probes import position_probe
    from smartformer.models.smartformer import SMARTFormer

    crops, positions, groups = position_crops()
    features = extract_features(SMARTFormer.from_pretrained(ckpt), crops, kind="both", device="cpu", progress=False)
    return position_probe(features, positions, groups)


def sts_cases() -> list[Any]:
    from smartformer.data.cases import find_cases

    return find_cases(DATA / "sts")  # STS_0xx/ct.nii.gz + tumor.nii.gz, in folder order


def fewlabel_splits() -> tuple[dict[str, list[Any]], list[Any]]:
    """``"n5/split0"`` -> training cases, and the fixed test cases every split is scored on.

    :data:`SEG_TEST_PATIENTS` patients (seeded) are held out once for all; each split draws its
    training patients from the others, and the n=5 patients are the first of the n=10 ones.
    """
    import numpy as np

    cases = sts_cases()
    order = np.random.default_rng(12345).permutation(len(cases))
    test, pool = [cases[i] for i in order[:SEG_TEST_PATIENTS]], [cases[i] for i in order[SEG_TEST_PATIENTS:]]
    train = {}
    for split in SEG_SPLITS:
        picked = np.random.default_rng(split).permutation(len(pool))
        for n in SEG_TRAIN_SIZES:
            train[f"n{n}/split{split}"] = [pool[i] for i in picked[:n]]
    return train, test


def fewlabel_segmentation(ckpt: Path, folder: Path) -> dict[str, dict[str, float]]:
    """Tumour Dice per held-out patient after fine-tuning SwinUNETR on few patients, per split (cached)."""
    from smartformer.downstream.segmentation import (
        SegmentationSettings,
        dice_per_case,
        load_case,
        load_segmenter,
        train_segmentation,
    )

    settings = SegmentationSettings(
        label_ids=(1,),
        roi=SEG_ROI,
        max_steps=SEG_STEPS,
        val_every=SEG_STEPS,
        warmup_steps=SEG_STEPS // 10,
        seed=0,
        log_every=50,
    )
    splits, test = fewlabel_splits()
    loaded: list[dict[str, Any]] = []  # the test cases, read once for every split
    result = {}
    for key, train in splits.items():

        def run(train=train, key=key) -> dict[str, float]:
            out = folder / key
            # validated on its own training cases: the held-out patients choose nothing
            train_segmentation(ckpt, train, train, out, settings, device="cpu", progress=False, log=lambda _: None)
            net, _ = load_segmenter(out)
            if not loaded:
                loaded.extend(
                    load_case(c, settings.spacing, settings.window, settings.roi, label_ids=(1,)) for c in test
                )
            rows = dice_per_case(net, loaded, (1,), settings.roi, settings.overlap)
            return {c.case: row["1"] for c, row in zip(test, rows)}

        result[key] = cached(folder / f"{key.replace('/', '-')}.json", run)
    return result


def localization_summary(folder: Path) -> dict[str, Any]:
    """Mean AUROC, pointing game and energy of the checkpoint's maps, and of the two priors."""
    methods = json.loads((folder / "summary.json").read_text())["methods"]
    priors = ("centre_prior", "intensity_prior")
    # localize's random-weights baseline: random_PRESET (random_init in summaries written before issue 16)
    (model,) = [m for m in methods if m not in priors and not m.startswith("random_")]

    def means(entry: dict[str, Any]) -> dict[str, float | None]:
        return {k: (entry[k]["mean"] if entry.get(k) else None) for k in ("auroc", "pointing", "energy")}

    return {**means(methods[model]), "cases": methods[model]["cases"], "priors": {p: means(methods[p]) for p in priors}}


def central_crop(volume: Any, size: int) -> Any:
    """The central ``size``^3 crop of a (1, X, Y, Z) volume at least that large."""
    x, y, z = ((n - size) // 2 for n in volume.shape[1:])
    return volume[:, x : x + size, y : y + size, z : z + size]


def head_diversity(work: Path, ckpt: Path, crops: int = 8) -> float:
    """Mean pairwise cosine distance between the teacher's head maps on fixed 64^3 corpus crops."""
    import torch

    from smartformer.data.transforms import preprocess_transforms
    from smartformer.models.smartformer import SMARTFormer
    from smartformer.train.teacher import head_diversity as diversity

    model = SMARTFormer.from_pretrained(ckpt).eval()
    prep = preprocess_transforms(spacing=2.0, roi=64)
    images = sorted(DATA.glob("sts/*/ct.nii.gz"))[:: max(1, 51 // crops)][:crops]
    values = []
    with torch.inference_mode():
        for path in images:
            crop = central_crop(prep({"image": str(path)})["image"].as_tensor(), 64)
            values.append(float(diversity(model.attention_maps(crop[None]))))
    return statistics.mean(values)


# ---------------------------------------------------------------------------- report
METRICS = {
    "localization AUROC": lambda r: (r["localization"] or {}).get("auroc"),
    "pointing game": lambda r: (r["localization"] or {}).get("pointing"),
    "clustering NMI": lambda r: statistics.mean(c["nmi"] for c in r["clustering"].values()),
    "clustering ARI": lambda r: statistics.mean(c["ari"] for c in r["clustering"].values()),
    "clustering purity": lambda r: statistics.mean(c["purity"] for c in r["clustering"].values()),
    "lesion probe AUC": lambda r: probe_auc(r["probe"]),
    "head diversity": lambda r: r["head_diversity"],
    # weighted by labelled tokens: the thin DICOM CT has ~20 against ~200 of the other
    "organ probe bal. acc.": lambda r: (
        sum(p["balanced_accuracy"] * p["tokens"] for p in r["organ_probe"].values())
        / sum(p["tokens"] for p in r["organ_probe"].values())
        if r.get("organ_probe")
        else None
    ),
    "position probe R2": lambda r: r["position_probe"]["r2"] if r.get("position_probe") else None,
    "[CLS] cosine, 5 CTs": lambda r: (r.get("cls_probe") or {}).get("cls_cosine_5ct"),
    "[CLS] target entropy, 5 CTs": lambda r: (r.get("cls_probe") or {}).get("cls_entropy_5ct"),
    **{f"tumour Dice, {n} patients": (lambda r, n=n: fewlabel_mean(r, n)) for n in SEG_TRAIN_SIZES},
}


def fewlabel_mean(evaluation: dict[str, Any], n: int) -> float | None:
    """Mean tumour Dice over the held-out patients of every split with ``n`` training patients."""
    import math

    values = [
        v
        for key, per_case in (evaluation.get("fewlabel") or {}).items()
        if key.startswith(f"n{n}/")
        for v in per_case.values()
        if math.isfinite(v)
    ]
    return statistics.mean(values) if values else None


def fewlabel_vs(evaluation: dict[str, Any], reference: dict[str, Any], n: int) -> dict[str, float] | None:
    """Paired Dice difference (run - reference) over the same held-out patients of every n-patient split."""
    from smartformer.downstream.metrics import paired_mean_difference

    a, b, groups = [], [], []
    for key, per_case in (evaluation.get("fewlabel") or {}).items():
        ref = (reference.get("fewlabel") or {}).get(key)
        if not key.startswith(f"n{n}/") or ref is None:
            continue
        for case, value in per_case.items():
            if case in ref:
                a.append(value)
                b.append(ref[case])
                groups.append(case)  # a patient held out in several splits is resampled as one
    return paired_mean_difference(a, b, groups=groups) if a else None


def probe_auc(metrics: dict[str, Any]) -> float:
    """Out-of-fold AUC of the one checkpoint in a ``smartformer probe`` metrics.json (all labels)."""
    (per_fraction,) = metrics["results"].values()
    return float(per_fraction["1"]["overall"]["auc"]["value"])


def slim(evaluation: dict[str, Any]) -> dict[str, Any]:
    """One run's evaluation without the per-pair organ separation table (24 kB per CT; in the run's eval/)."""
    clustering = {
        organ: {k: v for k, v in c.items() if k != "separation"} for organ, c in evaluation["clustering"].items()
    }
    return {**evaluation, "clustering": clustering}


def report(work: Path, step_seconds: dict[str, float], budget: float, suite: str = "issue7") -> dict[str, Any]:
    """Write the table of the suite's finished runs (issue 7's and the paper's share one file)."""
    keys = [k for name, s in SUITES.items() if s["results"] == SUITES[suite]["results"] for k in s["order"]]
    rows: dict[str, Any] = {}
    for key in dict.fromkeys(keys):
        name, seed = key.split(":")
        run = work / "runs" / f"{name}-s{seed}"
        if not (run / "eval.json").is_file():
            continue
        rows.setdefault(name, {"runs": []})["runs"].append(
            {
                "seed": int(seed),
                "pretrain": json.loads((run / "pretrain.json").read_text()),
                "eval": slim(json.loads((run / "eval.json").read_text())),
            }
        )
    for row in rows.values():
        row["summary"] = {}
        for metric, fn in METRICS.items():
            values = [v for v in (fn(r["eval"]) for r in row["runs"]) if v is not None]
            if values:
                row["summary"][metric] = {
                    "mean": statistics.mean(values),
                    "values": values,
                    "spread": (max(values) - min(values)) if len(values) > 1 else None,
                }
        row["steps"] = [r["pretrain"]["steps"] for r in row["runs"]]
        # Collapse monitor at the end of training (1.0 = uniform [CLS] targets; not logged by runs
        # trained before the monitor existed).
        row["final_cls_entropy"] = [r["pretrain"].get("final", {}).get("teacher_cls_entropy") for r in row["runs"]]
    reference = {r["seed"]: r["eval"] for r in rows.get("random_init", {}).get("runs", [])}
    for name, row in rows.items():
        if name == "random_init" or not reference:
            continue
        for r in row["runs"]:  # paired with the random init of the same seed (else seed 0's)
            ref = reference.get(r["seed"], reference.get(0, next(iter(reference.values()))))
            r["fewlabel_vs_random"] = {str(n): fewlabel_vs(r["eval"], ref, n) for n in SEG_TRAIN_SIZES}
    finished = {f"{n}:{r['seed']}" for n, v in rows.items() for r in v["runs"]}
    if SUITES[suite]["steps"] is None:
        result = {
            "budget_minutes_idle": budget,
            "step_seconds_idle": step_seconds,
            "variants": rows,
            "complete": set(ORDER) <= finished,
            "complete_paper": set(PAPER_ORDER) <= finished,
        }
    else:
        result = {
            "steps": SUITES[suite]["steps"],
            "variants": rows,
            "complete": set(SUITES[suite]["order"]) <= finished,
        }
    path = RESULTS / SUITES[suite]["results"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    if rows:
        plot(result, PLOTS / SUITES[suite]["plot"])
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| variant | runs | steps | " + " | ".join(METRICS) + " | [CLS] target entropy at the end |",
        "|---|---|---|" + "---|" * (len(METRICS) + 1),
    ]
    for name, row in result["variants"].items():
        cells = []
        for metric in METRICS:
            s = row["summary"].get(metric)
            if s is None:
                cells.append("n/a")
            else:
                cells.append(f"{s['mean']:.3f}" + (f" ± {s['spread'] / 2:.3f}" if s["spread"] is not None else ""))
        entropy = "/".join("n/a" if e is None else f"{e:.3f}" for e in row.get("final_cls_entropy", []))
        lines.append(
            f"| {name} | {len(row['runs'])} | {'/'.join(map(str, row['steps']))} | "
            + " | ".join(cells)
            + f" | {entropy or 'n/a'} |"
        )
    paired = [
        (name, r["seed"], n, d)
        for name, row in result["variants"].items()
        for r in row["runs"]
        for n, d in (r.get("fewlabel_vs_random") or {}).items()
        if d
    ]
    if paired:
        lines += [
            "",
            "| variant | seed | training patients | tumour Dice minus random weights | 95% paired interval "
            "| held-out cases |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {seed} | {n} | {d['value']:+.3f} | [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] | {d['cases']} |"
            for name, seed, n, d in paired
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    priors = next(
        (
            r["eval"]["localization"]["priors"]
            for v in result["variants"].values()
            for r in v["runs"]
            if r["eval"]["localization"]
        ),
        {},
    )
    prior_key = {"localization AUROC": "auroc", "pointing game": "pointing"}
    columns = (len(METRICS) + 1) // 2
    fig, axes = plt.subplots(2, columns, figsize=(3.6 * columns, 6.8))
    for ax in axes.flat[len(METRICS) :]:
        ax.axis("off")
    for ax, metric in zip(axes.flat, METRICS):
        for i, name in enumerate(names):
            s = result["variants"][name]["summary"].get(metric)
            if s is None:
                continue
            ax.bar(i, s["mean"], color="tab:blue" if name.startswith("smart") else "tab:gray")
            ax.plot([i] * len(s["values"]), s["values"], "k.", ms=4)
        for prior, style in (("centre_prior", "--"), ("intensity_prior", ":")):
            value = (priors.get(prior) or {}).get(prior_key.get(metric, ""))
            if value is not None:
                ax.axhline(value, color="tab:red", ls=style, lw=1, label=prior.replace("_", " "))
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
        ax.set_title(metric + " (dots: seeds)", fontsize=9)
    if priors and len(axes.flat) > len(METRICS):  # the priors' key, in the spare panel
        axes.flat[-1].legend(
            *axes.flat[0].get_legend_handles_labels(), loc="center", fontsize=9, title="localization baselines"
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=20.0,
        help="compute budget per variant in idle-machine minutes (default: 20)",
    )
    parser.add_argument("--only", nargs="*", default=None, metavar="VARIANT:SEED")
    parser.add_argument(
        "--suite",
        choices=list(SUITES),
        default="issue7",
        help="the runs to do: issue 7's ablations (default), the published paper's (issue 13), or issue 14's "
        "recipe at a fixed 1500-step budget, 3 seeds",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of each pretraining run (default: the CLI's)"
    )
    parser.add_argument("--report", action="store_true", help="only write the report from finished runs")
    parser.add_argument("--pretrain-only", action="store_true", help="pretrain the runs, evaluate none")
    parser.add_argument(
        "--evaluations",
        choices=list(EVALUATIONS),
        default="all",
        help="all, or 'probes' without the few-label segmentation (the slow part)",
    )
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: not found; this benchmark needs ../shared/data")
    args.work.mkdir(parents=True, exist_ok=True)
    suite = SUITES[args.suite]
    # a fixed step budget needs no calibration (whose cache a suite's fresh --work would lack)
    step_seconds = calibrate(args.work) if suite["steps"] is None else {}
    if not args.report:
        for key in args.only or suite["order"]:
            name, seed = key.split(":")
            if VARIANTS[name] is None:
                steps = 0
            elif suite["steps"] is not None:
                steps = suite["steps"]
            else:
                steps = int(args.budget_minutes * 60 / step_seconds[SAME_COST.get(name, name)])
            pretrain(args.work, name, int(seed), steps, args.threads)
            done = args.work / "runs" / f"{name}-s{seed}" / "eval.json"
            # a suite may plan the evaluations of each run; --evaluations probes leaves segmentation out
            planned = suite.get("evaluations", {}).get(key, "all")
            which = EVALUATIONS["probes" if args.evaluations == "probes" else planned]
            needed = [key for evaluation, key in NEWER_KEYS.items() if evaluation in which]
            missing = not done.is_file() or any(k not in json.loads(done.read_text()) for k in needed)
            if missing and not args.pretrain_only:  # each evaluation is cached: only the missing ones run
                print(f"[{name}:{seed}] evaluating", flush=True)
                result = evaluate(args.work, name, int(seed), which)
                done.write_text(json.dumps(result, indent=2) + "\n")
    report(args.work, step_seconds, args.budget_minutes, args.suite)


if __name__ == "__main__":
    main()
