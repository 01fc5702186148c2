"""What a timm Vision Transformer looks like, and how to cut it.

Everything here works on one block at a time and stays inside the blocks: the embedding
width never changes, so patch embedding, prefix tokens, pooling heads (``attn_pool``,
``fc_norm``) and classifiers are left untouched and keep working.

A *unit* is an MLP hidden neuron or an attention head. Selecting units by an index list is
the single primitive: a permutation reorders them (the block's output is unchanged) and a
prefix ``arange(k)`` slices them (the block becomes physically smaller).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.layers import Attention, GluMlp, Mlp, PatchEmbed, SwiGLU
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .deploy_size import multiples_near
from .forward import explicit_attention
from .values import all_finite, integer

__all__ = [
    "UnsupportedModelError",
    "BlockDims",
    "ViTStructure",
    "inspect_vit",
    "check_supported",
    "check_input_size",
    "check_model_images",
    "get_blocks",
    "mlp_kind",
    "mlp_input_layers",
    "mlp_rows",
    "head_channels",
    "select_units",
    "permute_block",
    "slice_block",
    "slice_model",
    "block_dims",
    "num_tokens",
    "block_params",
    "block_flops",
    "count_params",
    "count_flops",
    "measure_flops",
]

SUPPORTED_BLOCKS = (Block, ResPostBlock)
SUPPORTED_ATTENTION = (Attention,)
SUPPORTED_MLPS = (Mlp, SwiGLU, GluMlp)
_SUPPORTED_TEXT = (
    "supported: timm VisionTransformer (and subclasses such as VisionTransformerDistilled) with "
    "blocks of type Block/ResPostBlock, attention timm.layers.Attention and MLP "
    "Mlp/SwiGLU/GluMlp (incl. SwiGLUPacked) built from nn.Linear"
)


class UnsupportedModelError(TypeError):
    """Raised for a model, block or layer kind that the cut would get wrong."""


@dataclass(frozen=True)
class BlockDims:
    """The cuttable sizes of one block.

    Attributes:
        num_heads: Attention heads in the block.
        mlp_hidden: MLP hidden neurons (for gated MLPs: the gated width, i.e. ``fc2.in_features``).
    """

    num_heads: int
    mlp_hidden: int

    def __post_init__(self) -> None:
        """Refuse what no block can have: ``slice`` and ``cost`` read these as counts.

        Raises:
            TypeError: A count that is no integer (a bool, a float, a string; numpy and 0-d tensor integers are taken).
            ValueError: A negative count.
        """
        for field in ("num_heads", "mlp_hidden"):
            value = getattr(self, field)
            count = integer(value)
            if count is None:
                raise TypeError(f"BlockDims.{field} must be an int, got {value!r}")
            if count < 0:
                raise ValueError(f"BlockDims.{field} must be >= 0, got {value!r}")
            object.__setattr__(self, field, int(count))


@dataclass(frozen=True)
class ViTStructure:
    """A summary of a timm ViT, read off the modules (see :func:`inspect_vit`).

    Attributes:
        embed_dim: Token width (never changed by cutting).
        head_dim: Per-head width (never changed by cutting).
        blocks: Per-block cuttable sizes.
        mlp_kind: ``"mlp"``, ``"swiglu"`` or ``"glu"`` (GluMlp / SwiGLUPacked).
        num_prefix_tokens: Class, distillation and register tokens in front of the patches.
        has_class_token: Whether a class token is present.
        num_reg_tokens: Register tokens.
        has_dist_token: Whether a distillation token is present (DeiT distilled).
        layer_scale: Whether the blocks use LayerScale.
        qk_norm: Whether attention normalises q and k per head.
        scale_norm: Whether attention normalises its output before ``proj``.
        gated_attention: Whether attention has an elementwise output gate.
        mlp_norm: Whether the MLP normalises its hidden activations.
        attn_pool: Whether the model pools with an attention-pool head (SigLIP ``map``).
        post_norm_blocks: Whether blocks are ``ResPostBlock`` (norm after the residual branch).
    """

    embed_dim: int
    head_dim: int
    blocks: tuple[BlockDims, ...]
    mlp_kind: str
    num_prefix_tokens: int
    has_class_token: bool
    num_reg_tokens: int
    has_dist_token: bool
    layer_scale: bool
    qk_norm: bool
    scale_norm: bool
    gated_attention: bool
    mlp_norm: bool
    attn_pool: bool
    post_norm_blocks: bool

    @property
    def num_blocks(self) -> int:
        """Number of transformer blocks."""
        return len(self.blocks)

    @property
    def is_uniform(self) -> bool:
        """Whether every block has the same number of heads and neurons."""
        return len(set(self.blocks)) <= 1


def _describe(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def get_blocks(model: nn.Module) -> list[nn.Module]:
    """Return the transformer blocks of a timm ViT in order.

    Raises:
        UnsupportedModelError: If ``model`` has no ``blocks`` container.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise UnsupportedModelError(f"model {_describe(model)} has no `blocks` Sequential/ModuleList; {_SUPPORTED_TEXT}")
    return list(blocks)


