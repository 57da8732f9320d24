"""Weights in and out: safe loading, foreign checkpoints into :class:`Swin3D`, export to MONAI.

* :func:`load_weights` reads safetensors or a torch file with ``weights_only=True``: a file that
  would need to unpickle Python objects is refused with a clear message, never executed.
* :func:`checkpoint_filter_fn` maps MONAI ``SwinUNETR`` / ``SwinTransformer`` state dicts (also
  wrapped in ``state_dict``/``model``/``module.`` as research checkpoints often are, and the
  original Swin-UNETR pretraining names ``mlp.fc1``/``mlp.fc2``) to :class:`Swin3D` keys.
* :func:`to_monai_state_dict` gives the keys ``SwinUNETR.load_state_dict(..., strict=False)``
  needs for its ``swinViT`` part (every ``swinViT.*`` key present, nothing else);
  :func:`save_weights` writes a state dict as :func:`load_weights` reads it back.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from smartformer.errors import InputError, SmartformerError
from smartformer.io_utils import atomic_write_bytes, torch_bytes

__all__ = ["load_weights", "save_weights", "checkpoint_filter_fn", "to_monai_state_dict", "MONAI_PREFIX"]

MONAI_PREFIX = "swinViT."
_WRAPPERS = ("state_dict", "model", "teacher", "student", "network")
_STRIP = ("module.", "_orig_mod.", "backbone.", "encoder.", MONAI_PREFIX)
# Our extra parameter that MONAI's SwinTransformer does not have.
_OURS_ONLY = ("mask_token",)


def load_weights(path: str | Path) -> dict:
    """Load a weights file without executing code from it.

    ``.safetensors`` goes through safetensors; anything else through
    ``torch.load(weights_only=True)``, which only reconstructs tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise InputError(path, f"unreadable safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported object"
        raise InputError(
            path,
            "refusing to load: the file holds pickled Python objects, not just tensors "
            f"({first}). Re-save it as a plain state dict or safetensors.",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(path, f"not a readable PyTorch weights file ({exc})") from None


def save_weights(state: Mapping[str, Tensor], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: safetensors for a ``.safetensors`` name, else a torch file
    (tensors only, so that :func:`load_weights` reads it with ``weights_only=True``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return atomic_write_bytes(path, save(dict(state)))
    return atomic_write_bytes(path, torch_bytes(dict(state)))


def _unwrap(state: Mapping) -> Mapping:
    """Descend into the usual wrappers (``{'state_dict': ...}``, ``{'model': ...}``)."""
    while True:
        if any(isinstance(v, Tensor) for v in state.values()):
            return state
        for key in _WRAPPERS:
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
        else:
            return state


def checkpoint_filter_fn(state: Mapping, keep_mask_token: bool = True) -> dict[str, Tensor]:
    """Map a foreign state dict to :class:`Swin3D` keys; non-backbone keys are dropped.

    Accepts MONAI ``SwinTransformer`` / ``SwinUNETR`` (``swinViT.`` prefix) state dicts, our own
    ``SMARTFormer`` ones (``backbone.`` prefix), DDP's ``module.`` prefix, ``torch.compile``'s
    ``_orig_mod.``, and the original Swin-UNETR pretraining names (``mlp.fc1`` -> ``mlp.linear1``).
    """
    out: dict[str, Tensor] = {}
    for key, value in _unwrap(state).items():
        if not isinstance(value, Tensor):
            continue
        k = key
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP:
                if k.startswith(prefix):
                    k, changed = k[len(prefix) :], True
        k = k.replace("mlp.fc1.", "mlp.linear1.").replace("mlp.fc2.", "mlp.linear2.")
        if k.startswith(("patch_embed.", "layers1.", "layers2.", "layers3.", "layers4.")) or (
            keep_mask_token and k == "mask_token"
        ):
            out[k] = value
    if not out:
        raise SmartformerError("no backbone weights found (expected MONAI SwinTransformer / SwinUNETR keys)")
    return out


def to_monai_state_dict(backbone_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our backbone weights under MONAI ``SwinUNETR``'s ``swinViT.`` keys (mask token dropped)."""
    filtered = checkpoint_filter_fn(backbone_state, keep_mask_token=False)
    return {MONAI_PREFIX + k: v.detach().clone().contiguous() for k, v in filtered.items() if k not in _OURS_ONLY}
