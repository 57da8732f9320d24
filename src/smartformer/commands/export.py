"""``smartformer export``: pretrained weights to other frameworks (MONAI ``SwinUNETR``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smartformer.errors import SmartformerError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export encoder weights for MONAI SwinUNETR",
        description=(
            "Export the Swin encoder of a checkpoint to the keys MONAI's SwinUNETR uses for its "
            "swinViT part. Every swinViT key is present, so it loads strictly: "
            "net.load_state_dict(torch.load(FILE, weights_only=True), strict=False) reports no missing "
            "swinViT key, and net.swinViT.load_state_dict(<keys without 'swinViT.'>, strict=True) succeeds."
        ),
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a save_pretrained directory, a training checkpoint (.pt), a weights file, or "
                        "smart-tiny-ct (the shipped model)")
    p.add_argument("--to", choices=["monai"], default="monai", help="target format (default: monai)")
    p.add_argument("--out", required=True, type=Path, help="output file: .pt (torch) or .safetensors")
    p.add_argument("--weights", choices=["teacher", "student"], default="teacher",
                   help="which network of a training checkpoint to export (default: teacher)")
    p.set_defaults(func=run)


def _read_state(path: Path, which: str) -> dict:
    from smartformer.models.convert import load_weights
    from smartformer.models.smartformer import CONFIG_NAME, WEIGHTS_NAME, pretrained_path

    if not path.exists():
        path = pretrained_path(path) or path  # a shipped model by name
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
            raise SmartformerError(f"{path}: not a save_pretrained directory ({WEIGHTS_NAME} + {CONFIG_NAME})")
        return load_weights(path / WEIGHTS_NAME)
    state = load_weights(path)
    if isinstance(state, dict) and isinstance(state.get(which), dict):
        return state[which]
    return state


def run(args: argparse.Namespace) -> int:
    import torch

    from smartformer.models.convert import to_monai_state_dict

    state = _read_state(args.checkpoint, args.weights)
    monai_state = to_monai_state_dict(state)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(monai_state, str(tmp))
    else:
        torch.save(monai_state, tmp)
    tmp.replace(args.out)
    print(f"wrote {len(monai_state)} swinViT tensors to {args.out}")
    return 0