def mlp_kind(mlp: nn.Module) -> str:
    """Classify a block's MLP as ``"mlp"``, ``"swiglu"`` or ``"glu"``.

    Raises:
        UnsupportedModelError: For any other MLP (e.g. GatedMlp, ConvMlp, 1x1-conv Mlp).
    """
    kind = {Mlp: "mlp", SwiGLU: "swiglu", GluMlp: "glu"}.get(type(mlp))
    if kind is None:
        raise UnsupportedModelError(f"MLP {_describe(mlp)} is not supported; {_SUPPORTED_TEXT}")
    linears = [mlp.fc1_g, mlp.fc1_x, mlp.fc2] if kind == "swiglu" else [mlp.fc1, mlp.fc2]
    if not all(type(layer) is nn.Linear for layer in linears):
        raise UnsupportedModelError(
            f"MLP {_describe(mlp)} uses {[_describe(layer) for layer in linears]} instead of "
            f"nn.Linear (use_conv=True is not supported); {_SUPPORTED_TEXT}"
        )
    return kind


def _check_attention(attn: nn.Module) -> None:
    if type(attn) not in SUPPORTED_ATTENTION:
        raise UnsupportedModelError(
            f"attention {_describe(attn)} is not supported (e.g. EvaAttention, AttentionRope and "
            f"differential attention cut differently); {_SUPPORTED_TEXT}"
        )
    if attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:
        raise UnsupportedModelError(f"attention qkv has {attn.qkv.out_features} outputs, expected 3 * num_heads * head_dim "
                                    f"= {3 * attn.num_heads * attn.head_dim}")


