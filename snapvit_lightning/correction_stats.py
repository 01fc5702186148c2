"""Correction statistics: :class:`CorrectionStats` and their file (``<name>.stats.safetensors``).

The second moments of the dense model's ``attn.proj`` and ``mlp.fc2`` inputs that the weight
correction (:mod:`~snapvit_lightning.correction`) solves from, stored as float32 upper triangles
(tensors and plain metadata only), and the corrected path's optional ranking; which models
statistics can correct (:func:`check_one_shot`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import __version__
from .checkpoint import _write, read_format
from .structure import get_blocks
from .values import all_finite, integer

__all__ = [
    "CorrectionStats", "EXPORT_HINT", "SEQUENTIAL_HINT", "STATS_FORMAT", "STATS_FORMAT_VERSION", "STATS_READABLE_VERSIONS",
    "check_one_shot", "has_cut_norm", "stats_path_for",
]

STATS_FORMAT = "snapvit-correction-stats"
#: 1: full matrices; 2: upper triangles only (lossless); 3: as 2, plus the optional ranking of the corrected path.
STATS_FORMAT_VERSION = 3
STATS_READABLE_VERSIONS = (1, 2, 3)


def _triu(matrices: Tensor) -> Tensor:
    """The upper triangles (diagonal included) of ``[B, n, n]`` as ``[B, n(n+1)/2]``, row by row."""
    n = matrices.shape[-1]
    rows, cols = torch.triu_indices(n, n)
    return matrices[:, rows, cols]


def _from_triu(packed: Tensor, n: int) -> Tensor:
    """The symmetric ``[B, n, n]`` whose upper triangles are ``packed`` (the inverse of :func:`_triu`)."""
    out = packed.new_empty(packed.shape[0], n, n)
    start = 0
    for i in range(n):  # row by row: no index tensors, faster than one scatter of all n(n+1)/2 entries
        row = packed[:, start:start + n - i]
        out[:, i, i:] = row
        out[:, i:, i] = row
        start += n - i
    return out


def _triangle_side(length: int) -> int:
    """``n`` with ``n(n+1)/2 == length``, or -1."""
    n = int((math.isqrt(8 * length + 1) - 1) // 2)
    return n if n * (n + 1) // 2 == length else -1


def stats_path_for(elastic_path: str | os.PathLike) -> Path:
    """Where statistics of ``<name>.elastic.safetensors`` live: ``<name>.stats.safetensors`` beside it."""
    path = Path(elastic_path).expanduser()
    suffix = ".elastic.safetensors"
    stem = path.name[: -len(suffix)] if path.name.endswith(suffix) else path.stem
    return path.with_name(f"{stem}.stats.safetensors")


# ----------------------------------------------------------------------------------------------
# Stored statistics
# ----------------------------------------------------------------------------------------------


@dataclass
class CorrectionStats:
    """Second moments of the dense model's ``attn.proj`` and ``mlp.fc2`` inputs, per block.

    In the elastic model's (permuted) unit order, so a budget's kept inputs are a prefix. The
    matrices are symmetric (:func:`~snapvit_lightning.correction.collect_stats` makes them exactly
    so), and a file stores only their upper triangles: lossless, half the bytes (format version 3;
    version 1 files, which hold the full matrices, and version 2 files, without a ranking, are
    still read).

    They may carry the corrected path's own ranking (:func:`~snapvit_lightning.obs.with_ranking`):
    :meth:`~snapvit_lightning.elastic.ElasticViT.subnet` then keeps, for corrected subnets, the
    units it ranks highest instead of the elastic model's prefix; plain cuts never use it.

    Attributes:
        attn: ``[B, C + 1, C + 1]`` float32 ``E[xₐ xₐᵀ]`` of the ``attn.proj`` inputs
            ``x`` (``C = heads · head_dim``), augmented with a constant 1 (last row/column holds
            the means).
        mlp: ``[B, hidden + 1, hidden + 1]`` the same for the ``mlp.fc2`` inputs.
        num_images: Inputs they were collected on (calibration images × ``views_per_image``).
        num_tokens: Tokens per layer they average over (images × tokens per image).
        fingerprint: :func:`~snapvit_lightning.correction.fingerprint` of the elastic model they belong to.
        ranking_mlp: ``[B, hidden]`` float64 scores of the MLP neurons for corrected subnets, in
            the elastic model's unit order (higher = keep), or ``None``.
        ranking_heads: ``[B, H]`` the same for the heads; given together with ``ranking_mlp``.
        views_per_image: Inputs per calibration image (its eval view and random crops), when known
            (``None``: not recorded, e.g. statistics collected from a tensor of images).
        image_size: ``(H, W)`` of the inputs, in pixels (``None`` in files written before it was
            recorded): the size the correction was measured at.

    Raises:
        ValueError: Matrices that are not ``[B, n, n]`` finite float second moments (non-negative on
            the diagonal, not all zero in a block) with one ``B``; counts that are not ints with
            ``1 <= num_images <= num_tokens``; a fingerprint that is no str; a ranking without the other
            half, of the wrong shape, or with values that are not finite and non-negative;
            ``views_per_image`` that does not divide ``num_images``; an ``image_size`` that is not
            two ints >= 1.
    """

    attn: Tensor
    mlp: Tensor
    num_images: int
    num_tokens: int
    fingerprint: str
    ranking_mlp: Tensor | None = None
    ranking_heads: Tensor | None = None
    views_per_image: int | None = None
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for name, t in (("attn", self.attn), ("mlp", self.mlp)):
            if not isinstance(t, Tensor) or t.ndim != 3 or t.shape[1] != t.shape[2]:
                got = tuple(t.shape) if isinstance(t, Tensor) else f"a {type(t).__name__}, not a torch.Tensor"
                raise ValueError(f"'{name}' must be a [B, n, n] torch.Tensor, got {got}")
        if self.attn.shape[0] != self.mlp.shape[0]:
            raise ValueError(f"'attn' and 'mlp' have different block counts ({self.attn.shape[0]} and {self.mlp.shape[0]})")
        for name, t in (("attn", self.attn), ("mlp", self.mlp)):  # a damaged file, not a damping problem later
            diagonal = t.diagonal(dim1=1, dim2=2) if t.is_floating_point() else None
            if diagonal is None or not all_finite(t) or bool((diagonal < 0).any()) \
                    or bool((diagonal.sum(dim=1) == 0).any()):
                raise ValueError(f"'{name}' must hold finite float second moments, non-negative on the "
                                 "diagonal and not all zero in a block (a damaged file?)")
        counts = [integer(v) for v in (self.num_images, self.num_tokens)]
        if None in counts or counts[0] < 1 or counts[1] < counts[0]:
            raise ValueError(f"num_images must be an int >= 1 and num_tokens an int >= num_images, got "
                             f"{self.num_images!r} and {self.num_tokens!r}")
        self.num_images, self.num_tokens = counts
        if not isinstance(self.fingerprint, str):  # "": collect_stats of a bare model (an elastic model takes none)
            raise ValueError(f"fingerprint must be a str (correction.fingerprint), got {self.fingerprint!r}")
        views = self.views_per_image
        if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1
                                  or self.num_images % views):
            raise ValueError(f"views_per_image must be None or an int >= 1 that divides num_images "
                             f"({self.num_images}), got {views!r}")
        if self.image_size is not None:
            size = [integer(v) for v in self.image_size] if isinstance(self.image_size, (tuple, list)) else [None]
            if len(size) != 2 or None in size or min(size) < 1:
                raise ValueError(f"image_size must be None or (H, W), two ints >= 1, got {self.image_size!r}")
            self.image_size = (size[0], size[1])
        if (self.ranking_mlp is None) != (self.ranking_heads is None):
            raise ValueError("ranking_mlp and ranking_heads must be given together (or neither)")
        if self.ranking_mlp is None:
            return
        blocks, hidden, channels = self.mlp.shape[0], self.mlp.shape[-1] - 1, self.attn.shape[-1] - 1
        for name, value in (("ranking_mlp", self.ranking_mlp), ("ranking_heads", self.ranking_heads)):
            if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[0] != blocks or value.shape[1] < 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"{name} must be a [{blocks}, units] tensor (one row per block), got {shape}")
            if not value.is_floating_point() or not all_finite(value) or (value < 0).any():
                raise ValueError(f"{name} must hold finite, non-negative floating-point scores")
        if self.ranking_mlp.shape[1] != hidden:
            raise ValueError(f"ranking_mlp must be [{blocks}, {hidden}] (the MLP's neurons), got {tuple(self.ranking_mlp.shape)}")
        heads = self.ranking_heads.shape[1]
        if channels % heads:
            raise ValueError(
                f"ranking_heads has {heads} heads per block, which do not divide the {channels} attn.proj inputs"
            )
        self.ranking_mlp = self.ranking_mlp.detach().to("cpu", torch.float64)
        self.ranking_heads = self.ranking_heads.detach().to("cpu", torch.float64)

    @property
    def has_ranking(self) -> bool:
        """Whether they carry the corrected path's own ranking (``ranking_mlp``/``ranking_heads``)."""
        return self.ranking_mlp is not None

    def _rankings(self) -> tuple[Tensor, ...]:
        return () if self.ranking_mlp is None else (self.ranking_mlp, self.ranking_heads)

    @property
    def nbytes(self) -> int:
        """Bytes in memory: the (full, float32) matrices and the ranking (float64), if any."""
        return sum(t.numel() * t.element_size() for t in (self.attn, self.mlp, *self._rankings()))

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors :meth:`save` writes: the float32 upper triangles, ``4·B·n(n+1)/2`` per
        layer, and the float64 ranking, ``8·B·(hidden + H)``, when there is one."""
        triangles = sum(4 * t.shape[0] * t.shape[1] * (t.shape[1] + 1) // 2 for t in (self.attn, self.mlp))
        return triangles + sum(8 * t.numel() for t in self._rankings())

    @property
    def digest(self) -> str:
        """A short hash of their content (the ``attn.proj`` matrices, the ranking, the counts).

        The same after :meth:`save` and :meth:`load` (the stored triangles are lossless); statistics
        of other images differ. ``report.json`` records it, so a report can tell whether its
        corrected fidelity was measured with the statistics now beside the checkpoint.
        """
        h = hashlib.sha256(f"{self.num_images},{self.num_tokens}".encode())
        for t in (self.attn.float(), *self._rankings()):
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def check_fits(self, fingerprint: str, model: nn.Module) -> None:
        """Refuse statistics of another elastic model (``fingerprint``) or of other layer sizes than ``model``'s.

        A file of the right fingerprint with another size of matrices was attached and announced as
        correcting by default; only the first ``subnet()`` refused it.

        Raises:
            ValueError: Naming what differs.
        """
        if self.fingerprint != fingerprint:
            raise ValueError(f"the correction statistics belong to another elastic model (fingerprint {self.fingerprint!r}, "
                             f"this model {fingerprint!r}); collect them again for this checkpoint")
        blocks = get_blocks(model)
        for branch, stored, layer in (("mlp", self.mlp, blocks[0].mlp.fc2), ("attn", self.attn, blocks[0].attn.proj)):
            if tuple(stored.shape[:2]) != (len(blocks), layer.in_features + 1):
                raise ValueError(f"the correction statistics' '{branch}' matrices are {tuple(stored.shape)}, this model "
                                 f"needs [{len(blocks)}, {layer.in_features + 1}, {layer.in_features + 1}]; collect them "
                                 "again for this checkpoint")

    def permuted(self, mlp_order: Tensor, head_order: Tensor, fingerprint: str) -> "CorrectionStats":
        """These statistics in another unit order, without a ranking (the new order is the ranking).

        Row and column ``i`` of block ``b``'s MLP matrix become those of neuron ``mlp_order[b, i]``;
        the ``attn.proj`` inputs move with their heads (``head_order`` expanded to each head's
        channels); the last row and column (the constant 1) stay last.
        """
        blocks, heads, channels = self.attn.shape[0], head_order.shape[1], self.attn.shape[-1] - 1
        head_dim = channels // heads
        channel_order = (head_order.long()[:, :, None] * head_dim + torch.arange(head_dim)).flatten(1)
        out = {}
        for name, moment, order in (("attn", self.attn, channel_order), ("mlp", self.mlp, mlp_order.long())):
            last = torch.full((blocks, 1), moment.shape[-1] - 1, dtype=torch.long)
            index = torch.cat([order, last], 1).to(moment.device)
            out[name] = torch.stack([m.index_select(0, i).index_select(1, i) for m, i in zip(moment, index)])
        return CorrectionStats(out["attn"], out["mlp"], self.num_images, self.num_tokens, fingerprint,
                               views_per_image=self.views_per_image, image_size=self.image_size)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file of the upper triangles (to a temporary file, then renamed).

        Raises:
            ValueError: A matrix that is not symmetric (the lower triangle would be lost).
        """
        for name, t in (("attn", self.attn), ("mlp", self.mlp)):
            if not torch.equal(t, t.transpose(1, 2)):
                raise ValueError(f"correction statistics '{name}' are not symmetric; collect them with collect_stats()")
        meta = {
            "format": STATS_FORMAT,
            "format_version": str(STATS_FORMAT_VERSION),
            "num_images": str(self.num_images),
            "num_tokens": str(self.num_tokens),
            "fingerprint": self.fingerprint,
            "snapvit_version": __version__,
        }
        if self.views_per_image is not None:
            meta["views_per_image"] = str(self.views_per_image)
        if self.image_size is not None:
            meta["image_size"] = json.dumps(list(self.image_size))
        tensors = {"attn_triu": _triu(self.attn.float()), "mlp_triu": _triu(self.mlp.float())}
        if self.has_ranking:
            tensors.update(ranking_mlp=self.ranking_mlp, ranking_heads=self.ranking_heads)
        _write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CorrectionStats":
        """Read statistics written by :meth:`save` (tensors and plain values only).

        Reads format version 3 (upper triangles and, when stored, the ranking ``ranking_mlp``
        ``[B, hidden]`` / ``ranking_heads`` ``[B, H]``), version 2 (upper triangles, no ranking)
        and version 1 (full matrices, no ranking).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: Not a statistics file of a readable format/version, or inconsistent contents
                (a ranking of the wrong shape included).
        """
        tensors, meta = read_format(path, STATS_FORMAT, STATS_READABLE_VERSIONS, "correction statistics")
        try:
            if meta["format_version"] == "1":
                attn, mlp = tensors["attn"], tensors["mlp"]
            else:
                attn, mlp = (_unpack(path, name, tensors[f"{name}_triu"]) for name in ("attn", "mlp"))
            values = (int(meta["num_images"]), int(meta["num_tokens"]), str(meta["fingerprint"]))
            views = int(meta["views_per_image"]) if "views_per_image" in meta else None  # not in earlier files
            size = json.loads(meta["image_size"]) if "image_size" in meta else None  # not in earlier files
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: incomplete correction statistics: {err!r}") from err
        ranking = {}
        if meta["format_version"] not in ("1", "2"):  # older files carry no ranking
            ranking = {k: tensors[k] for k in ("ranking_mlp", "ranking_heads") if k in tensors}
        try:
            return cls(attn, mlp, *values, **ranking, views_per_image=views, image_size=size)
        except ValueError as err:
            raise ValueError(f"{path}: invalid correction statistics: {err}") from err


