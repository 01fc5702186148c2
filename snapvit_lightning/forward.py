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
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

__all__ = ["embed", "supports_cls_only"]


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
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    out = attn.norm(out.transpose(1, 2).reshape(b, 1, width))
    gate = getattr(attn, "gate", None)  # gated attention (newer timm)
    if gate is not None:
        out = out * gate(cls).sigmoid()
    return attn.proj_drop(attn.proj(out))


def _cls_block(block: Block, x: Tensor) -> Tensor:
    """``block(x)[:, :1]`` without the patch tokens' outputs."""
    y = x[:, :1] + block.drop_path1(block.ls1(_cls_attention(block.attn, block.norm1(x))))
    return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """``model.forward_head(model.forward_features(x), pre_logits=True)``, computed cheaply.

    Args:
        model: A timm ViT (dense or cut).
        x: ``[N, 3, S, S]`` normalised images.

    Returns:
        ``[N, D]`` pre-logits embeddings.
    """
    if not supports_cls_only(model):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    for block in model.blocks[:-1]:
        x = block(x)
    x = model.norm(_cls_block(model.blocks[-1], x))
    return model.forward_head(x, pre_logits=True)