def check_supported(model: nn.Module) -> None:
    """Refuse, early and clearly, every model the cut would get wrong.

    Raises:
        UnsupportedModelError: Naming the first unsupported module and what is supported.
    """
    if not isinstance(model, nn.Module):  # a model name, an ElasticViT: not an architecture to list refusals for
        hint = "pass its .model" if isinstance(getattr(model, "model", None), nn.Module) else "build it with timm.create_model"
        raise UnsupportedModelError(f"model must be a timm VisionTransformer (an nn.Module), got {type(model).__name__}: {hint}")
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"model {_describe(model)} is not a timm VisionTransformer (not supported: Eva and RoPE ViTs such as DINOv3, "
            f"EVA-02 and PE, BEiT v1/v2, relpos ViTs, NaFlexVit, hybrid and windowed models); {_SUPPORTED_TEXT}"
        )
    if not isinstance(getattr(model, "patch_embed", None), PatchEmbed):  # e.g. HybridEmbed: a CNN stem
        raise UnsupportedModelError(
            f"patch embedding {_describe(getattr(model, 'patch_embed', None))} is not timm's PatchEmbed (hybrid "
            f"models with a CNN stem are not supported: their input and FLOPs are the stem's); {_SUPPORTED_TEXT}"
        )
    own = tuple(int(s) for s in getattr(model.patch_embed, "img_size", None) or ())
    try:
        if own:
            check_input_size(model, own, f"model img_size={own[0] if len(set(own)) == 1 else list(own)}")
    except ValueError as err:  # timm's assertion would come at the first forward at that size
        why = ("" if not getattr(model, "dynamic_img_size", False) else "; a model with dynamic_img_size=True must take its "
               "own img_size (its files record it, and latency and ONNX export use it): build it with such an img_size "
               "(views at another size: data.img_size)")
        raise UnsupportedModelError(f"{err}{why}") from None
    if getattr(model, "global_pool", None) == "" and getattr(model, "attn_pool", None) is None:
        raise UnsupportedModelError(
            "model has global_pool='' (its features are all tokens, not one embedding per image, which the scores, "
            "the fitness and the fidelity compare); build it with global_pool='token', 'avg' or 'map'"
        )
    blocks = get_blocks(model)
    if not blocks:
        raise UnsupportedModelError("model has no transformer blocks")
    for i, block in enumerate(blocks):
        if type(block) not in SUPPORTED_BLOCKS:
            raise UnsupportedModelError(
                f"block {i} is {_describe(block)} (parallel and other block kinds are not "
                f"supported); {_SUPPORTED_TEXT}"
            )
        _check_attention(block.attn)
        mlp_kind(block.mlp)
    kinds = {mlp_kind(b.mlp) for b in blocks}
    if len(kinds) > 1:
        raise UnsupportedModelError(f"blocks mix MLP kinds {sorted(kinds)}; one kind is supported")


def block_dims(block: nn.Module) -> BlockDims:
    """Read the current number of heads and MLP hidden neurons of a block."""
    return BlockDims(num_heads=int(block.attn.num_heads), mlp_hidden=int(block.mlp.fc2.in_features))


def inspect_vit(model: nn.Module) -> ViTStructure:
    """Describe a supported timm ViT.

    Raises:
        UnsupportedModelError: See :func:`check_supported`.
    """
    check_supported(model)
    blocks = get_blocks(model)
    first = blocks[0]
    head_dims = {int(b.attn.head_dim) for b in blocks}
    if len(head_dims) != 1:
        raise UnsupportedModelError(f"blocks have different head_dim {sorted(head_dims)}")
    num_reg = int(getattr(model, "num_reg_tokens", 0) or 0)
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    has_dist = getattr(model, "dist_token", None) is not None
    return ViTStructure(
        embed_dim=int(model.embed_dim),
        head_dim=head_dims.pop(),
        blocks=tuple(block_dims(b) for b in blocks),
        mlp_kind=mlp_kind(first.mlp),
        num_prefix_tokens=int(model.num_prefix_tokens),
        has_class_token=has_cls,
        num_reg_tokens=num_reg,
        has_dist_token=has_dist,
        layer_scale=not isinstance(getattr(first, "ls1", nn.Identity()), nn.Identity),
        qk_norm=not isinstance(first.attn.q_norm, nn.Identity),
        scale_norm=not isinstance(first.attn.norm, nn.Identity),
        gated_attention=getattr(first.attn, "gate", None) is not None,
        mlp_norm=not isinstance(first.mlp.norm, nn.Identity),
        attn_pool=getattr(model, "attn_pool", None) is not None,
        post_norm_blocks=isinstance(first, ResPostBlock),
    )


def mlp_input_layers(block: nn.Module) -> list[nn.Linear]:
    """The Linear layers whose rows are the block's MLP neurons (``fc1``, or ``fc1_g`` and ``fc1_x``)."""
    mlp = block.mlp
    return [mlp.fc1_g, mlp.fc1_x] if mlp_kind(mlp) == "swiglu" else [mlp.fc1]


