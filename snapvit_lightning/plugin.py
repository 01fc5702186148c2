""":class:`SnapViT`: one callback a user adds to their *own* ``Trainer``.

After their fit it finds the timm ViT inside their LightningModule (:func:`find_vit`), scores a
copy of it on calibration data, optionally runs the evolutionary search, and exports the
elastic checkpoint with :func:`~snapvit_lightning.export.export_elastic`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from .checkpoint import resolve_rebuild, uncompiled
from .console import fit, internal_fit
from .correction import EXPORT_HINT, check_one_shot
from .data import CalibrationDataModule
from .elastic import ElasticViT
from .export import (
    Budget,
    DEFAULT_BUDGETS,
    DEFAULT_STATS_VIEWS,
    _calibration_images,
    _check_dirpath,
    _check_image_source,
    _check_reachable,
    _default_name,
    _read_image_source,
    _refuse_existing,
    _refuse_existing_before_fit,
    _set_export_options,
    export_elastic,
    export_targets,
    with_scoring_time,
)
from .loss import check_classifier_fits, check_labels
from .module import ALLOWED_PRECISIONS, CRITERIA, SnapViTModule
from .precision import PROBE_VIEWS, cli_device, resolve_precision
from .precision_state import precision_refusal
from .ranks import collective_safe_sigterm, finish_on_every_rank, stops_on_sigterm
from .scores import ImportanceScores
from .search import DEFAULT_RATIO_PAIRS, EvolutionarySearch
from .search.fitness import check_pairs_apart
from .search.loop import check_start_fits
from .values import non_float32
from .structure import UnsupportedModelError, check_input_size, check_model_images, check_supported

__all__ = [
    "find_vit",
    "SnapViT",
]

def _is_timm_vit(module: nn.Module) -> bool:
    """A timm ``VisionTransformer``, or another timm model with patch embedding and blocks (Eva, NaFlexVit, ...).

    The second kind is found only to be named in the error (``check_supported`` refuses it).
    """
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(module, VisionTransformer) or (
        _from_timm_models(module) and hasattr(module, "patch_embed") and hasattr(module, "blocks"))


def _from_timm_models(module: nn.Module) -> bool:
    """Whether ``module``'s class is one of timm's models or their parts (a user's subclass too)."""
    return any(c.__module__.startswith("timm.models.") for c in type(module).__mro__)


def find_vit(
    pl_module: nn.Module,
    model_attr: str | None = None,
    model_getter: Callable[[Any], nn.Module] | None = None,
) -> tuple[str, nn.Module]:
    """Find the timm ViT inside a (Lightning) module.

    By ``model_attr`` (a dotted attribute path), by ``model_getter(pl_module)``, or by
    auto-detection: the submodules that are timm ``VisionTransformer`` instances (one inside
    another counted once) that SnapViT supports; exactly one must be found. Other timm ViT-like
    models found (Eva, ...) are named in the error when no supported one is.

    Returns:
        ``(where, model)``: the attribute path (``"<getter>"`` for a getter) and the model.

    Raises:
        ValueError: No such attribute, no timm model at all, or several supported ViTs (listing their names).
        TypeError: The attribute or getter result is not an ``nn.Module``.
        UnsupportedModelError: The chosen model is not supported (attr/getter), or auto-detection
            found only timm models that are not (ViT-like ones such as Eva, or a Swin or ConvNeXt;
            listing them).
    """
    cls = type(pl_module).__name__
    if model_attr is not None:
        try:
            model = functools.reduce(getattr, model_attr.split("."), pl_module)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise ValueError(f"model_attr={model_attr!r}: {cls} has no such attribute; its submodules: {children}") from None
        where = model_attr
    elif model_getter is not None:
        model = model_getter(pl_module)
        where = "<model_getter>"
    else:
        found: list[tuple[str, nn.Module]] = []
        for name, module in pl_module.named_modules():
            if _is_timm_vit(module) and not any(name.startswith(f"{n}.") for n, _ in found):
                found.append((name, module))
        supported, unsupported = [], []
        for name, module in found:
            try:
                check_supported(module)
                supported.append((name, module))
            except UnsupportedModelError as err:
                unsupported.append(f"{name} ({err})")
        if len(supported) == 1:
            return supported[0]
        if not supported:
            if not unsupported:  # other timm models (a Swin, a ConvNeXt): named, so it does not read as not found
                others: list[str] = []
                for name, module in pl_module.named_modules():  # the outermost ones (a user's subclass too)
                    if _from_timm_models(module) and not any(n == "" or name.startswith(f"{n}.") for n in others):
                        others.append(name)
                unsupported = [f"{n or '(the module itself)'} ({type(pl_module.get_submodule(n)).__name__}: not a timm "
                               "VisionTransformer)" for n in others]
            advice = ("SnapViT cannot prune these" if unsupported else "pass model_attr= or model_getter= if it is there")
            extra = f"; unsupported ones: {unsupported}" if unsupported else ""
            error = UnsupportedModelError if unsupported else ValueError  # the README's error for a refused model
            raise error(f"found no supported timm VisionTransformer in {cls}{extra}; {advice}")
        raise ValueError(
            f"found several timm VisionTransformers in {cls}: {[n for n, _ in supported]}; "
            "choose one with model_attr= (e.g. model_attr='backbone') or model_getter="
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} of {cls} must be an nn.Module (a timm ViT), got {type(model).__name__}")
    if uncompiled(model) is not model:  # torch.compile's wrapper: the model it compiled
        model, where = uncompiled(model), (f"{where}._orig_mod" if model_attr is not None else where)
    try:
        check_supported(model)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{where} of {cls}: {err}") from None
    return where, model


class SnapViT(Callback):
    """Plug SnapViT into an existing Trainer: after the user's fit, export an elastic ViT.

    ``Trainer(callbacks=[SnapViT(datamodule=CalibrationDataModule(...), dirpath="elastic")])``.
    In ``on_fit_end`` of the user's fit (after teardown, the model on CPU) it:

    1. finds the timm ViT in the user's LightningModule (:func:`find_vit`: ``model_attr``,
       ``model_getter`` or auto-detection; checked already in ``setup``, so a bad set-up fails
       before the user's training);
    2. deep-copies it (the user's trained weights, ``requires_grad`` flags and mode are never
       touched) and wraps the copy in a :class:`SnapViTModule` with ``criterion``;
    3. runs a fresh internal ``Trainer(devices=1, max_epochs=1, logger=False,
       enable_checkpointing=False)`` over the calibration data with
       :class:`EvolutionarySearch` (``search_evals`` evaluations; 0 skips the search);
    4. exports with :func:`export_elastic` to ``dirpath``.

    Multi-GPU: the work runs on global rank 0 of the user's run only, on one device; other
    ranks wait for it, so the files exist on every rank when ``fit`` returns. For calibration on
    several GPUs use the ``snapvit`` CLI / a DDP ``SnapViTModule`` run with
    :class:`EvolutionarySearch` and :class:`ElasticExport`.

    Fitness/fidelity images: ``fitness_images`` if given, else the datamodule's
    ``fitness_images()``, else (a DataLoader) the first global crop ``views[:, 0]`` of every
    calibration batch.

    Args:
        datamodule: A :class:`~snapvit_lightning.data.CalibrationDataModule` (or another
            LightningDataModule yielding ``(views, labels)``) or a DataLoader of such batches.
        dirpath: Output directory of the export.
        model_attr: Attribute path of the ViT in the user's module (e.g. ``"backbone"``,
            ``"model.encoder"``).
        model_getter: ``f(pl_module) -> nn.Module`` returning the ViT.
        criterion: Scoring criterion (see :data:`~snapvit_lightning.module.CRITERIA`).
        search_evals: Evolutionary-search evaluations (0: no search).
        budgets: Budgets of the report (see :func:`export_elastic`).
        save_subnets: Also write each budget's subnet.
        overwrite: Replace an earlier export.
        model_name: timm name to rebuild the model (default: inferred from ``pretrained_cfg``).
        model_kwargs: ``timm.create_model`` kwargs to rebuild it (default: inferred).
        name: File-name stem of the export.
        precision: Precision of the internal scoring Trainer (fp16 is refused); ``"auto"``: a
            probe on the internal Trainer's device picks it and the attention kernel
            (:func:`~snapvit_lightning.precision.resolve_precision`).
        accelerator: Accelerator of the internal Trainer; ``None``: ``"cpu"`` when the user's
            run was on CPU, else ``"auto"``. One this machine lacks is refused when the user's
            fit starts (``setup``), not after it.
        search_kwargs: Extra :class:`EvolutionarySearch` arguments (e.g. ``pca_components``). Its
            ``autocast`` is ``"auto"`` unless given here (as in the configs): the search times its
            fitness forward in each precision and runs the faster (docs/precision.md).
        fitness_images: Float ``[M, 3, S, S]`` fitness images, or an iterable of such batches (e.g. a
            ``DataLoader``), read once in ``setup``.
        correct: Weight correction of the exported subnets: ``"lstsq"`` (default), ``"bias"``
            or ``"none"`` (the paper's plain cut, no statistics file); statistics from the
            datamodule's ``calibration_views(...)`` (eval views and random crops) or
            ``calibration_images_eval()`` when it has one, else from the fitness images, written
            beside the checkpoint (see :func:`export_elastic`).
        stats_views: Inputs the statistics aim for, as :class:`ElasticExport`'s (default 256:
            each image gives ``256 // N`` views, 1 to 8; ``1``: the eval views alone).

    Attributes:
        elastic: The exported :class:`ElasticViT` (after the fit, rank 0).
        export_paths: ``{role: Path}`` of the written files.
        report: The report written to ``report.json``.
        scores: The (searched) :class:`ImportanceScores`.
        model_path: Where the ViT was found in the user's module.

    Raises:
        TypeError: Wrong argument types (datamodule, getter, flags, kwargs).
        ValueError: Invalid criterion, search_evals, budgets, precision, or both
            ``model_attr`` and ``model_getter``.
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule | DataLoader,
        dirpath: str | os.PathLike,
        model_attr: str | None = None,
        model_getter: Callable[[pl.LightningModule], nn.Module] | None = None,
        criterion: str = "dino",
        search_evals: int = 50,
        budgets: Sequence[Budget] = DEFAULT_BUDGETS,
        save_subnets: bool = False,
        overwrite: bool = False,
        model_name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        name: str | None = None,
        precision: str = "32-true",
        accelerator: str | None = None,
        search_kwargs: dict[str, Any] | None = None,
        fitness_images: Tensor | Iterable[Any] | None = None,
        correct: str = "lstsq",
        stats_views: int = DEFAULT_STATS_VIEWS,
    ) -> None:
        super().__init__()
        if not isinstance(datamodule, (pl.LightningDataModule, DataLoader)):
            raise TypeError(
                f"datamodule must be a LightningDataModule (e.g. CalibrationDataModule) or a DataLoader, "
                f"got {type(datamodule).__name__}"
            )
        self.datamodule = datamodule
        self.dirpath = _check_dirpath(dirpath)
        if model_attr is not None and model_getter is not None:
            raise ValueError(f"give model_attr or model_getter, not both (got model_attr={model_attr!r})")
        if model_attr is not None and (
            not isinstance(model_attr, str) or not all(part.isidentifier() for part in model_attr.split("."))
        ):
            raise ValueError(f"model_attr must be an attribute name, possibly dotted, got {model_attr!r}")
        if model_getter is not None and not callable(model_getter):
            raise TypeError(f"model_getter must be callable, got {type(model_getter).__name__}")
        self.model_attr = model_attr
        self.model_getter = model_getter
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {list(CRITERIA)}, got {criterion!r}")
        self.criterion = criterion
        if isinstance(search_evals, bool) or not isinstance(search_evals, int) or search_evals < 0:
            raise ValueError(f"search_evals must be an int >= 0 (0: no search), got {search_evals!r}")
        self.search_evals = search_evals
        _set_export_options(self, budgets, save_subnets, overwrite, model_name, model_kwargs, name, correct, stats_views)
        if str(precision) not in ("auto", *ALLOWED_PRECISIONS):
            raise ValueError(precision_refusal("precision", precision))
        self.precision = precision
        if accelerator is not None and not isinstance(accelerator, str):
            raise TypeError(f"accelerator must be a str or None, got {accelerator!r}")
        self.accelerator = accelerator
        if search_kwargs is not None and not isinstance(search_kwargs, dict):
            raise TypeError(f"search_kwargs must be a dict or None, got {type(search_kwargs).__name__}")
        for key, instead in (("max_evals", "search_evals"), ("images", "fitness_images")):
            if search_kwargs and key in search_kwargs:
                raise ValueError(f"search_kwargs must not hold {key}; use {instead}")
        allowed = sorted(set(inspect.signature(EvolutionarySearch).parameters) - {"max_evals", "images"})
        unknown = sorted(set(search_kwargs or {}) - set(allowed))
        if unknown:
            raise ValueError(f"search_kwargs: unknown key(s) {unknown}; EvolutionarySearch takes {allowed}")
        self.search_kwargs = {"autocast": "auto", **(search_kwargs or {})}  # bf16 is slower on some CPUs
        if search_evals:
            try:  # validate early
                EvolutionarySearch(max_evals=search_evals, **self.search_kwargs)
            except (TypeError, ValueError) as err:
                raise (TypeError if isinstance(err, TypeError) else ValueError)(f"search_kwargs: {err}") from err
        self.fitness_images = _check_image_source(fitness_images, "fitness_images")
        if search_evals and fitness_images is None and not (
            isinstance(datamodule, DataLoader) or hasattr(datamodule, "fitness_images")
        ):
            raise ValueError(
                f"search_evals={search_evals} needs fitness images: pass fitness_images=, a DataLoader or a "
                f"datamodule with fitness_images() (e.g. CalibrationDataModule), got {type(datamodule).__name__}"
            )

        self.elastic: ElasticViT | None = None
        self.export_paths: dict[str, Path] | None = None
        self.report: dict[str, Any] | None = None
        self.scores: ImportanceScores | None = None
        self.model_path: str | None = None
        self._loader: DataLoader | None = None  # a user's calibration datamodule's, from setup
        self._first_batch: tuple[Any, int] | None = None  # (labels, images) of its first batch, from setup

    def _name(self, model: nn.Module) -> str | None:
        return self.name or _default_name(self.model_name, model)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the ViT, check the accelerator, images and search start, refuse an existing export: before the user's fit."""
        if stage != "fit":
            return
        self.model_path, model = find_vit(pl_module, self.model_attr, self.model_getter)
        resolve_rebuild(model, self.model_name, self.model_kwargs)  # else the export would fail after the user's fit
        self.fitness_images = _read_image_source(self.fitness_images, "fitness_images")
        self._check_accelerator()
        self._check_loader(trainer)
        self._check_inputs(model)
        try:
            _refuse_existing_before_fit(trainer, self.dirpath, self._name(model), self.overwrite, owner="SnapViT")
        except FileExistsError as err:
            if not self.export_paths:
                raise
            path = str(err).split(" exists", 1)[0]
            raise FileExistsError(f"{path} exists: this SnapViT wrote it in an earlier fit; a second fit with the same "
                                  "callback exports again only with overwrite=True") from None

    def _check_inputs(self, model: nn.Module) -> None:
        """Refuse images and a search start the ViT cannot take, before the user's fit, not after it."""
        if self.correct != "none":
            check_one_shot(model, f"SnapViT(correct={self.correct!r})", EXPORT_HINT)
        datamodule = self.datamodule if isinstance(self.datamodule, CalibrationDataModule) else None  # folder labels
        check_classifier_fits(model, self.criterion, datamodule)
        if self.criterion == "cross_entropy" and self._first_batch is not None:
            check_labels(*self._first_batch, int(model.num_classes))  # the first batch's (later ones: as read)
        if self.fitness_images is not None:
            check_model_images(model, self.fitness_images, "fitness_images")
        size = getattr(self.datamodule, "img_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            check_input_size(model, (size, size), f"datamodule: img_size={size}")
        if self.search_evals:
            check_start_fits(model, self.search_kwargs.get("initial_weights"), self.search_kwargs.get("initial_covariance"))
        keeps = inspect.signature(SnapViTModule).parameters  # the scoring module's minimum keeps
        min_keeps = keeps["min_mlp_keep"].default, keeps["min_head_keep"].default
        _check_reachable(model, self.budgets, *min_keeps, "SnapViT(budgets=...)")
        if self.search_evals:
            check_pairs_apart(model, self.search_kwargs.get("ratio_pairs", DEFAULT_RATIO_PAIRS), *min_keeps)

    def _check_loader(self, trainer: pl.Trainer) -> None:
        """Refuse calibration data of single images (a training loader), or a folder without images, before the user's fit.

        A DataLoader, or the ``train_dataloader()`` of a LightningDataModule other than
        :class:`~snapvit_lightning.data.CalibrationDataModule` (:meth:`_prepare_datamodule`), gives
        its first batch; the global random state is left as it was.
        """
        dm = self.datamodule
        if isinstance(dm, CalibrationDataModule):
            dm.check_sources()  # its folder's files are listed, not decoded: an empty folder fails here
            return
        with isolate_rng(include_cuda=False):  # an iterator draws its seed; a datamodule's transforms may draw more
            if isinstance(dm, DataLoader):
                what, loader = "the DataLoader", dm
            else:
                what, loader = f"{type(dm).__name__}.train_dataloader()", self._prepare_datamodule(trainer)
            batch = next(iter(loader), None)
        views = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        labels = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        self._first_batch = (labels, views.shape[0]) if isinstance(views, Tensor) and views.dim() else None
        if not isinstance(views, Tensor) or views.dim() != 5 or views.shape[2] != 3:
            found = list(views.shape) if isinstance(views, Tensor) else type(views).__name__
            raise ValueError(
                f"datamodule: SnapViT's calibration data ({what}) must yield multi-crop views [B, V, 3, S, S] "
                f"(or (views, labels)), as CalibrationDataModule's does; its first batch holds {found}"
            )

    def _prepare_datamodule(self, trainer: pl.Trainer) -> DataLoader:
        """Prepare and set up a user's calibration datamodule once, in the user's fit; its ``train_dataloader()``.

        As Lightning does for the user's own datamodule (``prepare_data`` on one process per node,
        a barrier, then ``setup("fit")``, with ``trainer`` attached); the calibration after the fit
        runs on this loader, so the datamodule is not prepared again there (under DDP only rank 0
        calibrates, and a second ``prepare_data`` would wait for the other ranks at its barrier).
        """
        dm, attached = self.datamodule, self.datamodule.trainer
        dm.trainer = trainer
        try:
            if trainer.local_rank == 0 if dm.prepare_data_per_node else trainer.is_global_zero:
                dm.prepare_data()
            trainer.strategy.barrier("SnapViT.prepare_data")
            dm.setup("fit")
            self._loader = dm.train_dataloader()
        finally:
            dm.trainer = attached
        return self._loader

    def _check_accelerator(self) -> None:
        """Refuse an ``accelerator`` this machine lacks, or one the ``"auto"`` precision probe cannot time."""
        from lightning.pytorch.accelerators import AcceleratorRegistry

        name = self.accelerator
        if name is None or name == "auto":
            return
        if name == "gpu":
            available = torch.cuda.is_available() or (torch.backends.mps.is_available())
        elif name in AcceleratorRegistry:
            available = AcceleratorRegistry[name]["accelerator"].is_available()
        else:
            raise ValueError(f"accelerator must be None, 'auto', 'gpu' or one of {sorted(AcceleratorRegistry)}, got {name!r}")
        if not available:
            raise ValueError(f"accelerator={name!r} is not available on this machine; use None (the user's device) or 'cpu'")
        if self.precision == "auto":
            cli_device(name)  # the probe times CPU and CUDA only

    def _accelerator(self, trainer: pl.Trainer) -> str:
        if self.accelerator is not None:
            return self.accelerator
        return "cpu" if trainer.strategy.root_device.type == "cpu" else "auto"

    def _fitness_images(self) -> Tensor | None:
        if self.fitness_images is not None:
            return self.fitness_images
        if hasattr(self.datamodule, "fitness_images"):
            return self.datamodule.fitness_images()
        if isinstance(self.datamodule, DataLoader):
            crops = []
            for batch in self.datamodule:
                views = batch[0] if isinstance(batch, (tuple, list)) else batch
                crops.append(views[:, 0].detach().cpu().float())
            return torch.cat(crops) if crops else None
        return None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Score, search and export a copy of the user's ViT (global rank 0 only).

        Skipped under ``fast_dev_run`` (a smoke test writes nothing, as Lightning's checkpoints);
        the global random state is restored afterwards, so the user's later draws do not change.
        """
        if trainer.fast_dev_run:
            rank_zero_info("SnapViT: fast_dev_run, so no calibration and no export (the set-up was checked)")
            return
        with collective_safe_sigterm(trainer):  # under DDP a SIGTERM stops rank 0's work, then every rank
            error: BaseException | None = None
            if trainer.is_global_zero:
                cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
                try:
                    with torch.random.fork_rng(devices=cuda), internal_fit(), stops_on_sigterm():
                        self._calibrate_and_export(trainer, pl_module)
                except BaseException as err:  # raised after the barrier, so no rank waits forever
                    error = err
            finish_on_every_rank(trainer, error, "SnapViT's calibration and export")  # the others return once the files exist

    def _calibrate_and_export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.model_path, model = find_vit(pl_module, self.model_attr, self.model_getter)
        search = f"a search of {self.search_evals} evaluations" if self.search_evals else "no search"
        rank_zero_info(f"SnapViT: calibrating a copy of your model's {self.model_path!r} (scoring, {search}, "
                       f"export to {self.dirpath})")
        student = copy.deepcopy(model)
        for p in student.parameters():
            p.grad = None
        dtypes = non_float32(student)
        if dtypes:  # e.g. a precision="bf16-true" Trainer's weights: the scoring takes float32 views
            student.float()
            rank_zero_info(f"SnapViT: your model's weights are {', '.join(dtypes)}; the copy is exported in float32 "
                           "(cast a subnet back to deploy it in that precision)")
        name = self._name(student)
        if name is not None:
            _refuse_existing(export_targets(self.dirpath, name, stats=True), self.overwrite)
        module = SnapViTModule(student, criterion=self.criterion)
        # A CalibrationDataModule's images are read after the inner fit (which configures it from the
        # model; its search reads them itself); the others' before it, for the search too.
        images = (
            None if self.fitness_images is None and isinstance(self.datamodule, CalibrationDataModule)
            else self._fitness_images()
        )
        callbacks: list[Callback] = []
        if self.search_evals:
            callbacks.append(EvolutionarySearch(max_evals=self.search_evals, images=images, **self.search_kwargs))
        accelerator = self._accelerator(trainer)
        precision = self.precision
        if precision == "auto":  # explicit precisions as before, without a probe
            views = min(PROBE_VIEWS, int(getattr(self.datamodule, "num_views", PROBE_VIEWS)))
            precision = resolve_precision("auto", module, cli_device(accelerator), views=views)
        inner = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            max_epochs=1,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            # The scoring takes minutes on a CPU: it shows its progress when the user's fit showed theirs.
            enable_progress_bar=getattr(trainer.progress_bar_callback, "is_enabled", False),
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=str(self.dirpath),
        )
        if isinstance(self.datamodule, CalibrationDataModule):  # it takes its sizes from the model in the fit
            data = {"datamodule": self.datamodule}
        else:  # a DataLoader, or the loader of a datamodule set up before the user's fit
            data = {"train_dataloaders": self._loader if self._loader is not None else self.datamodule}
        scoring_start = time.perf_counter()
        fit(inner, module, **data)  # Ctrl-C: KeyboardInterrupt, not the inner fit's sys.exit(1)
        if module.scores is None:
            raise RuntimeError("calibration produced no scores (empty calibration data?)")
        module.scores = with_scoring_time(module.scores, scoring_start, inner.strategy.root_device, 1)
        self.scores = module.scores
        if non_float32(module.student):  # precision="bf16-true" cast the copy
            module.student.float()
            if not dtypes:  # else said above
                rank_zero_info(f"SnapViT: scored with precision={precision!r}; the copy is exported in float32")
        self.elastic = ElasticViT(
            module.student.cpu(), module.scores, model_name=self.model_name, model_kwargs=self.model_kwargs
        )
        if images is None:
            images = self._fitness_images()
        calibration = None if self.correct == "none" else _calibration_images(self.datamodule, images, self.stats_views)
        result = export_elastic(
            self.elastic,
            self.dirpath,
            budgets=self.budgets,
            fitness_images=images,
            save_subnets=self.save_subnets,
            overwrite=self.overwrite,
            name=self.name,
            correct=self.correct,
            calibration_images=None if calibration is None else calibration[0],
            views_per_image=1 if calibration is None else calibration[1],
            device=inner.strategy.root_device,
        )
        self.export_paths, self.report = result["paths"], result["report"]
