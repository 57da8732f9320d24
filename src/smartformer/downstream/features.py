"""Frozen encoder features of downstream crops: [CLS] and pooled tokens, batched, in inference mode.

A checkpoint argument is a save_pretrained directory, a pretraining run directory (its ``teacher/``),
or ``random:PRESET`` (``random:tiny``, ``random:base``): that preset with random weights from the
run's seed, the baseline every pretrained encoder should beat.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from smartformer.errors import SmartformerError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from smartformer.models.smartformer import SMARTFormer

RANDOM_PREFIX = "random:"
#: Which features a classifier reads: the semantic [CLS], the mean of the tokens, or both concatenated.
FEATURE_KINDS: tuple[str, ...] = ("cls", "pooled", "both")


def checkpoint_names(specs: list[str]) -> list[str]:
    """Short unique names for checkpoint arguments (``random:tiny`` -> ``random_tiny``; see localize's rule for paths).

    Raises:
        InputError: a path that is neither a save_pretrained nor a run directory.
        SmartformerError: an unknown ``random:`` preset.
    """
    from smartformer.commands.localize import checkpoint_names as path_names
    from smartformer.models.smartformer import MODEL_PRESETS

    paths = [Path(s) for s in specs if not s.startswith(RANDOM_PREFIX)]
    from_paths = iter(path_names(paths))
    names: list[str] = []
    for spec in specs:
        if spec.startswith(RANDOM_PREFIX):
            preset = spec[len(RANDOM_PREFIX):]
            if preset not in MODEL_PRESETS:
                raise SmartformerError(f"--checkpoint {spec}: unknown preset; choose random:"
                                       + " or random:".join(sorted(MODEL_PRESETS)))
            base = f"random_{preset}"
        else:
            base = next(from_paths)
        name, k = base, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    return names


def load_encoder(spec: str, seed: int = 0) -> "SMARTFormer":
    """The network of a checkpoint argument, without projection heads or decoder, in eval mode.

    ``random:PRESET`` is seeded with ``seed``, so the baseline is the same network in every run.
    """
    import torch

    from smartformer.commands.attention import load_pretrained
    from smartformer.models.smartformer import SMARTFormer

    if spec.startswith(RANDOM_PREFIX):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SMARTFormer.from_preset(spec[len(RANDOM_PREFIX):], heads=False, decoder=False)
    else:
        model = load_pretrained(Path(spec))
        model.cls_head = model.patch_head = model.decoder = None  # never used downstream
    return model.eval()


def pick_device(name: str | None) -> "torch.device":
    """``name`` as a device, or CUDA when available and else the CPU."""
    import torch

    if name:
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise SmartformerError(f"--device {name}: {exc}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encode(model: "SMARTFormer", batch: "torch.Tensor", kind: str = "both") -> "torch.Tensor":
    """(B, D) features of a (B, 1, *crop) batch: [CLS], the mean of the tokens, or both concatenated.

    Shared by the probe (frozen) and fine-tuning (trained), so both read the same features.
    """
    import torch

    if kind not in FEATURE_KINDS:
        raise SmartformerError(f"features {kind!r}: choose one of {', '.join(FEATURE_KINDS)}")
    out = model.forward_features(batch)
    parts = {"cls": [out["cls"]], "pooled": [out["tokens"].mean(dim=1)]}
    parts["both"] = parts["cls"] + parts["pooled"]
    return torch.cat(parts[kind], dim=1)


def extract_features(model: "SMARTFormer", crops: "np.ndarray", kind: str = "both", batch_size: int = 8,
                     device: "torch.device | str | None" = None, progress: bool = True,
                     desc: str = "features") -> "np.ndarray":
    """Frozen features (N, D) float32 of (N, 1, *crop) crops, in batches under ``torch.inference_mode``.

    The model is moved to ``device`` (default: :func:`pick_device`) and left in eval mode.
    """
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    device = pick_device(None) if device is None else torch.device(device)
    model = model.to(device).eval()
    chunks: list[np.ndarray] = []
    starts = range(0, len(crops), batch_size)
    with torch.inference_mode():
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            batch = torch.from_numpy(np.asarray(crops[start:start + batch_size], dtype=np.float32)).to(device)
            chunks.append(encode(model, batch, kind).float().cpu().numpy())
    return np.concatenate(chunks, axis=0)


def feature_columns(kind: str, width: int) -> list[str]:
    """Column names of a feature matrix: ``cls_0..`` and/or ``pooled_0..`` (``width`` = the encoder's C)."""
    prefixes = ["cls", "pooled"] if kind == "both" else [kind]
    return [f"{p}_{i}" for p in prefixes for i in range(width)]
