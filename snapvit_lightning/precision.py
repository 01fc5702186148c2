"""Precision and attention kernels chosen by a short probe on the machine the job runs on.

Whether bfloat16 pays depends on the machine: on an AMD Zen 4 (AVX512-BF16) a scoring step
runs 1.5x and a search fitness forward ~4x faster under bf16 autocast than in fp32; on an Intel
Xeon without bf16 units (AVX-512 only) bf16 is 1.4-1.6x *slower*. The explicit-matmul
attention path (:func:`~snapvit_lightning.forward.explicit_attention`) beats PyTorch's fused
kernel in bf16 on the former. No fixed setting is right everywhere, so :func:`probe` times each
candidate setting (:data:`CPU_SETTINGS` or :data:`CUDA_SETTINGS`) on a few images:

* a *scoring step*: the forward and backward of ``step_images`` images x ``views`` multi-crop
  views through the student with the DINO loss (:meth:`SnapViTModule.compute_loss`, exactly
  what ``training_step`` runs);
* a *fitness forward*: the pre-logits embeddings of ``fitness_images`` images under
  ``torch.inference_mode`` (what :class:`~snapvit_lightning.search.Fitness` runs per subnet).

One untimed run warms the process up; then every setting runs once, timed (for the scoring
step this is the rank check's pass below). That first round is a screen: a setting slower than
:data:`SCREEN_RATIO` times the fastest first time cannot win and keeps its first time; only the
others are timed ``repeats`` more times, interleaved, and their median counts. On a CPU
without bf16 units this skips the slow bf16 rounds that made up most of the probe. The scoring step and the search's fitness each get the fastest *allowed* setting,
independently; between two kernels of one precision that time within ``margin`` of each other the
one listed first wins, so two runs on one machine choose alike. A reduced-precision setting (bf16 autocast, TF32) is allowed only when the
order of the per-unit gradient scores it produces on the probe batch matches fp32's: the
Spearman rank correlation of the per-row mean squared gradients of the MLP input layers and
the ``attn.qkv`` V rows (the rows the scores average) must be at least
``min_rank_correlation`` (default :data:`DEFAULT_MIN_RANK_CORRELATION`). It must also be
faster than the fastest full-precision setting by more than ``margin`` (default
:data:`DEFAULT_MARGIN`, 15 %: one kernel's fitness time varied by that much between runs): a
near-tie keeps fp32.

:func:`resolve_precision` turns ``precision="auto"`` into a Trainer precision (``"32-true"`` or
``"bf16-mixed"``) and applies the rest of the choice to the :class:`SnapViTModule`: its
``explicit_attention`` (the scoring step's attention kernel) and ``precision_probe`` (the
probe's plain-dict record, which :class:`~snapvit_lightning.search.EvolutionarySearch` with
``autocast="auto"`` reads for the fitness's autocast and kernel, and which lands in the scores'
``build_info``, hence ``report.json``). ``snapvit fit`` does this before the Trainer is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from . import machine
from .errors import warn_at_caller
from .forward import embed
from .precision_state import ALLOWED_PRECISIONS, precision_refusal
from .values import real_number

if TYPE_CHECKING:
    from .module import SnapViTModule

__all__ = [
    "CPU_SETTINGS",
    "CUDA_SETTINGS",
    "DEFAULT_MARGIN",
    "DEFAULT_MIN_RANK_CORRELATION",
    "PROBE_VIEWS",
    "SCREEN_RATIO",
    "ProbeResult",
    "Setting",
    "apply_probe",
    "cli_device",
    "probe",
    "resolve_precision",
    "search_setting",
    "spearman",
    "time_interleaved",
]

#: Views per image in the probe's scoring step (2 global + 2 local crops): the settings' cost
#: per view is what is compared, and a 12-view step would triple the probe's time.
PROBE_VIEWS = 4

#: A setting whose first timed run is this many times slower than the fastest first run is not
#: timed again (the first run of every setting comes after one process-wide warm-up run, so
#: one-off start-up costs do not screen a setting out). Settings that win differ by < 1.3x.
SCREEN_RATIO = 1.5

#: Lowest Spearman correlation of a reduced-precision setting's gradient scores with fp32's on
#: the probe batch. Measured bf16 autocast vs fp32 on the real DINOv2 ViT-S/14 (112 px, one
#: image x 12 views of random pixels): 0.9967 (fused attention), 0.9968 (explicit).
DEFAULT_MIN_RANK_CORRELATION = 0.95

#: How much faster a reduced-precision setting must be than fp32, and a later-listed kernel than
#: an earlier one of its precision, to be chosen. Four main jobs in one sitting on a 2-core AMD EPYC
#: timed the search's bf16 fused kernel at 0.025-0.034 s (the explicit one alike): with 5 % the
#: choice flipped between runs, and with it the search's result; the wins that matter are larger
#: (there the scoring step's explicit kernel took 0.083-0.104 s against the fused 0.139-0.149 s).
DEFAULT_MARGIN = 0.15


@dataclasses.dataclass(frozen=True)
class Setting:
    """One candidate precision/kernel setting.

    Attributes:
        name: Its name in the probe's tables.
        autocast: ``"bfloat16"`` (autocast to bf16) or ``None`` (fp32).
        explicit_attention: The explicit-matmul attention path instead of the fused kernel.
        tf32: TF32 matmuls for fp32 (``torch.set_float32_matmul_precision("high")``; CUDA).
    """

    name: str
    autocast: str | None = None
    explicit_attention: bool = False
    tf32: bool = False

    @property
    def reduced(self) -> bool:
        """Whether the setting computes with fewer mantissa bits than fp32."""
        return self.autocast is not None or self.tf32

    @property
    def trainer_precision(self) -> str:
        """The Lightning Trainer precision that runs the scoring step this way."""
        return "bf16-mixed" if self.autocast == "bfloat16" else "32-true"

    @contextlib.contextmanager
    def active(self, device: torch.device) -> Iterator[None]:
        """Autocast and the TF32 switch of this setting (the previous TF32 state is restored)."""
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if self.tf32 else "highest")
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.autocast == "bfloat16"):
                yield
        finally:
            torch.set_float32_matmul_precision(previous)


#: Candidates on a CPU: fp32 and bf16 autocast, each with the fused and the explicit attention.
CPU_SETTINGS = (
    Setting("fp32-fused"),
    Setting("fp32-explicit", explicit_attention=True),
    Setting("bf16-fused", autocast="bfloat16"),
    Setting("bf16-explicit", autocast="bfloat16", explicit_attention=True),
)

#: Candidates on a CUDA GPU (fused attention kernels): fp32 (the reference), TF32, bf16 autocast.
CUDA_SETTINGS = (
    Setting("fp32"),
    Setting("tf32", tf32=True),
    Setting("bf16", autocast="bfloat16"),
)


@dataclasses.dataclass
class ProbeResult:
    """What :func:`probe` measured and chose (plain values; :meth:`to_dict` for JSON).

    Attributes:
        device: Where it ran (``"cpu"``, ``"cuda:0"``).
        settings: The candidate settings, in probe order.
        step_s: Median seconds of a scoring step per setting name (missing when not probed).
        fitness_s: Median seconds of a fitness forward per setting name.
        rank_correlation: Spearman correlation of each reduced setting's gradient scores with
            fp32's on the probe batch (``None`` when the scoring step was not probed).
        excluded: Reduced settings whose correlation fell below ``min_rank_correlation``.
        min_rank_correlation: The threshold used.
        margin: How much faster than the fastest full-precision setting a reduced one must be
            (and a later-listed kernel than an earlier one of its precision).
        scoring: The setting chosen for the scoring step (``None`` when not probed).
        search: The setting chosen for the search's fitness forwards.
        batch: What one timed run processed (``step_images``, ``views``, ``fitness_images``,
            ``input_size``, ``repeats``).
        probe_s: Wall time of the whole probe.
        busy: The machine's load above its cores as the probe began (``None``: quiet, not a CPU,
            or a ``timer`` of the caller's); a busy machine's timings can choose another setting.
    """

    device: str
    settings: tuple[Setting, ...]
    step_s: dict[str, float]
    fitness_s: dict[str, float]
    rank_correlation: dict[str, float] | None
    excluded: list[str]
    min_rank_correlation: float
    margin: float
    scoring: Setting | None
    search: Setting
    batch: dict[str, Any]
    probe_s: float
    busy: str | None = None

    @property
    def trainer_precision(self) -> str | None:
        """``"32-true"`` or ``"bf16-mixed"`` for the scoring Trainer (``None``: not probed)."""
        return None if self.scoring is None else self.scoring.trainer_precision

    @property
    def search_autocast(self) -> torch.dtype | None:
        """The fitness forwards' autocast dtype (``None``: fp32)."""
        return torch.bfloat16 if self.search.autocast == "bfloat16" else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: the choice, the timings and the rank check."""
        return {
            "device": self.device,
            "scoring": None if self.scoring is None else self.scoring.name,
            "trainer_precision": self.trainer_precision,
            "scoring_explicit_attention": None if self.scoring is None else self.scoring.explicit_attention,
            "search": self.search.name,
            "search_autocast": self.search.autocast,
            "search_explicit_attention": self.search.explicit_attention,
            "tf32": bool((self.scoring is not None and self.scoring.tf32) or self.search.tf32),
            "step_s": {k: round(v, 4) for k, v in self.step_s.items()},
            "fitness_s": {k: round(v, 4) for k, v in self.fitness_s.items()},
            "rank_correlation": None if self.rank_correlation is None
            else {k: round(v, 5) for k, v in self.rank_correlation.items()},
            "min_rank_correlation": self.min_rank_correlation,
            "excluded": list(self.excluded),
            "margin": self.margin,
            "batch": dict(self.batch),
            "probe_s": round(self.probe_s, 2),
            "busy": self.busy,
        }

    def summary(self) -> str:
        """One line: the choice and the timings."""

        def table(times: Mapping[str, float]) -> str:
            return " ".join(f"{k} {v:.3f}" for k, v in times.items())

        def over(chosen: Setting, times: Mapping[str, float]) -> str:  # a slower one chosen: the margin's tie rule
            fastest = min(times, key=times.__getitem__)
            return "" if fastest in (chosen.name, *self.excluded) else f" (over {fastest}: within the {self.margin:.0%} margin)"

        parts = [f"precision probe on {self.device} ({self.probe_s:.1f} s{', busy' if self.busy else ''}):"]
        if self.scoring is not None:
            parts.append(f"scoring {self.scoring.name}{over(self.scoring, self.step_s)} -> {self.trainer_precision} "
                         f"[step s: {table(self.step_s)}];")
        parts.append(f"search (where its autocast is auto) {self.search.name}{over(self.search, self.fitness_s)} "
                     f"[fitness s: {table(self.fitness_s)}]")
        if self.rank_correlation:
            corr = " ".join(f"{k} {v:.4f}" for k, v in self.rank_correlation.items())
            parts[-1] += (f"; rank corr vs fp32 {corr} (min {self.min_rank_correlation}"
                          + (f", excluded {', '.join(self.excluded)})" if self.excluded else ")"))
        return " ".join(parts)


Timer = Callable[[Setting, str, Callable[[], None]], float]


def time_interleaved(runs: Mapping[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall seconds of each run, the runs interleaved round by round.

    Args:
        runs: Name -> zero-argument callable.
        repeats: Timed rounds (``>= 1``).
        warmup: Untimed rounds first (``>= 0``).

    Returns:
        Name -> median seconds.

    Raises:
        ValueError: If ``repeats < 1`` or ``warmup < 0``.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors of the same length (ties broken by position).

    Raises:
        ValueError: If the shapes differ or hold fewer than 2 values.
    """
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise ValueError(f"a and b must be 1-D of the same length >= 2, got {list(a.shape)} and {list(b.shape)}")
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def _unit_scores(module: "SnapViTModule") -> Tensor:
    """Per-row mean squared gradient of every row the scores read, concatenated (CPU, fp64)."""
    rows = []
    for param, sl in module._grad_sources().values():
        grad = param.grad
        if grad is None:
            raise RuntimeError("the probe's scoring step left no gradient on a scored layer")
        g = (grad if sl is None else grad[sl]).double()
        rows.append(g.square().mean(dim=1).cpu())
    return torch.cat(rows)


