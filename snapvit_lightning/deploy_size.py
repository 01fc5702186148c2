"""Another square input size for a loaded ViT: the ``--img-size`` of ``snapvit info``, ``slice`` and ``bench``."""

from __future__ import annotations

from torch import nn

__all__ = ["multiples_near", "set_deployment_size"]


def multiples_near(size: int, patch: int) -> str:
    """The multiples of ``patch`` next to ``size`` that an error suggests: ``"112 or 126"`` (``"14"`` below 14)."""
    below, above = max(1, size // patch) * patch, (size // patch + 1) * patch
    return str(above) if below == above else f"{below} or {above}"


def set_deployment_size(model: nn.Module, img_size: int, option: str = "--img-size") -> None:
    """Give ``model`` square ``img_size`` x ``img_size`` px inputs, in place, with timm's ``set_input_size``.

    timm resamples the position embeddings (as its checkpoint filter does for another size), so the
    FLOPs, the latency, the subnets cut from the model and the files they are written to follow the new
    size. The scores, the search and the correction statistics stay those measured at the calibration
    size: measure the subnets at the new size before deploying them.

    Args:
        model: A timm ViT (an elastic model's ``model``).
        img_size: The side of the square inputs, in pixels.
        option: How the caller names ``img_size`` in an error.

    Raises:
        ValueError: ``img_size`` not an int >= 1, or, other than the model's own size, not a multiple of
            the patch size (unless the patch embedding pads, ``dynamic_img_pad``, to a dynamic size); a
            model without timm's ``set_input_size``.
    """
    if not isinstance(img_size, int) or isinstance(img_size, bool) or img_size < 1:
        raise ValueError(f"{option}: must be an int >= 1, got {img_size!r}")
    pe = getattr(model, "patch_embed", None)
    if pe is None or not callable(getattr(model, "set_input_size", None)):
        raise ValueError(f"{option}: {type(model).__name__} has no timm set_input_size to take another input size")
    if tuple(int(s) for s in pe.img_size) == (img_size, img_size):
        return  # its own size, which it was built and checked at
    patch = tuple(int(p) for p in pe.patch_size)
    pads = getattr(pe, "dynamic_img_pad", False) and getattr(model, "dynamic_img_size", False)  # else a fixed grid
    if not pads and (img_size % patch[0] or img_size % patch[1]):
        raise ValueError(f"{option} {img_size}: the images would not cut into this model's {patch[0]} x {patch[1]} "
                         f"px patches; give a multiple of {patch[0]} (e.g. {multiples_near(img_size, patch[0])})")
    model.set_input_size(img_size=(img_size, img_size))
