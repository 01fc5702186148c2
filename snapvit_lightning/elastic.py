"""The elastic model: permuted weights + scores, from which any budget is a prefix slice.

File format (``*.elastic.safetensors``, :data:`~snapvit_lightning.checkpoint.FORMAT_VERSION`; read and
written by :mod:`snapvit_lightning.checkpoint`):

* tensors ``model.<name>``: the full state dict of the permuted model (or of a sliced subnet);
* tensors ``scores.mlp`` ``[B, hidden]``, ``scores.heads`` ``[B, H]`` and, when the search ran,
  ``scores.block_weights`` ``[B]``, ``scores.head_weights`` ``[B, H]``, ``scores.covariance``;
  all in the permuted unit order, so unit ``i`` of a block is its ``i``-th best;
* tensors ``order.mlp`` / ``order.heads``: the original index of each permuted unit;
* string metadata (JSON values): ``format``, ``format_version``, ``kind`` (``elastic`` or
  ``subnet``), ``model_name`` and ``model_kwargs`` (to rebuild the timm model with
  ``pretrained=False``), ``input_size``, ``block_dims`` (per block ``[heads, neurons]``),
  ``scores_meta`` (``min_mlp_keep``, ``min_head_keep``, ``criterion``, and when set ``build_info``
  and ``balance``: how the ranking compares blocks, see :class:`ImportanceScores`),
  ``snapvit_version``, ``timm_version``, ``torch_version``.

Loading parses JSON and reads tensors only; the model is rebuilt by its registered timm name
with plain keyword values, so nothing in a file is ever executed.

Correction statistics live beside the checkpoint, ``<name>.stats.safetensors``
(:func:`~snapvit_lightning.correction.stats_path_for`); :meth:`ElasticViT.load` attaches them
when present, and :meth:`ElasticViT.subnet` then gives the ``lstsq``-corrected subnet by default
(``correct="none"`` gives the plain cut). When the statistics carry the corrected path's own
ranking (:func:`~snapvit_lightning.obs.with_ranking`), corrected subnets keep the units that ranking
puts first (:meth:`ElasticViT.ranked_view`); plain cuts always follow the checkpoint's order.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .checkpoint import (  # the file format; its public names are importable from here too
    FORMAT,
    FORMAT_VERSION,
    _metadata,
    _read,
    _rebuild,
    check_rebuilds,
    _write,
    check_model_kwargs,
    load_subnet,
    read_metadata,
    resolve_rebuild,
    save_subnet,
)
from .correction import (
    CorrectionStats, check_correction, collect_stats, correct_subnet, fingerprint, prepare_targets, stats_path_for,
    weights_version,
)
from .scores import (  # noqa: F401
    DEFAULT_HEAD_RATIO_SCALE, HEAD_SHARE_KNEE, ImportanceScores, budget_line, ceil4, check_ratio, head_share, shortfall_note,
)
from .structure import (
    BlockDims,
    block_dims,
    check_dims,
    count_flops,
    count_params,
    get_blocks,
    inspect_vit,
    permute_block,
    slice_model,
)
from .values import real_number

if TYPE_CHECKING:
    from .latency import LatencyBudget

__all__ = [
    "ElasticViT", "FORMAT", "FORMAT_VERSION", "save_subnet", "load_subnet", "read_metadata", "check_model_kwargs", "head_share",
]

#: What ``ElasticViT.subnet(correct=...)`` accepts: ``"auto"`` and the corrections.
CORRECT_CHOICES = ("auto", "none", "bias", "lstsq")
#: The measurement options ``ElasticViT.latency_budget`` passes on to ``find_latency_budget``.
LATENCY_OPTIONS = ("warmup", "repeats", "resolution", "timer", "dtype")


class ElasticViT:
    """A timm ViT whose blocks are permuted by descending importance, sliceable to any budget.

    Args:
        model: A supported timm ``VisionTransformer`` (see :mod:`snapvit_lightning.structure`);
            it is copied, never changed.
        scores: Importance scores whose shapes match the model's blocks. If they carry search
            weights, units are ranked by the weighted scores.
        model_name: Registered timm name to rebuild the model from a file. Default: the model's
            ``pretrained_cfg["architecture"]``.
        model_kwargs: JSON-serialisable keyword arguments for ``timm.create_model`` that rebuild
            the same architecture. Default: ``num_classes``, ``img_size``, ``global_pool`` and
            ``dynamic_img_size`` read from the model (given ones complete them); checked by building
            the model on the meta device (:func:`~snapvit_lightning.checkpoint.resolve_rebuild`:
            weight shapes, module classes and their settings).

    Raises:
        UnsupportedModelError: For a model the cut would get wrong.
        TypeError: If ``scores`` is not :class:`ImportanceScores`.
        ValueError: If the scores do not match the model, the blocks are not uniform, or the
            name/kwargs do not rebuild the same architecture.
    """

    def __init__(
        self,
        model: nn.Module,
        scores: ImportanceScores,
        *,
        model_name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(scores, ImportanceScores):
            raise TypeError(f"scores must be ImportanceScores, got {type(scores).__name__}")
        structure = inspect_vit(model)
        if not structure.is_uniform:
            raise ValueError("model has blocks of different sizes; build the elastic model from the dense model")
        scores.check_matches(structure.num_blocks, structure.blocks[0])
        hooked = [name or "the model" for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        if hooked:  # deep-copied with the model: into every subnet and every ONNX graph traced from one
            warnings.warn(f"model has forward hooks on {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''}: "
                          "they are copied into the elastic model and its subnets (and traced into ONNX; subnet "
                          "files do not keep them); remove them first if they change outputs", stacklevel=2)
        self._build(model, scores, *resolve_rebuild(model, model_name, model_kwargs))

    def _build(self, model: nn.Module, scores: ImportanceScores, model_name: str, model_kwargs: dict[str, Any]) -> None:
        """A permuted copy of a checked ``model`` (``__init__`` after its checks; :meth:`ranked_view`)."""
        self.model_name, self.model_kwargs = model_name, dict(model_kwargs)
        elastic = copy.deepcopy(model).eval().requires_grad_(False)
        mlp_order, head_order = scores.block_orders()
        for block, m_order, h_order in zip(get_blocks(elastic), mlp_order, head_order):
            permute_block(block, m_order, h_order)
        self._init(elastic, scores.permuted(mlp_order, head_order), mlp_order, head_order)

    def _init(
        self, model: nn.Module, scores: ImportanceScores, mlp_order: torch.Tensor, head_order: torch.Tensor
    ) -> None:
        self.model = model
        self.scores = scores
        self.mlp_order = mlp_order
        self.head_order = head_order
        self.structure = inspect_vit(model)
        self._dense: tuple[tuple, int, int, int] | None = None  # (input and patch size, head, total FLOPs, params)
        self.cost(self.dims())  # the dense counts, now: cost() counts them again only after timm's set_input_size
        self._fingerprint: tuple[tuple, str] | None = None  # (weights_version(model), fingerprint)
        self.stats: CorrectionStats | None = None
        # Caches of the attached statistics, valid while the weights they were built from are unchanged
        # (weights_version): prepare_targets, and (stats, versions, ranked_view(stats)), built lazily.
        self._prepared: tuple[tuple, list[dict[str, torch.Tensor]]] | None = None
        self._ranked: tuple[CorrectionStats, tuple, ElasticViT] | None = None

    # ------------------------------------------------------------------------------------------
    # Budgets

    @property
    def input_size(self) -> tuple[int, int]:
        """The model's input image size ``(H, W)``."""
        return tuple(int(s) for s in self.model.patch_embed.img_size)

    def dims(self, mlp_ratio: float = 0.0, head_ratio: float = 0.0) -> list[BlockDims]:
        """Per-block kept heads and neurons at ``(mlp_ratio, head_ratio)`` (global ranking).

        Raises:
            ValueError: A ratio outside ``[0, 1)``.
        """
        neurons, heads = self.scores.keep_counts(mlp_ratio, head_ratio)
        return [BlockDims(int(h), int(n)) for h, n in zip(heads, neurons)]

    def cost(self, dims: Sequence[BlockDims]) -> dict[str, float]:
        """FLOPs and parameters (absolute and as a fraction of the dense model) of ``dims``.

        Raises:
            ValueError: ``dims`` is not one :class:`BlockDims` per block within the model's sizes.
        """
        check_dims(dims, self.structure)
        size = (self.input_size, tuple(self.model.patch_embed.patch_size))
        if self._dense is None or self._dense[0] != size:  # counted again after timm's set_input_size
            dense = count_flops(self.model)
            self._dense = (size, dense["head"], dense["total"], count_params(self.model)["total"])
        _, head_flops, dense_flops, dense_params = self._dense
        flops = count_flops(self.model, dims=dims, head_flops=head_flops)["total"]
        params = count_params(self.model, dims=dims)["total"]
        return {"flops": flops, "params": params, "flops_fraction": flops / dense_flops, "params_fraction": params / dense_params}

    def resolve_budget(
        self,
        mlp_ratio: float | None = None,
        head_ratio: float | None = None,
        *,
        flops: float | None = None,
        params: float | None = None,
        head_ratio_scale: float | None = None,
    ) -> tuple[float, float]:
        """Turn a budget into ``(mlp_ratio, head_ratio)``.

        Give either ratios (a missing one is 0) or exactly one of ``flops``/``params``. A FLOPs or
        parameter fraction ``f`` prunes ``r`` of the neurons and ``s * r`` of the heads (``s =
        head_ratio_scale``; ``None``: :func:`head_share`, corrected when statistics are attached), the
        smallest ``r`` whose cost is at most ``f`` times the dense model's (bisection); past ``r =
        HEAD_SHARE_KNEE`` the heads catch up (:func:`~snapvit_lightning.scores.budget_line`), so the smallest
        model stays reachable: the largest model on that line within the budget. A ratio beyond every block's minimum keep
        cuts as ``scores.max_ratios`` (:meth:`ImportanceScores.reachable`), named by what it cuts.

        Raises:
            TypeError: ``head_ratio_scale`` is not a number.
            ValueError: Both a ratio and a fraction, a fraction outside ``(0, 1]``, or a budget
                below what the per-block minimum keep allows.
        """
        scale = real_number(head_share(head_ratio_scale, corrected=self.stats is not None))
        if scale is None:
            raise TypeError(f"head_ratio_scale must be a number in [0, 1], got {head_ratio_scale!r}")
        if flops is None and params is None:
            if head_ratio_scale is not None:
                raise ValueError(f"head_ratio_scale={head_ratio_scale!r} applies to a flops/params fraction only; "
                                 "with ratios give head_ratio itself")
            return self.scores.reachable(check_ratio(0.0 if mlp_ratio is None else mlp_ratio, "mlp_ratio"),
                                         check_ratio(0.0 if head_ratio is None else head_ratio, "head_ratio"))
        if flops is not None and params is not None:
            raise ValueError("give only one of flops and params")
        if mlp_ratio is not None or head_ratio is not None:
            raise ValueError("give either mlp_ratio/head_ratio or a flops/params fraction, not both")
        name, target = ("flops", flops) if flops is not None else ("params", params)
        fraction_given = real_number(target)
        if fraction_given is None or not 0.0 < fraction_given <= 1.0:
            raise ValueError(f"{name} must be a fraction in (0, 1], got {target!r}")
        target = fraction_given
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"head_ratio_scale must be in [0, 1], got {head_ratio_scale!r}")
        key = f"{name}_fraction"

        def fraction(u: float) -> float:
            return self.cost(self.dims(*budget_line(u, scale)))[key]

        if fraction(0.0) <= target:
            return 0.0, 0.0
        hi = math.nextafter(1.0, 0.0)  # the line's end: every block at its minimum keep
        if fraction(hi) > target:
            raise ValueError(
                f"{name}={target} is below the smallest reachable fraction {ceil4(fraction(hi)):.4f} "
                f"(min_mlp_keep={self.scores.min_mlp_keep}, min_head_keep={self.scores.min_head_keep})"
            )
        lo = 0.0  # fraction(lo) > target >= fraction(hi)
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if fraction(mid) <= target:
                hi = mid
            else:
                lo = mid
        return self.scores.reachable(*budget_line(hi, scale))

    def subnet(
        self,
        mlp_ratio: float | None = None,
        head_ratio: float | None = None,
        *,
        flops: float | None = None,
        params: float | None = None,
        head_ratio_scale: float | None = None,
        latency_ms: float | None = None,
        batch_size: int | None = None,
        correct: str = "auto",
        calibration: CorrectionStats | torch.Tensor | None = None,
        damping: float | None = None,
        damping_reference: str = "mean",
        sequential: bool = False,
    ) -> nn.Module:
        """A new, physically smaller, ordinary timm model at the given budget.

        The elastic model is left whole, so budgets can be cut in any order. See
        :meth:`resolve_budget` for how a ``flops``/``params`` fraction is turned into ratios,
        :meth:`latency_budget` for ``latency_ms`` (the largest budget measured to run a batch of
        ``batch_size``, default 1, within ``latency_ms`` on this CPU) and :meth:`slice` for the
        weight correction options.

        A one-shot correction (``"bias"``/``"lstsq"``) from statistics that carry a ranking (the
        attached ones or ``calibration``) cuts :meth:`ranked_view` at the same ratios: the same
        global keep counts, so the same FLOPs and parameters, spread over the blocks and chosen
        by the ranking. Otherwise (``correct="none"``, images, no ranking) it is
        ``slice(dims(*ratios), ...)``, the plain cut bit for bit.

        Raises:
            ValueError: See :meth:`resolve_budget`, :meth:`latency_budget` and :meth:`slice`;
                ``latency_ms`` with another budget, or ``batch_size`` without ``latency_ms``.
            SingularGramError: See :meth:`slice`.
        """
        asked = {k: v for k, v in (("flops", flops), ("params", params), ("latency_ms", latency_ms), ("mlp_ratio", mlp_ratio),
                                   ("head_ratio", head_ratio)) if v is not None}
        correct, calibration = self._resolve_correction(correct, calibration)
        correction = dict(correct=correct, calibration=calibration, damping=damping,
                          damping_reference=damping_reference, sequential=sequential)
        _check_correction_args(**correction)
        view = self._ranked_cut(correct, calibration, sequential)
        if latency_ms is not None or flops is not None or params is not None:  # its default follows the correction
            head_ratio_scale = head_share(head_ratio_scale, corrected=correct != "none")
        if latency_ms is not None:
            if any(v is not None for v in (mlp_ratio, head_ratio, flops, params)):
                raise ValueError("give either latency_ms or mlp_ratio/head_ratio/flops/params, not both")
            timed = self.latency_budget(
                latency_ms, batch_size=1 if batch_size is None else batch_size, head_ratio_scale=head_ratio_scale,
                correct=correct, calibration=calibration, sequential=sequential,
            )
            flops = timed.flops
        elif batch_size is not None:
            raise ValueError(f"batch_size={batch_size!r} is only used with latency_ms")
        ratios = self.resolve_budget(mlp_ratio, head_ratio, flops=flops, params=params, head_ratio_scale=head_ratio_scale)
        cost = self.cost(self.dims(*ratios)) if "flops" in asked or "params" in asked else {}  # not a latency's own fraction
        for note in [*self.scores.capped_notes((mlp_ratio, head_ratio), ratios), *filter(None, (shortfall_note(
                k, asked.get(k), cost.get(f"{k}_fraction", 1.0)) for k in ("flops", "params")))]:
            warnings.warn(note, stacklevel=2)  # as `snapvit slice` prints them
        if view is not None:
            sub = view.slice(view.dims(*ratios), correct=correct, damping=damping, damping_reference=damping_reference)
        else:
            sub = self.slice(self.dims(*ratios), **correction)
        split = {} if head_ratio_scale is None else {"head_ratio_scale": head_ratio_scale, "head_share_knee": HEAD_SHARE_KNEE}
        at = getattr(calibration, "image_size", None) if correct != "none" else None  # statistics of another size
        sub.snapvit_cut = {"mlp_ratio": ratios[0], "head_ratio": ratios[1], "correction": correct, "requested": asked, **split,
                           **({"calibration_size": list(at)} if at is not None and tuple(at) != self.input_size else {}),
                           **({"latency": timed.record()} if latency_ms is not None else {})}  # as `slice --latency-ms`
        return sub

    def _ranked_cut(self, correct: Any, calibration: Any, sequential: bool = False) -> "ElasticViT | None":
        """The :meth:`ranked_view` a (resolved) correction cuts, or ``None`` for this model's own cut."""
        if correct in ("bias", "lstsq") and not sequential and isinstance(calibration, CorrectionStats) \
                and calibration.has_ranking:
            return self.ranked_view(calibration)
        return None

    def latency_budget(
        self,
        latency_ms: float,
        *,
        batch_size: int = 1,
        device: str = "cpu",
        threads: int | None = None,
        backend: str = "torch",
        head_ratio_scale: float | None = None,
        correct: str = "auto",
        calibration: CorrectionStats | torch.Tensor | None = None,
        sequential: bool = False,
        **options: Any,
    ) -> LatencyBudget:
        """The largest FLOPs budget whose subnet is measured to run within ``latency_ms`` here.

        Candidates on the :meth:`resolve_budget` line are timed on ``device`` (``backend``
        ``"torch"``, or ``"onnx"``: exported and run by ONNX Runtime), each interleaved with the
        dense model, in a bisection on the FLOPs fraction; see
        :func:`~snapvit_lightning.latency.find_latency_budget`, which also takes the ``options``
        (``warmup``, ``repeats``, ``resolution``, ``timer``, ``dtype``: a deployment cast). Slice the result with
        ``subnet(flops=budget.flops, correct=...)`` with the same ``correct``: the candidates
        timed are the cuts that correction gives (with statistics that carry a ranking, the
        :meth:`ranked_view`'s: the same FLOPs, other per-block widths; a correction only changes
        weights, not shapes); ``correct``/``calibration``/``sequential`` as in :meth:`subnet`.

        Raises:
            LatencyTargetError: A target the dense model meets, or one below the smallest budget's
                latency (a ``ValueError``; the message says what was measured).
            TypeError: An option not in :data:`LATENCY_OPTIONS`.
            ValueError: A bad argument.
        """
        from .latency import find_latency_budget

        unknown = sorted(set(options) - set(LATENCY_OPTIONS))
        if unknown:
            raise TypeError(f"latency_budget() got unknown options {unknown}; besides its own arguments it takes "
                            f"{', '.join(LATENCY_OPTIONS)}")
        correct, calibration = self._resolve_correction(correct, calibration)
        _check_correction_args(correct, calibration, None, "mean", sequential)  # as subnet() would
        head_ratio_scale = head_share(head_ratio_scale, corrected=correct != "none")
        self.resolve_budget(flops=1.0, head_ratio_scale=head_ratio_scale)  # checks head_ratio_scale
        source = self._ranked_cut(correct, calibration, sequential) or self

        def build(f: float) -> nn.Module:  # uncorrected: a correction does not change the shapes
            ratios = self.resolve_budget(flops=f, head_ratio_scale=head_ratio_scale)
            return source.slice(source.dims(*ratios), correct="none")

        smallest = budget_line(math.nextafter(1.0, 0.0), 1.0)  # the line's end, whatever its head share
        return find_latency_budget(
            build,
            latency_ms,
            min_flops=self.cost(self.dims(*smallest))["flops_fraction"],
            batch_size=batch_size, device=device, threads=threads, backend=backend, **options,
        )

    def slice(
        self,
        dims: Sequence[BlockDims],
        *,
        correct: str = "auto",
        calibration: CorrectionStats | torch.Tensor | None = None,
        damping: float | None = None,
        damping_reference: str = "mean",
        sequential: bool = False,
    ) -> nn.Module:
        """A copy of the elastic model with each block cut to the first ``dims`` units.

        Args:
            dims: Kept heads and neurons per block.
            correct: ``"auto"`` (default: ``"lstsq"`` when statistics are attached, see
                :meth:`attach_stats`, or ``calibration`` is given, else ``"none"``), ``"none"``
                (the paper's plain cut), ``"bias"`` (bias compensation) or ``"lstsq"``
                (least-squares refit of ``attn.proj``/``mlp.fc2``); see
                :mod:`snapvit_lightning.correction`. The elastic model itself never changes.
            calibration: For a correction: stored :class:`CorrectionStats` of this model
                (:meth:`collect_stats`, :meth:`CorrectionStats.load`) or preprocessed images
                ``[N, 3, H, W]``. Default: the attached statistics (:attr:`stats`).
            damping: Least-squares damping relative to the mean (or max) Gram diagonal;
                ``None`` (default): :func:`~snapvit_lightning.correction.auto_damping` of the
                calibration (more for fewer images).
            damping_reference: ``"mean"`` or ``"max"``.
            sequential: Fit block by block on the corrected subnet's activations (images only).

        Raises:
            ValueError: A correction without calibration (or calibration without one), a bad
                option, or statistics of another model.
            SingularGramError: A damped Gram matrix that is not positive definite.
        """
        check_dims(dims, self.structure)
        correct, calibration = self._resolve_correction(correct, calibration)
        _check_correction_args(correct, calibration, damping, damping_reference, sequential)
        # Copy the module tree but share the parameters, cut the blocks (which copies only the
        # kept units), then copy whatever parameter is still shared: each weight is copied once.
        shared = {id(p): p for p in self.model.parameters()}
        sub = copy.deepcopy(self.model, memo=dict(shared))
        slice_model(sub, dims)
        for module in sub.modules():
            for name, param in module._parameters.items():
                if param is not None and id(param) in shared:
                    module._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        if correct != "none":
            prepared = None
            if calibration is self.stats and not sequential:
                version = weights_version(self.model)
                if self._prepared is None or self._prepared[0] != version:
                    self._prepared = (version, prepare_targets(self.model, self.stats))
                prepared = self._prepared[1]
            correct_subnet(
                self.model, sub, calibration, method=correct, damping=damping, damping_reference=damping_reference,
                sequential=sequential, expected_fingerprint=self.fingerprint, prepared=prepared,
            )
        return sub.requires_grad_(True)  # an ordinary timm model, trainable whatever the elastic model's flags

    # ------------------------------------------------------------------------------------------
    # Correction statistics

    def _resolve_correction(
        self, correct: Any, calibration: Any
    ) -> tuple[Any, CorrectionStats | torch.Tensor | None]:
        """``correct="auto"`` → ``"lstsq"`` with calibration or attached statistics, else ``"none"``;
        a correction without ``calibration`` uses the attached statistics (checked afterwards)."""
        if correct == "auto":
            correct = "lstsq" if calibration is not None or self.stats is not None else "none"
        if correct not in ("none", "auto") and calibration is None:
            calibration = self.stats
        return correct, calibration

    def attach_stats(self, stats: CorrectionStats | None) -> None:
        """Use ``stats`` as the default calibration of :meth:`subnet`/:meth:`slice` (``None`` detaches).

        With statistics attached ``subnet()`` is ``lstsq``-corrected by default; ``correct="none"``
        still gives the plain cut.

        Raises:
            TypeError: ``stats`` is not :class:`CorrectionStats` or ``None``.
            ValueError: Statistics of another elastic model (their fingerprint differs) or of other layer sizes.
        """
        if stats is not None and not isinstance(stats, CorrectionStats):
            raise TypeError(f"stats must be CorrectionStats or None, got {type(stats).__name__}")
        if stats is not None:
            stats.check_fits(self.fingerprint, self.model)
        self.stats = stats
        self._prepared = None
        self._ranked = None

    def ranking_scores(self, stats: CorrectionStats | None = None) -> ImportanceScores | None:
        """The corrected path's ranking that ``stats`` carry, as scores of this model's units.

        ``stats.ranking_mlp``/``ranking_heads`` with this model's ``min_mlp_keep`` / ``min_head_keep``
        (criterion ``"corrected-ranking"``), in this model's unit order.

        Args:
            stats: Statistics of this model (default: the attached ones).

        Returns:
            The scores, or ``None`` when the statistics carry no ranking (or there are none).

        Raises:
            TypeError: ``stats`` is not :class:`CorrectionStats` or ``None``.
            ValueError: Statistics of another elastic model, or a ranking that does not fit it.
        """
        stats = self.stats if stats is None else stats
        if stats is not None and not isinstance(stats, CorrectionStats):
            raise TypeError(f"stats must be CorrectionStats or None, got {type(stats).__name__}")
        if stats is None or not stats.has_ranking:
            return None
        if stats.fingerprint != self.fingerprint:
            raise ValueError(
                f"the correction statistics belong to another elastic model (fingerprint {stats.fingerprint!r}, "
                f"this model {self.fingerprint!r}); collect them again for this checkpoint"
            )
        got = (tuple(stats.ranking_mlp.shape), tuple(stats.ranking_heads.shape))
        if got != (tuple(self.scores.mlp.shape), tuple(self.scores.heads.shape)):
            raise ValueError(
                f"the statistics' ranking_mlp / ranking_heads have shapes {got}, this model needs "
                f"{tuple(self.scores.mlp.shape)} / {tuple(self.scores.heads.shape)} ([blocks, neurons] / [blocks, heads])"
            )
        return ImportanceScores(
            stats.ranking_mlp, stats.ranking_heads, min_mlp_keep=self.scores.min_mlp_keep,
            min_head_keep=self.scores.min_head_keep, criterion="corrected-ranking",
        )

    def ranked_view(self, stats: CorrectionStats | None = None) -> "ElasticViT | None":
        """This elastic model re-ordered by the ranking that ``stats`` carry, for corrected subnets.

        An :class:`ElasticViT` of the same weights whose blocks are permuted so that the ranking
        (:meth:`ranking_scores`) is a prefix, with ``stats`` permuted into its order and attached. Its
        :meth:`dims` at given ratios keep as many units in all as this model's (the same FLOPs
        and parameters), spread over the blocks as the ranking says. Cached, and built again when
        the weights or the view changed; its ``mlp_order``/``head_order`` index this model's units.
        ``None`` where :meth:`ranking_scores` is ``None``; arguments and errors as there.
        """
        stats = self.stats if stats is None else stats
        versions = (weights_version(self.model), None if self._ranked is None else weights_version(self._ranked[2].model))
        if self._ranked is not None and self._ranked[0] is stats and self._ranked[1] == versions \
                and self._ranked[2].stats is not None:  # a view changed or detached since is built again
            return self._ranked[2]
        ranking = self.ranking_scores(stats)
        if ranking is None:
            return None
        view = ElasticViT.__new__(ElasticViT)  # this model's architecture, already checked: no rebuild check
        view._build(self.model, ranking, self.model_name, self.model_kwargs)
        view.attach_stats(stats.permuted(view.mlp_order, view.head_order, view.fingerprint))
        self._ranked = (stats, (weights_version(self.model), weights_version(view.model)), view)
        return view

    @property
    def fingerprint(self) -> str:
        """Hash that ties :class:`CorrectionStats` to this elastic model."""
        version = weights_version(self.model)  # weights changed in place or cast: hashed again
        if self._fingerprint is None or self._fingerprint[0] != version:
            self._fingerprint = (version, fingerprint(self.model, self.mlp_order, self.head_order))
        return self._fingerprint[1]

    def collect_stats(self, images: torch.Tensor, batch_size: int = 32, *, ranking: bool = False) -> CorrectionStats:
        """Correction statistics of this model on preprocessed images ``[N, 3, H, W]``.

        Store them with :meth:`CorrectionStats.save` beside the checkpoint; correcting any
        budget from them is then one small solve per cut layer. Size in memory: ``4·B·((C+1)² +
        (hidden+1)²)`` bytes, 120.5 MB for ViT-S (B=12, C=384, hidden=1536), 481.6 MB for ViT-B
        (a file stores the upper triangles, half of that); collecting them needs more at its peak
        (float64 totals and the activations: +1.7 GB for ViT-B, docs/benchmarks.md).

        Args:
            images: The calibration images.
            batch_size: Images per forward.
            ranking: Also compute the corrected path's own ranking on the same images
                (:func:`~snapvit_lightning.obs.with_ranking`, as the export and ``snapvit stats``
                do): corrected subnets then keep the units it ranks highest (:meth:`subnet`).

        Raises:
            ValueError: Bad images or batch size.
            TypeError: ``ranking`` is not a bool.
        """
        if not isinstance(ranking, bool):
            raise TypeError(f"ranking must be a bool, got {ranking!r}")
        if not ranking:
            return collect_stats(self.model, images, batch_size=batch_size, fingerprint=self.fingerprint)
        from .obs import with_ranking

        stats, energy = collect_stats(self.model, images, batch_size=batch_size, fingerprint=self.fingerprint,
                                      with_energy=True)
        return with_ranking(
            self.model, stats, images, min_mlp_keep=self.scores.min_mlp_keep, min_head_keep=self.scores.min_head_keep,
            batch_size=batch_size, energy=energy,
        )

    # ------------------------------------------------------------------------------------------
    # Files

    def save(self, path: str | os.PathLike, *, stats: bool = True) -> None:
        """Write the elastic checkpoint (safetensors; written to a temporary file, then renamed).

        Args:
            path: The ``*.elastic.safetensors`` file.
            stats: With statistics attached (:meth:`attach_stats`), also write them beside it
                (``<name>.stats.safetensors``, :func:`~snapvit_lightning.correction.stats_path_for`),
                where :meth:`load` finds them: the loaded model's :meth:`subnet` is then corrected as
                this one's. ``False`` writes the checkpoint alone. Without attached statistics a
                statistics file already beside ``path`` is left as it is (:meth:`load` refuses one
                of another model).

        Raises:
            TypeError: ``stats`` is not a bool.
        """
        if not isinstance(stats, bool):
            raise TypeError(f"stats must be a bool, got {stats!r}")
        writes_stats = stats and self.stats is not None
        self._save(path, stats_path_for(path).name if writes_stats else None)
        if writes_stats:
            self.stats.save(stats_path_for(path))

    def _save(self, path: str | os.PathLike, stats_file: str | None) -> None:
        """Write the checkpoint alone; ``stats_file``: the name of the statistics written beside it (metadata)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update(self.scores.to_tensors())
        tensors["order.mlp"] = self.mlp_order
        tensors["order.heads"] = self.head_order
        meta = _metadata("elastic", self.model, self.model_name, self.model_kwargs)
        meta["scores_meta"] = json.dumps(self.scores.metadata())
        if stats_file is not None:  # load() warns when they are not beside it
            meta["stats_file"] = stats_file
        check_rebuilds(path, meta, tensors)  # a file load() would refuse is not written
        _write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, stats: bool = True) -> "ElasticViT":
        """Read an elastic checkpoint written by :meth:`save` (no network, no code execution).

        Args:
            path: The ``*.elastic.safetensors`` file.
            stats: Attach the correction statistics beside it (``<name>.stats.safetensors``,
                :func:`~snapvit_lightning.correction.stats_path_for`) when that file exists, so
                :meth:`subnet` is corrected by default; ``False`` loads the model alone.

        Raises:
            FileNotFoundError: If ``path`` does not exist.
            TypeError: ``stats`` is not a bool.
            ValueError: A truncated file or a corrupt header (the tensors carry no checksum:
                changed values load as they are unless they are not finite), another format or
                version, a subnet file, contents that do not fit the model they name, or a
                statistics file beside it that is unreadable or belongs to another elastic model.
        """
        if not isinstance(stats, bool):
            raise TypeError(f"stats must be a bool, got {stats!r}")
        tensors, meta = _read(path)
        if meta["kind"] != "elastic":
            raise ValueError(f"{path} holds a {meta['kind']!r}, not an elastic model: load_subnet() reads it, `snapvit "
                             "info` shows it, `snapvit slice SUBNET -o X.onnx` writes it as ONNX; other budgets, bench and "
                             "--latency take the elastic checkpoint it was cut from")
        try:
            scores = ImportanceScores.from_tensors(tensors, json.loads(meta["scores_meta"]))
            mlp_order, head_order = tensors["order.mlp"], tensors["order.heads"]
        except (KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}: invalid scores in the elastic checkpoint: {err}") from err
        model = _rebuild(path, meta, tensors)
        scores.check_matches(len(get_blocks(model)), block_dims(get_blocks(model)[0]))
        for name, order in (("order.mlp", mlp_order), ("order.heads", head_order)):
            size = scores.mlp.shape if name == "order.mlp" else scores.heads.shape
            if order.dtype != torch.int64 or tuple(order.shape) != tuple(size) or not torch.equal(
                    order.sort(dim=1).values, torch.arange(size[1]).expand(size)):
                raise ValueError(f"{path}: {name} must hold a permutation of each block's units, int64 {list(size)}")
        self = cls.__new__(cls)
        self.model_name, self.model_kwargs = meta["model_name"], meta["model_kwargs"]
        self._init(model, scores, mlp_order, head_order)
        beside = stats_path_for(path)
        if stats and beside.is_file():
            try:
                self.attach_stats(CorrectionStats.load(beside))
            except ValueError as err:
                raise ValueError(f"{beside} (beside {path}): {err}; remove or replace it (`ElasticViT.load(..., "
                                 "stats=False)` and `snapvit slice --no-correct` ignore it)") from err
        elif stats and "stats_file" in meta:  # exported corrected, moved without its statistics
            warnings.warn(
                f"{path} was written with correction statistics ({meta['stats_file']}), but there are none beside it "
                f"at {beside}: subnet() now cuts plain subnets, which keep far less of the dense model's features. "
                "Put the statistics there (or attach_stats()), or load(..., stats=False) for the model alone "
                "(snapvit slice: --no-correct)",
                UserWarning, stacklevel=2,
            )
        return self

    def save_subnet(self, path: str | os.PathLike, subnet: nn.Module, budget: dict[str, Any] | None = None) -> None:
        """Write a subnet cut from this model, with its per-block dims and ``budget`` (see :func:`save_subnet`)."""
        if isinstance(path, nn.Module):
            raise TypeError("ElasticViT.save_subnet(path, subnet, ...) takes the path first, got a module as path "
                            "(the function save_subnet(model, path, ...) is the one that takes the model first)")
        save_subnet(subnet, path, model_name=self.model_name, model_kwargs=self.model_kwargs, budget=budget)


def _check_correction_args(
    correct: Any, calibration: Any, damping: Any, damping_reference: Any, sequential: Any
) -> None:
    if correct not in CORRECT_CHOICES:
        raise ValueError(f"correct must be one of {CORRECT_CHOICES}, got {correct!r}")
    check_correction(correct, damping, damping_reference)
    if correct == "none" and (calibration is not None or sequential or damping is not None or damping_reference != "mean"):
        raise ValueError("calibration/sequential/damping/damping_reference are only used with correct='bias' or "
                         "'lstsq', got correct='none' (the default when no statistics are attached and no "
                         "calibration= is given: pass calibration=CorrectionStats or images [N, 3, H, W])")
    if correct != "none" and not isinstance(calibration, (CorrectionStats, torch.Tensor)):
        raise ValueError(
            f"correct={correct!r} needs calibration=CorrectionStats or images [N, 3, H, W] "
            f"(or statistics attached with attach_stats / found by ElasticViT.load), got {type(calibration).__name__}"
        )
