"""Importance scores of MLP neurons and attention heads, and the global ranking.

:class:`ImportanceScores` is a plain object of tensors and scalars: it is what the scoring
stage produces, what the search rescales, and what the elastic checkpoint stores.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from .values import all_finite, real_number

__all__ = [
    "DEFAULT_HEAD_RATIO_SCALE", "HEAD_SHARE_KNEE", "ImportanceScores", "budget_line", "ceil4", "check_fraction", "check_ratio",
    "head_share", "lamp_scores",
]


def check_ratio(value: float, name: str) -> float:
    """Validate a pruning ratio in ``[0, 1)``.

    Raises:
        ValueError: If ``value`` is not a finite number in ``[0, 1)``.
    """
    number = real_number(value)
    if number is None or not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return number


def check_fraction(value: float, name: str) -> float:
    """Validate a keep fraction in ``[0, 1]``.

    Raises:
        ValueError: If ``value`` is not a number in ``[0, 1]``.
    """
    number = real_number(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return number


#: The share of the MLP ratio a FLOPs/params/latency budget prunes of the heads for corrected subnets (plain
#: cuts: 1.0, both alike, as before; chosen held out: docs/defaults.md, "The head share of a fraction budget").
DEFAULT_HEAD_RATIO_SCALE = 0.25


def head_share(head_ratio_scale: float | None, corrected: bool) -> float:
    """``head_ratio_scale``, or when ``None`` its default: :data:`DEFAULT_HEAD_RATIO_SCALE` for corrected cuts, 1.0 for plain."""
    return (DEFAULT_HEAD_RATIO_SCALE if corrected else 1.0) if head_ratio_scale is None else head_ratio_scale


def ceil4(x: float) -> float:
    """``x`` rounded up to 4 decimals: a smallest reachable fraction printed so that the printed value is reachable."""
    return math.ceil(x * 1e4 - 1e-9) / 1e4


#: Where a fraction budget's line leaves ``(r, s * r)``: past this MLP ratio the heads catch up, straight to every
#: block's minimum keep (taking the neurons alone to their minimum lost far more than it gained; docs/defaults.md).
HEAD_SHARE_KNEE = 0.75


def budget_line(u: float, scale: float) -> tuple[float, float]:
    """``(mlp_ratio, head_ratio)`` at ``u`` in ``[0, 1]``: ``(u, scale * u)`` up to :data:`HEAD_SHARE_KNEE`, then a
    straight line on to ``(1, 1)`` (both at their minimum keep); with ``scale = 1`` the diagonal throughout."""
    top = math.nextafter(1.0, 0.0)
    if u <= HEAD_SHARE_KNEE:
        return u, scale * u
    t = (u - HEAD_SHARE_KNEE) / (1.0 - HEAD_SHARE_KNEE)
    return min(u, top), min(scale * HEAD_SHARE_KNEE + t * (1.0 - scale * HEAD_SHARE_KNEE), top)


def check_quantiles(value: object, name: str) -> tuple[float, float]:
    """Validate a balancing quantile: a number in ``(0, 1)`` or an ``(mlp, heads)`` pair of them.

    Returns:
        ``(mlp_quantile, head_quantile)`` (equal for a single number).

    Raises:
        ValueError: Otherwise, naming ``name`` and the value.
    """
    def ok(q: object) -> bool:
        number = real_number(q)
        return number is not None and 0.0 < number < 1.0

    if ok(value):
        return real_number(value), real_number(value)  # type: ignore[return-value]
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(ok(q) for q in value):
        return real_number(value[0]), real_number(value[1])  # type: ignore[return-value]
    raise ValueError(f"{name} must be a number in (0, 1), an (mlp, heads) pair of them or 'rank', got {value!r}")


def check_balance(value: object, name: str = "balance") -> float | tuple[float, float] | str | None:
    """Validate how a ranking balances blocks: ``None``, ``"rank"``, a quantile or an ``(mlp, heads)`` pair.

    Returns:
        The value normalised: ``None``, ``"rank"``, a float, or a tuple of two floats.

    Raises:
        ValueError: Otherwise, naming ``name`` and the value.
    """
    if value is None or value == "rank":
        return value  # type: ignore[return-value]
    try:
        mlp_q, head_q = check_quantiles(value, name)
    except ValueError:
        raise ValueError(
            f"{name} must be None, a ratio in (0, 1), an (mlp, heads) pair of ratios or 'rank', got {value!r}"
        ) from None
    return (mlp_q, head_q) if isinstance(value, (tuple, list)) else mlp_q


def shortfall_note(name: str, given: float | None, got: float, flag: str = "") -> str | None:
    """A sentence when a ``flops``/``params`` budget cuts more than 2 points below ``given`` (``got``), else ``None``.

    The budget line's largest cut within a fraction can fall far below it where blocks have few heads (one
    head is a large step): ``--flops 0.6`` cut at 52.1 % of a two-head model's FLOPs.
    """
    if given is None or got >= given - 0.02:
        return None
    shown = f"{flag}{name} {given:g}" if flag else f"{name}={given:g}"
    return (f"{shown} cuts at {100 * got:.1f}%: the largest cut on the budget line within it (with few heads per block, "
            "one head is a large step); mlp_ratio/head_ratio reach others")


@dataclass
class ImportanceScores:
    """Per-block MLP-neuron and head scores, optional search weights, and the global ranking.

    Attributes:
        mlp: ``[B, hidden]`` non-negative neuron scores (higher = more important).
        heads: ``[B, H]`` non-negative head scores.
        block_weights: Optional ``[B]`` search weights that rescale each block's MLP scores.
        head_weights: Optional ``[B, H]`` search weights that rescale each head's score.
        covariance: Optional ``[B + B*H, B + B*H]`` covariance learned by the search (the
            cross-structure correlation estimate), in the order ``block_weights`` then
            ``head_weights`` flattened row-major.
        min_mlp_keep: Fraction of each block's neurons that is always kept (the best-scoring).
        min_head_keep: Fraction of each block's heads that is always kept.
        criterion: Name of the criterion that produced the scores.
        build_info: Plain JSON values recorded while building the elastic model: stage wall
            times ``scoring_s``, ``search_s``, ``search_evaluations`` and the build machine
            (see :mod:`snapvit_lightning.benchmarks.bench`); ``None`` when unknown (older checkpoints).
        balance: How the global ranking compares blocks (``mlp`` and ``heads`` always stay the
            raw scores): ``None``, the raw scores; a quantile ``q`` in ``(0, 1)`` or an
            ``(mlp, heads)`` pair, each block's scores divided by their ``q``-quantile; ``"rank"``,
            each score replaced by its rank inside its block (see :meth:`balanced`). The search
            weights rescale these balanced scores.
    """

    mlp: torch.Tensor
    heads: torch.Tensor
    block_weights: torch.Tensor | None = None
    head_weights: torch.Tensor | None = None
    covariance: torch.Tensor | None = None
    min_mlp_keep: float = 0.05
    min_head_keep: float = 0.2
    criterion: str = "dino"
    build_info: dict | None = None
    balance: float | tuple[float, float] | str | None = None

    def __post_init__(self) -> None:
        for name in ("mlp", "heads"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.numel() == 0:
                raise ValueError(f"{name} must be a non-empty 2-D tensor [blocks, units], got {_shape(value)}")
            if not all_finite(value) or (value < 0).any():
                raise ValueError(f"{name} scores must be finite and non-negative")
            setattr(self, name, value.detach().to("cpu", torch.float64))
        if self.mlp.shape[0] != self.heads.shape[0]:
            raise ValueError(f"mlp has {self.mlp.shape[0]} blocks but heads has {self.heads.shape[0]}")
        num_blocks, num_heads = self.heads.shape
        if self.block_weights is not None:
            self.block_weights = self._check_tensor(self.block_weights, (num_blocks,), "block_weights")
        if self.head_weights is not None:
            self.head_weights = self._check_tensor(self.head_weights, (num_blocks, num_heads), "head_weights")
        if (self.block_weights is None) != (self.head_weights is None):
            raise ValueError("block_weights and head_weights must be given together")
        if self.covariance is not None:
            d = self.num_weights
            self.covariance = self._check_tensor(self.covariance, (d, d), "covariance")
            scale = float(self.covariance.abs().max()) or 1.0
            if not torch.allclose(self.covariance, self.covariance.T, rtol=0, atol=1e-9 * scale) or \
                    float(torch.linalg.eigvalsh(self.covariance).min()) < -1e-9 * scale:
                raise ValueError("covariance must be symmetric positive semi-definite (the search's learned covariance)")
        self.min_mlp_keep = check_fraction(self.min_mlp_keep, "min_mlp_keep")
        self.min_head_keep = check_fraction(self.min_head_keep, "min_head_keep")
        if not isinstance(self.criterion, str) or not self.criterion:
            raise ValueError(f"criterion must be a non-empty string, got {self.criterion!r}")
        self.balance = check_balance(self.balance)
        if self.build_info is not None:
            try:
                self.build_info = json.loads(json.dumps(dict(self.build_info), allow_nan=False))
            except (TypeError, ValueError) as err:
                raise ValueError(f"build_info must be a dict of plain JSON values, got {self.build_info!r}") from err

    @staticmethod
    def _check_tensor(value: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            raise ValueError(f"{name} must be a tensor of shape {list(shape)}, got {_shape(value)}")
        if not all_finite(value):
            raise ValueError(f"{name} must be finite")
        return value.detach().to("cpu", torch.float64)

    # ------------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Number of blocks ``B``."""
        return int(self.mlp.shape[0])

    @property
    def mlp_hidden(self) -> int:
        """Neurons per block."""
        return int(self.mlp.shape[1])

    @property
    def num_heads(self) -> int:
        """Heads per block ``H``."""
        return int(self.heads.shape[1])

    @property
    def num_weights(self) -> int:
        """Length ``B + B*H`` of the search's weight vector."""
        return self.num_blocks * (1 + self.num_heads)

    @property
    def min_neurons(self) -> int:
        """Neurons each block always keeps: ``ceil(min_mlp_keep * hidden)``."""
        return math.ceil(self.min_mlp_keep * self.mlp_hidden - 1e-9)

    @property
    def min_heads(self) -> int:
        """Heads each block always keeps: ``ceil(min_head_keep * H)``."""
        return math.ceil(self.min_head_keep * self.num_heads - 1e-9)

    @property
    def max_ratios(self) -> tuple[float, float]:
        """The largest ``(mlp_ratio, head_ratio)``: every block at its minimum keep (a larger ratio cuts no more)."""
        return 1.0 - self.min_neurons / self.mlp_hidden, 1.0 - self.min_heads / self.num_heads

    def reachable(self, mlp_ratio: float, head_ratio: float) -> tuple[float, float]:
        """The ratios capped at :attr:`max_ratios`: the same cut (a larger ratio cuts no more), named by what it cuts."""
        top = self.max_ratios
        return min(mlp_ratio, top[0]), min(head_ratio, top[1])

    def check_matches(self, num_blocks: int, dims: Any) -> None:
        """Refuse a model of another shape: ``num_blocks`` blocks of ``dims`` (a ``BlockDims``).

        Raises:
            ValueError: Naming both (blocks, neurons, heads).
        """
        expected = (num_blocks, dims.mlp_hidden, dims.num_heads)
        got = (self.num_blocks, self.mlp_hidden, self.num_heads)
        if got != expected:
            raise ValueError(f"scores (blocks, neurons, heads) = {got} do not match the model's {expected}")

    def capped_notes(self, given: tuple[float | None, float | None], got: tuple[float, float], flag: str = "") -> list[str]:
        """What :meth:`reachable` changed, one sentence per ratio: ``"mlp_ratio=0.97 cuts as 0.9499: ..."``.

        ``given``: the ratios asked for (``None``: not asked); ``got``: those cut; ``flag``: the
        prefix of the names (``"--"`` with the CLI's dashes, else the keyword arguments' names).
        """
        notes = []
        for name, asked, cut in zip(("mlp_ratio", "head_ratio"), given, got):
            if asked is not None and asked != cut:
                shown = f"{flag}{name.replace('_', '-')} {asked:g}" if flag else f"{name}={asked:g}"
                notes.append(f"{shown} cuts as {cut:.4f}: every block keeps its minimum (min_mlp_keep "
                             f"{self.min_mlp_keep:g}, min_head_keep {self.min_head_keep:g}); a larger ratio cuts no more")
        return notes

    def weight_vector(self) -> torch.Tensor | None:
        """The search weights as one ``[B + B*H]`` vector, or ``None`` when there are none."""
        if self.block_weights is None:
            return None
        return torch.cat([self.block_weights, self.head_weights.flatten()])

    def with_weights(self, weights: torch.Tensor, covariance: torch.Tensor | None = None) -> "ImportanceScores":
        """A copy that carries the search weights ``weights`` (``[B + B*H]``) and ``covariance``.

        Raises:
            ValueError: If ``weights`` has the wrong length.
        """
        weights = torch.as_tensor(weights)
        if weights.shape != (self.num_weights,):
            raise ValueError(f"weights must have shape [{self.num_weights}] (B + B*H), got {list(weights.shape)}")
        b = self.num_blocks
        return replace(
            self,
            block_weights=weights[:b].clone(),
            head_weights=weights[b:].reshape(b, self.num_heads).clone(),
            covariance=None if covariance is None else torch.as_tensor(covariance).clone(),
        )

    def balanced(self, quantile: float | tuple[float, float] | str) -> "ImportanceScores":
        """A copy whose global ranking compares blocks on balanced scores (``balance=quantile``).

        Every block's neuron and head scores are divided by their ``quantile`` before the
        global ranking: the order inside each block is unchanged, but the copy prunes about the
        same share of every block at ratio ``quantile`` (a uniform split across blocks); search
        weights then move budget between blocks from there. A pair ``(mlp_quantile,
        head_quantile)`` uses a different quantile for the head scores. With
        ``quantile="rank"`` every score becomes its rank inside the block divided by the
        block's size (best unit 1, worst ``1/n``): the copy then prunes the same share of every
        block (to one unit) at *every* ratio, and a block weight ``w`` keeps the units whose
        rank is above ``threshold / w``. The raw scores are kept (``mlp``, ``heads``); search
        weights and covariance are dropped.

        Raises:
            ValueError: If ``quantile`` is neither in ``(0, 1)``, a pair of such numbers nor ``"rank"``.
        """
        if quantile != "rank":
            check_quantiles(quantile, "quantile")
        return replace(self, balance=quantile, block_weights=None, head_weights=None, covariance=None)

    def raw(self) -> "ImportanceScores":
        """A copy ranked by the raw scores alone: no balance, search weights, covariance or build info."""
        return replace(self, balance=None, block_weights=None, head_weights=None, covariance=None, build_info=None)

    def ranking_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The MLP and head scores the global ranking compares (``balance`` applied, no weights)."""
        if self.balance is None:
            return self.mlp, self.heads
        if self.balance == "rank":
            return _block_ranks(self.mlp), _block_ranks(self.heads)
        mlp_q, head_q = check_quantiles(self.balance, "balance")

        def scale(x: torch.Tensor, q: float) -> torch.Tensor:
            value = x.quantile(q, dim=1, keepdim=True)
            floor = x.abs().amax().clamp_min(1e-300) * 1e-12  # a block of zeros stays zeros
            return x / value.clamp_min(floor)

        return scale(self.mlp, mlp_q), scale(self.heads, head_q)

    def weighted(self, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranking scores (:meth:`ranking_scores`) rescaled by ``|w|`` (default: the stored weights)."""
        mlp, heads = self.ranking_scores()
        if weights is None:
            if self.block_weights is None:
                return mlp, heads
            block_w, head_w = self.block_weights, self.head_weights
        else:
            weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
            if weights.shape != (self.num_weights,):
                raise ValueError(f"weights must have shape [{self.num_weights}], got {list(weights.shape)}")
            block_w, head_w = weights[: self.num_blocks], weights[self.num_blocks :].view_as(self.heads)
        return mlp * block_w.abs()[:, None], heads * head_w.abs()

    def keep_counts(
        self, mlp_ratio: float, head_ratio: float, weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block kept neurons and heads under the global ranking.

        Prunes the globally lowest ``round(ratio * B * units_per_block)`` units (scores rescaled
        by the search weights), except that each block always keeps its best ``min_*`` units.
        Within a block the kept units are always its best-scoring ones, so after permuting by
        descending score every budget is a prefix slice.

        Args:
            mlp_ratio: Fraction of all MLP neurons to prune, in ``[0, 1)``.
            head_ratio: Fraction of all heads to prune, in ``[0, 1)``.
            weights: Optional ``[B + B*H]`` search weights overriding the stored ones.

        Returns:
            ``(neurons [B], heads [B])`` as int64 tensors.

        Raises:
            ValueError: A ratio outside ``[0, 1)`` or weights of the wrong shape.
        """
        mlp_ratio = check_ratio(mlp_ratio, "mlp_ratio")
        head_ratio = check_ratio(head_ratio, "head_ratio")
        mlp, heads = self.weighted(weights)
        return (
            _global_keep(mlp, mlp_ratio, self.min_neurons),
            _global_keep(heads, head_ratio, self.min_heads),
        )

    def block_orders(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block unit orders by descending (weighted) score: ``([B, hidden], [B, H])``."""
        mlp, heads = self.weighted()
        return _descending(mlp), _descending(heads)

    def permuted(self, mlp_order: torch.Tensor, head_order: torch.Tensor) -> "ImportanceScores":
        """A copy whose per-block units are reordered by ``mlp_order`` / ``head_order``.

        The covariance is left in the original head order it was learned in.
        """
        head_w = None if self.head_weights is None else self.head_weights.gather(1, head_order)
        return replace(
            self,
            mlp=self.mlp.gather(1, mlp_order),
            heads=self.heads.gather(1, head_order),
            head_weights=head_w,
        )

    # ------------------------------------------------------------------------------------------

    def to_tensors(self, prefix: str = "scores.") -> dict[str, torch.Tensor]:
        """The tensors of these scores, keyed for a safetensors file."""
        out = {f"{prefix}mlp": self.mlp, f"{prefix}heads": self.heads}
        for name in ("block_weights", "head_weights", "covariance"):
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}{name}"] = value
        return {k: v.contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, object]:
        """The plain (non-tensor) values of these scores."""
        meta: dict[str, object] = {
            "min_mlp_keep": self.min_mlp_keep, "min_head_keep": self.min_head_keep, "criterion": self.criterion
        }
        if self.build_info is not None:
            meta["build_info"] = self.build_info
        if self.balance is not None:
            meta["balance"] = list(self.balance) if isinstance(self.balance, tuple) else self.balance
        return meta

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], metadata: dict[str, object], prefix: str = "scores."
    ) -> "ImportanceScores":
        """Rebuild from :meth:`to_tensors` and :meth:`metadata`.

        Raises:
            KeyError: If the required ``mlp`` or ``heads`` tensors are missing.
        """
        values = {name: tensors.get(f"{prefix}{name}") for name in ("block_weights", "head_weights", "covariance")}
        return cls(mlp=tensors[f"{prefix}mlp"], heads=tensors[f"{prefix}heads"], **values, **metadata)

    def state_dict(self) -> dict[str, object]:
        """Tensors and plain values, loadable with ``torch.load(weights_only=True)``."""
        return {**self.to_tensors(prefix=""), **self.metadata()}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> "ImportanceScores":
        """Inverse of :meth:`state_dict`."""
        return cls(**{k: v for k, v in state.items()})


