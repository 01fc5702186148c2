"""Fitness and fidelity images given as one tensor or as an iterable of batches (e.g. a ``DataLoader``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

__all__ = ["check_image_batches", "collect_images"]


def check_image_batches(source: object, name: str = "images") -> None:
    """Refuse what :func:`collect_images` cannot read as batches (a string, a number): before the batches are read.

    Raises:
        ValueError: ``source`` is not an iterable (a string is not one of batches), naming ``name``.
    """
    if isinstance(source, (str, bytes)) or not isinstance(source, Iterable):
        raise ValueError(f"{name} must be a float tensor [N, 3, H, W] or an iterable of such batches "
                         f"(e.g. a DataLoader), got {type(source).__name__}")
    if type(source).__module__ == "numpy":
        raise ValueError(f"{name} must be a float tensor [N, 3, H, W] or an iterable of such batches, got a numpy "
                         "array: pass torch.from_numpy(array)")
    if isinstance(source, (list, tuple)):  # read again later at no cost: its batches are checked now
        for batch in source:
            _batch_tensor(batch, name)


def _batch_tensor(batch: object, name: str) -> torch.Tensor:
    """The images of one batch: ``batch`` or its first item, a ``[B, C, H, W]`` tensor."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = f"a {list(x.shape)} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        hint = " (single images: torch.stack them into one batch)" if isinstance(x, torch.Tensor) and x.dim() == 3 else ""
        raise ValueError(f"{name}: batches must be [B, 3, H, W] tensors or (images, ...) tuples, got {got}{hint}")
    return x


def collect_images(source: object, name: str = "images") -> torch.Tensor:
    """``source`` as one ``[N, C, H, W]`` tensor: a tensor as it is, or the batches of an iterable concatenated.

    An iterable (e.g. a ``DataLoader``) yields image batches ``[B, C, H, W]`` or tuples/lists whose
    first item is one (``(images, labels)``). The tensor's shape and values are checked by the
    caller (:func:`~snapvit_lightning.structure.check_model_images`).

    Raises:
        ValueError: ``source`` is neither a tensor nor an iterable, a batch is not a 4-D tensor, or
            the iterable yields nothing; naming ``name``.
    """
    if isinstance(source, torch.Tensor):
        return source
    check_image_batches(source, name)
    batches = []
    for batch in source:
        x = _batch_tensor(batch, name)
        if batches and x.shape[1:] != batches[0].shape[1:]:
            raise ValueError(f"{name}: batches of {list(batches[0].shape[1:])} and {list(x.shape[1:])} images: "
                             "give images of one size (the model's input size)")
        batches.append(x.detach().cpu())
    if not batches:
        once = (" (it is an iterator, e.g. a generator, which is read once: was it read before, or given to two "
                "callbacks? give a list, a DataLoader or a tensor)" if isinstance(source, Iterator) else "")
        raise ValueError(f"{name}: the iterable yielded no batches{once}")
    return torch.cat(batches)
