"""The segmentation network: MONAI ``SwinUNETR`` whose ``swinViT`` is a SMART checkpoint's encoder.

:func:`build_segmenter` builds it with the checkpoint encoder's feature size, depths, heads and window
and loads the encoder weights strictly (every ``swinViT`` tensor, nothing left over;
:func:`~smartformer.models.convert.to_monai_state_dict`). :class:`SegmentationConfig` is what a
trained model's ``segmentation.json`` holds: enough to rebuild the network and preprocess a new CT.

The other way round, :func:`monai_swinvit_state` exports an encoder for a user's own ``SwinUNETR``
(checked key for key against MONAI's layout, :func:`check_monai_layout`), and
:func:`write_swinunetr_recipe` records the ``SwinUNETR(...)`` arguments those weights need.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import monai
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer

from smartformer.downstream.features import load_encoder
from smartformer.errors import SmartformerError
from smartformer.io_utils import atomic_write_bytes
from smartformer.models.convert import MONAI_PREFIX, to_monai_state_dict
from smartformer.models.swin3d import Swin3DConfig
from smartformer.train.checkpoint import check_state_fits

if TYPE_CHECKING:
    from torch import Tensor

    from smartformer.models.smartformer import SMARTFormer


CONFIG_FILE = "segmentation.json"
WEIGHTS_FILE = "best.safetensors"
FORMAT_VERSION = 1


#: SwinUNETR constructor arguments that MONAI 1.4 does not take yet, with the values it builds instead.
_FIXED_IN_OLD_MONAI = {"window_size": (7, 7, 7), "patch_size": 2, "mlp_ratio": 4.0, "qkv_bias": True}


def _encoder_args(encoder: Swin3DConfig) -> dict[str, Any]:
    return {
        "window_size": tuple(encoder.window_size),
        "patch_size": encoder.patch_size,
        "mlp_ratio": encoder.mlp_ratio,
        "qkv_bias": encoder.qkv_bias,
    }


def swinunetr_kwargs(encoder: Swin3DConfig, num_classes: int, roi: Sequence[int] = (64, 64, 64)) -> dict[str, Any]:
    """``SwinUNETR`` keyword arguments for ``encoder``'s architecture, as far as this MONAI takes them.

    MONAI 1.4 wants ``img_size`` (deprecated; given ``roi``) and has no ``window_size``,
    ``patch_size``, ``mlp_ratio`` or ``qkv_bias`` arguments; :func:`new_swinunetr` then swaps in
    a MONAI ``SwinTransformer`` built with the encoder's values.

    Raises:
        SmartformerError: an encoder width SwinUNETR's decoder cannot take (not a multiple of 12).
    """
    if encoder.embed_dim % 12:
        raise SmartformerError(
            f"encoder width {encoder.embed_dim} cannot be a MONAI SwinUNETR (its feature_size must be a multiple of 12)"
        )
    params = inspect.signature(SwinUNETR.__init__).parameters
    kwargs: dict[str, Any] = dict(
        in_channels=encoder.in_chans,
        out_channels=num_classes + 1,
        feature_size=encoder.embed_dim,
        depths=tuple(encoder.depths),
        num_heads=tuple(encoder.num_heads),
        dropout_path_rate=encoder.drop_path_rate,
    )
    kwargs.update({k: v for k, v in _encoder_args(encoder).items() if k in params})
    if "img_size" in params:
        kwargs["img_size"] = tuple(int(r) for r in roi)
    return kwargs


def swinunetr_recipe(encoder: Swin3DConfig, weights: Path) -> tuple[dict[str, Any], str]:
    """How to use exported ``swinViT`` weights: the ``SwinUNETR`` arguments they need, as a JSON-ready
    dict and as the Python lines to type (a default ``SwinUNETR`` has window 7 and refuses them).

    ``out_channels`` is left to the user (the task's classes + background); every other argument is
    what this MONAI's ``SwinUNETR`` takes for ``encoder`` (:func:`swinunetr_kwargs`).
    """
    kwargs = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in swinunetr_kwargs(encoder, 1).items()
        if k != "out_channels"
    }
    loader = (
        "safetensors.torch.load_file(WEIGHTS)"
        if weights.suffix == ".safetensors"
        else "torch.load(WEIGHTS, weights_only=True)"
    )
    load = (
        f"net.load_state_dict({loader.replace('WEIGHTS', repr(str(weights)))}, strict=False)  "
        "# every swinViT key loads; the decoder stays random"
    )
    arguments = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v!r}" for k, v in kwargs.items())
    imports = "import safetensors.torch" if weights.suffix == ".safetensors" else "import torch"
    text = (
        f"{imports}\nfrom monai.networks.nets import SwinUNETR\n"
        f"net = SwinUNETR({arguments}, out_channels=N_CLASSES + 1)\n{load}"
    )
    recipe = {
        "class": "monai.networks.nets.SwinUNETR",
        "kwargs": kwargs,
        "out_channels": "your classes + 1 (background)",
        "weights": weights.name,
        "load": load,
        "monai_version": monai.__version__,
    }
    return recipe, text


def write_swinunetr_recipe(encoder: Swin3DConfig, weights: Path) -> tuple[Path, str]:
    """Write the :func:`swinunetr_recipe` of ``weights`` to ``<stem>.swinunetr.json`` beside them (a default
    ``SwinUNETR`` refuses them: window 7, not the encoder's); return the JSON's path and the Python lines."""
    recipe, text = swinunetr_recipe(encoder, weights)
    path = weights.with_name(f"{weights.name.split('.')[0]}.swinunetr.json")
    atomic_write_bytes(path, (json.dumps(recipe, indent=2) + "\n").encode())
    return path, text


def check_monai_layout(monai_state: dict[str, Tensor], encoder: Swin3DConfig, source: str) -> None:
    """Refuse a swinViT state dict whose keys or shapes differ from MONAI's for ``encoder``.

    Raises:
        SmartformerError: naming the source, the number of disagreements and the first one.
    """
    expected = {MONAI_PREFIX + k: v for k, v in new_swinunetr(encoder, 1).swinViT.state_dict().items()}
    check_state_fits(expected, monai_state, "MONAI SwinUNETR.swinViT for its architecture", str(source))


def monai_swinvit_state(model: SMARTFormer, source: str) -> dict[str, Tensor]:
    """The Swin encoder of ``model`` under MONAI ``SwinUNETR``'s ``swinViT.*`` keys, every one of them, checked
    against MONAI's layout for its architecture (:func:`check_monai_layout`; ``source`` names the weights
    in the error). A ViT encoder has no such layout: its weights go to MONAI's ``ViT`` through
    :meth:`~smartformer.models.vit3d.ViT3D.monai_state_dict`."""
    monai_state = to_monai_state_dict(model.backbone.state_dict())
    check_monai_layout(monai_state, model.config.backbone, source)
    return monai_state


def new_swinunetr(encoder: Swin3DConfig, num_classes: int, roi: Sequence[int] = (64, 64, 64)) -> SwinUNETR:
    """A randomly initialised ``SwinUNETR`` whose ``swinViT`` has exactly ``encoder``'s architecture."""
    kwargs = swinunetr_kwargs(encoder, num_classes, roi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI 1.4's img_size deprecation notice
        net = SwinUNETR(**kwargs)
    wanted = _encoder_args(encoder)
    if any(name not in kwargs and value != _FIXED_IN_OLD_MONAI[name] for name, value in wanted.items()):
        # Older MONAI: same SwinTransformer class and arguments as SwinUNETR builds, the encoder's values.
        net.swinViT = SwinTransformer(
            in_chans=encoder.in_chans,
            embed_dim=encoder.embed_dim,
            window_size=wanted["window_size"],
            patch_size=(encoder.patch_size,) * 3,
            depths=tuple(encoder.depths),
            num_heads=tuple(encoder.num_heads),
            mlp_ratio=encoder.mlp_ratio,
            qkv_bias=encoder.qkv_bias,
            drop_path_rate=encoder.drop_path_rate,
            spatial_dims=3,
            downsample="merging",
            use_v2=False,
        )
    return net


def build_segmenter(
    checkpoint: str | Path, num_classes: int, roi: Sequence[int] = (64, 64, 64), seed: int = 0
) -> tuple[SwinUNETR, Swin3DConfig]:
    """A ``SwinUNETR`` for ``num_classes`` foreground classes whose encoder is ``checkpoint``'s.

    ``checkpoint`` is a save_pretrained directory, a pretraining run directory (its ``teacher/``) or
    ``random:PRESET`` (that preset's architecture, random weights drawn from ``seed``: the baseline).
    The encoder's weights go into ``net.swinViT`` with ``strict=True``; the decoder is initialised
    from ``seed``. Returns the network and the encoder's configuration.

    Raises:
        InputError: a path that is no checkpoint (e.g. a folder without weights).
        SmartformerError: an architecture ``SwinUNETR`` cannot take, or weights that do not fit it.
    """
    encoder_model = load_encoder(str(checkpoint), seed=seed)
    return segmenter_from_encoder(
        encoder_model, num_classes, roi, seed, source=str(checkpoint)
    ), encoder_model.config.backbone


def segmenter_from_encoder(
    encoder_model: SMARTFormer,
    num_classes: int,
    roi: Sequence[int] = (64, 64, 64),
    seed: int = 0,
    source: str = "encoder",
) -> SwinUNETR:
    """:func:`build_segmenter` for a network already loaded (``source`` names it in errors)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = new_swinunetr(encoder_model.config.backbone, num_classes, roi)
    state = {k[len(MONAI_PREFIX) :]: v for k, v in to_monai_state_dict(encoder_model.backbone.state_dict()).items()}
    try:
        net.swinViT.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise SmartformerError(f"{source}: the encoder does not load into SwinUNETR.swinViT ({first})") from None
    return net


@dataclass
class SegmentationConfig:
    """What ``segmentation.json`` holds: enough to rebuild the network and preprocess a new CT."""

    label_ids: list[int]
    encoder: dict[str, Any]
    spacing: list[float]
    window: str | list[float]
    roi: list[int]
    overlap: float = 0.25
    checkpoint: str = ""
    step: int = 0
    val_dice: dict[str, float] = field(default_factory=dict)
    val_mean_dice: float = float("nan")
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.label_ids)

    def encoder_config(self) -> Swin3DConfig:
        return Swin3DConfig(**self.encoder)


def _sliding_logits(
    net: torch.nn.Module,
    image: torch.Tensor,
    roi: Sequence[int],
    overlap: float,
    device: torch.device,
    sw_batch_size: int = 2,
) -> torch.Tensor:
    """(1, K+1, X, Y, Z) logits of a (1, X, Y, Z) volume, blended over overlapping ROI windows."""
    return sliding_window_inference(
        image[None].to(device), tuple(roi), sw_batch_size, net, overlap=overlap, mode="gaussian", progress=False
    )
