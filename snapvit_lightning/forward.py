"""Pre-logits embeddings of a timm ViT without the work its output never sees.

Scoring and the search only read the *CLS embedding* ``forward_head(forward_features(x),
pre_logits=True)``. With timm's ``global_pool="token"`` that embedding is the last block's CLS
token after the final norm, so in the last block the patch tokens need only their keys and
values: their queries, attention outputs, ``proj`` and MLP rows are dead computation (about
10/12 of the last block's matmul FLOPs, ~7 % of a 12-block forward and backward). Gradients
are unchanged too: in the full forward those dead rows receive exactly zero gradient.

:func:`embed` runs that shortened forward when :func:`supports_cls_only` says it is exact for
the model, and the model's own ``forward_features``/``forward_head`` otherwise (any other
pooling, attention pooling, a subclass with its own forward, a training-mode block with
dropout or drop-path). The two agree to floating-point rounding (tested).

On CPU under bfloat16 (autocast or bfloat16 weights) :func:`embed` runs timm's attention on its
explicit-matmul path (``fused_attn=False``, see :func:`explicit_attention`): at ViT token counts
PyTorch's fused CPU attention kernel is the slower one in bfloat16, above all in the backward.
Measured on 2 cores of an AMD EPYC (Zen 4, AVX512-BF16), DINOv2 ViT-S/14 at 112 px: a scoring
step (16 images × 12 views, forward and backward) 6.8 → 4.6 s (``python -m
snapvit_lightning.benchmarks.step``), a search fitness evaluation (196 images, 4 subnets) 6.34 → 6.09 s.
In fp32 the two paths cost about the same and on GPUs the fused kernels win, so both keep the
model's own setting.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

__all__ = ["embed", "explicit_attention", "prefers_explicit_attention", "supports_cls_only"]


@contextlib.contextmanager
def explicit_attention(module: nn.Module) -> Iterator[None]:
    """Run every attention layer of ``module`` that has timm's ``fused_attn`` flag on its
    explicit-matmul path (``q @ k.T``, softmax, ``@ v``); the flags are restored afterwards.

    Both paths compute the same function (to rounding); only the kernels differ.
    """
    fused = [(m, m.fused_attn) for m in module.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    try:
        for m, _ in fused:
            m.fused_attn = False
        yield
    finally:
        for m, flag in fused:
            m.fused_attn = flag


def prefers_explicit_attention(model: nn.Module, x: Tensor) -> bool:
    """Whether a forward of ``model`` on ``x`` runs faster with :func:`explicit_attention`.

    True on CPU when the matmuls run in bfloat16: under CPU autocast to bfloat16, or with
    bfloat16 weights.
    """
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    return weight is not None and weight.dtype == torch.bfloat16


def _stock(obj: object, base: type, *methods: str) -> bool:
    return isinstance(obj, base) and all(getattr(type(obj), m) is getattr(base, m) for m in methods)


def supports_cls_only(model: nn.Module) -> bool:
    """Whether :func:`embed` may skip the last block's patch-token outputs for ``model``.

    True for a timm :class:`~timm.models.vision_transformer.VisionTransformer` with stock
    ``forward_features``/``forward_head``/``pool``, ``global_pool="token"``, no attention pooling
    and no gradient checkpointing, whose last block is a stock ``Block`` with a stock
    ``Attention`` in eval mode (dropout and drop-path would draw random numbers per token).
    """
    if not _stock(model, VisionTransformer, "forward_features", "forward_head", "pool", "_pos_embed"):
        return False
    if model.global_pool != "token" or model.attn_pool is not None or model.grad_checkpointing:
        return False
    if len(model.blocks) == 0:
        return False
    last = model.blocks[-1]
    return _stock(last, Block, "forward") and _stock(last.attn, Attention, "forward") and not last.training


def _cls_attention(attn: Attention, x: Tensor) -> Tensor:
    """``attn(x)[:, :1]`` computing queries and outputs for the CLS token only."""
    b, n, _ = x.shape
    width = attn.qkv.weight.shape[0] // 3  # current (possibly cut) num_heads * head_dim
    heads = width // attn.head_dim
    weight, bias = attn.qkv.weight, attn.qkv.bias
    cls = x[:, :1]
    q = F.linear(cls, weight[:width], None if bias is None else bias[:width])
    kv = F.linear(x, weight[width:], None if bias is None else bias[width:])
    q = q.reshape(b, 1, heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(b, n, 2, heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        out = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    out = attn.norm(out.transpose(1, 2).reshape(b, 1, width))
    gate = getattr(attn, "gate", None)  # gated attention (newer timm)
    if gate is not None:
        out = out * gate(cls).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _cls_block(block: Block, x: Tensor) -> Tensor:
    """``block(x)[:, :1]`` without the patch tokens' outputs."""
    y = x[:, :1] + block.drop_path1(block.ls1(_cls_attention(block.attn, block.norm1(x))))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def embed(model: nn.Module, x: Tensor, explicit: bool | None = None) -> Tensor:
    """``model.forward_head(model.forward_features(x), pre_logits=True)``, computed cheaply.

    Args:
        model: A timm ViT (dense or cut).
        x: ``[N, 3, S, S]`` normalised images.
        explicit: Attention kernel: ``True`` the explicit-matmul path
            (:func:`explicit_attention`), ``False`` the model's own ``fused_attn`` setting,
            ``None`` whichever :func:`prefers_explicit_attention` says (a probe's choice,
            :mod:`snapvit_lightning.precision`, passes ``True``/``False``).

    Returns:
        ``[N, D]`` pre-logits embeddings.
    """
    if explicit is None:
        explicit = prefers_explicit_attention(model, x)
    with explicit_attention(model) if explicit else contextlib.nullcontext():
        if not supports_cls_only(model):
            return model.forward_head(model.forward_features(x), pre_logits=True)
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for block in model.blocks[:-1]:
            x = block(x)
        x = model.norm(_cls_block(model.blocks[-1], x))
        return model.forward_head(x, pre_logits=True)