def _clear_grads(module: "SnapViTModule") -> None:
    for param in module.student.parameters():
        param.grad = None


def _check_settings(settings: Sequence[Setting]) -> tuple[Setting, ...]:
    settings = tuple(settings)
    if not settings or not all(isinstance(s, Setting) for s in settings):
        raise ValueError(f"settings must be a non-empty sequence of Setting, got {settings!r}")
    if not any(not s.reduced for s in settings):
        raise ValueError(f"settings need a full-precision (fp32) one as the reference, got {[s.name for s in settings]}")
    if len({s.name for s in settings}) != len(settings):
        raise ValueError(f"settings must have distinct names, got {[s.name for s in settings]}")
    return settings


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _input_size(module: "SnapViTModule", input_size: int | Sequence[int] | None) -> tuple[int, int]:
    if input_size is None:
        size = getattr(module.student.patch_embed, "img_size", None)
        if size is None:
            raise ValueError("the model has no fixed patch_embed.img_size; pass input_size=(H, W)")
        return int(size[0]), int(size[1])
    if isinstance(input_size, int) and not isinstance(input_size, bool) and input_size > 0:
        return input_size, input_size
    if isinstance(input_size, Sequence) and len(input_size) in (2, 3) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size
    ):
        return int(input_size[-2]), int(input_size[-1])
    raise ValueError(f"input_size must be None, an int > 0, (H, W) or (3, H, W), got {input_size!r}")


