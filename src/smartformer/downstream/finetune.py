"""Full fine-tuning: the encoder plus a linear head, AdamW with layer-wise learning-rate decay.

Layer numbering for the decay (:func:`layer_id`), from input to output, for a backbone of ``L`` Swin
blocks in all (``L = sum(depths)``, 8 for ``tiny``):

* ``0``: the patch embedding (and the mask token),
* ``1 .. L``: the Swin blocks, stage by stage in the order they run; a stage's patch merging takes the
  number of that stage's last block,
* ``L + 1``: the semantic attention module (or the pooling norm of a model without it),
* ``L + 2``: the classification head.

On a ViT backbone (``model.vit``) ``L`` is its number of blocks: ``0`` is the patch embedding with
the position embeddings, the [CLS] and the mask token, ``1 .. L`` its blocks, ``L + 1`` its final norm.

A parameter of layer ``i`` learns at ``lr * layer_decay ** (L + 2 - i)``: the head at ``lr``, the
semantic attention at ``lr * decay``, the patch embedding at ``lr * decay ** (L + 2)``. Biases, norms,
tokens and relative-position tables get no weight decay.

Training: class-balanced binary cross-entropy, random flips along each axis, gradients clipped at norm
1, early stopping on the validation loss with ``patience`` epochs (the best epoch's weights are kept).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from smartformer.downstream.evaluation import Study, test_indices, training_indices
from smartformer.downstream.features import encode, load_encoder, pick_device
from smartformer.downstream.splits import validation_split
from smartformer.errors import SmartformerError

if TYPE_CHECKING:
    from smartformer.models.smartformer import SMARTFormer


class Classifier(nn.Module):
    """An encoder and a linear head (after a LayerNorm) on its [CLS], pooled or both features: one logit."""

    def __init__(self, encoder: SMARTFormer, kind: str = "both") -> None:
        super().__init__()
        self.encoder = encoder
        self.kind = kind
        width = encoder.embed_dim * (2 if kind == "both" else 1)
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) logits of class 1 for a (B, 1, *crop) batch."""
        return self.head(encode(self.encoder, x, self.kind)).squeeze(1)


def num_layers(model: Classifier) -> int:
    """The head's layer number, ``L + 2`` (see the module docstring)."""
    vit = model.encoder.config.vit
    return (vit.num_layers if vit is not None else sum(model.encoder.config.backbone.depths)) + 2


def layer_id(name: str, model: Classifier) -> int:
    """The layer number of a :class:`Classifier` parameter name (see the module docstring)."""
    depths = list(model.encoder.config.backbone.depths)
    top = num_layers(model)
    if name.startswith("head."):
        return top
    if name.startswith(("encoder.semantic.", "encoder.pool_norm.")):
        return top - 1
    if name.startswith(("encoder.backbone.patch_embed.", "encoder.backbone.mask_token")):
        return 0
    if model.encoder.config.vit is not None:  # ViT: patch_embedding, cls_token, blocks.{i}, norm
        if name.startswith("encoder.backbone.blocks."):
            return int(name.split(".")[3]) + 1
        if name.startswith("encoder.backbone.norm."):
            return top - 1
        if name.startswith(("encoder.backbone.patch_embedding.", "encoder.backbone.cls_token")):
            return 0
    if name.startswith("encoder.backbone.layers"):
        parts = name.split(".")  # encoder.backbone.layers{stage}.0.blocks.{block}... or .downsample...
        stage = int(parts[2][len("layers") :]) - 1
        before = sum(depths[:stage])
        if parts[4] == "blocks":
            return before + int(parts[5]) + 1
        return before + depths[stage]
    raise SmartformerError(f"no layer-wise learning-rate rule for parameter {name!r}")


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(
        ("mask_token", "cls_token", "relative_position_bias_table", "position_embeddings")
    )


def param_groups_lrd(model: Classifier, lr: float, weight_decay: float = 0.05, layer_decay: float = 0.75) -> list[dict]:
    """AdamW parameter groups with layer-wise lr decay (one group per layer and decay/no-decay).

    Each group carries ``lr`` (already scaled), ``weight_decay``, ``layer_id`` and ``lr_scale``.
    """
    top = num_layers(model)
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, model)
        decay = not _no_weight_decay(name, param)
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (top - layer)
            groups[key] = {
                "params": [],
                "names": [],
                "layer_id": layer,
                "lr_scale": scale,
                "lr": lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


@dataclass
class FinetuneSettings:
    """Optimisation settings of :func:`finetune` (the CLI options of ``smartformer finetune``)."""

    epochs: int = 20
    lr: float = 1e-4
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    patience: int = 5
    batch_size: int = 4
    features: str = "both"
    flip_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise SmartformerError(
                f"epochs, batch size and patience must be at least 1, got {self.epochs}, "
                f"{self.batch_size} and {self.patience}"
            )
        if self.lr <= 0 or not 0 < self.layer_decay <= 1 or self.weight_decay < 0:
            raise SmartformerError(
                f"the learning rate must be > 0 (got {self.lr:g}), the layer decay in (0, 1] "
                f"(got {self.layer_decay:g}) and the weight decay >= 0 (got {self.weight_decay:g})"
            )


@dataclass
class FinetuneResult:
    """A fine-tuned classifier and its per-epoch history."""

    model: Classifier
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)