def mlp_rows(mlp: nn.Module, neurons: torch.Tensor) -> list[tuple[nn.Linear, torch.Tensor]]:
    """``(layer, rows)`` of the MLP's input layers that hold ``neurons`` (packed GLU: rows ``j`` and ``j + hidden``)."""
    kind = mlp_kind(mlp)
    if kind == "glu":  # GluMlp / SwiGLUPacked: fc1 holds both halves
        return [(mlp.fc1, torch.cat([neurons, neurons + mlp.fc2.in_features]))]
    return [(mlp.fc1_g, neurons), (mlp.fc1_x, neurons)] if kind == "swiglu" else [(mlp.fc1, neurons)]


# ----------------------------------------------------------------------------------------------
# Selecting units
# ----------------------------------------------------------------------------------------------


def _take(param: torch.Tensor | None, index: torch.Tensor, dim: int) -> nn.Parameter | None:
    if param is None:
        return None
    data = param.detach().index_select(dim, index.to(param.device)).contiguous()
    return nn.Parameter(data, requires_grad=param.requires_grad)


def _select_linear_rows(layer: nn.Linear, rows: torch.Tensor) -> None:
    layer.weight = _take(layer.weight, rows, 0)
    if layer.bias is not None:
        layer.bias = _take(layer.bias, rows, 0)
    layer.out_features = int(rows.numel())


def _select_linear_cols(layer: nn.Linear, cols: torch.Tensor) -> None:
    layer.weight = _take(layer.weight, cols, 1)
    layer.in_features = int(cols.numel())


def _select_norm(norm: nn.Module, index: torch.Tensor) -> None:
    """Slice an elementwise-affine norm over the cut dimension (LayerNorm/RmsNorm over units)."""
    if isinstance(norm, nn.Identity):
        return
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if param is not None:
            setattr(norm, name, _take(param, index, 0))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (int(index.numel()),)


def _as_index(index: torch.Tensor | Sequence[int], size: int, what: str) -> torch.Tensor:
    index = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
        raise ValueError(f"{what} indices must lie in [0, {size}), got min {int(index.min())} max {int(index.max())}")
    if torch.unique(index).numel() != index.numel():
        raise ValueError(f"{what} indices must be unique, got {index.tolist()}")
    return index


def _select_mlp(mlp: nn.Module, index: torch.Tensor) -> None:
    for layer, rows in mlp_rows(mlp, index):
        _select_linear_rows(layer, rows)
    _select_norm(mlp.norm, index)
    _select_linear_cols(mlp.fc2, index)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The ``attn_dim`` channels (qkv rows per section, proj columns) of ``heads``, head by head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).flatten()


def _select_heads(attn: nn.Module, heads: torch.Tensor) -> None:
    head_dim = attn.head_dim
    channels = head_channels(heads, head_dim)
    attn_dim = attn.num_heads * head_dim
    qkv_rows = torch.cat([s * attn_dim + channels for s in range(3)])
    _select_linear_rows(attn.qkv, qkv_rows)
    if getattr(attn, "gate", None) is not None:
        _select_linear_rows(attn.gate, channels)
    _select_norm(attn.norm, channels)
    _select_linear_cols(attn.proj, channels)
    attn.num_heads = int(heads.numel())
    attn.attn_dim = int(heads.numel()) * head_dim


def min_units(block: nn.Module) -> tuple[int, int]:
    """The fewest (heads, neurons) a block may keep and still run its forward.

    Zero heads or neurons work (the branch then only adds its output bias) unless a norm over
    the cut dimension (``scale_norm`` / MLP ``norm``) would normalise an empty vector.
    """
    return (
        0 if isinstance(block.attn.norm, nn.Identity) else 1,
        0 if isinstance(block.mlp.norm, nn.Identity) else 1,
    )