def _choose(settings: tuple[Setting, ...], times: Mapping[str, float], allowed: set[str], margin: float) -> Setting:
    """The fastest allowed setting, with near-ties (within ``margin``) broken towards stability.

    Reduced precision only when its fastest setting beats the fastest fp32 one by ``margin``;
    inside the chosen precision, the first listed setting within ``margin`` of the fastest (two
    kernels that time alike would otherwise flip between runs, and so would the search's numbers).
    """
    full = [s for s in settings if not s.reduced]
    reduced = [s for s in settings if s.reduced and s.name in allowed]

    def fastest(group: list[Setting]) -> float:
        return min(times[s.name] for s in group)

    group = reduced if reduced and fastest(reduced) < (1.0 - margin) * fastest(full) else full
    return next(s for s in group if (1.0 - margin) * times[s.name] <= fastest(group))


def _time_once(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _time_settings(settings: tuple[Setting, ...], stage: str, run: Callable[[Setting], None],
                   repeats: int, timer: Timer | None, first: Mapping[str, float] | None = None) -> dict[str, float]:
    """Seconds per setting: a screening round (``first``, or one timed run each), then ``repeats``
    interleaved runs of the settings within :data:`SCREEN_RATIO` of the fastest (median)."""
    if timer is not None:
        return {s.name: float(timer(s, stage, lambda s=s: run(s))) for s in settings}
    if first is None:
        first = {s.name: _time_once(lambda s=s: run(s)) for s in settings}
    fastest = min(first.values())
    contenders = {s.name: (lambda s=s: run(s)) for s in settings if first[s.name] <= SCREEN_RATIO * fastest}
    return {**first, **time_interleaved(contenders, repeats, warmup=0)}


def probe(
    module: "SnapViTModule",
    input_size: int | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    *,
    settings: Sequence[Setting] | None = None,
    scoring: bool = True,
    step_images: int = 1,
    views: int = PROBE_VIEWS,
    fitness_images: int = 4,
    repeats: int = 2,
    min_rank_correlation: float = DEFAULT_MIN_RANK_CORRELATION,
    margin: float = DEFAULT_MARGIN,
    seed: int = 0,
    timer: Timer | None = None,
    rank_correlation: Callable[[Setting, Tensor, Tensor], float] | None = None,
) -> ProbeResult:
    """Time a scoring step and a fitness forward in every candidate setting; pick the fastest.

    See the module docstring for what is timed and how the choice is made. The module is moved
    to ``device`` for the probe and back afterwards; its weights, accumulators and scores are
    left unchanged (the probe's gradients are cleared). Random pixels: the work does not depend
    on them, and the rank check compares two precisions on the same batch.

    Args:
        module: The :class:`SnapViTModule` to be scored.
        input_size: Image size (``None``: the model's ``patch_embed.img_size``).
        device: Where to probe (the device the job will run on; ``cuda`` probes ``cuda:0``).
        settings: Candidates (default :data:`CPU_SETTINGS` or :data:`CUDA_SETTINGS`); at
            least one full-precision setting is needed as the reference.
        scoring: Also probe the scoring step (``False``: the fitness forward only, as the
            search does when no probe ran before it).
        step_images: Images per scoring step.
        views: Multi-crop views per image (2 global + local crops); fewer than the data's
            keep the probe short: what differs between settings is the per-view cost.
        fitness_images: Images per fitness forward.
        repeats: Timed runs per setting after the screening round (median taken).
        min_rank_correlation: Lowest Spearman correlation, in ``[-1, 1]``, of a reduced
            setting's gradient scores with fp32's for it to be allowed.
        margin: A reduced setting is chosen only when faster than the fastest fp32 one by more
            than this fraction, in ``[0, 1)``; inside the chosen precision, the first listed
            setting within this fraction of the fastest wins (a near-tie keeps the list's order).
        seed: Seed of the probe's random pixels.
        timer: ``timer(setting, stage, run) -> seconds`` replaces the timing (``stage`` is
            ``"step"`` or ``"fitness"``; ``run()`` runs it once); for tests and custom timing.
        rank_correlation: ``fn(setting, scores, reference_scores) -> float`` replaces the
            Spearman correlation of the gradient scores.

    Returns:
        The :class:`ProbeResult`. On a CPU whose load exceeds its cores it warns first: the
        timings, and so the choice, may differ from a quiet machine's.

    Raises:
        ValueError: Bad ``settings``, sizes, counts, ``min_rank_correlation`` or ``margin``;
            ``views < 2`` (the DINO loss needs the two global views).
    """
    from .module import SnapViTModule

    if not isinstance(module, SnapViTModule):
        raise ValueError(f"module must be a SnapViTModule, got {type(module).__name__}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {str(device)!r}")
    settings = _check_settings(settings if settings is not None else CUDA_SETTINGS if device.type == "cuda" else CPU_SETTINGS)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        settings = tuple(s for s in settings if s.autocast != "bfloat16")
    height, width = _input_size(module, input_size)
    step_images = _check_positive_int("step_images", step_images)
    fitness_images = _check_positive_int("fitness_images", fitness_images)
    repeats = _check_positive_int("repeats", repeats)
    if _check_positive_int("views", views) < 2:
        raise ValueError(f"views must be >= 2 (two global crops), got {views}")
    given_correlation, given_margin = min_rank_correlation, margin
    min_rank_correlation, margin = real_number(min_rank_correlation), real_number(margin)
    if min_rank_correlation is None or not -1.0 <= min_rank_correlation <= 1.0:
        raise ValueError(f"min_rank_correlation must be a number in [-1, 1], got {given_correlation!r}")
    if margin is None or not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be a number in [0, 1), got {given_margin!r}")

    busy = machine.busy_load() if device.type == "cpu" and timer is None else None
    if busy is not None:
        warn_at_caller(f"the precision probe runs on a busy machine ({busy}): its timings, and so its choice of "
                       "precision and attention kernel (and with them the scores and plain cuts), may differ from a "
                       "quiet machine's; a fixed precision (trainer.precision 32-true or bf16-mixed, the search's "
                       "autocast false or true) chooses without timing")
    start = time.perf_counter()
    home = next(module.student.parameters()).device
    saved_explicit = module.explicit_attention
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randn(max(step_images * views, fitness_images), 3, height, width, generator=gen)
    student = module.student
    dtype = next(student.parameters()).dtype  # the model's own (a bf16-true fit's bf16), as the fitness casts its images
    step_views = pixels[: step_images * views].reshape(step_images, views, 3, height, width).to(device, dtype)
    fit_x = pixels[:fitness_images].to(device, dtype)
    module.to(device)

    def step(s: Setting) -> None:
        module.explicit_attention = s.explicit_attention
        with s.active(device):
            module.compute_loss(step_views).backward()
        _clear_grads(module)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def fitness(s: Setting) -> None:
        with torch.inference_mode(), s.active(device):
            embed(student, fit_x, s.explicit_attention)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        _clear_grads(module)
        correlation: dict[str, float] | None = None
        step_s: dict[str, float] = {}
        if scoring:
            reference = next(s for s in settings if not s.reduced)
            step(reference)  # process-wide warm-up, untimed
            grads: dict[str, Tensor] = {}
            first: dict[str, float] = {}
            for s in settings:  # every setting once, timed: the rank check's pass is also the screen
                module.explicit_attention = s.explicit_attention
                begin = time.perf_counter()
                with s.active(device):
                    module.compute_loss(step_views).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first[s.name] = time.perf_counter() - begin
                grads[s.name] = _unit_scores(module)
                _clear_grads(module)
            measure = rank_correlation or (lambda s, got, ref: spearman(got, ref))
            correlation = {s.name: float(measure(s, grads[s.name], grads[reference.name])) for s in settings if s.reduced}
            step_s = _time_settings(settings, "step", step, repeats, timer, first)
        fitness(next(s for s in settings if not s.reduced))  # warm-up of the inference path, untimed
        fitness_s = _time_settings(settings, "fitness", fitness, repeats, timer)
    finally:
        _clear_grads(module)
        module.explicit_attention = saved_explicit
        module.to(home)
    excluded = [name for name, c in (correlation or {}).items() if c < min_rank_correlation]
    # Without a rank check (fitness only) every setting is allowed: the fitness compares
    # candidates, and bf16 fitness forwards were measured to rank them as fp32 does.
    allowed = {s.name for s in settings} - set(excluded)
    return ProbeResult(
        device=str(device),
        settings=settings,
        step_s=step_s,
        fitness_s=fitness_s,
        rank_correlation=correlation,
        excluded=excluded,
        min_rank_correlation=float(min_rank_correlation),
        margin=float(margin),
        scoring=_choose(settings, step_s, allowed, margin) if scoring else None,
        search=_choose(settings, fitness_s, allowed, margin),
        batch={"step_images": step_images, "views": views, "fitness_images": fitness_images,
               "input_size": [height, width], "repeats": repeats},
        probe_s=time.perf_counter() - start,
        busy=busy,
    )


#: What ``precision`` may be: ``"auto"`` or one of the module's allowed Trainer precisions.
def _allowed() -> tuple[str, ...]:
    return ("auto", *ALLOWED_PRECISIONS)


def resolve_precision(
    precision: str | int,
    module: "SnapViTModule",
    device: str | torch.device = "cpu",
    *,
    views: int = PROBE_VIEWS,
    log: Callable[[str], None] | None = print,
    **probe_kwargs: Any,
) -> str:
    """The Trainer precision for ``precision``: ``"auto"`` runs :func:`probe` and applies it.

    An explicit precision is returned unchanged (as a string) and nothing is probed. For
    ``"auto"`` the probe's choice is applied to ``module`` (``module.explicit_attention``, the
    scoring step's attention kernel; ``module.precision_probe``, its plain-dict record for the
    search and ``build_info``), TF32 is switched on globally when chosen
    (``torch.set_float32_matmul_precision("high")``), and one line with the choice and the
    timings goes to ``log``.

    Args:
        precision: ``"auto"`` or a Trainer precision from ``ALLOWED_PRECISIONS``.
        module: The :class:`SnapViTModule` the Trainer will fit.
        device: The device it will run on.
        views: Multi-crop views per image in the probe's scoring step.
        log: Where the one-line summary goes (``None``: nowhere).
        **probe_kwargs: More :func:`probe` options.

    Returns:
        ``"32-true"`` or ``"bf16-mixed"`` for ``"auto"``, else ``str(precision)``.

    Raises:
        ValueError: If ``precision`` is not ``"auto"`` or an allowed precision (``16-mixed``
            scales the loss and corrupts gradient scores), or a probe option is bad.
    """
    if str(precision) not in _allowed() or isinstance(precision, bool):
        raise ValueError(precision_refusal("precision", precision))
    if str(precision) != "auto":
        return str(precision)
    result = probe(module, device=device, views=views, **probe_kwargs)
    apply_probe(module, result)
    if log is not None:
        log(result.summary())
    assert result.trainer_precision is not None  # scoring was probed
    return result.trainer_precision


def apply_probe(module: "SnapViTModule", result: ProbeResult) -> None:
    """Apply a probe's choice to ``module`` (attention kernel, record) and TF32 globally.

    Raises:
        ValueError: If the probe did not time the scoring step.
    """
    if result.scoring is None:
        raise ValueError("the probe did not time the scoring step (scoring=False); nothing to apply to the module")
    _apply_record(module, result.to_dict())


def _apply_record(module: "SnapViTModule", record: dict[str, Any]) -> None:
    """Apply a :meth:`ProbeResult.to_dict` record of a probe that timed the scoring step."""
    module.explicit_attention = bool(record["scoring_explicit_attention"])
    module.precision_probe = record
    if record["tf32"]:
        torch.set_float32_matmul_precision("high")


def search_setting(record: Mapping[str, Any]) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype, explicit attention)`` of the search from a :meth:`ProbeResult.to_dict` record.

    Raises:
        ValueError: If ``record`` lacks the search's choice.
    """
    try:
        autocast, explicit = record["search_autocast"], record["search_explicit_attention"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"not a precision probe record (no search choice): {record!r}") from err
    if autocast not in (None, "bfloat16") or not isinstance(explicit, bool):
        raise ValueError(f"precision probe record has a bad search choice: {autocast!r}, {explicit!r}")
    return (torch.bfloat16 if autocast == "bfloat16" else None), explicit


# ----------------------------------------------------------------------------------------------
# The device of a Trainer's ``accelerator`` (the CLI's ``trainer.precision: auto``, the plug-in)
# ----------------------------------------------------------------------------------------------


def cli_device(accelerator: Any) -> torch.device:
    """The device a LightningCLI ``trainer.accelerator`` runs on, for the probe.

    Raises:
        ValueError: For an accelerator other than ``None``/``"auto"``/``"cpu"``/``"gpu"``/``"cuda"``
            (the probe knows CPU and CUDA settings only), or ``"gpu"``/``"cuda"`` without CUDA.
    """
    if accelerator in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():  # else the probe's first CUDA call fails with a traceback
            from .errors import ON_THE_CPU

            raise ValueError(f"trainer.accelerator={accelerator!r} asks for GPUs and this machine has none; "
                             f"on its CPU: {ON_THE_CPU}")
        return torch.device("cuda", 0)
    raise ValueError(
        f"trainer.precision 'auto' probes CPU and CUDA settings; trainer.accelerator={accelerator!r} needs an "
        "explicit trainer.precision (32-true or bf16-mixed)"
    )
