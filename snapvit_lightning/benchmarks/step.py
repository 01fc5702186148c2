"""Time one scoring step on the real DINOv2 ViT-S/14 with and without the dead-work shortcuts.

::

    python -m snapvit_lightning.benchmarks.step [--batch-size 16] [--views 12] [--repeats 3]

One step is the DINO loss of ``batch`` images × ``views`` crops, its backward and the gradient
accumulation, as ``SnapViTModule.training_step`` runs them (the work does not depend on the pixels, so the views are
random). The variants run interleaved, ``repeats`` rounds after one warm-up, in fp32 and under
bf16 autocast, each adding one saving to the one above it:

1. the step as the official code runs it: a separate no-grad teacher forward of the 2 global
   views, the plain timm forward of all views and the full ``attn.qkv`` weight gradient;
2. the teacher's embeddings taken from the student's (identical weights during scoring);
3. the CLS-only last block (:func:`snapvit_lightning.forward.embed`);
4. the V-rows-only ``qkv`` weight gradient;
5. in bf16 only, the explicit-matmul attention
   (:func:`snapvit_lightning.forward.explicit_attention`); rows 1–4 keep PyTorch's fused kernel.

The last row of each precision is what ``SnapViTModule`` runs by default (``precision: auto``
picks the precision and kernel by a shorter probe of the same step, :mod:`snapvit_lightning.precision`). Prints the median seconds per step
of each and its speed-up over row 1. Row 1 reproduces the official step's work with this package's
code, not the official code itself (its data pipeline is not included either).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator, NamedTuple, Sequence

import torch

from .. import forward
from ..precision import time_interleaved


def _plain_embed(model: torch.nn.Module, x: torch.Tensor, explicit: bool | None = None) -> torch.Tensor:
    with forward.explicit_attention(model) if explicit else contextlib.nullcontext():
        return model.forward_head(model.forward_features(x), pre_logits=True)


class _Variant(NamedTuple):
    teacher_pass: bool
    cls_only: bool
    v_rows: bool
    explicit_attention: bool


VARIANTS = {
    "official (own teacher pass)": _Variant(True, False, False, False),
    "plain forward, full qkv grad": _Variant(False, False, False, False),
    "CLS-only last block": _Variant(False, True, False, False),
    "CLS-only + V-rows qkv grad": _Variant(False, True, True, False),
    "+ explicit attention": _Variant(False, True, True, True),
}


@contextlib.contextmanager
def _variant(variant: _Variant) -> Iterator[None]:
    """Swap the module's shortcuts for the plain code while timing (restored after)."""
    from .. import forward, module

    saved = module.embed, module._v_rows_weight_grads, forward.prefers_explicit_attention
    if not variant.cls_only:
        module.embed = _plain_embed
    if not variant.v_rows:
        module._v_rows_weight_grads = lambda model: contextlib.nullcontext()
    if not variant.explicit_attention:
        forward.prefers_explicit_attention = lambda model, x: False
    try:
        yield
    finally:
        module.embed, module._v_rows_weight_grads, forward.prefers_explicit_attention = saved


def _step(module: torch.nn.Module, views: torch.Tensor, teacher_pass: bool = False) -> None:
    """``training_step`` without a Trainer: loss, backward, gradients into the accumulators.

    ``teacher_pass`` adds the official code's separate teacher forward of the global views (its
    output is not used: the work is the same).
    """
    from ..module import NUM_GLOBAL_VIEWS

    if module._grads is None:
        module._grads = module._zero_grads()
    if teacher_pass:
        with torch.no_grad():
            module.embed(views[:, :NUM_GLOBAL_VIEWS].flatten(0, 1))
    module.compute_loss(views).backward()
    module._accumulate()


def main(argv: Sequence[str] | None = None) -> int:
    from ..module import SnapViTModule
    from ..quickstart import DEFAULT_WEIGHTS, MODEL_NAME, ensure_weights

    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.step", description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=112, help="input size in pixels (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step (default: %(default)s)")
    parser.add_argument("--views", type=int, default=12, help="views per image, the first 2 the global ones, all random at --img-size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved timed rounds after one warm-up; the median is printed (default: %(default)s)")
    args = parser.parse_args(argv)
    module = SnapViTModule(MODEL_NAME, checkpoint_path=str(ensure_weights(DEFAULT_WEIGHTS)),
                           model_kwargs={"num_classes": 0, "img_size": args.img_size})
    views = torch.randn(args.batch_size, args.views, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0))
    print(f"{MODEL_NAME} @ {args.img_size}px, {args.batch_size} images x {args.views} views, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for precision in ("fp32", "bf16-autocast"):
        # In fp32 the module keeps the fused kernel, so the last variant would repeat the one above.
        timed = {name: v for name, v in VARIANTS.items() if precision != "fp32" or not v.explicit_attention}
        def runner(v: _Variant, bf16: bool = precision != "fp32") -> Callable[[], None]:
            def run() -> None:
                with _variant(v), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    _step(module, views, v.teacher_pass)

            return run

        times = time_interleaved({name: runner(v) for name, v in timed.items()}, args.repeats)  # 1 warm-up round
        base = times["official (own teacher pass)"]
        for name, t in times.items():
            print(f"  {precision:13} {name:30} {t:6.2f} s/step  ({base / t:.2f}x)")
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
