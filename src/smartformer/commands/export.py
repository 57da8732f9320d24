"""``smartformer export``: pretrained weights to other frameworks (MONAI ``SwinUNETR``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from smartformer.commands._options import add_checkpoint_argument
from smartformer.errors import SmartformerError

if TYPE_CHECKING:
    from smartformer.models.swin3d import Swin3DConfig


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
    p.add_argument("--weights", choices=["teacher", "student"], default="teacher",
                   help="which network of a training checkpoint or run directory to export (default: teacher)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out file (never the input, nor a checkpoint of a run)")
    p.set_defaults(func=run)


_VIT_REFUSAL = ("holds a ViT encoder; export --to monai writes the Swin encoder of SwinUNETR. A ViT's weights "
                "load strictly into MONAI's ViT (UNETR's encoder) through ViT3D.monai_state_dict()")


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


def check_monai_layout(monai_state: dict, encoder: "Swin3DConfig", source: str) -> None:
    """Refuse a swinViT state dict whose keys or shapes differ from MONAI's for ``encoder``.

    Raises:
        SmartformerError: naming the source, the number of disagreements and the first one.
    """
    from smartformer.downstream.segmentation import new_swinunetr
    from smartformer.models.convert import MONAI_PREFIX
    from smartformer.train.checkpoint import check_state_fits

    expected = {MONAI_PREFIX + k: v for k, v in new_swinunetr(encoder, 1).swinViT.state_dict().items()}
    check_state_fits(expected, monai_state, "MONAI SwinUNETR.swinViT for its architecture", str(source))


def run(args: argparse.Namespace) -> int:
    from smartformer.io_utils import atomic_write_bytes, torch_bytes
    from smartformer.models.convert import to_monai_state_dict
    from smartformer.models.hub import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    given = Path(args.checkpoint)
    _check_out(args.out, [p for p in (given, checkpoint.path) if p is not None and p.exists()], args.force)
    model = checkpoint.load(which=args.weights)
    if model.config.vit is not None:
        raise SmartformerError(f"{args.checkpoint}: {_VIT_REFUSAL}")
    encoder = model.config.backbone
    monai_state = to_monai_state_dict(model.backbone.state_dict())
    check_monai_layout(monai_state, encoder, checkpoint.source)
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write_bytes(args.out, save(monai_state))
    else:
        atomic_write_bytes(args.out, torch_bytes(monai_state))
    print(f"wrote {len(monai_state)} swinViT tensors to {args.out}")
    print_swinunetr_recipe(encoder, args.out)
    return 0


def print_swinunetr_recipe(encoder: "Swin3DConfig", weights: Path) -> Path:
    """Print the ``SwinUNETR(...)`` that takes ``weights`` and write its arguments to
    ``<stem>.swinunetr.json`` beside them (a default ``SwinUNETR`` refuses them: window 7, not the
    encoder's); return the JSON's path."""
    import json
    import textwrap

    from smartformer.downstream.segmentation import swinunetr_recipe
    from smartformer.io_utils import atomic_write_bytes

    recipe, text = swinunetr_recipe(encoder, weights)
    path = weights.with_name(f"{weights.name.split('.')[0]}.swinunetr.json")
    atomic_write_bytes(path, (json.dumps(recipe, indent=2) + "\n").encode())
    print("load it into a MONAI SwinUNETR built with these arguments (a default SwinUNETR refuses it):")
    print(textwrap.indent(text, "  "))
    print(f"the arguments are also in {path}")
    return path
