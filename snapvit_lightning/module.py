"""SnapViTModule: the LightningModule that accumulates self-supervised gradient scores.

Method step 1 of SnapViT. One ``trainer.fit`` over calibration batches of DINO multi-crop
views ``(views [B, 2 + N, 3, S, S], labels [B])`` accumulates the gradients of the MLP input
layers (``fc1``, or ``fc1_g``/``fc1_x``) and of the V rows of ``attn.qkv``; at the end of the
epoch they become :class:`~snapvit_lightning.scores.ImportanceScores` (``module.scores``).
No weight ever changes: there is no optimizer.

Teacher. The paper's teacher is a frozen copy of the pretrained model with its classifier
removed. While scoring, teacher and student have identical weights and both run in eval mode,
so the teacher's embeddings of the two global crops *are* the student's embeddings of those
crops: they are taken from the student's single forward pass over all views and
``detach()``-ed. No second copy of the model is kept and no second forward pass is run.

Gradient accumulation. The per-batch loss is a **sum over samples** (the paper's loss is a
mean over the batch; a constant factor does not change a ranking). The gradient of a sum is
additive over samples, so with ``accumulation="sum_then_square"`` the accumulated gradient,
hence the scores, are the same whatever the batch size and however the images are split over
DDP ranks. After each backward the gradients are added (or, for ``"fisher"``, their squares)
to float32 buffers owned by this module and the parameters' ``.grad`` is cleared; float32
buffers keep long sums exact under ``bf16-true`` too.

DDP. Lightning's DDP wrapper would all-reduce (average) the parameter gradients in every
``manual_backward``. Each backward here runs inside the wrapper's ``no_sync()`` context, so
each rank accumulates only its own images without any communication, and at the end of the
epoch one ``trainer.strategy.reduce(..., reduce_op="sum")`` sums the buffers over ranks;
every rank then computes identical scores. (DDP wants ``no_sync`` around the forward too, so
that its post-forward hook does not arm the reducer; in manual optimization Lightning already
switches that hook off around the ``training_step`` forward and arms the reducer only in
``manual_backward``, and it re-enables sync after every step, so an epoch-wide ``no_sync``
would not survive the first step.) For ``"sum_then_square"`` averaging and then summing
over ranks would give the same sum; for ``"fisher"`` it would not: the per-rank squared
gradients must be of the rank's own batch. Sharding strategies (FSDP, DeepSpeed) are refused.
:class:`~snapvit_lightning.data.CalibrationDataModule` shards the images in order and marks the
images that even out the shares (:class:`~snapvit_lightning.data.PaddedShards`); the scoring
step drops them, so every image counts once. A loader of your own gets Lightning's
``DistributedSampler``, which repeats images when their number is not divisible by the number of
ranks: use a divisible size (or ``drop_last``) there for scores identical to a single process.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import _MockOptimizer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from timm.models import parse_model_name
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from .console import quiet_spawned_process
from .errors import warn_at_caller_on_rank_zero
from .forward import embed
from .loss import NUM_GLOBAL_VIEWS, _v_rows_weight_grads, check_classifier_fits, check_labels, dino_loss
from .precision_state import (
    ALLOWED_PRECISIONS, MODULE_STATE_KEY, check_resumed_precision, precision_state, saved_precision,
)
from .scores import ImportanceScores, check_fraction, lamp_scores
from .structure import (
    UnsupportedModelError, check_model_images, check_supported, get_blocks, inspect_vit, mlp_input_layers,
)
from .values import real_number
from .weights_io import classifier_layers, create_timm_model, load_weights, rebuild_spec, weights_source

__all__ = [
    "SnapViTModule",
    "CRITERIA",
    "GRADIENT_CRITERIA",
    "ACCUMULATIONS",
    "ALLOWED_PRECISIONS",
    "lamp_scores",
    "dino_loss",
    "load_weights",
]

#: Criteria selectable by name (see :class:`SnapViTModule`).
CRITERIA = ("dino", "cross_entropy", "snip_magnitude", "magnitude", "lamp", "random")


#: Criteria that need a backward pass over the calibration data.
GRADIENT_CRITERIA = ("dino", "cross_entropy", "snip_magnitude")


#: How per-batch gradients are combined over the epoch.
ACCUMULATIONS = ("sum_then_square", "fisher")




_CHECKPOINT_KEY = MODULE_STATE_KEY
_CHECKPOINT_VERSION = 1


def _check_temperature(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    number = real_number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
    return number


def _mlp_unit_mean(values: list[Tensor], kind: str, hidden: int) -> Tensor:
    """Mean of per-weight values over each neuron's rows of the MLP input layer(s) -> ``[hidden]``."""
    if kind == "glu":  # rows j and j + hidden of fc1
        return values[0].reshape(2, hidden, -1).mean(dim=(0, 2))
    return torch.stack([v.reshape(hidden, -1).mean(dim=1) for v in values]).mean(dim=0)


