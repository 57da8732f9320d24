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
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from smartformer.errors import SmartformerError
from smartformer.io_utils import atomic_write_bytes
from smartformer.models.heads import DINOHead, ReconstructionDecoder
from smartformer.models.semantic_attention import SemanticAttention, ViTSemanticAttention
from smartformer.models.swin3d import PRESETS as BACKBONE_PRESETS
from smartformer.models.swin3d import Swin3D, Swin3DConfig
from smartformer.models.vit3d import VIT_PRESETS, ViT3D, ViT3DConfig

__all__ = [
    "SMARTConfig",
    "SMARTFormer",
    "MODEL_PRESETS",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PRETRAINED",
    "pretrained_path",
]

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
    # class_attention: CaiT blocks, only the [CLS] queries (patch tokens unchanged); vit: the
    # published form, ViT blocks over [CLS] + patch tokens (all N+1 attend to each other).
    semantic_form: Literal["class_attention", "vit"] = "class_attention"
    # Where the semantic attention reads the Swin tokens: stage 1-4 (the paper's Fig. 6 ablation).
    # False: the output of the stage's own blocks, at stride 2**stage (the paper's "in stage 3":
    # the blocks are part of that stage, at its resolution); True: after the stage's patch
    # merging, at twice that stride. The stride sets the mask unit and the map's grid.
    semantic_stage: int = 4
    semantic_merged: bool = False
    # vit only: the SA-updated patch tokens replace the stage's tokens and continue into the rest
    # of the Swin. Default False: the Swin stays exactly MONAI's SwinTransformer, so the encoder
    # that `export` hands to SwinUNETR computes what pretraining computed (with True it would
    # drop two blocks that the later stages were trained to follow). The paper does not say.
    semantic_continue: bool = False
    semantic_depth: int = 2
    semantic_heads: int = 6
    # LayerScale start of the class-attention blocks; see ClassAttentionBlock for why not CaiT's 1e-4.
    semantic_layer_scale: float = 1.0
    heads: bool = True  # DINO projection heads ([CLS] and patch)
    # GITD (the paper's fourth loss): a projection head of its own on the average-pooled stage-4
    # tokens (stride 16, the blocks' output).
    global_head: bool = False
    head_out_dim: int = 1024
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    head_nlayers: int = 3
    patch_out_dim: int | None = None  # None: same as head_out_dim
    shared_head: bool = False
    decoder: bool = True
    # The decoder -- one linear layer per token (a 1x1x1 convolution) and a pixel shuffle, the
    # paper's "1-layer linear prediction head" -- reads the last stage's blocks (stride 16, the
    # paper's end of stage 4; the stride-32 output is only their linear merge). It matches the
    # mask unit of the default semantic stage and costs 16^3 instead of 32^3 output channels.
    decoder_stride: int = 16
    # A 3D ViT instead of the Swin (``backbone`` is then unused): its own [CLS] is the semantic
    # attention (AttMask-style), the mask unit and the decoder's stride are its patch.
    vit: ViT3DConfig | None = None

    @property
    def semantic_stride(self) -> int:
        """Stride in voxels of the tokens the semantic attention reads (the mask unit)."""
        if self.vit is not None:
            return self.vit.patch_size
        return 2 ** (self.semantic_stage + int(self.semantic_merged))

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = Swin3DConfig(**self.backbone)
        if isinstance(self.vit, dict):
            self.vit = ViT3DConfig(**self.vit)
        if self.vit is not None and not self.semantic_attention:
            raise ValueError("a ViT backbone keeps its [CLS] (semantic_attention cannot be false with vit)")
        if self.semantic_form not in ("class_attention", "vit"):
            raise ValueError(f"semantic_form must be class_attention or vit, got {self.semantic_form!r}")
        if self.semantic_stage not in (1, 2, 3, 4):
            raise ValueError(f"semantic_stage must be 1, 2, 3 or 4, got {self.semantic_stage}")
        if self.semantic_continue and self.semantic_form != "vit":
            raise ValueError(
                "semantic_continue needs semantic_form=vit (class attention leaves the patch tokens unchanged)"
            )
        if self.semantic_continue and self.semantic_stride == 32:
            raise ValueError("semantic_continue: nothing follows stage 4's patch merging")
        width = self.backbone.embed_dim * self.semantic_stride // 2
        if self.semantic_attention and self.vit is None and width % self.semantic_heads:
            raise ValueError(
                f"semantic_heads {self.semantic_heads} does not divide the width {width} at stride "
                f"{self.semantic_stride}"
            )
        if self.decoder_stride not in (4, 8, 16, 32):
            raise ValueError(f"decoder_stride must be 4, 8, 16 or 32, got {self.decoder_stride}")
        if self.shared_head and self.patch_out_dim not in (None, self.head_out_dim):
            raise ValueError("shared_head needs patch_out_dim equal to head_out_dim")

    @staticmethod
    def upgrade(data: dict[str, Any]) -> dict[str, Any]:
        """Config dicts written before ``semantic_stage``: ``semantic_stride`` s becomes the stage
        whose blocks run at s (32: stage 4 after its merging), which is what it meant."""
        data = dict(data)
        stride = data.pop("semantic_stride", None)
        if stride is not None:
            if stride not in (2, 4, 8, 16, 32):
                raise ValueError(f"semantic_stride must be 2, 4, 8, 16 or 32, got {stride}")
            stage = {2: 1, 4: 2, 8: 3, 16: 4, 32: 4}[stride]
            data.update(semantic_stage=stage, semantic_merged=stride == 32)
        return data

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SMARTConfig:
        try:
            data = cls.upgrade(data)
        except ValueError as exc:
            raise SmartformerError(str(exc)) from None
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
    # As published (DAGMaN, MIDL 2025): 2 ViT semantic-attention blocks on stage 3's own tokens
    # (stride 8, 192 channels, stage 3's 8 heads), student drop-path 0.1 (the teacher runs in eval).
    "paper": SMARTConfig(
        backbone=Swin3DConfig(**{**BACKBONE_PRESETS["paper"].to_dict(), "drop_path_rate": 0.1}),
        semantic_form="vit",
        semantic_stage=3,
        semantic_heads=8,
        head_out_dim=8192,
        head_hidden_dim=2048,
        head_bottleneck_dim=256,
    ),
    # The ViT variant the paper reports (their Table 2): 12 blocks, 768, 8 heads, at 128^3.
    "paper_vit": SMARTConfig(
        vit=VIT_PRESETS["paper"], head_out_dim=8192, head_hidden_dim=2048, head_bottleneck_dim=256
    ),
    # A ViT for a 2-core CPU (64^3 views).
    "vit_tiny": SMARTConfig(vit=VIT_PRESETS["tiny"]),
}

