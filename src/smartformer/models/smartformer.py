"""SMARTFormer: Swin3D backbone + semantic attention + DINO heads + reconstruction decoder.

Typical use::

    model = SMARTFormer.from_preset("tiny")
    out = model(views, mask=cell_mask)          # dict: cls, tokens, attn, cls_logits, patch_logits, recon
    maps = model.attention_maps(volume)         # (B, heads, d, h, w), exact softmax weights
    model.save_pretrained("encoder/")           # model.safetensors + config.json
    encoder = SMARTFormer.from_pretrained("encoder/")
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from smartformer.errors import SmartformerError
from smartformer.models.heads import DINOHead, ReconstructionDecoder
from smartformer.models.semantic_attention import SemanticAttention
from smartformer.models.swin3d import PRESETS as BACKBONE_PRESETS
from smartformer.models.swin3d import Swin3D, Swin3DConfig

__all__ = ["SMARTConfig", "SMARTFormer", "MODEL_PRESETS", "CONFIG_NAME", "WEIGHTS_NAME", "PRETRAINED",
           "pretrained_path"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1

#: Pretrained models shipped inside the package, by short name (folders of smartformer/pretrained/,
#: each with model.safetensors, config.json and a model card, README.md).
PRETRAINED: tuple[str, ...] = ("smart-tiny-ct",)


def pretrained_path(name: str | Path) -> Path | None:
    """The folder of the shipped pretrained model called ``name`` (see :data:`PRETRAINED`), else None."""
    if str(name) not in PRETRAINED:
        return None
    folder = Path(__file__).resolve().parents[1] / "pretrained" / str(name)
    return folder if (folder / WEIGHTS_NAME).is_file() else None


@dataclass
class SMARTConfig:
    """Everything needed to rebuild a :class:`SMARTFormer` (saved as ``config.json``)."""

    backbone: Swin3DConfig = field(default_factory=lambda: Swin3DConfig(**BACKBONE_PRESETS["tiny"].to_dict()))
    semantic_attention: bool = True  # False: the SMIT way, a global-average-pooled token instead of [CLS]
    semantic_stride: int = 16
    semantic_depth: int = 2
    semantic_heads: int = 6
    # LayerScale start of the class-attention blocks; see ClassAttentionBlock for why not CaiT's 1e-4.
    semantic_layer_scale: float = 1.0
    heads: bool = True  # DINO projection heads ([CLS] and patch)
    head_out_dim: int = 1024
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    head_nlayers: int = 3
    patch_out_dim: int | None = None  # None: same as head_out_dim
    shared_head: bool = False
    decoder: bool = True
    # The decoder reads the last stage's blocks (stride 16; the stride-32 output is only their
    # linear merge). It matches the mask unit and costs 16^3 instead of 32^3 output channels.
    decoder_stride: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = Swin3DConfig(**self.backbone)
        if self.semantic_stride not in (4, 8, 16, 32):
            raise ValueError(f"semantic_stride must be 4, 8, 16 or 32, got {self.semantic_stride}")
        if self.decoder_stride not in (4, 8, 16, 32):
            raise ValueError(f"decoder_stride must be 4, 8, 16 or 32, got {self.decoder_stride}")
        if self.shared_head and self.patch_out_dim not in (None, self.head_out_dim):
            raise ValueError("shared_head needs patch_out_dim equal to head_out_dim")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SMARTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SmartformerError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


MODEL_PRESETS: dict[str, SMARTConfig] = {
    "tiny": SMARTConfig(backbone=Swin3DConfig(**BACKBONE_PRESETS["tiny"].to_dict()), semantic_heads=6),
    "base": SMARTConfig(
        backbone=Swin3DConfig(**BACKBONE_PRESETS["base"].to_dict()),
        semantic_heads=12,
        head_out_dim=8192,
        head_hidden_dim=2048,
        head_bottleneck_dim=256,
    ),
    "smit": SMARTConfig(
        backbone=Swin3DConfig(**BACKBONE_PRESETS["smit"].to_dict()),
        semantic_heads=4,
        head_out_dim=8192,
        head_hidden_dim=2048,
        head_bottleneck_dim=256,
    ),
}


class SMARTFormer(nn.Module):
    """The SMART network: one module for the student, a deep copy for the teacher."""

    def __init__(self, config: SMARTConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Swin3D(config.backbone)
        dim = self.backbone.width(config.semantic_stride)
        self.embed_dim = dim
        self.semantic: SemanticAttention | None = None
        self.pool_norm: nn.LayerNorm | None = None
        if config.semantic_attention:
            self.semantic = SemanticAttention(dim, config.semantic_heads, depth=config.semantic_depth,
                                              init_values=config.semantic_layer_scale,
                                              fused_attn=config.backbone.fused_attn)
        else:
            self.pool_norm = nn.LayerNorm(dim)
        self.cls_head: DINOHead | None = None
        self.patch_head: DINOHead | None = None
        if config.heads:
            head_kw = dict(hidden_dim=config.head_hidden_dim, bottleneck_dim=config.head_bottleneck_dim,
                           nlayers=config.head_nlayers)
            self.cls_head = DINOHead(dim, config.head_out_dim, **head_kw)
            self.patch_head = (
                self.cls_head
                if config.shared_head
                else DINOHead(dim, config.patch_out_dim or config.head_out_dim, **head_kw)
            )
        self.decoder = (
            ReconstructionDecoder(self.backbone.width(config.decoder_stride), config.decoder_stride)
            if config.decoder
            else None
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "SMARTFormer":
        """Build from a preset (``tiny``, ``base``, ``smit``); keyword overrides replace fields."""
        if name not in MODEL_PRESETS:
            raise SmartformerError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        data = MODEL_PRESETS[name].to_dict()
        backbone = {**data.pop("backbone"), **overrides.pop("backbone", {})}
        return cls(SMARTConfig.from_dict({**data, **overrides, "backbone": backbone}))

    # ------------------------------------------------------------------ forward
    def forward_features(self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False) -> dict[str, Any]:
        """Backbone + semantic attention.

        Args:
            x: (B, 1, D, H, W) volume, sides multiples of 32.
            mask: optional boolean cell mask (B, d, h, w), True = replaced by the mask token.
            return_attention: also return the last class-attention block's maps.

        Returns:
            ``cls`` (B, C); ``tokens`` (B, N, C) of the semantic stage, N = d*h*w in C order;
            ``grid`` (d, h, w); ``attn`` (B, heads, d, h, w) or None; ``final`` channels-last
            features at ``decoder_stride`` (or None without a decoder).
        """
        strides = {self.config.semantic_stride}
        if self.decoder is not None:
            strides.add(self.config.decoder_stride)
        feats = self.backbone.forward_features(x, mask, strides=sorted(strides))
        tokens = feats[self.config.semantic_stride]
        attn = None
        if self.semantic is not None:
            cls, attn = self.semantic(tokens, return_attn=return_attention)
        else:
            assert self.pool_norm is not None
            cls = self.pool_norm(tokens).mean(dim=(1, 2, 3))
        return {
            "cls": cls,
            "tokens": tokens.flatten(1, 3),
            "grid": tuple(tokens.shape[1:4]),
            "attn": attn,
            "final": feats.get(self.config.decoder_stride) if self.decoder is not None else None,
        }

    def forward_head(self, features: dict[str, Any]) -> dict[str, Tensor]:
        """DINO logits for the [CLS] (B, K) and the patch tokens (B, N, K')."""
        if self.cls_head is None or self.patch_head is None:
            raise SmartformerError("this model was built or saved without projection heads")
        return {"cls_logits": self.cls_head(features["cls"]), "patch_logits": self.patch_head(features["tokens"])}

    def reconstruct(self, features: dict[str, Any]) -> Tensor:
        """Voxel reconstruction (B, 1, D, H, W) from the final-stage features."""
        if self.decoder is None or features["final"] is None:
            raise SmartformerError("this model was built or saved without a reconstruction decoder")
        return self.decoder(features["final"])

    def forward(
        self, x: Tensor, mask: Tensor | None = None, return_attention: bool = False, heads: bool = True,
        reconstruct: bool = True,
    ) -> dict[str, Any]:
        """Features, head logits and reconstruction in one call (one call per step keeps DDP simple)."""
        out = self.forward_features(x, mask, return_attention)
        if heads and self.cls_head is not None:
            out.update(self.forward_head(out))
        if reconstruct and self.decoder is not None:
            out["recon"] = self.reconstruct(out)
        return out

    @torch.no_grad()
    def attention_maps(self, volume: Tensor) -> Tensor:
        """Per-head semantic attention (B, heads, d, h, w) for (B, 1, D, H, W); each map sums to 1."""
        if self.semantic is None:
            raise SmartformerError(
                "attention maps need the semantic attention module; this model was built with "
                "semantic_attention=False (pooled token, the SMIT way)"
            )
        return self.forward_features(volume, return_attention=True)["attn"]

    # ------------------------------------------------------------------ weights in and out
    def save_pretrained(self, directory: str | Path, include_heads: bool = False) -> Path:
        """Write ``model.safetensors`` + ``config.json``; heads and decoder only with ``include_heads``."""
        from safetensors.torch import save

        from smartformer.io_utils import atomic_write_bytes

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        state = self.state_dict()
        if not include_heads:
            config.update(heads=False, decoder=False)
            state = {k: v for k, v in state.items() if not k.startswith(("cls_head.", "patch_head.", "decoder."))}
        # safetensors refuses shared storage (a shared head appears twice) and non-contiguous tensors.
        seen: set[int] = set()
        tensors: dict[str, Tensor] = {}
        for k, v in state.items():
            key = v.data_ptr()
            tensors[k] = v.detach().clone().contiguous() if key in seen else v.detach().contiguous()
            seen.add(key)
        # atomic, and with the umask's mode like every other file (save_file would make it 0600)
        atomic_write_bytes(directory / WEIGHTS_NAME,
                           save(tensors, metadata={"format": "pt", "smartformer_format": str(FORMAT_VERSION)}))
        (directory / CONFIG_NAME).write_text(
            json.dumps({"format_version": FORMAT_VERSION, "model": config}, indent=2) + "\n"
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "SMARTFormer":
        """Load a model written by :meth:`save_pretrained`, or a shipped one by name (``"smart-tiny-ct"``).

        A path that exists wins over a shipped name. Weights are safetensors: no code is ever unpickled.
        """
        from safetensors.torch import load_file

        shipped = None if Path(directory).exists() else pretrained_path(directory)
        directory = shipped or Path(directory)
        cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (cfg_path, weights):
            if not path.is_file():
                raise SmartformerError(f"{path}: not found (expected a directory written by save_pretrained)")
        try:
            meta = json.loads(cfg_path.read_text())
            config = SMARTConfig.from_dict(meta["model"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SmartformerError(f"{cfg_path}: not a valid smartformer config ({exc})") from None
        model = cls(config)
        try:
            state = load_file(str(weights), device=str(map_location))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise SmartformerError(f"{weights}: unreadable safetensors file ({exc})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SmartformerError(
                f"{weights}: weights do not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return model
