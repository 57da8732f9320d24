"""Copy a pretraining run's teacher into the package as the shipped model, with its model card.

The shipped model, ``smart-tiny-ct``, is the ``tiny`` SMART teacher pretrained on every CT of
../shared/data (see docs/BENCHMARKS.md and the card). Its run goes on across sessions
(``smartformer pretrain --resume``); after each, this script refreshes the shipped weights and
writes the card from the run's own config, metrics and checkpoint, so the card's figures are
always those of the weights next to it.

Usage::

    python tools/ship_pretrained.py RUN_DIR --data CORPUS_CSV [--name smart-tiny-ct] [--limit TEXT ...]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import textwrap
from pathlib import Path

import yaml

from smartformer.train.monitor import UNIFORM_ENTROPY, read_metrics

ROOT = Path(__file__).resolve().parents[1]
TAIL_ROWS = 20  # logged steps summarised (median) for the card's entropy figures and the collapse check

CARD = """\
# {name}: SMART `tiny` encoder pretrained on public CT

A small 3D Swin transformer with semantic class attention, pretrained self-supervised with SMART
(noisy momentum teacher, attention-guided masked image modeling, co-distillation) by
`smartformer pretrain`. These are the **teacher** weights, encoder only (no projection heads, no
reconstruction decoder): {params:,} parameters, {size_mb:.1f} MB of float32 safetensors.

```python
from smartformer.models.smartformer import SMARTFormer
model = SMARTFormer.from_pretrained("{name}")         # by name; no download, no pickle
```
```bash
smartformer attention --checkpoint {name} --image ct.nii.gz --out maps/
smartformer probe --checkpoint {name} random:tiny --data lesions.csv --out probe/
smartformer export --checkpoint {name} --to monai --out swinvit.pt     # SwinUNETR.swinViT
```

## Architecture
`tiny` preset: patch 2, embed dim {embed_dim}, depths {depths}, heads {heads}, window {window};
semantic attention ({sem_depth} class-attention blocks, {sem_heads} heads) on the stride-{stride}
tokens. Input: one channel, CT in HU windowed {window_hu} to [0, 1], RAS, {spacing} mm voxels, sides
multiples of 32 (trained on {roi} views).

## Training
- Data: {n_volumes} CT volumes, every CT of the project's shared test data (listed below).
- Budget: **{steps} steps** of batch {batch} ({views} views of {roi} voxels each step), {hours:.1f} h of
  training on {hardware}. The schedules span {max_steps} steps; {status}.
- Recipe: the `tiny` preset (lr {lr} per sample, AdamW, cosine; EMA teacher momentum {momentum};
  teacher noise `{noise}` {noise_ratio}; masking `{masking}` ratio {mask_ratio}; losses recon
  {w_recon} / patch {w_patch} / [CLS] {w_cls}). Full resolved config: `training_config.yaml`.
- Final training losses (step {last_step}): total {loss:.4f}, reconstruction {loss_recon:.4f},
  patch distillation {loss_patch:.4f}, [CLS] distillation {loss_cls:.4f}; attention-head
  diversity {head_diversity:.3f}.{entropy_line}

## Data, licences and attributions
Weights derived from these data sets; attribution is required when results are published:
- 51 soft-tissue-sarcoma CTs (limbs, cropped around the tumour): IBSI validation data set
  (theibsi/data_sets, `ibsi_validation`), CC BY 3.0, from the TCIA Soft-tissue-Sarcoma collection.
  Cite: Vallieres M, Freeman CR, Skamene SR, El Naqa I (2015), The Cancer Imaging Archive,
  DOI 10.7937/K9/TCIA.2015.7GO2GSKS; Phys Med Biol 60(14):5471, DOI 10.1088/0031-9155/60/14/5471;
  Clark K et al. (2013) J Digit Imaging 26(6):1045.
