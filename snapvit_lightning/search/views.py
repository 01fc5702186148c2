"""Master weights and per-budget views of a ViT's blocks, for :class:`~.fitness.Fitness`.

:class:`~.fitness.Fitness` keeps one working copy of the model whose blocks' Linear weights
are replaced, per budget, by slices of stored *master* weights:

* MLP neurons are permuted once by descending raw score. A block's MLP weight is one scalar,
  so the within-block order never changes with ``w`` and every budget is a prefix slice
  (``fc1`` rows ``[:k]`` and ``fc2`` columns ``[:, :k]`` are views, no copy: a strided
  ``fc2`` view measured as fast as a contiguous copy, bf16 on CPU). Only when rescaling creates ties (e.g. a block weight of exactly 0) the kept set is
  gathered by index instead, so the result always equals the elastic model's.
* Heads are kept in their original order; the kept heads (top-``h`` by weighted score,
  taken in ascending index order) are gathered from the master ``qkv`` rows / ``proj``
  columns. All heads kept uses the master tensors themselves.
* Under autocast the master Linear weights are stored in the autocast dtype once, which is
  bit-for-bit what autocast would produce, without re-casting on every forward.
* With ``multiple > 1`` an MLP cut to ``k`` neurons runs ``ceil(k / multiple) * multiple`` of
  them, the extra ones with zero ``fc2`` columns: the block computes the same function (up to the
  summation order of its matmuls) with far fewer distinct matrix shapes. On a CPU every new shape
  makes oneDNN build and cache a kernel, and the cached kernels pin freed memory in the heap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..structure import head_channels, mlp_kind

def _descending(scores: Tensor) -> Tensor:
    # Same ordering as ImportanceScores.block_orders / ElasticViT.
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


@dataclass
class _LinearMaster:
    """The full weights of one Linear layer (rows or columns are the cut units)."""

    layer: nn.Linear
    weight: Tensor
    bias: Tensor | None


@dataclass
class _NormMaster:
    norm: nn.Module
    weight: Tensor | None
    bias: Tensor | None


@dataclass
class _BlockMaster:
    """Master weights of one block: MLP permuted by descending raw score, heads as is."""

    mlp_rows: list[_LinearMaster]  # fc1 (+ fc1_g / fc1_x); for GLU: fc1 whose halves are cut together
    glu: bool
    fc2: _LinearMaster
    mlp_norm: _NormMaster | None
    qkv: _LinearMaster
    gate: _LinearMaster | None
    attn_norm: _NormMaster | None
    proj: _LinearMaster
    hidden: int
    num_heads: int
    head_dim: int


def _norm_master(norm: nn.Module, index: Tensor | None) -> _NormMaster | None:
    if isinstance(norm, nn.Identity):
        return None

    def take(p: Tensor | None) -> Tensor | None:
        if p is None:
            return None
        p = p.detach()
        return (p if index is None else p.index_select(0, index.to(p.device))).clone()

    return _NormMaster(norm, take(getattr(norm, "weight", None)), take(getattr(norm, "bias", None)))


def _build_master(block: nn.Module, mlp_order: Tensor, dtype: torch.dtype | None) -> _BlockMaster:
    """Detach (and copy) the block's cut weights into a master, MLP permuted by ``mlp_order``."""

    def cast(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        t = t.detach()
        return (t if dtype is None else t.to(dtype)).contiguous().clone()

    def rows(layer: nn.Linear, index: Tensor | None) -> _LinearMaster:
        w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
        if index is not None:
            index = index.to(w.device)
            w = w.index_select(0, index)
            b = None if b is None else b.index_select(0, index)
        return _LinearMaster(layer, cast(w), cast(b))

    mlp, attn = block.mlp, block.attn
    kind = mlp_kind(mlp)
    hidden = int(mlp.fc2.in_features)
    if kind == "mlp":
        mlp_rows, glu = [rows(mlp.fc1, mlp_order)], False
    elif kind == "swiglu":
        mlp_rows, glu = [rows(mlp.fc1_g, mlp_order), rows(mlp.fc1_x, mlp_order)], False
    else:  # GluMlp / SwiGLUPacked: neuron j is rows j and j + hidden
        mlp_rows, glu = [rows(mlp.fc1, torch.cat([mlp_order, mlp_order + hidden]))], True
    fc2_w = mlp.fc2.weight.detach().index_select(1, mlp_order.to(mlp.fc2.weight.device))
    fc2 = _LinearMaster(mlp.fc2, cast(fc2_w), None)
    gate = getattr(attn, "gate", None)
    return _BlockMaster(
        mlp_rows=mlp_rows,
        glu=glu,
        fc2=fc2,
        mlp_norm=_norm_master(mlp.norm, mlp_order),
        qkv=rows(attn.qkv, None),
        gate=None if gate is None else rows(gate, None),
        attn_norm=_norm_master(attn.norm, None),
        proj=_LinearMaster(attn.proj, cast(attn.proj.weight), None),
        hidden=hidden,
        num_heads=int(attn.num_heads),
        head_dim=int(attn.head_dim),
    )


def _take(t: Tensor | None, sel: int | Tensor, dim: int, contiguous: bool = False) -> Tensor | None:
    """Units ``sel`` (a prefix length or an index tensor) of ``t`` along ``dim``."""
    if t is None:
        return None
    if isinstance(sel, int):
        if sel == t.shape[dim]:
            return t
        out = t.narrow(dim, 0, sel)
        return out.contiguous() if contiguous else out
    return t.index_select(dim, sel)


def _set_rows(m: _LinearMaster, sel: int | Tensor, glu_hidden: int | None = None) -> None:
    layer = m.layer
    if glu_hidden is not None:  # GLU: neuron j is rows j and j + hidden of one fc1
        if isinstance(sel, int) and sel == glu_hidden:
            sel = 2 * glu_hidden
        else:
            idx = torch.arange(sel, device=m.weight.device) if isinstance(sel, int) else sel
            sel = torch.cat([idx, idx + glu_hidden])
    layer.weight = _frozen(_take(m.weight, sel, 0))
    if m.bias is not None:
        layer.bias = _frozen(_take(m.bias, sel, 0))
    layer.out_features = int(layer.weight.shape[0])


def _set_cols(m: _LinearMaster, sel: int | Tensor) -> None:
    m.layer.weight = _frozen(_take(m.weight, sel, 1))  # strided prefix view: measured as fast as a copy
    m.layer.in_features = int(m.layer.weight.shape[1])


def _silence_extra_columns(layer: nn.Linear, kept: int) -> None:
    """Zero the input columns of ``layer`` from ``kept`` on (a copy: the master stays whole)."""
    weight = layer.weight.detach().clone()
    weight[:, kept:] = 0
    layer.weight = _frozen(weight)


def _set_norm(m: _NormMaster | None, sel: int | Tensor) -> None:
    if m is None:
        return
    for name in ("weight", "bias"):
        value = getattr(m, name)
        if value is not None:
            setattr(m.norm, name, _frozen(_take(value, sel, 0)))
    if hasattr(m.norm, "normalized_shape"):
        m.norm.normalized_shape = (sel if isinstance(sel, int) else int(sel.numel()),)


def _padded(master: _BlockMaster, mlp_sel: int | Tensor, multiple: int) -> tuple[int | Tensor, int]:
    """``mlp_sel`` grown to a multiple of ``multiple`` units (at most all), and how many it keeps."""
    kept = mlp_sel if isinstance(mlp_sel, int) else int(mlp_sel.numel())
    width = min(master.hidden, -(-kept // multiple) * multiple)
    if multiple == 1 or width == kept or master.mlp_norm is not None:  # a norm over neurons would see the extra ones
        return mlp_sel, kept
    if isinstance(mlp_sel, int):
        return width, kept
    unused = torch.ones(master.hidden, dtype=torch.bool, device=mlp_sel.device)
    unused[mlp_sel] = False
    return torch.cat([mlp_sel, unused.nonzero().flatten()[: width - kept]]), kept


def _set_block_view(
    block: nn.Module, master: _BlockMaster, mlp_sel: int | Tensor, heads: Tensor | None, multiple: int = 1
) -> None:
    """Point ``block``'s cut layers at slices of ``master`` (no copy for prefixes / all heads).

    Args:
        mlp_sel: Kept neurons in the master's (permuted) order: a prefix length or an index tensor.
        heads: Kept heads (ascending original indices) on the master's device, or ``None`` for all.
        multiple: Run the MLP on a multiple of this many neurons, the extra ones silenced by zero
            ``fc2`` columns (see the module docstring); not for a block with a norm over neurons.
    """
    mlp_sel, kept = _padded(master, mlp_sel, multiple)
    for m in master.mlp_rows:
        _set_rows(m, mlp_sel, master.hidden if master.glu else None)
    _set_norm(master.mlp_norm, mlp_sel)
    _set_cols(master.fc2, mlp_sel)
    if master.fc2.layer.in_features > kept:
        _silence_extra_columns(master.fc2.layer, kept)
    attn = block.attn
    hd = master.head_dim
    if heads is None:
        sel: int | Tensor = master.num_heads * hd
        qkv_sel: int | Tensor = 3 * master.num_heads * hd
        n = master.num_heads
    else:
        channels = head_channels(heads, hd)
        attn_dim = master.num_heads * hd
        sel = channels
        qkv_sel = torch.cat([channels, channels + attn_dim, channels + 2 * attn_dim])
        n = int(heads.numel())
    _set_rows(master.qkv, qkv_sel)
    if master.gate is not None:
        _set_rows(master.gate, sel)
    _set_norm(master.attn_norm, sel)
    _set_cols(master.proj, sel)
    attn.num_heads = n
    attn.attn_dim = n * hd
