"""Loading local weights (safetensors, ``torch.save`` files, Lightning checkpoints) into a timm model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "load_weights",
]

def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load local weights into ``model`` (strictly).

    Reads ``*.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)``. A Lightning checkpoint (a dict with ``state_dict``) is
    accepted; a common ``student.``/``model.``/``module.`` key prefix is stripped. If the keys
    do not match as they are, the timm model family's ``checkpoint_filter_fn`` is applied (as
    timm does for pretrained weights: original key layouts, position embeddings resampled to
    the model's ``img_size``) and the strict load is tried once more.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file holds no state dict or its keys/shapes do not match the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint_path {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"checkpoint_path {str(path)!r} is not a readable safetensors file: {err}") from err
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"checkpoint_path {str(path)!r} could not be read with torch.load(weights_only=True): {err}"
            ) from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"checkpoint_path {str(path)!r} does not hold a state dict of tensors")
    for prefix in ("student.", "model.", "module."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
            break
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError as err:
        error = err
    # Like timm's pretrained loading: the model family's checkpoint_filter_fn converts original
    # key layouts and resamples position embeddings to the model's img_size.
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            model.load_state_dict(filter_fn(dict(state), model), strict=True)
            return
        except Exception:  # report the unfiltered mismatch below
            pass
    raise ValueError(f"checkpoint_path {str(path)!r} does not match the model: {error}") from error