- 1 contrast chest CT: example data of InsightSoftwareConsortium/ITKElastix (Apache-2.0).
- 1 chest/upper-abdomen CT: pyvista/vtk-data (`Data/DICOM_Stack`), from the TCIA
  Pancreas-CT-CB collection (CC BY).
- 2 abdomen CTs: reference files of the TotalSegmentator test suite (wasserth/TotalSegmentator,
  Apache-2.0).

## Known limits
- Tiny and briefly trained: {steps} CPU steps on {n_volumes} scans, most of them limb
  sarcoma crops; a demonstration and a starting point, not a foundation model. Pretrain on your
  own CTs (`smartformer pretrain --data ...`), optionally starting from these weights.
- Trained at {spacing} mm, window {window_hu} HU, {roi} views: feed it the same
  (`smartformer attention` does by default).
- Attention maps are for exploration, not a detector; the zero-shot localization and probe
  figures of this model are in docs/BENCHMARKS.md. Not for clinical use.{collapse_note}{notes}
"""


def median_of(rows: list[dict], key: str) -> float:
    """Median of ``key`` over the rows that logged it (NaN when none did).

    The median, not the mean: a collapsed branch's entropy sits at 1.0 with brief dips (one
    step at 0.6 among twenty at 1.0), which would pull a mean under the threshold.
    """
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else float("nan")


def entropy_line(tail: list[dict]) -> str:
    """The card's sentence on the teacher target entropies at the end ('' for runs that did not log them)."""
    cls, patch = median_of(tail, "teacher_cls_entropy"), median_of(tail, "teacher_patch_entropy")
    if math.isnan(cls) or math.isnan(patch):
        return ""
    return (
        f" Median teacher target entropy over the last {len(tail)} logged steps, as a\n"
        f"  fraction of ln K (1.0 = uniform targets, nothing to learn): [CLS] {cls:.3f}, patch {patch:.3f}."
    )


