"""``smartformer export``: pretrained weights to other frameworks (MONAI ``SwinUNETR``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

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
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a save_pretrained directory, a training checkpoint (.pt), a weights file, or "
                        "smart-tiny-ct (the shipped model)")
    p.add_argument("--to", choices=["monai"], default="monai", help="target format (default: monai)")
    p.add_argument("--out", required=True, type=Path, help="output file: .pt (torch) or .safetensors")
    p.add_argument("--weights", choices=["teacher", "student"], default="teacher",
                   help="which network of a training checkpoint to export (default: teacher)")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out file (never the input, nor a checkpoint of a run)")
    p.set_defaults(func=run)


_VIT_REFUSAL = ("holds a ViT encoder; export --to monai writes the Swin encoder of SwinUNETR. A ViT's weights "
                "load strictly into MONAI's ViT (UNETR's encoder) through ViT3D.monai_state_dict()")


def _read_state(path: Path, which: str) -> tuple[dict, "Swin3DConfig | None"]:
    """The weights to export and, where the source records it, the encoder architecture."""
    import json

    from smartformer.config import build_model_config, config_from_dict
    from smartformer.models.convert import load_weights
    from smartformer.models.smartformer import CONFIG_NAME, WEIGHTS_NAME, SMARTConfig, pretrained_path

    if not path.exists():
        path = pretrained_path(path) or path  # a shipped model by name
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
            raise SmartformerError(f"{path}: not a save_pretrained directory ({WEIGHTS_NAME} + {CONFIG_NAME})")
        try:
            config = SMARTConfig.from_dict(json.loads((path / CONFIG_NAME).read_text())["model"])
        except (ValueError, KeyError, TypeError) as exc:
            raise SmartformerError(f"{path / CONFIG_NAME}: not a valid smartformer config ({exc})") from None
        if config.vit is not None:
            raise SmartformerError(f"{path}: {_VIT_REFUSAL}")
        return load_weights(path / WEIGHTS_NAME), config.backbone
    state = load_weights(path)
    if isinstance(state, dict) and isinstance(state.get(which), dict):
        config = config_from_dict(state["config"]) if isinstance(state.get("config"), dict) else None
        model = build_model_config(config) if config is not None else None
        if model is not None and model.vit is not None:
            raise SmartformerError(f"{path}: {_VIT_REFUSAL}")
        return state[which], model.backbone if model is not None else None
    return state, None


def _check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse an output that is the input, a checkpoint of a run, a folder, or (without --force) a file."""
    from smartformer.train.checkpoint import is_run_checkpoint

    if out.is_dir():
        raise SmartformerError(f"{out}: is a folder; give --out a file name (.pt or .safetensors)")
    inputs = [source] + ([p for p in source.iterdir() if p.is_file()] if source.is_dir() else [])
    if out.exists() and any(p.exists() and out.samefile(p) for p in inputs):
        raise SmartformerError(f"{out}: is the checkpoint being exported; choose another --out")
    if is_run_checkpoint(out):
        raise SmartformerError(f"{out}: is a checkpoint of the run in {out.parent.parent}; export elsewhere")
    if out.exists() and not force:
        raise SmartformerError(f"{out}: exists; pass --force to overwrite it")


def check_monai_layout(monai_state: dict, encoder: "Swin3DConfig", source: Path) -> None:
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
    from smartformer.models.convert import checkpoint_filter_fn, to_monai_state_dict

    _check_out(args.out, args.checkpoint, args.force)
    state, encoder = _read_state(args.checkpoint, args.weights)
    monai_state = to_monai_state_dict(state)
    if encoder is None:  # a bare weights file: the architecture its tensors imply
        encoder = infer_encoder(checkpoint_filter_fn(state, keep_mask_token=False))
    check_monai_layout(monai_state, encoder, args.checkpoint)
    if args.out.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write_bytes(args.out, save(monai_state))
    else:
        atomic_write_bytes(args.out, torch_bytes(monai_state))
    print(f"wrote {len(monai_state)} swinViT tensors to {args.out}")
    print_swinunetr_recipe(encoder, args.out)
    return 0


def infer_encoder(backbone: dict) -> "Swin3DConfig":
    """The :class:`Swin3DConfig` that backbone weights (Swin3D keys) imply: width, depths, heads, window.

    Raises:
        SmartformerError: the weights lack the tensors the architecture is read from.
    """
    import re

    from smartformer.models.swin3d import Swin3DConfig

    try:
        embed_dim = int(backbone["patch_embed.proj.weight"].shape[0])
        depths, heads, window = [], [], None
        for stage in range(1, 5):
            blocks = {int(m.group(1)) for k in backbone
                      if (m := re.match(rf"layers{stage}\.0\.blocks\.(\d+)\.", k))}
            table = backbone[f"layers{stage}.0.blocks.0.attn.relative_position_bias_table"]
            depths.append(max(blocks) + 1)
            heads.append(int(table.shape[1]))
            side = round(table.shape[0] ** (1 / 3))
            window = (side + 1) // 2
        return Swin3DConfig(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(heads),
                            window_size=(window,) * 3)
    except (KeyError, ValueError, IndexError) as exc:
        raise SmartformerError(f"cannot tell the encoder architecture from the weights (missing {exc})") from None


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