def select_units(
    block: nn.Module,
    mlp_index: torch.Tensor | Sequence[int] | None = None,
    head_index: torch.Tensor | Sequence[int] | None = None,
) -> None:
    """Keep (in this order) the given MLP neurons and heads of ``block``, in place.

    Updates every attribute timm's forward reads (``num_heads``, ``attn_dim``,
    ``in_features``/``out_features``, norm shapes, gates); ``head_dim`` and ``scale`` never change.

    Args:
        block: A supported timm block.
        mlp_index: Neuron indices to keep, in the new order; ``None`` leaves the MLP alone.
        head_index: Head indices to keep, in the new order; ``None`` leaves attention alone.

    Raises:
        ValueError: Indices out of range, repeated, or fewer than the block can run with.
    """
    _check_attention(block.attn)
    dims = block_dims(block)
    min_heads, min_neurons = min_units(block)
    if mlp_index is not None:
        mlp_index = _as_index(mlp_index, dims.mlp_hidden, "mlp_index")
        if mlp_index.numel() < min_neurons:
            raise ValueError(f"mlp_index keeps {mlp_index.numel()} neurons; this block needs >= {min_neurons}")
        _select_mlp(block.mlp, mlp_index)
    if head_index is not None:
        head_index = _as_index(head_index, dims.num_heads, "head_index")
        if head_index.numel() < min_heads:
            raise ValueError(f"head_index keeps {head_index.numel()} heads; this block needs >= {min_heads}")
        _select_heads(block.attn, head_index)


def permute_block(
    block: nn.Module,
    mlp_order: torch.Tensor | Sequence[int] | None = None,
    head_order: torch.Tensor | Sequence[int] | None = None,
) -> None:
    """Reorder a block's neurons and heads in place; the block's output does not change.

    Raises:
        ValueError: If an order is not a permutation of all the block's units.
    """
    dims = block_dims(block)
    for order, size, name in ((mlp_order, dims.mlp_hidden, "mlp_order"), (head_order, dims.num_heads, "head_order")):
        if order is not None and len(order) != size:
            raise ValueError(f"{name} must be a permutation of {size} units, got length {len(order)}")
    select_units(block, mlp_order, head_order)


def slice_block(block: nn.Module, num_heads: int, mlp_hidden: int) -> None:
    """Keep the first ``num_heads`` heads and first ``mlp_hidden`` neurons of a block, in place.

    Raises:
        ValueError: A count outside ``[min, current]`` (see :func:`min_units`).
    """
    dims = block_dims(block)
    for value, size, name in ((num_heads, dims.num_heads, "num_heads"), (mlp_hidden, dims.mlp_hidden, "mlp_hidden")):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= size:
            raise ValueError(f"{name} must be an int in [0, {size}], got {value!r}")
    select_units(block, torch.arange(mlp_hidden), torch.arange(num_heads))


def check_dims(dims: object, structure: "ViTStructure") -> None:
    """Refuse ``dims`` that are not one :class:`BlockDims` per block of ``structure``, within its sizes.

    Raises:
        ValueError: Another length or type, or a count outside ``[0, heads]`` / ``[0, neurons]``.
    """
    blocks = structure.blocks
    if not isinstance(dims, (list, tuple)) or len(dims) != len(blocks) or not all(isinstance(d, BlockDims) for d in dims):
        raise ValueError(f"dims must be a list of {len(blocks)} BlockDims (one per block, e.g. elastic.dims(0.3, 0.2)), "
                         f"got {type(dims).__name__}" + (f" of {len(dims)}" if isinstance(dims, (list, tuple)) else ""))
    for i, (d, full) in enumerate(zip(dims, blocks)):
        if not (0 <= d.num_heads <= full.num_heads and 0 <= d.mlp_hidden <= full.mlp_hidden):
            raise ValueError(f"dims[{i}] = {d} is outside the block's {full.num_heads} heads and {full.mlp_hidden} neurons")


def slice_model(model: nn.Module, dims: Sequence[BlockDims]) -> None:
    """Slice every block of ``model`` to ``dims`` (first units kept), in place.

    Raises:
        ValueError: If ``dims`` does not have one entry per block.
    """
    blocks = get_blocks(model)
    if len(dims) != len(blocks):
        raise ValueError(f"dims has {len(dims)} entries, the model has {len(blocks)} blocks")
    for block, d in zip(blocks, dims):
        slice_block(block, int(d.num_heads), int(d.mlp_hidden))


# ----------------------------------------------------------------------------------------------
# Parameters and FLOPs
# ----------------------------------------------------------------------------------------------


