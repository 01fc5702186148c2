"""The scoring loss: DINO multi-crop self-distillation, and the V-rows gradient shortcut.

:func:`dino_loss` is the per-sample loss whose gradients become the scores (the teacher taken
from the student's own embeddings of the global views, see :mod:`snapvit_lightning.module`).
:func:`_v_rows_weight_grads` makes every ``attn.qkv`` compute only its V rows' weight gradient,
the only rows the scores read.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .structure import get_blocks

__all__ = [
    "check_classifier_fits",
    "check_labels",
    "dino_loss",
]

#: Number of global crops (teacher views) at the front of every multi-crop.
NUM_GLOBAL_VIEWS = 2


class _RowsGradLinear(torch.autograd.Function):
    """``F.linear`` whose weight gradient is computed for rows ``[start, stop)`` only.

    The other rows' gradient is returned as zeros: the scores read only the V rows of
    ``attn.qkv``, and the Q/K rows' weight gradient would cost two thirds of the layer's weight
    gradient matmul. Under autocast the inputs are cast as autocast would cast them, explicitly,
    so the backward does not depend on the autocast state of the thread that runs it.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int) -> Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.rows = (start, stop)
        ctx.has_bias = bias is not None
        with torch.autocast(device, enabled=False):
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        start, stop = ctx.rows
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
        if ctx.needs_input_grad[1]:
            grad_w = torch.zeros_like(weight)
            grad_w[start:stop] = grad[..., start:stop].reshape(-1, stop - start).T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None, None


@contextlib.contextmanager
def _v_rows_weight_grads(model: nn.Module) -> Any:
    """Within the context, every ``attn.qkv`` of ``model`` computes only its V rows' weight gradient."""
    patched = []
    try:
        for block in get_blocks(model):
            qkv = block.attn.qkv
            if torch.is_grad_enabled() and qkv.weight.requires_grad:
                width = qkv.out_features // 3
                qkv.forward = functools.partial(_rows_grad_linear, qkv, 2 * width, 3 * width)
                patched.append(qkv)
        yield
    finally:
        for qkv in patched:
            del qkv.forward  # back to nn.Linear.forward


def _rows_grad_linear(layer: nn.Linear, start: int, stop: int, x: Tensor) -> Tensor:
    return _RowsGradLinear.apply(x, layer.weight, layer.bias, start, stop)


def dino_loss(
    embeddings: Tensor, teacher_temp: float | None = None, student_temp: float | None = None
) -> Tensor:
    """Per-sample DINO multi-crop loss with the teacher taken from the global views.

    Embeddings are L2-normalised; the teacher distribution is ``softmax(z / teacher_temp)``
    of the (detached) embeddings of views 0 and 1, the student's is
    ``log_softmax(z / student_temp)`` of every view (no temperature when ``None``). The loss
    of a sample is the sum over teacher views ``t`` and student views ``s != t`` of the
    cross-entropy ``-sum_k p_t[k] * log q_s[k]``.

    Args:
        embeddings: ``[B, V, D]`` embeddings, views 0 and 1 being the global crops (``V >= 2``).
        teacher_temp: Teacher temperature, or ``None``.
        student_temp: Student temperature, or ``None``.

    Returns:
        ``[B]`` per-sample losses (float32 or wider).

    Raises:
        ValueError: If ``embeddings`` is not ``[B, V >= 2, D]``.
    """
    if embeddings.dim() != 3 or embeddings.shape[1] < NUM_GLOBAL_VIEWS:
        raise ValueError(f"embeddings must be [B, V >= 2, D], got {list(embeddings.shape)}")
    z = F.normalize(embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings, dim=-1)
    teacher = z[:, :NUM_GLOBAL_VIEWS].detach()
    p = F.softmax(teacher / (1.0 if teacher_temp is None else teacher_temp), dim=-1)
    log_q = F.log_softmax(z / (1.0 if student_temp is None else student_temp), dim=-1)
    ce = -torch.einsum("btd,bsd->bts", p, log_q)  # [B, teacher views, student views]
    same = torch.zeros(ce.shape[1:], dtype=torch.bool, device=ce.device)
    same[torch.arange(NUM_GLOBAL_VIEWS), torch.arange(NUM_GLOBAL_VIEWS)] = True
    return ce.masked_fill(same, 0.0).sum(dim=(1, 2))


def check_classifier_fits(model: nn.Module, criterion: str, datamodule: Any = None) -> None:
    """Refuse ``criterion="cross_entropy"`` for a model without a classifier head, or a head too small for the data.

    Args:
        model: The timm ViT to score.
        criterion: The scoring criterion (only ``"cross_entropy"`` is checked).
        datamodule: A :class:`~snapvit_lightning.data.CalibrationDataModule` reading a folder, whose
            labels are its class folders' sorted indices (others are not checked).

    Raises:
        ValueError: ``num_classes`` of 0, a folder without class subfolders, or more classes than the head has.
    """
    if criterion != "cross_entropy":
        return
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes <= 0:
        raise ValueError("criterion='cross_entropy' needs the ViT's own classifier head; the model has num_classes="
                         f"{getattr(model, 'num_classes', None)!r} (timm builds one for num_classes > 0, e.g. SnapViTModule's "
                         "model_kwargs; a head outside the ViT, as a plug-in user's, is not scored: use criterion='dino')")
    if getattr(datamodule, "data_dir", None) is None or not hasattr(datamodule, "classes"):
        return
    classes = list(datamodule.classes)
    if not classes:
        raise ValueError("criterion='cross_entropy' needs labelled images: one subfolder per class in the data "
                         "folder and no images directly in it (found none: a flat folder, or one with images beside "
                         "its subfolders, is unlabelled); use criterion='dino' for unlabelled images")
    if len(classes) > num_classes:
        raise ValueError(f"criterion='cross_entropy': the data has {len(classes)} classes ({', '.join(classes[:5])}"
                         f"{', ...' if len(classes) > 5 else ''}) but the model's head has num_classes={num_classes}; "
                         f"labels are the class folders' indices in sorted order, so give a head of {len(classes)} "
                         "classes trained in that order (timm's num_classes)")


def check_labels(labels: Any, count: int, num_classes: int) -> None:
    """Refuse ``criterion="cross_entropy"`` labels that are missing, negative, or beyond the head's classes.

    Args:
        labels: The batch's labels (``None`` when the data yields none).
        count: The batch's number of images.
        num_classes: The classifier head's outputs.

    Raises:
        ValueError: Labels missing for an image, negative (``-1``: unlabeled), or ``>= num_classes``.
    """
    if not isinstance(labels, torch.Tensor) or labels.numel() != count or bool((labels < 0).any()):
        got = labels.tolist() if isinstance(labels, torch.Tensor) else labels
        raise ValueError(f"criterion='cross_entropy' needs a label >= 0 for every image (got {got}); use "
                         "criterion='dino' for unlabeled data")
    if bool((labels >= num_classes).any()):  # F.cross_entropy's IndexError names no cause
        raise ValueError(f"criterion='cross_entropy': label {int(labels.max())} is not a class of the model's "
                         f"head (num_classes={num_classes})")