def _head_unit_mean(values: Tensor, num_heads: int) -> Tensor:
    """Mean of per-weight values over each head's V rows -> ``[num_heads]``."""
    return values.reshape(num_heads, -1).mean(dim=1)


class SnapViTModule(pl.LightningModule):
    """Accumulate SnapViT importance scores of a timm ViT's MLP neurons and attention heads.

    Criteria (``criterion``):

    * ``"dino"``: the paper's label-free score: DINO multi-crop loss (teacher = the detached
      global-view embeddings), gradient accumulated over the epoch, then squared.
    * ``"cross_entropy"``: the same with the supervised cross-entropy of the classifier on the
      first global crop (needs labels ``>= 0`` and a model with ``num_classes > 0``).
    * ``"snip_magnitude"``: SNIP saliency ``|w * g|`` of the DINO-loss gradient ``g``.
    * ``"magnitude"``: mean squared weight of the unit's rows (no data needed).
    * ``"lamp"``: LAMP score of the unit's mean squared weight within its block (no data needed).
    * ``"random"``: uniform random scores from ``seed`` (no data needed).

    A neuron's score is the mean over its ``fc1`` rows (SwiGLU: the rows of ``fc1_g`` and
    ``fc1_x``; GluMlp: rows ``j`` and ``j + hidden``) of the per-weight value; a head's score
    is the mean over its V rows of ``attn.qkv`` (rows ``2 * attn_dim + h * head_dim + d``).
    The per-weight value is ``G**2`` (``G`` = gradient summed over the whole epoch, the paper)
    for ``accumulation="sum_then_square"``, or ``sum_batches g**2`` for ``"fisher"``; for
    ``"snip_magnitude"`` it is ``|w * G|`` or ``|w| * sqrt(sum_batches g**2)``.

    The model is used as is (not copied); only the MLP input weights and ``attn.qkv.weight``
    require gradients, and it always stays in eval mode (no dropout or drop-path). See the
    module docstring for the teacher, the sum-over-samples loss and the DDP handling.

    Args:
        model: A timm model name or a timm ``VisionTransformer`` instance. Names are registry
            names (with an optional pretrained tag), ``hf-hub:ORG/REPO`` or ``local-dir:FOLDER``
            (see :func:`~snapvit_lightning.weights_io.create_timm_model`). An instance is used
            in place: put in eval mode, gradients on the scored layers only, timm gradient
            checkpointing off.
        checkpoint_path: Local weights for the model (``.safetensors`` or a
            ``torch.load(weights_only=True)`` file), loaded strictly.
        pretrained: Build the named model with timm's pretrained weights
            (``timm.create_model(model, pretrained=True, **model_kwargs)``); from a local file
            with ``model_kwargs={"pretrained_cfg_overlay": {"file": PATH}}``.
        model_kwargs: Keyword arguments for ``timm.create_model`` (e.g. ``img_size``,
            ``num_classes``); only with a model name.
        criterion: ``"dino"`` (the paper's label-free DINO gradients), ``"cross_entropy"`` (labels from
            class folders), ``"snip_magnitude"``, ``"magnitude"``, ``"lamp"`` or ``"random"`` (:data:`CRITERIA`).
        accumulation: ``"sum_then_square"`` or ``"fisher"``.
        teacher_temp: Teacher softmax temperature (``None``: none, as in the paper).
        student_temp: Student softmax temperature (``None``: none, as in the paper).
        min_mlp_keep: Fraction of each block's neurons always kept (stored in the scores).
        min_head_keep: Fraction of each block's heads always kept (stored in the scores).
        seed: Seed of the ``"random"`` criterion.

    Attributes:
        student: The timm model.
        explicit_attention: The attention kernel of the scoring forward: ``True`` explicit
            matmuls, ``False`` the model's fused setting, ``None`` (default) as
            :func:`~snapvit_lightning.forward.embed` prefers; set by
            :func:`~snapvit_lightning.precision.resolve_precision` with ``"auto"``.
        precision_probe: That probe's record (plain values), or ``None``; kept in the scores'
            ``build_info["precision"]`` and read by a search with ``autocast="auto"``.
        scores: The :class:`ImportanceScores` after a training epoch (``None`` before).
        num_samples: Calibration images seen by the scores (over all ranks and epochs).

    Raises:
        TypeError: If ``model`` is neither a string nor an ``nn.Module``.
        UnsupportedModelError: For a model the cut would get wrong, or blocks of different sizes.
        ValueError: An unknown model name, criterion or accumulation; a temperature that is
            not ``None`` or > 0; a keep fraction outside ``[0, 1]``; ``model_kwargs`` with a
            model instance; ``"cross_entropy"`` without a classifier; unreadable or
            mismatching ``checkpoint_path``; ``pretrained`` not a bool, with ``checkpoint_path``
            or a model instance, or for a model without timm weights.
        FileNotFoundError: If ``checkpoint_path`` (or a ``pretrained_cfg_overlay`` file) does not exist.
    """

    def __init__(
        self,
        model: str | nn.Module,
        checkpoint_path: str | None = None,
        pretrained: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        criterion: str = "dino",
        accumulation: str = "sum_then_square",
        teacher_temp: float | None = None,
        student_temp: float | None = None,
        min_mlp_keep: float = 0.05,
        min_head_keep: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation must be one of {list(ACCUMULATIONS)}, got {accumulation!r}")
        self.teacher_temp = _check_temperature(teacher_temp, "teacher_temp")
        self.student_temp = _check_temperature(student_temp, "student_temp")
        self.min_mlp_keep = check_fraction(min_mlp_keep, "min_mlp_keep")
        self.min_head_keep = check_fraction(min_head_keep, "min_head_keep")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict or None, got {type(model_kwargs).__name__}")
        if not isinstance(pretrained, bool):
            raise ValueError(f"pretrained must be True or False, got {pretrained!r}")
        if pretrained and checkpoint_path is not None:
            raise ValueError(
                f"give either pretrained=True (timm's weights) or checkpoint_path={checkpoint_path!r} "
                "(local weights), not both"
            )
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        self.criterion = criterion
        self.accumulation = accumulation
        self.seed = seed

        if isinstance(model, str):
            student = create_timm_model(model, pretrained, model_kwargs)
            if parse_model_name(model)[0] is not None:  # hf-hub:/local-dir: the export records what rebuilds it
                self.model_name, self.model_kwargs = rebuild_spec(model, model_kwargs)
        elif isinstance(model, nn.Module):
            if model_kwargs or pretrained:
                raise ValueError(
                    f"model_kwargs={model_kwargs!r} and pretrained={pretrained!r} only apply when model is a "
                    "timm name, not a module instance"
                )
            student = model
        else:
            raise TypeError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
        check_supported(student)  # early, before any weights are read
        structure = inspect_vit(student)
        if not structure.is_uniform:
            raise UnsupportedModelError(
                f"blocks have different sizes {[(d.num_heads, d.mlp_hidden) for d in structure.blocks]}; "
                "scores need the same number of heads and neurons in every block"
            )
        check_classifier_fits(student, criterion)
        if checkpoint_path is not None:
            load_weights(student, checkpoint_path, classifier=classifier_layers(student))  # a head may differ, as in timm
        elif isinstance(model, str) and not pretrained:  # a config without its weights line scored noise in silence
            warn_at_caller_on_rank_zero(f"SnapViTModule: scoring random weights: {model!r} was built with "
                                        "pretrained=False and no checkpoint_path, so its scores and elastic model mean "
                                        "nothing for a real task; give checkpoint_path (local weights) or pretrained=True")
        self.weights_source = weights_source(model if isinstance(model, str) else None, pretrained, checkpoint_path, student)
        if getattr(student, "grad_checkpointing", False):
            # Its recomputation in backward runs outside the explicit-attention context of the
            # forward, so the saved and recomputed tensors differ; the scores need one backward only.
            student.set_grad_checkpointing(False)
        self.student = student
        self.structure = structure
        self._mlp_kind = structure.mlp_kind

        # Only the MLP input layers and qkv need gradients.
        self.student.requires_grad_(False)
        for block in get_blocks(self.student):
            for layer in mlp_input_layers(block):
                layer.weight.requires_grad_(True)
            block.attn.qkv.weight.requires_grad_(True)
        self.student.eval()

        self.automatic_optimization = False
        self.scores: ImportanceScores | None = None
        self.num_samples: int = 0
        self._grads: dict[str, Tensor] | None = None  # local (per-rank) fp32 accumulators
        self._samples = 0  # local sample count
        self._pending: dict[str, Any] | None = None  # restored by on_load_checkpoint
        self._resumed = False  # this fit continues sums restored from a checkpoint
        self._train_started = False  # this fit reached on_train_start
        self._warn_unfinished_resume = True  # the CLI turns it off: it ends such a fit with its own error
        self.explicit_attention: bool | None = None  # attention kernel (None: forward.embed decides)
        self.precision_probe: dict[str, Any] | None = None  # set by precision.resolve_precision("auto")

    # ------------------------------------------------------------------------------------------
    # Forward

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings with the classification head removed: ``forward_head(..., pre_logits=True)``.

        Args:
            x: ``[N, 3, S, S]`` normalised images.

        Returns:
            ``[N, D]`` embeddings (not normalised).

        Raises:
            ValueError: ``x`` is not finite float images the model takes (naming the shape it needs).
        """
        return embed(self.student, self._checked(x, "x"), self.explicit_attention)

    def _checked(self, images: Tensor, name: str) -> Tensor:
        dtype = next(self.student.parameters()).dtype
        if isinstance(images, Tensor) and images.is_floating_point() and images.dtype != dtype \
                and not torch.is_autocast_enabled(images.device.type):  # under autocast (bf16-mixed) any float runs
            raise ValueError(f"{name} are {images.dtype}, the model {dtype}: give {dtype} images, or run under torch.autocast")
        return check_model_images(self.student, images, name)

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`embed`."""
        return self.embed(x)

    @override
    def train(self, mode: bool = True) -> "SnapViTModule":
        """Set the module's mode; the student always stays in eval mode (no dropout/drop-path)."""
        super().train(mode)
        self.student.eval()
        return self

    # ------------------------------------------------------------------------------------------
    # Set-up checks

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """No optimizer: scoring never changes a weight.

        Lightning's placeholder optimizer, which it would put in place of ``None`` itself (with a
        warning): its ``step()`` changes nothing and counts each batch in ``trainer.global_step``
        (see :meth:`training_step`).
        """
        return _MockOptimizer()

    @override
    def setup(self, stage: str) -> None:
        """Configure the datamodule from the model; refuse fp16 and sharding strategies.

        Raises:
            ValueError: For ``precision`` other than 32/bf16 (or any precision plugin with a
                gradient scaler), or a strategy that is neither single-device nor DDP.
        """
        quiet_spawned_process()  # a ddp_spawn process of `snapvit fit`: the CLI's notice filters
        precision = str(self.trainer.precision)
        if precision not in ALLOWED_PRECISIONS or getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"precision={precision!r} is not supported for scoring: fp16 (and its loss scaling) "
                f"corrupts raw gradient scores; use one of {list(ALLOWED_PRECISIONS)}"
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "configure_from_model"):  # crops at the model's size and normalisation
            datamodule.configure_from_model(self.student)
        check_classifier_fits(self.student, self.criterion, datamodule)  # before the scoring, not in it
        trainer = self.trainer
        for name in ("max_epochs", "max_steps", "limit_train_batches"):  # Lightning skips the training silently
            if stage == "fit" and getattr(trainer, name, None) == 0:
                raise ValueError(f"{name}=0: this fit would score no calibration image and write nothing; "
                                 "the scoring is one epoch (max_epochs: 1)")
        if stage == "fit" and trainer.max_epochs == -1 and trainer.max_steps == -1:
            raise ValueError("max_epochs=-1 (no limit; also Lightning's for max_epochs null with max_time) without "
                             "max_steps: this fit would score until stopped; the scoring is one epoch (max_epochs: 1)")
        if stage == "fit" and (trainer.max_epochs or 0) > 1 and hasattr(datamodule, "configure_from_model"):
            warn_at_caller_on_rank_zero(f"max_epochs={trainer.max_epochs}: the scoring is one epoch, and each further "
                                        "one scores the same crops again (the same ranking, for that many times the time)")
        strategy = self.trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(
                f"strategy {type(strategy).__name__} is not supported for scoring (sharded gradients); "
                "use a single device or DDP"
            )

    # ------------------------------------------------------------------------------------------
    # Accumulators

    def _grad_sources(self) -> dict[str, tuple[Tensor, slice | None]]:
        """Accumulator key -> (parameter, row slice) for every gradient the scores read."""
        out: dict[str, tuple[Tensor, slice | None]] = {}
        for i, block in enumerate(get_blocks(self.student)):
            for k, layer in enumerate(mlp_input_layers(block)):
                out[f"blocks.{i}.mlp.{k}"] = (layer.weight, None)
            attn_dim = int(block.attn.num_heads) * int(block.attn.head_dim)
            out[f"blocks.{i}.attn.v"] = (block.attn.qkv.weight, slice(2 * attn_dim, 3 * attn_dim))
        return out

    def _zero_grads(self) -> dict[str, Tensor]:
        return {
            key: torch.zeros((p if rows is None else p[rows]).shape, dtype=torch.float32, device=p.device)
            for key, (p, rows) in self._grad_sources().items()
        }

    def _accumulate(self) -> None:
        """Move the parameters' ``.grad`` into the fp32 accumulators (squared for ``fisher``)."""
        assert self._grads is not None
        for key, (param, rows) in self._grad_sources().items():
            grad = param.grad
            if grad is None:
                continue
            g = (grad if rows is None else grad[rows]).float()
            if self.accumulation == "fisher":
                self._grads[key].add_(g.square())
            else:
                self._grads[key].add_(g)
        for param, _ in self._grad_sources().values():
            param.grad = None

    def _reduced(self) -> tuple[dict[str, Tensor], int]:
        """The accumulators and sample count summed over ranks (local ones are left as they are)."""
        assert self._grads is not None
        keys = list(self._grads)
        flat = torch.cat([self._grads[k].flatten() for k in keys] + [self._grads[keys[0]].new_tensor([self._samples])])
        if self._trainer is not None and self.trainer.world_size > 1:
            flat = self.trainer.strategy.reduce(flat, reduce_op="sum")
        out, offset = {}, 0
        for k in keys:
            n = self._grads[k].numel()
            out[k] = flat[offset : offset + n].view_as(self._grads[k])
            offset += n
        return out, int(round(float(flat[-1])))

    # ------------------------------------------------------------------------------------------
    # Hooks

    @override
    def on_fit_start(self) -> None:
        """Start fresh accumulators, or continue those restored by :meth:`on_load_checkpoint`.

        Restored sums (already summed over the ranks that saved them) go to rank 0 only, so
        the sum over ranks is preserved whatever the new number of ranks.
        """
        device = self.student.patch_embed.proj.weight.device
        self._grads = {k: v.to(device) for k, v in self._zero_grads().items()}
        self._samples = 0
        self._resumed = self._pending is not None
        self._train_started = False
        if self._pending is not None:
            pending, self._pending = self._pending, None
            if self.global_rank == 0:
                for key, value in pending["grads"].items():
                    if key not in self._grads or value.shape != self._grads[key].shape:
                        raise ValueError(f"restored accumulator {key!r} does not match the model")
                    self._grads[key].copy_(value)
                self._samples = int(pending["num_samples"])

    @override
    def on_train_start(self) -> None:
        """Compute the scores of an epoch that a resumed fit will not finish itself.

        A checkpoint saved at the end of an epoch's *last* training batch is restored by
        Lightning as an epoch already processed: that epoch's ``on_train_epoch_end`` (where the
        scores are computed) never runs again. The restored sums are complete, so the scores are
        computed here, before any ``on_train_end`` callback (the search) needs them.
        """
        self._train_started = True
        batches, max_steps = self.trainer.num_training_batches, self.trainer.max_steps
        if 0 < max_steps < batches:  # Lightning ends the epoch there: the scores see part of the images
            warn_at_caller_on_rank_zero(f"max_steps={max_steps} stops the scoring epoch after {max_steps} of its "
                                        f"{batches} batches: the scores see only those images")
        progress = self.trainer.fit_loop.epoch_progress.current
        if self._resumed and progress.started > 0 and progress.processed == progress.started:
            self.scores = self.compute_scores()

    @override
    def on_fit_end(self) -> None:
        """Warn when a resumed fit ran no training (so no ``on_train_end`` callback ran)."""
        ckpt_path = self.trainer.ckpt_path
        if ckpt_path is not None and not self._train_started and self._warn_unfinished_resume:
            warn_at_caller_on_rank_zero(f"trainer.fit(ckpt_path={str(ckpt_path)!r}) resumed a checkpoint saved after "
                                        "the scoring epoch had ended (e.g. an end-of-epoch ModelCheckpoint, or one saved "
                                        "during the search or export): Lightning considers that fit finished, so no "
                                        "on_train_end callback ran (EvolutionarySearch, ElasticExport). The restored scores "
                                        "are in `module.scores`; to finish the run, resume from a checkpoint saved during "
                                        "the scoring epoch (ModelCheckpoint(every_n_train_steps=k, "
                                        "save_on_train_epoch_end=False)) or start a new fit.")

    @override
    def on_train_epoch_start(self) -> None:
        """Keep the student in eval mode (no dropout or drop-path)."""
        self.student.eval()

    def _no_grad_sync(self) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync()`` when wrapped in DDP (no all-reduce in the backward), else nothing."""
        model = self.trainer.strategy.model if self._trainer is not None else None
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    @staticmethod
    def _unpack(batch: Any) -> tuple[Tensor, Tensor | None]:
        """``(views, labels)`` of a batch; the images a ``(views, labels, keep)`` batch marks as padding dropped."""
        if isinstance(batch, Tensor):
            views, labels = batch, None
        elif isinstance(batch, (tuple, list)) and len(batch) >= 1 and isinstance(batch[0], Tensor):
            views = batch[0]
            labels = batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
            if len(batch) > 2 and isinstance(batch[2], Tensor) and batch[2].dtype == torch.bool:  # PaddedShards
                views, labels = views[batch[2]], None if labels is None else labels[batch[2]]
        else:
            raise TypeError(f"batch must be views [B, V, 3, S, S] or (views, labels), got {type(batch).__name__}")
        if views.dim() != 5:
            raise ValueError(
                f"views must be [B, V, 3, S, S] (multi-crop views, as CalibrationDataModule yields), got shape "
                f"{list(views.shape)}" + (": a batch of single images" if views.dim() == 4 else "")
            )
        return views, labels

    def compute_loss(self, views: Tensor, labels: Tensor | None = None) -> Tensor:
        """The criterion's loss of one batch, summed over samples.

        Args:
            views: ``[B, V, 3, S, S]`` multi-crop views, views 0 and 1 the global crops.
            labels: ``[B]`` class indices (``-1``: unlabeled); needed by ``"cross_entropy"``.

        Returns:
            A scalar: the DINO loss (``"dino"``, ``"snip_magnitude"``) or the cross-entropy
            of the first global crop (``"cross_entropy"``), summed over the batch.

        Raises:
            ValueError: ``views`` that are not finite float ``[B, V, 3, S, S]`` the model takes, too
                few views, or missing/negative labels for ``"cross_entropy"``.
        """
        if not isinstance(views, Tensor) or views.dim() != 5:  # torch's and timm's errors named no cause
            got = list(views.shape) if isinstance(views, Tensor) else type(views).__name__
            raise ValueError(f"views must be a float tensor [B, V, 3, S, S] of multi-crop views, got {got}")
        self._checked(views.flatten(0, 1), f"views (their {views.shape[0]} x {views.shape[1]} views as one batch)")
        if self.criterion == "cross_entropy":
            check_labels(labels, views.shape[0], int(self.student.num_classes))
            logits = self.student(views[:, 0])
            return F.cross_entropy(logits.float(), labels.long(), reduction="sum")
        if views.shape[1] < NUM_GLOBAL_VIEWS:
            raise ValueError(f"criterion={self.criterion!r} needs >= 2 views per image, got {views.shape[1]}")
        b, v = views.shape[:2]
        with _v_rows_weight_grads(self.student):
            emb = embed(self.student, views.flatten(0, 1), self.explicit_attention).reshape(b, v, -1)
        return dino_loss(emb, self.teacher_temp, self.student_temp).sum()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """Backward the batch's summed loss and add its gradients to the accumulators.

        The data-free criteria (``magnitude``, ``lamp``, ``random``) do nothing here.

        Raises:
            TypeError: If the batch is not ``views`` or ``(views, labels)``.
            ValueError: See :meth:`compute_loss`.
        """
        views, labels = self._unpack(batch)
        if self.criterion not in GRADIENT_CRITERIA:
            return None
        if views.shape[0] == 0:  # a DDP rank's batch of padding only: the step still counts, as on the other ranks
            if self._trainer is not None:
                self.optimizers().step()
            return None
        if self._grads is None:  # training_step called outside fit
            self._grads = {k: v.to(views.device) for k, v in self._zero_grads().items()}
        loss = self.compute_loss(views, labels)
        with self._no_grad_sync():  # summed over ranks once, at the end of the epoch
            self.manual_backward(loss)
        self._accumulate()
        self._samples += int(views.shape[0])
        if self._trainer is not None:
            # Lightning's placeholder optimizer (no parameter has a .grad any more, so even a
            # real optimizer would change nothing): counts the batch in trainer.global_step,
            # which step-based checkpointing (every_n_train_steps), max_steps and loggers use.
            self.optimizers().step()
        loss = loss.detach()
        self.log("loss", loss / views.shape[0], prog_bar=True, batch_size=int(views.shape[0]))
        return loss

    @override
    def on_train_epoch_end(self) -> None:
        """Sum the accumulators over ranks and turn them into ``self.scores`` (same on every rank)."""
        self.scores = self.compute_scores()

    # ------------------------------------------------------------------------------------------
    # Scores

    def compute_scores(self) -> ImportanceScores:
        """Scores from the accumulators (summed over ranks under DDP) or from the weights.

        Under DDP this is a collective call: every rank must call it.

        Raises:
            RuntimeError: A gradient criterion before any calibration image was seen.
        """
        blocks = get_blocks(self.student)
        hidden = self.structure.blocks[0].mlp_hidden
        num_heads = self.structure.blocks[0].num_heads
        kind = self._mlp_kind
        sources = self._grad_sources()

        def weights(key: str) -> Tensor:
            param, rows = sources[key]
            return (param if rows is None else param[rows]).detach().float()

        mlp_keys = [[k for k in sources if k.startswith(f"blocks.{i}.mlp.")] for i in range(len(blocks))]
        if self.criterion in GRADIENT_CRITERIA:
            if self._grads is None:
                self._grads = self._zero_grads()
            acc, self.num_samples = self._reduced()
            if self.num_samples == 0:  # summed over ranks: all raise, none waits
                raise RuntimeError(f"compute_scores: criterion={self.criterion!r} has seen no calibration images (its "
                                   "sums are zero): fit the module on images first, or use 'magnitude' or 'lamp'")
            if self.criterion == "snip_magnitude":
                if self.accumulation == "fisher":
                    value = {k: weights(k).abs() * acc[k].clamp_min(0).sqrt() for k in acc}
                else:
                    value = {k: (weights(k) * acc[k]).abs() for k in acc}
            elif self.accumulation == "fisher":
                value = acc
            else:
                value = {k: g.square() for k, g in acc.items()}
        elif self.criterion in ("magnitude", "lamp"):
            value = {k: weights(k).square() for k in sources}
        else:  # random
            gen = torch.Generator().manual_seed(self.seed)
            mlp = torch.rand(len(blocks), hidden, generator=gen, dtype=torch.float64)
            heads = torch.rand(len(blocks), num_heads, generator=gen, dtype=torch.float64)
            return self._make_scores(mlp, heads)
        mlp = torch.stack([_mlp_unit_mean([value[k] for k in keys], kind, hidden) for keys in mlp_keys])
        heads = torch.stack([_head_unit_mean(value[f"blocks.{i}.attn.v"], num_heads) for i in range(len(blocks))])
        mlp, heads = mlp.double().cpu(), heads.double().cpu()
        if self.criterion == "lamp":
            mlp, heads = lamp_scores(mlp), lamp_scores(heads)
        return self._make_scores(mlp, heads)

    def _make_scores(self, mlp: Tensor, heads: Tensor) -> ImportanceScores:
        return ImportanceScores(
            mlp=mlp,
            heads=heads,
            min_mlp_keep=self.min_mlp_keep,
            min_head_keep=self.min_head_keep,
            criterion=self.criterion,
            build_info={**(self._precision_info() or {}), **({"weights": self.weights_source} if self.weights_source else {})} or None,
        )

    def _precision_info(self) -> dict[str, Any] | None:
        """``{"precision": record}`` for the scores: the probe's, or the Trainer's precision as given (not probed)."""
        if self.precision_probe is not None:
            return {"precision": self.precision_probe}
        if self._trainer is None:
            return None
        return {"precision": {"trainer_precision": str(self.trainer.precision), "scoring": "not probed (trainer.precision given)"}}

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the scores and the accumulated gradients (tensors and plain values only).

        Under DDP the accumulators are summed over ranks first (a collective: Lightning calls
        this hook on every rank), so a resumed run loses no rank's images.
        """
        grads: dict[str, Tensor] | None = None
        samples = 0
        if self._grads is not None:
            reduced, samples = self._reduced()
            grads = {k: v.detach().cpu().clone() for k, v in reduced.items()}
        elif self._pending is not None:
            grads, samples = self._pending["grads"], int(self._pending["num_samples"])
        checkpoint[_CHECKPOINT_KEY] = {
            "version": _CHECKPOINT_VERSION,
            "criterion": self.criterion,
            "accumulation": self.accumulation,
            "num_samples": int(samples),
            "grads": grads,
            "scores": None if self.scores is None else self.scores.state_dict(),
            "precision": None if self._trainer is None else precision_state(
                self.trainer.precision, self.explicit_attention, self.precision_probe, self.device.type),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the scores and the accumulated gradients saved by :meth:`on_save_checkpoint`.

        The next ``fit`` continues accumulating from the restored sums.

        Raises:
            ValueError: If the checkpoint was made with another criterion, accumulation, precision or
                attention kernel, or (before the datamodule saved its own state) other calibration data options.
        """
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if hasattr(datamodule, "check_saved_options"):  # a checkpoint older than the datamodule's own state
            datamodule.check_saved_options(checkpoint)
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is None:
            return
        for name in ("criterion", "accumulation"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"checkpoint was scored with {name}={state[name]!r}, this module uses {getattr(self, name)!r}"
                )
        if self._trainer is not None:
            check_resumed_precision(saved_precision(checkpoint), self.trainer.precision, self.explicit_attention,
                                    self.device.type)
        if state.get("scores") is not None:
            self.scores = ImportanceScores.from_state_dict(state["scores"])
        self.num_samples = int(state.get("num_samples", 0))
        if state.get("grads") is not None:
            self._pending = {"grads": dict(state["grads"]), "num_samples": int(state["num_samples"])}
            self._grads = None