def _unpack(path: str | os.PathLike, name: str, packed: Tensor) -> Tensor:
    n = _triangle_side(packed.shape[-1]) if packed.ndim == 2 else -1
    if n < 1:
        raise ValueError(f"{path}: '{name}_triu' must be [B, n(n+1)/2] upper triangles, got {tuple(packed.shape)}")
    return _from_triu(packed, n)


def has_cut_norm(block: nn.Module) -> bool:
    """Whether ``block`` has a norm over a cut dimension (``scale_norm`` / MLP norm): stored statistics cannot correct it."""
    return not isinstance(block.attn.norm, nn.Identity) or not isinstance(block.mlp.norm, nn.Identity)


#: How a model with a norm over a cut dimension gets corrected subnets: block by block, from images.
SEQUENTIAL_HINT = ("correct its subnets block by block from calibration images instead: "
                   "subnet(..., calibration=images, sequential=True), or snapvit slice --sequential --calibration DIR")


#: What an export of such a model does instead (:func:`check_one_shot` in the export and the callbacks).
EXPORT_HINT = ("export it with correct='none' (in a config: correct: none in the callback's init_args), then "
               + SEQUENTIAL_HINT)


def check_one_shot(model: nn.Module, what: str | None, instead: str = SEQUENTIAL_HINT) -> None:
    """Refuse a model that statistics cannot correct (:func:`has_cut_norm`), naming ``what`` asked for it.

    Raises:
        ValueError: A block of ``model`` has a norm over a cut dimension; the message starts with
            ``what`` (unless ``None``) and ends with ``instead``.
    """
    if any(has_cut_norm(b) for b in get_blocks(model)):
        raise ValueError(
            f"{f'{what}: ' if what else ''}statistics cannot correct this model: it has a norm over the cut dimension "
            f"(timm's scale_attn_norm / scale_mlp_norm), so its kept activations change with every cut; {instead}"
        )