def _flip(batch: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Flip each sample along each spatial axis with probability ``prob``."""
    batch = batch.clone()
    for axis in (2, 3, 4):
        chosen = torch.rand(batch.shape[0], generator=generator) < prob
        if chosen.any():
            batch[chosen] = batch[chosen].flip(axis - 1)
    return batch


def _batch(crops: np.ndarray, index: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor of ``crops[index]`` (crops are cached as float16)."""
    return torch.from_numpy(np.asarray(crops[index], dtype=np.float32)).to(device)


def _logits(
    model: Classifier, crops: np.ndarray, index: np.ndarray, batch_size: int, device: torch.device | str
) -> torch.Tensor:
    """(len(index),) float32 CPU logits in eval mode.

    Uses ``torch.no_grad`` rather than ``inference_mode``: the backbone caches shifted-window masks,
    and an inference-mode tensor in that cache could not be used by a later training step.
    """
    model.eval()
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, len(index), batch_size):
            out.append(model(_batch(crops, index[start : start + batch_size], torch.device(device))).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def predict_probabilities(
    model: Classifier, crops: np.ndarray, index: np.ndarray, batch_size: int = 8, device: torch.device | str = "cpu"
) -> np.ndarray:
    """P(class 1) for ``crops[index]``, in eval mode."""
    return torch.sigmoid(_logits(model, crops, index, batch_size, device)).numpy()


def finetune(
    encoder: SMARTFormer,
    crops: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    settings: FinetuneSettings,
    device: torch.device | str = "cpu",
    fold: int = 0,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune ``encoder`` (modified in place) with a new head on ``crops[train]``.

    Early stopping watches the loss on ``crops[val]``; with an empty ``val`` every epoch runs and the
    last one is kept. Shuffling, flips and the head's initialisation are seeded by ``(seed, fold)``.
    """
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed * 1000 + fold)
        model = Classifier(encoder, settings.features).to(device)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + fold)
    y = labels.astype(np.float32)
    n_pos = float(y[train].sum())
    pos_weight = torch.tensor((len(train) - n_pos) / max(n_pos, 1.0))
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight.to(device))
    val_loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(param_groups_lrd(model, settings.lr, settings.weight_decay, settings.layer_decay))
    best_loss, best_epoch, best_state, waited = float("inf"), 0, None, 0
    history: list[dict[str, float]] = []
    for epoch in tqdm(range(1, settings.epochs + 1), desc=f"finetune fold {fold}", unit="epoch", disable=not progress):
        model.train()
        order = torch.randperm(len(train), generator=generator).numpy()
        losses: list[float] = []
        for start in range(0, len(order), settings.batch_size):
            index = train[order[start : start + settings.batch_size]]
            batch = _flip(_batch(crops, index, torch.device("cpu")), settings.flip_prob, generator).to(device)
            loss = loss_fn(model(batch), torch.from_numpy(y[index]).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
        record: dict[str, float] = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if len(val):
            val_logits = _logits(model, crops, val, settings.batch_size, device)
            record["val_loss"] = float(val_loss_fn(val_logits, torch.from_numpy(y[val])))
            if record["val_loss"] < best_loss:
                best_loss, best_epoch, waited = record["val_loss"], epoch, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            else:
                waited += 1
        history.append(record)
        if len(val) and waited >= settings.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    return FinetuneResult(model=model, best_epoch=best_epoch, history=history)


def finetune_checkpoint(
    study: Study, spec: str, name: str, settings: FinetuneSettings, val_fraction: float = 0.2
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fine-tuning as a :data:`~smartformer.downstream.evaluation.CheckpointRunner`: a fresh copy of the
    checkpoint ``spec`` fine-tuned per fold and fraction (early stopping on ``val_fraction`` of the
    training fold's patients; 0: none), then scored on the test fold."""
    s, table = study.settings, study.table
    device = pick_device(s.device)
    rows, details = [], []
    for fold in range(s.folds):
        test = test_indices(study, fold)
        for fraction, subset in training_indices(study, fold).items():
            train, val = (
                validation_split(subset, table.labels, table.patients, val_fraction, s.seed, fold)
                if val_fraction > 0
                else (subset, subset[:0])
            )
            result = finetune(
                load_encoder(spec, s.seed),
                study.crops,
                table.labels,
                train,
                val,
                settings,
                device,
                fold=fold,
                progress=s.progress,
            )
            probs = predict_probabilities(result.model, study.crops, test, s.batch_size, device)
            rows += [
                {"index": int(i), "fold": fold, "fraction": fraction, "probability": float(p)}
                for i, p in zip(test, probs)
            ]
            details.append(
                {
                    "fold": fold,
                    "fraction": fraction,
                    "n_train": len(train),
                    "n_val": len(val),
                    "best_epoch": result.best_epoch,
                    "epochs_run": len(result.history),
                    "history": result.history,
                }
            )
    return rows, details
