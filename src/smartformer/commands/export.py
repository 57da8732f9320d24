"""``smartformer export``: pretrained weights to other frameworks (MONAI ``SwinUNETR``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.commands._options import add_checkpoint_argument
from smartformer.errors import SmartformerError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export encoder weights for MONAI SwinUNETR",
        description=(
            "Export the Swin encoder of a checkpoint to the keys MONAI's SwinUNETR uses for its "
            "swinViT part. Every swinViT key is present, so it loads strictly: "
            "net.load_state_dict(torch.load(FILE, weights_only=True), strict=False) reports no missing "
            "swinViT key, and net.swinViT.load_state_dict(<keys without 'swinViT.'>, strict=True) succeeds. "
            "The SwinUNETR must be built with the encoder's architecture (window, width, depths, heads): "
            "export prints the exact SwinUNETR(...) call and writes its arguments to NAME.swinunetr.json "
            "beside --out."
        ),
    )
    add_checkpoint_argument(p)
    p.add_argument("--to", choices=["monai"], default="monai", help="target format (default: monai)")
    p.add_argument("--out", required=True, type=Path, help="output file: .pt (torch) or .safetensors")
    p.add_argument(
        "--weights",
        choices=["teacher", "student"],
        default="teacher",
        help="which network of a training checkpoint or run directory to export (default: teacher)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing --out file (never the input, nor a checkpoint of a run)",
    )
    p.set_defaults(func=run)


_VIT_REFUSAL = (
    "holds a ViT encoder; export --to monai writes the Swin encoder of SwinUNETR. A ViT's weights "
    "load strictly into MONAI's ViT (UNETR's encoder) through ViT3D.monai_state_dict()"
)


def _check_out(out: Path, sources: list[Path], force: bool) -> None:
    """Refuse an output that is the input, a checkpoint of a run, a folder, or (without --force) a file."""
    from smartformer.train.checkpoint import is_run_checkpoint

    if out.is_dir():
        raise SmartformerError(f"{out}: is a folder; give --out a file name (.pt or .safetensors)")
    inputs = [p for source in sources for p in [source, *(source.iterdir() if source.is_dir() else [])]]
    if out.exists() and any(p.exists() and out.samefile(p) for p in inputs):
        raise SmartformerError(f"{out}: is the checkpoint being exported; choose another --out")
    if is_run_checkpoint(out):
        raise SmartformerError(f"{out}: is a checkpoint of the run in {out.parent.parent}; export elsewhere")
    if out.exists() and not force:
        raise SmartformerError(f"{out}: exists; pass --force to overwrite it")


def run(args: argparse.Namespace) -> int:
    import textwrap

    from smartformer.downstream.segmentation import monai_swinvit_state, write_swinunetr_recipe
    from smartformer.models.convert import save_weights
    from smartformer.models.hub import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    given = Path(args.checkpoint)
    _check_out(args.out, [p for p in (given, checkpoint.path) if p is not None and p.exists()], args.force)
    model = checkpoint.load(which=args.weights)
    if model.config.vit is not None:
        raise SmartformerError(f"{args.checkpoint}: {_VIT_REFUSAL}")
    monai_state = monai_swinvit_state(model, checkpoint.source)
    save_weights(monai_state, args.out)
    print(f"wrote {len(monai_state)} swinViT tensors to {args.out}")
    path, text = write_swinunetr_recipe(model.config.backbone, args.out)
    print("load it into a MONAI SwinUNETR built with these arguments (a default SwinUNETR refuses it):")
    print(textwrap.indent(text, "  "))
    print(f"the arguments are also in {path}")
    return 0