def _shape(value: object) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def _descending(scores: torch.Tensor) -> torch.Tensor:
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def _block_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Per block, ``(n - position) / n`` of each unit in the descending (stable) score order."""
    num_blocks, units = scores.shape
    order = _descending(scores)
    ranks = torch.empty_like(scores, dtype=torch.float64)
    values = torch.arange(units, 0, -1, dtype=torch.float64).div(units).expand(num_blocks, units)
    ranks.scatter_(1, order, values)
    return ranks.to(scores.dtype if scores.is_floating_point() else torch.float64)


def _global_keep(scores: torch.Tensor, ratio: float, min_keep: int) -> torch.Tensor:
    num_blocks, units = scores.shape
    num_prune = round(ratio * num_blocks * units)
    keep = torch.full((num_blocks,), units, dtype=torch.long)
    if num_prune == 0:
        return keep
    # Each block's best `min_keep` units are protected; the rest compete globally.
    ranked = torch.sort(scores, dim=1, descending=True, stable=True).values
    candidates = ranked[:, min_keep:]
    num_prune = min(num_prune, candidates.numel())
    block_of = torch.arange(num_blocks)[:, None].expand_as(candidates).flatten()
    lowest = torch.sort(candidates.flatten(), stable=True).indices[:num_prune]
    keep -= torch.bincount(block_of[lowest], minlength=num_blocks)
    return keep


def lamp_scores(magnitudes: torch.Tensor) -> torch.Tensor:
    """LAMP scores (Lee et al., 2021) of the units in each row of ``magnitudes``.

    ``score(u) = m_u / sum_{v : m_v >= m_u} m_v`` over the units ``v`` of the same row (layer),
    where ``m`` are squared magnitudes; ties share a denominator, the largest unit scores 1 and
    a row of zeros scores 0.

    Args:
        magnitudes: ``[rows, units]`` non-negative squared magnitudes.

    Returns:
        ``[rows, units]`` scores in ``[0, 1]``.
    """
    m = magnitudes.to(torch.float64)
    ascending, _ = torch.sort(m, dim=1)
    # suffix[:, i] = sum of ascending[:, i:]; suffix[:, units] = 0
    suffix = torch.flip(torch.cumsum(torch.flip(ascending, dims=[1]), dim=1), dims=[1])
    first = torch.searchsorted(ascending.contiguous(), m.contiguous(), right=False)
    denom = suffix.gather(1, first)
    return torch.where(denom > 0, m / denom.clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(m))