def collapse_note(tail: list[dict], out_dim: int, layer_scale: float, batch: int) -> str:
    """A known-limits line when the run's [CLS] targets were uniform at the end, else ''.

    ``tail`` is the last logged steps: one step's entropy is noisy, their median is not.
    ``layer_scale`` is the class-attention LayerScale start the run used (configs written
    before it was an option started at 1e-4), which decides the cause the line gives; ``batch``
    the volumes per step.
    """
    entropy = median_of(tail, "teacher_cls_entropy")
    uniform = (
        entropy > UNIFORM_ENTROPY
        if not math.isnan(entropy)
        else abs(median_of(tail, "loss_cls") - math.log(out_dim)) < 1e-3
    )
    if not uniform:
        return ""
    if layer_scale < 1e-2:
        cause = (
            "  Runs of smartformer before the semantic-attention LayerScale fix (LayerScale started\n"
            "  at 1e-4) collapse this way: the [CLS] did not depend on the input."
        )
    else:
        cause = (
            f"  The [CLS] starts input-dependent, but at {batch} volumes per step its targets drift to\n"
            "  uniform during training, as in every run of the quality benchmark (docs/BENCHMARKS.md),\n"
            "  and the [CLS] ends nearly the same for every input; the patch targets stay informative\n"
            f"  ({median_of(tail, 'teacher_patch_entropy'):.3f} of ln K). DINO trains with hundreds of\n"
            "  images per step and recommends a teacher temperature of 0.04 (this recipe warms up to\n"
            "  0.07): a larger batch or `loss.teacher_temp=0.04` are the first things to try\n"
            "  (docs/BENCHMARKS.md has a first, short trial of the latter)."
        )
    return (
        f"\n- Its [CLS] targets ended near uniform (teacher entropy above {UNIFORM_ENTROPY} of ln K; the\n"
        f"  [CLS] loss sits near ln K = {math.log(out_dim):.4f}), so the [CLS] distillation taught the\n"
        "  [CLS] embedding little and the attention query learnt mostly through the other losses.\n" + cause
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a pretraining run directory")
    parser.add_argument("--data", type=Path, required=True, help="the CSV (image column) the run was trained on")
    parser.add_argument("--name", default="smart-tiny-ct")
    parser.add_argument("--hardware", default="2 vCPU (AMD EPYC), no GPU, shared with other work")
    parser.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="TEXT",
        help="a further known-limits item for the card (measured figures, e.g. localization); repeatable",
    )
    args = parser.parse_args()

    from smartformer.models.smartformer import SMARTFormer
    from smartformer.train.checkpoint import load_checkpoint

    config = yaml.safe_load((args.run / "config.yaml").read_text())
    state = load_checkpoint(args.run / "checkpoints" / "last.pt")
    steps = int(state["step"])
    logged = [r for r in read_metrics(args.run / "metrics.jsonl") if "loss" in r and r["step"] <= steps]
    last, tail = logged[-1], logged[-TAIL_ROWS:]
    # Training time: the checkpoint's own count, else the logged throughput summed over the logs.
    seconds = float(state.get("train_seconds", 0.0)) or sum(
        (r["step"] - (logged[i - 1]["step"] if i else 0)) / r["steps_per_s"] for i, r in enumerate(logged)
    )
    model = SMARTFormer.from_pretrained(args.run / "teacher")
    # Saved before the LayerScale start was an option: then it was CaiT's 1e-4.
    layer_scale = json.loads((args.run / "teacher" / "config.json").read_text())["model"].get(
        "semantic_layer_scale", 1e-4
    )
    dest = ROOT / "src" / "smartformer" / "pretrained" / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(args.run / "teacher" / name, dest / name)
    (dest / "training_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    bb, m, t = model.config.backbone, model.config, config
    n_volumes = len(args.data.read_text().splitlines()) - 1
    card = CARD.format(
        name=args.name,
        params=sum(p.numel() for p in model.parameters()),
        size_mb=(dest / "model.safetensors").stat().st_size / 2**20,
        embed_dim=bb.embed_dim,
        depths=list(bb.depths),
        heads=list(bb.num_heads),
        window=list(bb.window_size),
        sem_depth=m.semantic_depth,
        sem_heads=m.semantic_heads,
        stride=m.semantic_stride,
        window_hu=t["data"]["window"],
        spacing="x".join(f"{s:g}" for s in t["data"]["spacing"]),
        roi="x".join(str(r) for r in t["data"]["roi"]),
        n_volumes=n_volumes,
        steps=steps,
        batch=t["data"]["batch_size"],
        views=2,
        hours=seconds / 3600,
        hardware=args.hardware,
        max_steps=t["train"]["max_steps"],
        status="training is complete"
        if steps >= t["train"]["max_steps"]
        else f"training continues (these are the step-{steps} weights; the lr has not yet decayed to its minimum)",
        lr=t["optim"]["lr"],
        momentum=t["teacher"]["momentum"],
        noise=t["teacher"]["noise"],
        noise_ratio=t["teacher"].get("noise_ratio", ""),
        masking=t["masking"]["strategy"],
        mask_ratio=t["masking"]["ratio"],
        w_recon=t["loss"]["recon_weight"],
        w_patch=t["loss"]["patch_weight"],
        w_cls=t["loss"]["cls_weight"],
        last_step=last["step"],
        loss=last["loss"],
        loss_recon=last["loss_recon"],
        loss_patch=last["loss_patch"],
        loss_cls=last["loss_cls"],
        head_diversity=last.get("head_diversity", float("nan")),
        entropy_line=entropy_line(tail),
        collapse_note=collapse_note(tail, m.head_out_dim, layer_scale, t["data"]["batch_size"]),
        notes="".join("\n- " + textwrap.fill(text, 96, subsequent_indent="  ") for text in args.limit),
    )
    (dest / "README.md").write_text(card)
    print(f"shipped {args.run / 'teacher'} (step {steps}) as {dest}")


if __name__ == "__main__":
    main()
