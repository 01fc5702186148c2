""":class:`EvolutionarySearch`: the search (SnapViT step 2) as a Lightning callback.

It minimises :class:`~.fitness.Fitness` with :class:`~snapvit_lightning.xnes.XNES` after the
scores are computed; the learned covariance is the cross-structure correlation estimate and is
kept with the scores.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from ..correction import check_correction
from ..errors import warn_at_caller_on_rank_zero
from ..image_batches import check_image_batches, collect_images
from ..machine import build_machine
from ..precision import search_setting
from ..ranks import collective_safe_sigterm, stop_if_terminated
from ..scores import ImportanceScores, check_balance
from .fitness import (
    DEFAULT_BALANCE,
    DEFAULT_FITNESS_SAMPLES,
    DEFAULT_GUARD,
    DEFAULT_RATIO_PAIRS,
    DEFAULT_SIGMA,
    DEFAULT_SPACE,
    Fitness,
    _check_images,
    _check_int,
    _check_ratio_pairs,
    _resolve_autocast,
    check_guard,
    check_pairs_apart,
    check_space,
    fitness_subset,
)
from .loop import (
    _balanced_start, _best, _check_early_stop, _check_popsize, _check_sigma, _make_xnes, _search_loop, check_start_fits,
)
from .progress import SearchProgress


#: ``autocast`` given by a dtype's name (a config cannot write a ``torch.dtype``).
_AUTOCAST_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _search_probe(trainer: pl.Trainer, pl_module: pl.LightningModule, device: torch.device) -> dict[str, Any]:
    """The module's precision probe record, else a fitness-only probe's (rank 0's under DDP)."""
    from ..module import SnapViTModule
    from ..precision import probe

    record = getattr(pl_module, "precision_probe", None)
    if record is not None:
        return record
    if not isinstance(pl_module, SnapViTModule):
        raise ValueError(
            f"autocast='auto' probes a SnapViTModule; got {type(pl_module).__name__} without a precision_probe"
        )
    record = None
    if trainer.is_global_zero:
        result = probe(pl_module, device=device, scoring=False)
        rank_zero_info(f"EvolutionarySearch: {result.summary()}")
        record = result.to_dict()
    return trainer.strategy.broadcast(record, src=0)


__all__ = [
    "EvolutionarySearch",
    "scored_model",
]

def _check_same_start(saved: float, here: float) -> None:
    """Refuse a restored search state whose start fitness is not this run's (another model, scores or images).

    The tolerance is far above run-to-run rounding (bf16 kernels) and far below what other scores
    or images change (~1e-2).
    """
    if not math.isclose(saved, here, rel_tol=1e-3, abs_tol=1e-4):
        raise ValueError(
            f"EvolutionarySearch: the restored search state started at fitness {saved:.6f}, this run's start is "
            f"{here:.6f}: the state belongs to another model, other scores or other fitness images; resume it in "
            "the run it was saved from, or start a new search (without load_state_dict / ckpt_path)"
        )


def scored_model(pl_module: pl.LightningModule, caller: str) -> tuple[nn.Module, ImportanceScores]:
    """The ``(student, scores)`` of a scoring module (e.g. SnapViTModule) after its fit.

    Raises:
        RuntimeError: If ``pl_module`` has no ``student`` module or no ``ImportanceScores``.
    """
    scores = getattr(pl_module, "scores", None)
    student = getattr(pl_module, "student", None)
    if not isinstance(scores, ImportanceScores) or not isinstance(student, nn.Module):
        raise RuntimeError(
            f"{caller} needs `pl_module.student` (the timm model) and `pl_module.scores` "
            f"(ImportanceScores) at the end of training, got scores={type(scores).__name__}"
        )
    return student, scores


def _with_search_probe(build_info: dict | None, probe_record: dict[str, Any]) -> dict[str, Any]:
    """The scores' precision record (an explicit trainer precision) completed by the search's own probe."""
    given = (build_info or {}).get("precision") or {}
    return {**given, **{k: v for k, v in probe_record.items() if v is not None or k not in given}}


def _unprobed_search(build_info: dict | None, autocast: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    """The scoring probe's record with the search's fixed setting in place of the search choice it did not use."""
    record = (build_info or {}).get("precision")
    if record is None or autocast == "auto":
        return {}
    precision = "bf16" if dtype == torch.bfloat16 else "fp16" if dtype == torch.float16 else "fp32"
    return {"precision": {**record, "search": f"{precision} (autocast={autocast!r}, not probed)",
                          "search_autocast": None if dtype is None else str(dtype).removeprefix("torch."),
                          "search_explicit_attention": None}}


class EvolutionarySearch(Callback):
    """Search the block/head score weights with xNES after the scores are computed.

    Runs in ``on_train_end`` (the model is still on its device): reads the fitness images
    (``images`` if given, else ``trainer.datamodule.fitness_images()``), builds a
    :class:`Fitness` from ``pl_module.student`` and the scores (by default balanced per block,
    see ``balance``), evaluates the start point, then minimises the fitness with
    :class:`~snapvit_lightning.xnes.XNES` (bounds ``[0, 2]``, start mean ``initial_weights``,
    else ``w = 1`` on balanced scores or :func:`default_initial_weights` on raw ones, initial
    covariance ``sigma**2 * initial_covariance`` or ``sigma**2 * I``). Each evaluation is
    logged to every logger of the Trainer (``trainer.loggers``; e.g. a ``CSVLogger`` writes the
    curves to ``metrics.csv``) at ``step=eval_idx`` as ``search/fitness``, ``search/best`` (the
    best so far, start point included) and one ``search/cos_mlp{m}_head{h}`` per ratio pair
    (e.g. ``search/cos_mlp0.35_head0.2``: that budget's mean cosine, in the fitness's
    ``space``). A progress bar of Lightning's kind under the training bar shows the
    evaluations with the fitness and the best (none with ``enable_progress_bar=False`` or
    on ranks other than 0).
    At the end ``pl_module.scores`` becomes ``scores.with_weights(best_weights,
    covariance=xnes.covariance)`` (``scores`` balanced, as searched); the start point is kept
    when no candidate beats it.
    Its ``build_info`` records the wall times ``scoring_s`` (``on_train_start`` to this hook:
    the calibration epoch and the scores), ``search_s`` (this hook), ``search_evaluations``
    (candidates of this run), ``search_stopped`` (those of them stopped early, see
    ``early_stop``) and the ``machine``; a resumed run times only its own part.

    Step size: the default ``sigma=0.15`` perturbs weights that start at 1 (0.8-1.2 for the
    paper's start) by about 15 %. That is enough to move a meaningful number of units across
    the global pruning threshold between blocks (which is what changes the fitness), while
    keeping samples inside the ``[0, 2]`` box and near the start. The official code
    effectively used std 1, which clips many weights to 0 or 2 and behaves like random search;
    with about 50 evaluations xNES only makes a few updates, so a local trust region around a
    good start is what can pay off. ``sigma=0.08`` was measured too (held out, 5 runs) and was
    not more reliable. Use a larger ``sigma`` and more evaluations for a broader search.

    Data parallel (DDP): every process evaluates the same candidates (broadcast from rank 0)
    on its shard ``images[rank::world_size]``; the per-budget sums of cosines and counts are
    all-reduced (``trainer.strategy.reduce(..., reduce_op="sum")``), so every process sees the
    same fitness values and its xNES evolves identically. Every process computes the teacher
    embeddings of *all* images and fits the PCA on them (cheap: one dense forward), and the
    basis is broadcast from rank 0 so it is identical everywhere. The final weights and
    covariance are broadcast from rank 0 too.

    Args:
        max_evals: Candidate evaluations (``>= 1``), the start point not counted.
        popsize: xNES population size (``None``: ``4 + floor(3 ln d)``, 17 for ViT-S/B).
        sigma: Initial xNES step size (``> 0``).
        ratio_pairs: ``(mlp_ratio, head_ratio)`` budgets of the fitness, ratios in ``[0, 1)``
            (default :data:`DEFAULT_RATIO_PAIRS`; the paper's: :data:`PAPER_RATIO_PAIRS`).
        pca_components: PCA components of the fitness (``>= 1``; at most ``M - 1`` and ``D`` used).
        seed: xNES seed.
        autocast: bfloat16 autocast for the fitness forwards (``True``), a dtype (or its name,
            ``"bfloat16"``, ``"float16"``, ``"float32"``, as a config writes it), ``False``, or
            ``"auto"``: the autocast and attention kernel a precision probe chose
            (:mod:`snapvit_lightning.precision`): the module's (``precision_probe``, set by a
            ``precision: auto`` Trainer) or, when it has none, a fitness-only probe run here;
            the record lands in the scores' ``build_info["precision"]``.
        batch_size: Images per forward pass.
        images: Fitness images: a float tensor ``[M, 3, S, S]`` or an iterable (e.g. a
            DataLoader) of such batches or ``(images, ...)`` tuples. ``None``: the datamodule's.
        initial_weights: Start mean ``[B + B*H]`` (clipped into ``[0, 2]``, the search's box).
        initial_covariance: Initial covariance shape ``[d, d]`` (e.g. a previous run's).
        log_every_n_evals: Without a progress bar (``enable_progress_bar=False``), print a
            line every this many evaluations (``0``: never).
        balance: Which scores the weights rescale, hence where the search starts.
            ``(0.5, 0.65)`` (default, :data:`DEFAULT_BALANCE`): every block's MLP scores are
            divided by their median and its head scores by their 0.65-quantile
            (:meth:`ImportanceScores.balanced`; these are the scores the module ends with) and
            the search starts at ``w = 1``: about the same share of every block is pruned near
            those ratios, so no block is emptied at high sparsity (the raw DINO scores prune
            most of the first and last blocks), while the order inside each block stays the
            gradient's. One ratio ``q`` balances both at ``q``. ``None``: the paper's: the
            scores as given (raw, unless already balanced), start ``initial_weights`` or
            :func:`default_initial_weights`. ``"rank"``:
            every score becomes its rank inside its block (``w = 1`` is the uniform split at
            every ratio). Measured on the real DINOv2 ViT-S/14 (photos8, 112 px, 50
            evaluations; search on the 98 even-position photos, fidelity on the 98 odd ones at
            (0.35,0.2) (0.45,0.3) (0.55,0.4) (0.65,0.5), ``python -m
            snapvit_lightning.benchmarks.balance --holdout``, with the fitness of the time: PCA cosine,
            paper's pairs, no guard): the default start searched .617 .366 .264
            .189 (seed 0), .585 .368 .257 .166 (seed 1), .584 .336 .224 .142 (seed 2), against
            raw gradient scores .557 .310 .143 .071 and random scores .293 .234 .181 .134 (the
            paper's start lost to random scores from (0.55,0.4) on). With the halves swapped one
            seed of three beats both everywhere and two fall below random scores at (0.65,0.5):
            50 evaluations on 98 photos can overfit them. See docs/defaults.md.
        correct: Weight correction inside the fitness: ``"none"`` (default, the paper),
            ``"bias"`` or ``"lstsq"`` (see :class:`Fitness`). Use the correction the elastic
            model will be sliced with, so the search optimises what the corrected subnets keep.
            About 1.4x the time per evaluation on ViT-S/14 (the per-layer solves). Measured
            with the fitness defaults of the time (``space="pca"``, :data:`PAPER_RATIO_PAIRS`,
            ``guard=0``; same protocol, seed 0, ``lstsq`` cross-fitted): the paper's start
            (``balance=None``) searched with an ``lstsq`` fitness keeps .921 .877 .848 .807
            after correction vs .925 .846 .801 .759 with the plain fitness; ``balance=0.5`` .925 .882 .855 .773 (uncorrected .528 .353
            .246 .160, above random at every budget; mean of seeds 0-2 .926 .891 .862 .815, the
            best configuration measured for corrected exports); ``balance="rank"`` .924 .833 .811
            .783 (it lost at (0.45,0.3), which no fitness pair covers). See docs/defaults.md.
        damping: ``lstsq`` damping of that correction (relative to the Gram diagonal; ``None``: automatic).
        damping_reference: ``"mean"`` or ``"max"`` of the Gram diagonal.
        space: Where the fitness takes the cosine (see :class:`Fitness`): ``"raw"`` (default),
            the embeddings themselves, the fidelity the elastic model is judged by; ``"pca"``,
            the paper's PCA projections, centered on the dense mean. Uncorrected subnets from
            about (0.45, 0.3) on keep almost nothing of the centered features, so the PCA
            cosine is about 0 there for every ``w`` and the sparse budgets add only noise.
            Measured on the real DINOv2 ViT-S/14 (photos8, 112 px, balanced default, 50
            evaluations, fidelity at (0.35,0.2) (0.45,0.3) (0.55,0.4) (0.65,0.5)): searched
            and measured on the same 196 photos, seeds 0-2 kept .589 .330 .314 .212, .626 .381
            .300 .200 and .552 .373 .300 .200 with ``"raw"`` against .576 .285 .173 .141, .555
            .329 .230 .170 and .603 .335 .218 .157 with ``"pca"`` (gradient-only .556 .304 .135
            .064, random .297 .223 .218 .144, magnitude .304 .264 .226 .121); held out (search
            on one half, measured on the other, 6 runs) ``"raw"`` beat every reference at every
            budget in 5 of 6 runs, ``"pca"`` in 3 of 6. See docs/defaults.md.
        guard: Penalty per unit of cosine a fitness pair loses against the start point
            (:class:`Fitness`; default :data:`DEFAULT_GUARD` ``= 10``; ``0``: the paper's plain
            mean, which lets the search give up a little at one budget for more at others).
            Default together with :data:`DEFAULT_RATIO_PAIRS`, which adds (0.45, 0.3) to the
            paper's four pairs (:data:`PAPER_RATIO_PAIRS`) so no measured budget is left
            unprotected. Measured on the real DINOv2 ViT-S/14 (photos8, 112 px, 50 evaluations,
            seeds 0-2, fidelity at (0.35,0.2) (0.45,0.3) (0.55,0.4) (0.65,0.5), ``python -m
            snapvit_lightning.benchmarks.balance``): held out (search on one half of the photos,
            measured on the other), mean over seeds .592 .401 .288 .163 (even -> odd) and .602
            .411 .256 .144 (odd -> even) against .570 .346 .294 .194 and .588 .354 .275 .175 with
            ``guard=0`` and the paper's pairs: more kept at the two lighter budgets, up to .03
            less at the sparsest. What made it the default: all 15 runs (seeds 0-4: 10 held
            out, 5 searched and measured on all 196 photos) kept more than gradient-only,
            random, uniform, magnitude and LAMP scores at every budget; ``guard=0`` with the paper's
            pairs did in 5 of 6 held-out runs and 3 of 5 in-sample ones, ``guard=10`` with the
            paper's pairs in 5 of 6 and 2 of 3 (the in-sample miss at (0.45,0.3), which no pair
            covered). The fifth pair made each evaluation 1.12x as long (main job, 3.73 s against 3.32 s on
            2 CPU cores). See docs/defaults.md.
        early_stop: Stop a candidate's evaluation (sparsest ratio pair first) once its fitness
            is certainly worse than the candidates that decide the xNES update
            (:meth:`XNES.optimize`, :class:`Fitness`): the same result (weights, covariance,
            every other fitness value), only faster. A generation is evaluated as a whole, best
            first (every candidate on the sparsest pair, then always the lowest partial
            fitness), so its evaluations are logged and shown when the generation is done. Not
            a fitness setting: a state saved with one value resumes with the other.
        fitness_samples: Embed only this many of the fitness images in every evaluation, drawn
            once with ``seed`` (:func:`~snapvit_lightning.search.fitness.fitness_subset`; the
            same on every process); default :data:`~snapvit_lightning.search.fitness.DEFAULT_FITNESS_SAMPLES`
            (64); ``None``: all of them (the paper's). The work per evaluation scales with it; the
            export still measures on all fitness images. Chosen held out: docs/defaults.md.

    Attributes:
        best_weights: Best weights found (``None`` before the search).
        best_fitness: Their fitness.
        initial_fitness: Fitness of the start point.
        reference_cosines: Per ratio pair, the start point's cosines that ``guard`` protects.
        history: Fitness of each candidate in evaluation order; a stopped candidate is
            recorded as ``nan``: it was certainly in the lower half of its generation (its
            logged ``search/fitness`` is ``nan`` too, and it never counts as the best).
        covariance: Final xNES covariance.
        fitness: The :class:`Fitness` of the last run (eval times in ``fitness.eval_times``).

    Raises:
        ValueError: ``max_evals < 1``, ``sigma <= 0``, bad ratio pairs, ``pca_components < 1``,
            ``popsize < 2``, ``batch_size < 1``, an image tensor that is not ``[M, 3, S, S]``,
            or initial weights / covariance of the wrong shape (at search time).
    """

    def __init__(
        self,
        max_evals: int = 50,
        popsize: int | None = None,
        sigma: float = DEFAULT_SIGMA,
        ratio_pairs: Sequence[tuple[float, float]] = DEFAULT_RATIO_PAIRS,
        pca_components: int = 64,
        seed: int = 0,
        autocast: bool | str = True,
        batch_size: int = 64,
        images: Tensor | Iterable[Any] | None = None,
        initial_weights: Tensor | None = None,
        initial_covariance: Tensor | None = None,
        log_every_n_evals: int = 10,
        balance: float | tuple[float, float] | str | None = DEFAULT_BALANCE,
        correct: str = "none",
        damping: float | None = None,
        damping_reference: str = "mean",
        space: str = DEFAULT_SPACE,
        guard: float = DEFAULT_GUARD,
        early_stop: bool = True,
        fitness_samples: int | None = DEFAULT_FITNESS_SAMPLES,
    ) -> None:
        super().__init__()
        self.early_stop = _check_early_stop(early_stop)
        self.fitness_samples = _check_int("fitness_samples", fitness_samples, 2, allow_none=True)
        self.balance = check_balance(balance)
        self.space = check_space(space)
        self.guard = check_guard(guard)
        self.correct, self.damping, self.damping_reference = check_correction(correct, damping, damping_reference)
        self.max_evals = _check_int("max_evals", max_evals, 1)
        self.popsize = _check_popsize(popsize)
        self.sigma = _check_sigma(sigma)
        self.ratio_pairs = _check_ratio_pairs(ratio_pairs)
        self.pca_components = _check_int("pca_components", pca_components, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        if isinstance(autocast, str) and autocast != "auto" and autocast not in _AUTOCAST_NAMES:
            raise ValueError(f"autocast must be a bool, a torch.dtype, None, 'auto' or a dtype's name "
                             f"{list(_AUTOCAST_NAMES)}, got {autocast!r}")
        self.autocast = autocast
        self.autocast_dtype = None if autocast == "auto" else _resolve_autocast(
            _AUTOCAST_NAMES.get(autocast) if isinstance(autocast, str) else autocast)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if isinstance(images, Tensor):
            _check_images(images)
        elif images is not None:
            check_image_batches(images)
        self.images = images
        self.initial_weights = None if initial_weights is None else torch.as_tensor(initial_weights, dtype=torch.float64)
        if self.initial_weights is not None and self.initial_weights.dim() != 1:
            raise ValueError(f"initial_weights must be a 1-D tensor [B + B*H], got shape {list(self.initial_weights.shape)}")
        self.initial_covariance = (
            None if initial_covariance is None else torch.as_tensor(initial_covariance, dtype=torch.float64)
        )
        self.log_every_n_evals = _check_int("log_every_n_evals", log_every_n_evals, 0)

        self.best_weights: Tensor | None = None
        self.best_fitness: float | None = None
        self.initial_fitness: float | None = None
        self.reference_cosines: list[float] | None = None
        self.history: list[float] = []
        self.covariance: Tensor | None = None
        self.fitness: Fitness | None = None
        self._xnes_state: dict[str, Any] | None = None
        self._final_state: dict[str, Any] | None = None
        self._resumed = False  # load_state_dict() before this fit: continue its search, else start afresh

    # ------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.best_weights, self.best_fitness, self.initial_fitness = None, None, None
        self.reference_cosines, self.covariance, self.fitness = None, None, None
        self.history = []
        self._xnes_state, self._final_state = None, None

    def _fitness_images(self, trainer: pl.Trainer) -> Tensor:
        if self.images is not None:
            return _check_images(collect_images(self.images))
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "fitness_images"):
            raise RuntimeError(
                "EvolutionarySearch needs fitness images: pass `images=` or use a datamodule with "
                "`fitness_images()` (e.g. CalibrationDataModule)"
            )
        return _check_images(dm.fitness_images())

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse too few fitness images before the scoring epoch; note when it starts (for the scores' record).

        Raises:
            ValueError: The datamodule gives fewer than 2 fitness images (the search's PCA needs 2),
                ``initial_weights``/``initial_covariance`` do not fit the model's ``B + B*H`` weights, or
                two ``ratio_pairs`` cut alike at the module's minimum keeps.
        """
        student = getattr(pl_module, "student", None)
        if isinstance(student, nn.Module):
            check_start_fits(student, self.initial_weights, self.initial_covariance)
            keeps = [getattr(pl_module, k, None) for k in ("min_mlp_keep", "min_head_keep")]
            if all(isinstance(k, float) for k in keeps):  # pairs that cut alike, known before the scoring
                check_pairs_apart(student, self.ratio_pairs, *keeps)
        dm = getattr(trainer, "datamodule", None)
        count = getattr(dm, "num_fitness_images", None) if self.images is None else None
        if count is not None and count < 2:
            folder = f" from data_dir '{dm.data_dir}'" if getattr(dm, "data_dir", None) is not None else ""
            raise ValueError(
                f"EvolutionarySearch needs at least 2 fitness images, the datamodule gives {count}{folder}: its "
                "`holdout` images, or with holdout=0 its calibration images (`data_dir`, `max_samples`)"
            )
        self._train_start = time.perf_counter()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Search (every rank takes part: a DDP run's SIGTERM stops all at the next evaluation)."""
        with collective_safe_sigterm(trainer):
            self._search(trainer, pl_module)

    def _search(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        search_start = time.perf_counter()
        if not self._resumed:  # a callback used for a second fit searches afresh, not from the first's state
            self._reset()
        self._resumed = False
        evals_before = len(self.history)
        student, scores = scored_model(pl_module, "EvolutionarySearch")
        scores, initial_weights = _balanced_start(scores, self.balance, self.initial_weights)
        strategy = trainer.strategy
        world = int(trainer.world_size)
        device = next(student.parameters()).device

        def reduce(t: Tensor) -> Tensor:
            return strategy.reduce(t.to(device), reduce_op="sum")

        def broadcast(t: Tensor) -> Tensor:
            return strategy.broadcast(t, src=0) if world > 1 else t

        images = fitness_subset(self._fitness_images(trainer), self.fitness_samples, self.seed)
        autocast_dtype, explicit, probe_record = self.autocast_dtype, None, None
        if self.autocast == "auto":
            probe_record = _search_probe(trainer, pl_module, device)
            autocast_dtype, explicit = search_setting(probe_record)
        self.fitness = fitness = Fitness(
            student,
            scores,
            images,
            self.ratio_pairs,
            self.pca_components,
            self.batch_size,
            autocast_dtype,
            rank=int(trainer.global_rank) if world > 1 else 0,
            world_size=world,
            reduce_fn=reduce if world > 1 else None,
            broadcast_fn=broadcast if world > 1 else None,
            correct=self.correct,
            damping=self.damping,
            damping_reference=self.damping_reference,
            space=self.space,
            guard=self.guard,
            reference_cosines=self.reference_cosines,  # restored with the start's fitness, else set by its call
            explicit_attention=explicit,
        )
        xnes, w0 = _make_xnes(
            scores.num_weights,
            scores.num_blocks,
            scores.num_heads,
            self.sigma,
            self.popsize,
            self.seed,
            initial_weights,
            self.initial_covariance,
        )
        if self._xnes_state is not None:
            xnes.load_state_dict(self._xnes_state)
            self._xnes_state = None
        if self.initial_fitness is None:
            self.initial_fitness = fitness(broadcast(w0))
        else:  # resumed: the state must be this run's (its model, scores and fitness images)
            if self.guard > 0 and fitness.reference_cosines is None:  # a state saved without them
                start_cosines = fitness.pair_cosines(broadcast(w0), pca=self.space == "pca")
                fitness.reference_cosines = torch.tensor(start_cosines, dtype=torch.float64)
            _check_same_start(self.initial_fitness, fitness(broadcast(w0)))
        if fitness.reference_cosines is not None:
            self.reference_cosines = fitness.reference_cosines.tolist()
        rank_zero_info(
            f"EvolutionarySearch: {scores.num_weights} weights, popsize {xnes.popsize}, sigma {self.sigma}, "
            f"{fitness.images.shape[0]} images/rank, cosine of the "
            f"{f'PCA projections ({fitness.num_components} components)' if self.space == 'pca' else 'raw embeddings'}; "
            f"start fitness {self.initial_fitness:.6f} (lower is better)"
        )
        max_evals = self.max_evals
        if xnes.evals == 0 and max_evals < xnes.popsize and not trainer.fast_dev_run:
            warn_at_caller_on_rank_zero(
                f"EvolutionarySearch: max_evals={max_evals} ends before one xNES generation (popsize {xnes.popsize}) "
                f"completes, so the search distribution is never updated: it only samples {max_evals} candidates "
                f"around its start (give max_evals >= {xnes.popsize}; the main job uses 50)"
            )
        if trainer.fast_dev_run:  # a smoke test: one generation shows the search works
            max_evals = min(max_evals, xnes.evals + xnes.popsize)
            rank_zero_info(f"EvolutionarySearch: fast_dev_run, so one generation ({max_evals} evaluations in all)")
        progress = SearchProgress(
            trainer, max_evals, min(len(self.history), max_evals), fitness.ratio_pairs, self.log_every_n_evals
        )

        def on_eval(idx: int, f: float, best: float) -> None:
            progress.update(idx, f, best, fitness.last_cosines)
            stop_if_terminated(trainer)

        def step_hook() -> None:  # within a staged generation too, which reports its candidates when it ends
            progress.pulse()
            stop_if_terminated(trainer)

        fitness.step_hook = step_hook
        try:
            _search_loop(
                xnes, fitness, max_evals, self.history, on_eval, broadcast, self.initial_fitness, self.early_stop
            )
        finally:
            fitness.step_hook = None
            progress.close()
        evaluated = [f for f in self.history[evals_before:] if not math.isnan(f)]
        if len(evaluated) > 1 and len(set(evaluated + [self.initial_fitness])) == 1:
            warn_at_caller_on_rank_zero(
                f"EvolutionarySearch: all {len(evaluated)} candidates had the start's fitness {self.initial_fitness:.6f}: "
                "nothing told them apart (constant scores, identical fitness images?); the start is kept"
            )
        best_w, best_f = _best(xnes, w0, self.initial_fitness)
        covariance = xnes.covariance
        if world > 1:
            best_w = broadcast(best_w).double().cpu()
            covariance = broadcast(covariance).double().cpu()
        self.best_weights, self.best_fitness, self.covariance = best_w, float(best_f), covariance
        self._final_state = xnes.state_dict()
        start_at = getattr(self, "_train_start", None)
        pl_module.scores = replace(scores.with_weights(best_w, covariance=covariance), build_info={
            **(scores.build_info or {}),
            "scoring_s": None if start_at is None else search_start - start_at,  # train start -> here
            "search_s": time.perf_counter() - search_start,  # this hook: fitness set-up, start point, xNES
            "search_evaluations": len(self.history) - evals_before,  # candidates, start point not counted
            "search_stopped": fitness.num_stopped,  # of those, stopped early (the start point never is)
            "machine": {**build_machine(device), "world_size": world},
            **({} if probe_record is None else {"precision": _with_search_probe(scores.build_info, probe_record)}),
            **_unprobed_search(scores.build_info, self.autocast, autocast_dtype),
        })
        rank_zero_info(
            f"EvolutionarySearch: best fitness {self.best_fitness:.6f} (start {self.initial_fitness:.6f}) "
            f"after {len(self.history)} evaluations ({fitness.num_stopped} of this run's "
            f"{len(self.history) - evals_before} stopped early), {fitness.mean_eval_time:.2f} s/eval"
            + ("; no candidate beat the start, which the checkpoint keeps" if self.best_fitness >= self.initial_fitness else "")
        )

    # ------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        """xNES state, history and results (tensors and plain values, ``weights_only``-loadable)."""
        xnes = self._final_state if self._final_state is not None else self._xnes_state
        return {
            "xnes": None if xnes is None else dict(xnes),
            "history": list(self.history),
            "initial_fitness": self.initial_fitness,
            "reference_cosines": None if self.reference_cosines is None else list(self.reference_cosines),
            "fitness_settings": self._fitness_settings(),
            "best_fitness": self.best_fitness,
            "best_weights": None if self.best_weights is None else self.best_weights.clone(),
            "covariance": None if self.covariance is None else self.covariance.clone(),
        }

    def _fitness_settings(self) -> dict[str, Any]:
        """What defines the fitness values of a state: a resumed search must use the same."""
        balance = self.balance if self.balance is None or isinstance(self.balance, str) else list(self.balance)
        return {
            "ratio_pairs": [list(p) for p in self.ratio_pairs],
            "guard": self.guard,
            "space": self.space,
            "correct": self.correct,
            "pca_components": self.pca_components,
            "balance": balance,
            "fitness_samples": self.fitness_samples,
            "fitness_seed": None if self.fitness_samples is None else self.seed,  # draws the fitness_samples subset
        }

    def _check_saved_settings(self, saved: dict[str, Any] | None) -> None:
        ours = self._fitness_settings()
        if saved is None:
            warn_at_caller_on_rank_zero(
                "EvolutionarySearch.load_state_dict: the state does not record its fitness settings "
                f"(saved by an older version); resuming assumes they equal this callback's {ours}"
            )
            return
        later = {"fitness_seed"}  # recorded since 2026-12-06: older states are compared without it
        differ = [f"{k}: saved {saved.get(k)!r}, here {v!r}" for k, v in ours.items()
                  if (k in saved or k not in later) and saved.get(k) != v]
        if differ:
            raise ValueError(
                f"state_dict was saved by a search with other fitness settings ({', '.join(differ)}); "
                "resume with the same settings, or start a new search"
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the next search continues up to ``max_evals`` in total.

        The continued search equals an uninterrupted one when the saved search stopped at the end
        of an xNES generation (its ``max_evals`` a multiple of the population); a partly evaluated
        generation is drawn again.

        Raises:
            ValueError: If the state was saved with other fitness settings (``ratio_pairs``,
                ``guard``, ``space``, ``correct``, ``pca_components``, ``balance``, ``fitness_samples``
                and, with ``fitness_samples``, the ``seed`` that draws them) than this
                callback's: its fitness values would not be comparable. A state saved before
                these settings were recorded (no ``fitness_settings``) is restored as it is, with
                a warning.
        """
        self._resumed = True
        if state_dict.get("history"):  # an empty search has no fitness values to compare
            self._check_saved_settings(state_dict.get("fitness_settings"))
        self._xnes_state = None if state_dict.get("xnes") is None else dict(state_dict["xnes"])
        self._final_state = None
        self.history = [float(f) for f in state_dict.get("history", [])]
        self.initial_fitness = state_dict.get("initial_fitness")
        ref = state_dict.get("reference_cosines")
        self.reference_cosines = None if ref is None else [float(c) for c in ref]
        self.best_fitness = state_dict.get("best_fitness")
        bw, cov = state_dict.get("best_weights"), state_dict.get("covariance")
        self.best_weights = None if bw is None else torch.as_tensor(bw, dtype=torch.float64)
        self.covariance = None if cov is None else torch.as_tensor(cov, dtype=torch.float64)