def num_tokens(model: nn.Module, img_size: int | tuple[int, int] | None = None) -> int:
    """Tokens a block sees for an input of ``img_size`` (prefix tokens + patches).

    Raises:
        ValueError: If the model has a fixed input size and ``img_size`` differs from it.
    """
    pe = model.patch_embed
    size = tuple(pe.img_size) if img_size is None else (
        (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    )
    fixed = not getattr(model, "dynamic_img_size", False) and getattr(pe, "strict_img_size", True)
    if fixed and size != tuple(pe.img_size):
        raise ValueError(
            f"img_size {size} differs from the model's fixed input size {tuple(pe.img_size)}; "
            "build the model with that img_size or dynamic_img_size=True"
        )
    grid = pe.dynamic_feat_size(size) if hasattr(pe, "dynamic_feat_size") else (
        size[0] // pe.patch_size[0], size[1] // pe.patch_size[1]
    )
    return int(model.num_prefix_tokens) + int(grid[0]) * int(grid[1])


def check_input_size(model: nn.Module, size: tuple[int, int], name: str) -> None:
    """Refuse an input ``size`` (H, W) that ``model``'s patch embedding does not take.

    Raises:
        ValueError: A fixed-size model (``strict_img_size``) and another size; a dynamic-size one
            and ``H`` or ``W`` not a multiple of the patch size (a patch embedding that pads,
            ``dynamic_img_pad``, takes any size). The message names ``name``.
    """
    pe = getattr(model, "patch_embed", None)
    patch = tuple(int(p) for p in getattr(pe, "patch_size", None) or ())
    fixed = tuple(int(s) for s in getattr(pe, "img_size", None) or ())
    whole = len(patch) == 2 and not size[0] % patch[0] and not size[1] % patch[1]
    near = multiples_near(size[0], patch[0]) if patch else ""
    if getattr(pe, "strict_img_size", False) and len(fixed) == 2 and tuple(size) != fixed:  # timm asserts in the forward
        other = f"img_size={size[0]} or dynamic_img_size=True" if whole else \
            f"dynamic_img_size=True and give a multiple of {patch[0] if patch else 'the patch size'}"
        raise ValueError(f"{name}: this ViT takes {fixed[0]} x {fixed[1]} px images only (give {fixed[0]}, or build "
                         f"the ViT with {other})")
    pads = getattr(pe, "dynamic_img_pad", False)
    if pads and not getattr(model, "dynamic_img_size", False) and len(patch) == len(fixed) == 2 and not whole:
        raise ValueError(f"{name}: {size[0]} x {size[1]} px images are padded to whole {patch[0]} x {patch[1]} px patches "
                         f"(dynamic_img_pad), more than this ViT's {fixed[0] // patch[0]} x {fixed[1] // patch[1]} position "
                         f"embeddings (no dynamic_img_size), so timm's own forward fails; build it with dynamic_img_size=True, "
                         f"or at a multiple of {patch[0]} (e.g. {near})")
    if len(patch) != 2 or not fixed or pads or getattr(pe, "strict_img_size", False) or whole:
        return  # a fixed size (checked above), a padding patch embedding (any size), whole patches, or no size to check
    multiple = patch[0] if patch[0] == patch[1] else f"{patch[0]} x {patch[1]}"
    raise ValueError(f"{name}: {size[0]} x {size[1]} px images do not cut into this model's {patch[0]} x {patch[1]} px "
                     f"patches; give a size that is a multiple of {multiple} (e.g. {near})")


def check_model_images(model: nn.Module, images: object, name: str = "images") -> torch.Tensor:
    """``images`` if they are finite float ``[N, C, H, W]`` (N >= 1) that ``model`` takes, else a ValueError.

    ``C`` must be the patch embedding's input channels and, when the model has a fixed input size
    (no ``dynamic_img_size``, a strict ``patch_embed``), ``(H, W)`` must be ``patch_embed.img_size``;
    else multiples of the patch size (unless the patch embedding pads, ``dynamic_img_pad``).

    Raises:
        ValueError: Naming ``name``, the shape or values given and what the model needs.
    """
    pe = getattr(model, "patch_embed", None)
    chans = int(getattr(getattr(pe, "proj", None), "in_channels", 3))
    size = tuple(int(v) for v in getattr(pe, "img_size", None) or ())
    fixed = bool(size) and not getattr(model, "dynamic_img_size", False) and getattr(pe, "strict_img_size", True)
    need = f"[N, {chans}, {size[0]}, {size[1]}]" if fixed else f"[N, {chans}, H, W]"
    if (not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point()
            or images.shape[0] < 1 or images.shape[1] != chans or (fixed and tuple(images.shape[2:]) != size)):
        got = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        dtype = f" {images.dtype}" if isinstance(images, torch.Tensor) else ""
        raise ValueError(f"{name} must be a non-empty float tensor {need} for this model, got {got}{dtype}")
    check_input_size(model, tuple(images.shape[2:]), name)
    if images.device.type == "meta":
        raise ValueError(f"{name} are on the meta device (no values); give real images")
    if not all_finite(images):
        raise ValueError(f"{name} hold non-finite values (NaN or inf); give normalised images")
    return images


def _numel(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() for t in tensors if t is not None)


def _module_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _norm_params_per_element(norm: nn.Module) -> int:
    if isinstance(norm, nn.Identity):
        return 0
    return sum(1 for name in ("weight", "bias") if getattr(norm, name, None) is not None)


def _unit_costs(block: nn.Module) -> tuple[int, int, int]:
    """Parameters per head, per neuron, and those that scale with neither (read off the shapes)."""
    attn, mlp = block.attn, block.mlp
    dims = block_dims(block)
    dim_in, dim_out, head_dim = attn.qkv.in_features, attn.proj.out_features, attn.head_dim
    per_channel = 3 * (dim_in + (attn.qkv.bias is not None)) + dim_out
    gate = getattr(attn, "gate", None)
    if gate is not None:
        per_channel += dim_in + (gate.bias is not None)
    per_head = head_dim * (per_channel + _norm_params_per_element(attn.norm))
    inputs = mlp_input_layers(block)
    rows = 1 if mlp_kind(mlp) == "mlp" else 2
    per_neuron = rows * (inputs[0].in_features + (inputs[0].bias is not None))
    per_neuron += mlp.fc2.out_features + _norm_params_per_element(mlp.norm)
    fixed = _module_params(block) - dims.num_heads * per_head - dims.mlp_hidden * per_neuron
    return per_head, per_neuron, fixed


def block_params(block: nn.Module, num_heads: int | None = None, mlp_hidden: int | None = None) -> int:
    """Parameters of ``block`` if it kept ``num_heads`` heads and ``mlp_hidden`` neurons.

    Exact for the block as sliced by :func:`slice_block` (cost is affine in the unit counts);
    ``None`` means the block's current count.
    """
    dims = block_dims(block)
    per_head, per_neuron, fixed = _unit_costs(block)
    h = dims.num_heads if num_heads is None else num_heads
    m = dims.mlp_hidden if mlp_hidden is None else mlp_hidden
    return fixed + h * per_head + m * per_neuron


def block_flops(block: nn.Module, tokens: int, num_heads: int | None = None, mlp_hidden: int | None = None) -> int:
    """Matmul FLOPs (2 x multiply-adds) of one block for one image of ``tokens`` tokens.

    Counts what :class:`torch.utils.flop_counter.FlopCounterMode` counts on the explicit attention
    path: the Linear layers and the two attention matmuls (norms, softmax and activations are not
    counted; the counter may miss the attention matmuls of a fused CPU attention kernel).
    """
    dims = block_dims(block)
    attn = block.attn
    dim = attn.proj.out_features
    h = dims.num_heads if num_heads is None else num_heads
    m = dims.mlp_hidden if mlp_hidden is None else mlp_hidden
    a = h * attn.head_dim
    proj_in = 4 if getattr(attn, "gate", None) is not None else 3  # qkv (+ gate) projections
    attn_flops = 2 * tokens * dim * a * (proj_in + 1) + 2 * 2 * tokens * tokens * a
    fc1_rows = 1 if mlp_kind(block.mlp) == "mlp" else 2
    mlp_flops = 2 * tokens * dim * m * (fc1_rows + 1)
    return attn_flops + mlp_flops


def count_params(model: nn.Module, dims: Sequence[BlockDims] | None = None) -> dict[str, object]:
    """Parameters per block and in total, for the model as it is or as if sliced to ``dims``.

    Returns:
        ``{"blocks": [int, ...], "other": int, "total": int}``.
    """
    blocks = get_blocks(model)
    dims = [block_dims(b) for b in blocks] if dims is None else list(dims)
    if len(dims) != len(blocks):
        raise ValueError(f"dims has {len(dims)} entries, the model has {len(blocks)} blocks")
    per_block = [block_params(b, d.num_heads, d.mlp_hidden) for b, d in zip(blocks, dims)]
    other = _module_params(model) - sum(_module_params(b) for b in blocks)
    return {"blocks": per_block, "other": other, "total": other + sum(per_block)}


def measure_flops(module: nn.Module, *args: torch.Tensor) -> int:
    """FLOPs of ``module(*args)`` as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    ``FlopCounterMode`` does not see inside the CPU kernel of ``scaled_dot_product_attention``,
    so modules with a ``fused_attn`` flag run the explicit-matmul path while counting (the
    flag is restored afterwards; the result of the forward is the same up to rounding).
    """
    counter = FlopCounterMode(display=False)
    # FlopCounterMode's module tracker needs an autograd graph behind every tensor it sees (none under
    # inference_mode, where a caller may ask for a cost: the counting runs outside it, on a meta-device
    # copy when the weights themselves were made there).
    with torch.inference_mode(False):
        if any(p.is_inference() for p in module.parameters()):
            module = copy.deepcopy(module).to("meta")
            args = tuple(torch.empty_like(a, device="meta") for a in args)
        args = tuple(a.clone().detach().requires_grad_(a.is_floating_point()) for a in args)
        with explicit_attention(module), torch.enable_grad(), counter:
            module(*args)
    return int(counter.get_total_flops())


def count_flops(
    model: nn.Module,
    img_size: int | tuple[int, int] | None = None,
    dims: Sequence[BlockDims] | None = None,
    head_flops: int | None = None,
) -> dict[str, object]:
    """Matmul FLOPs for one image, per block and in total, as is or as if sliced to ``dims``.

    The blocks and the patch embedding are counted analytically; the part after the blocks
    (pooling, attention-pool, classifier) never changes with cutting and is measured with
    ``FlopCounterMode`` on ``forward_head`` unless ``head_flops`` (an earlier result's
    ``"head"``) is given.

    Returns:
        ``{"tokens": int, "patch_embed": int, "blocks": [int, ...], "head": int, "total": int}``.
    """
    blocks = get_blocks(model)
    dims = [block_dims(b) for b in blocks] if dims is None else list(dims)
    if len(dims) != len(blocks):
        raise ValueError(f"dims has {len(dims)} entries, the model has {len(blocks)} blocks")
    tokens = num_tokens(model, img_size)
    proj = model.patch_embed.proj
    patches = tokens - int(model.num_prefix_tokens)
    patch_flops = 2 * patches * proj.weight.numel() if isinstance(proj, nn.Conv2d) else 0
    per_block = [block_flops(b, tokens, d.num_heads, d.mlp_hidden) for b, d in zip(blocks, dims)]
    head = head_flops
    if head is None:
        param = next(model.parameters())
        dummy = torch.zeros(1, tokens, int(model.embed_dim), dtype=param.dtype, device=param.device)
        head = measure_flops(_HeadOnly(model), dummy)
    return {
        "tokens": tokens,
        "patch_embed": patch_flops,
        "blocks": per_block,
        "head": head,
        "total": patch_flops + sum(per_block) + head,
    }


class _HeadOnly(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(x))