#: The visiting order of the token maps in a forward pass: (stride, merged); merged=False is the
#: output of the blocks that run at that stride, True the output of the patch merging into it.
_TAPS: tuple[tuple[int, bool], ...] = (
    (2, False),
    (4, True),
    (4, False),
    (8, True),
    (8, False),
    (16, True),
    (16, False),
    (32, True),
)


class SMARTFormer(nn.Module):
    """The SMART network: one module for the student, a deep copy for the teacher."""

    def __init__(self, config: SMARTConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone: Swin3D | ViT3D
        if config.vit is not None:
            self.backbone = ViT3D(config.vit)
            dim = width4 = decoder_width = config.vit.hidden_size
            decoder_stride = config.vit.patch_size
        else:
            self.backbone = Swin3D(config.backbone)
            dim, width4 = self.backbone.width(config.semantic_stride), self.backbone.width(16)
            decoder_width, decoder_stride = self.backbone.width(config.decoder_stride), config.decoder_stride
        self.embed_dim = dim
        self.semantic: SemanticAttention | ViTSemanticAttention | None = None
        self.pool_norm: nn.LayerNorm | None = None
        if config.vit is not None:
            pass  # the ViT's own [CLS] is the semantic attention
        elif config.semantic_attention and config.semantic_form == "vit":
            self.semantic = ViTSemanticAttention(
                dim, config.semantic_heads, depth=config.semantic_depth, fused_attn=config.backbone.fused_attn
            )
        elif config.semantic_attention:
            self.semantic = SemanticAttention(
                dim,
                config.semantic_heads,
                depth=config.semantic_depth,
                init_values=config.semantic_layer_scale,
                fused_attn=config.backbone.fused_attn,
            )
        else:
            self.pool_norm = nn.LayerNorm(dim)
        self.cls_head: DINOHead | None = None
        self.patch_head: DINOHead | None = None
        self.global_norm: nn.LayerNorm | None = None
        self.global_head: DINOHead | None = None
        if config.heads:
            head_kw = dict(
                hidden_dim=config.head_hidden_dim,
                bottleneck_dim=config.head_bottleneck_dim,
                nlayers=config.head_nlayers,
            )
            self.cls_head = DINOHead(dim, config.head_out_dim, **head_kw)
            self.patch_head = (
                self.cls_head
                if config.shared_head
                else DINOHead(dim, config.patch_out_dim or config.head_out_dim, **head_kw)
            )
            if config.global_head:
                self.global_norm = nn.LayerNorm(width4)
                self.global_head = DINOHead(width4, config.head_out_dim, **head_kw)
        self.decoder = ReconstructionDecoder(decoder_width, decoder_stride) if config.decoder else None

    @property
    def has_attention(self) -> bool:
        """Whether the model gives semantic attention maps (a [CLS] of its own or the SA module)."""
        return self.semantic is not None or isinstance(self.backbone, ViT3D)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SMARTFormer:
        """Build from a preset (``tiny``, ``base``, ``smit``, ``paper``, ``paper_vit``, ``vit_tiny``); keyword
        overrides replace fields."""
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
            return_attention: also return the last semantic-attention block's maps.

        Returns:
            ``cls`` (B, C); ``tokens`` (B, N, C) of the semantic stage, N = d*h*w in C order (with
            the ``vit`` form, the patch tokens of its last block); ``grid`` (d, h, w); ``attn``
            (B, heads, d, h, w) or None; ``final`` channels-last features at ``decoder_stride``
            (or None without a decoder); with a global head, ``pooled`` (B, C4), the normed
            stage-4 tokens averaged over the grid.
        """
        if isinstance(self.backbone, ViT3D):
            return self._forward_vit(x, mask, return_attention)
        cfg = self.config
        bb = self.backbone
        bb.check_input(x)
        sa_tap = (cfg.semantic_stride, cfg.semantic_merged)
        wanted = {sa_tap}
        if self.decoder is not None:
            wanted.add((cfg.decoder_stride, cfg.decoder_stride == 32))
        if self.global_head is not None:
            wanted.add((16, False))
        last = max(_TAPS.index(t) for t in wanted)
        feats: dict[tuple[int, bool], Tensor] = {}
        sem: dict[str, Any] = {"attn": None}

        def visit(tap: tuple[int, bool], tokens: Tensor) -> Tensor:
            if tap == sa_tap:
                tokens = self._semantic(tokens, return_attention, sem)
            if tap in wanted and tap != sa_tap:
                feats[tap] = tokens
            return tokens

        x = bb.embed(x, mask)
        stride = 2
        for stage in bb.stages:
            x = visit((stride, False), stage.forward_blocks(x, bb.grad_checkpointing))
            if _TAPS.index((stride, False)) >= last:
                break
            stride *= 2
            x = visit((stride, True), stage.downsample(x))
            if _TAPS.index((stride, True)) >= last:
                break
        tokens = sem["tokens"]
        out = {
            "cls": sem["cls"],
            "tokens": tokens.flatten(1, 3),
            "grid": tuple(tokens.shape[1:4]),
            "attn": sem["attn"],
            "final": None,
        }
        if self.decoder is not None:
            tap = (cfg.decoder_stride, cfg.decoder_stride == 32)
            out["final"] = sem["raw"] if tap == sa_tap else feats[tap]
        if self.global_norm is not None:
            stage4 = sem["raw"] if sa_tap == (16, False) else feats[(16, False)]
            out["pooled"] = self.global_norm(stage4).mean(dim=(1, 2, 3))
        return out

    def _forward_vit(self, x: Tensor, mask: Tensor | None, return_attention: bool) -> dict[str, Any]:
        """:meth:`forward_features` on a ViT: its [CLS], patch tokens and [CLS] attention; GITD pools the
        patch tokens and the decoder reads them."""
        assert isinstance(self.backbone, ViT3D)
        f = self.backbone.forward_features(x, mask, return_attention=return_attention)
        tokens = f["tokens"]
        out = {
            "cls": f["cls"],
            "tokens": tokens.flatten(1, 3),
            "grid": tuple(tokens.shape[1:4]),
            "attn": f["attn"],
            "final": tokens if self.decoder is not None else None,
        }
        if self.global_norm is not None:
            out["pooled"] = self.global_norm(tokens).mean(dim=(1, 2, 3))
        return out

    def _semantic(self, tokens: Tensor, return_attention: bool, sem: dict[str, Any]) -> Tensor:
        """Run the semantic attention on the tokens of its stage; fills ``sem`` (``cls``, ``attn``,
        ``tokens`` for the patch loss, ``raw`` the stage's own tokens) and returns what continues."""
        sem["raw"] = tokens
        if isinstance(self.semantic, ViTSemanticAttention):
            out = self.semantic(tokens, return_attn=return_attention)
            # As in a ViT, the patch loss reads the last block's normed patch tokens.
            sem.update(cls=out.cls, attn=out.attn, tokens=out.tokens)
            return out.stream if self.config.semantic_continue else tokens
        sem["tokens"] = tokens
        if self.semantic is not None:
            sem["cls"], sem["attn"] = self.semantic(tokens, return_attn=return_attention)
        else:
            assert self.pool_norm is not None
            sem["cls"] = self.pool_norm(tokens).mean(dim=(1, 2, 3))
        return tokens

    def forward_head(self, features: dict[str, Any]) -> dict[str, Tensor]:
        """DINO logits for the [CLS] (B, K), the patch tokens (B, N, K') and, with a global head, the
        pooled stage-4 tokens (B, K)."""
        if self.cls_head is None or self.patch_head is None:
            raise SmartformerError("this model was built or saved without projection heads")
        out = {"cls_logits": self.cls_head(features["cls"]), "patch_logits": self.patch_head(features["tokens"])}
        if self.global_head is not None:
            out["global_logits"] = self.global_head(features["pooled"])
        return out

    def reconstruct(self, features: dict[str, Any]) -> Tensor:
        """Voxel reconstruction (B, 1, D, H, W) from the final-stage features."""
        if self.decoder is None or features["final"] is None:
            raise SmartformerError("this model was built or saved without a reconstruction decoder")
        return self.decoder(features["final"])

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        return_attention: bool = False,
        heads: bool = True,
        reconstruct: bool = True,
        local: Tensor | None = None,
    ) -> dict[str, Any]:
        """Features, head logits and reconstruction in one call (one call per step keeps DDP simple).

        ``local`` (B', 1, d, h, w): smaller, unmasked views (multi-crop) whose [CLS] logits are
        returned as ``local_cls_logits`` (B', K) from the same call: DDP allows one forward per
        backward, and a second call on the same parameters would mark them ready twice.
        """
        out = self.forward_features(x, mask, return_attention)
        if heads and self.cls_head is not None:
            out.update(self.forward_head(out))
            if local is not None:
                out["local_cls_logits"] = self.cls_head(self.forward_features(local)["cls"])
        if reconstruct and self.decoder is not None:
            out["recon"] = self.reconstruct(out)
        return out

    @torch.no_grad()
    def attention_maps(self, volume: Tensor) -> Tensor:
        """Per-head semantic attention (B, heads, d, h, w) for (B, 1, D, H, W); each map sums to 1."""
        self._check_attention()
        return self.forward_features(volume, return_attention=True)["attn"]

    @torch.no_grad()
    def semantic_input(self, volume: Tensor) -> Tensor:
        """The Swin tokens (B, d, h, w, C) that the semantic attention reads, for (B, 1, D, H, W).

        Only the backbone runs (up to the semantic stage). As Swin attention is local, this can
        run once over a whole CT and :meth:`token_attention_maps` on windows of the result.
        """
        self._check_swin_attention()
        assert isinstance(self.backbone, Swin3D)
        cfg = self.config
        stride = cfg.semantic_stride
        if cfg.semantic_merged and stride != 32:  # the merging into `stride` (32: forward_features' own)
            tokens = self.backbone.forward_features(volume, strides=(stride // 2,))[stride // 2]
            return self.backbone.stages[(stride // 2).bit_length() - 2].downsample(tokens)
        return self.backbone.forward_features(volume, strides=(stride,))[stride]

    @torch.no_grad()
    def token_attention_maps(self, tokens: Tensor) -> Tensor:
        """Per-head semantic attention (B, heads, d, h, w) over the tokens (B, d, h, w, C) of
        :meth:`semantic_input`; each map sums to 1 over those tokens."""
        self._check_swin_attention()
        if isinstance(self.semantic, ViTSemanticAttention):
            return self.semantic(tokens, return_attn=True).attn
        assert self.semantic is not None
        return self.semantic(tokens, return_attn=True)[1]

    def _check_attention(self) -> None:
        if not self.has_attention:
            raise SmartformerError(
                "attention maps need the semantic attention module; this model was built with "
                "semantic_attention=False (pooled token, the SMIT way)"
            )

    def _check_swin_attention(self) -> None:
        self._check_attention()
        if isinstance(self.backbone, ViT3D):
            raise SmartformerError(
                "semantic attention over token windows needs a Swin backbone (a ViT attends "
                "globally; use attention_maps on whole windows)"
            )

    # ------------------------------------------------------------------ weights in and out
    def save_pretrained(self, directory: str | Path, include_heads: bool = False) -> Path:
        """Write ``model.safetensors`` + ``config.json``; heads and decoder only with ``include_heads``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        state = self.state_dict()
        if not include_heads:
            config.update(heads=False, decoder=False, global_head=False)
            state = {
                k: v
                for k, v in state.items()
                if not k.startswith(("cls_head.", "patch_head.", "decoder.", "global_head.", "global_norm."))
            }
        # safetensors refuses shared storage (a shared head appears twice) and non-contiguous tensors.
        seen: set[int] = set()
        tensors: dict[str, Tensor] = {}
        for k, v in state.items():
            key = v.data_ptr()
            tensors[k] = v.detach().clone().contiguous() if key in seen else v.detach().contiguous()
            seen.add(key)
        # atomic, and with the umask's mode like every other file (save_file would make it 0600)
        atomic_write_bytes(
            directory / WEIGHTS_NAME,
            save(tensors, metadata={"format": "pt", "smartformer_format": str(FORMAT_VERSION)}),
        )
        (directory / CONFIG_NAME).write_text(
            json.dumps({"format_version": FORMAT_VERSION, "model": config}, indent=2) + "\n"
        )
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> SMARTFormer:
        """Load a model written by :meth:`save_pretrained`, or a shipped one by name (``"smart-tiny-ct"``).

        A path that exists wins over a shipped name. Weights are safetensors: no code is ever unpickled.
        """
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
