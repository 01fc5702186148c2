"""Deployment forms of a subnet on this machine's CPU: latency and what each keeps of the features::

    python -m snapvit_lightning.benchmarks.deploy ELASTIC --data FOLDER [--flops 0.5] [--images 32]

For the dense model and the subnet ``ElasticViT.load(ELASTIC).subnet(flops=F)`` (corrected when the
statistics lie beside the checkpoint, as ``snapvit slice`` cuts it), each in the forms a CPU
deployment uses on a plain timm module:

* ``eager float32``: the module as loaded;
* ``bfloat16 cast``: ``model.to(torch.bfloat16)``, fed bfloat16 images;
* ``int8 dynamic``: ``torch.ao.quantization.quantize_dynamic`` of the ``nn.Linear`` layers (int8
  weights, activations quantized per batch; torch marks the API for migration to torchao);
* ``jit trace+freeze``: ``torch.jit.freeze(torch.jit.trace(model, x))``.

Every form runs the model's pre-logits features (``forward_head(forward_features(x), pre_logits=True)``:
a ``num_classes=0`` model's output, as the main job builds it). Latency: median ms per batch of
``--batch-size`` random images over ``--repeats`` interleaved rounds (one forward of every form per
round) after 3 warm-up forwards each, under ``torch.inference_mode``.
Fidelity: mean cosine of each form's features to the dense float32 model's on ``--images`` images of
``--data`` (evenly spaced over the sorted files), as ``snapvit bench`` measures it. ``torch.compile``
is not timed: its first call compiles for tens of seconds per input shape on a small CPU.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from ..cli_args import int_at_least, keep_fraction

FORMS = ("eager float32", "bfloat16 cast", "int8 dynamic", "jit trace+freeze")


def deployed_forms(model: Any, example: Any) -> dict[str, Callable[[Any], Any]]:
    """Each of :data:`FORMS` of ``model``'s pre-logits features (``model`` is left unchanged), as a function
    of float32 images to float32 features; ``example``: images to trace with."""
    import torch

    class PreLogits(torch.nn.Module):  # the output of a num_classes=0 model, as the main job builds it
        def __init__(self, vit: torch.nn.Module) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    model = PreLogits(copy.deepcopy(model)).eval()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    # torch's notice that the eager quantization API moves to torchao, and the tracer's about timm's shape checks
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        traced = torch.jit.freeze(torch.jit.trace(copy.deepcopy(model), example).eval())
    return {
        "eager float32": model,  # a copy: the caller's model keeps its mode
        "bfloat16 cast": lambda x: bf16(x.to(torch.bfloat16)).float(),
        "int8 dynamic": int8,
        "jit trace+freeze": traced,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m snapvit_lightning.benchmarks.deploy",
                                     description=__doc__.splitlines()[0].rstrip(":"))
    parser.add_argument("elastic", type=Path, metavar="ELASTIC", help="an *.elastic.safetensors checkpoint")
    parser.add_argument("--data", type=Path, required=True, metavar="FOLDER", help="images for the fidelity")
    parser.add_argument("--flops", type=keep_fraction, default=0.5, help="the subnet's FLOPs fraction (default: 0.5)")
    parser.add_argument("--images", type=int_at_least(2), default=32, help="images for the fidelity (default: 32)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=1, help="images per timed forward (default: 1)")
    parser.add_argument("--repeats", type=int_at_least(1), default=30, help="interleaved timed rounds (default: 30)")
    return _run(parser.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    import torch

    from ..data import load_eval_images
    from ..elastic import ElasticViT
    from ..evaluation import extract_features, feature_fidelity
    from ..latency import busy_note
    from ..machine import cpu_model

    if not args.elastic.is_file():
        raise FileNotFoundError(f"ELASTIC: elastic checkpoint not found: '{args.elastic}'")
    elastic = ElasticViT.load(args.elastic)
    dense = elastic.model.eval()
    images = load_eval_images(args.data, dense, argument="--data")[0]
    picked = images[torch.linspace(0, len(images) - 1, min(args.images, len(images))).round().long()]
    subnet = elastic.subnet(flops=args.flops)
    reference = extract_features(dense, picked, batch_size=32)
    example = picked[:1]
    forms = {(name, form): fn for name, model in (("dense", dense), (f"subnet {args.flops:g}", subnet))
             for form, fn in deployed_forms(model, example).items()}
    fidelity = {}
    with torch.inference_mode():
        for key, fn in forms.items():
            feats = torch.cat([fn(picked[i:i + 8]).float() for i in range(0, len(picked), 8)])
            fidelity[key] = feature_fidelity(feats, reference)
        busy = busy_note("cpu")
        if busy is not None:
            warnings.warn(busy, stacklevel=1)
        x = torch.randn(args.batch_size, *images.shape[1:])
        for fn in forms.values():
            for _ in range(3):
                fn(x)
        times: dict[Any, list[float]] = {key: [] for key in forms}
        for _ in range(args.repeats):
            for key, fn in forms.items():
                start = time.perf_counter()
                fn(x)
                times[key].append(1e3 * (time.perf_counter() - start))
    correction = "corrected" if elastic.stats is not None else "plain (no statistics beside the checkpoint)"
    print(f"{cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}; subnet: "
          f"flops={args.flops:g}, {correction}; batch {args.batch_size}, median of {args.repeats} interleaved rounds; "
          f"fidelity on {len(picked)} images of {args.data}")
    print("| model | form | latency (ms) | speed-up | fidelity |\n|:---|:---|---:|---:|---:|")
    base = statistics.median(times[("dense", "eager float32")])
    for (name, form), t in times.items():
        ms = statistics.median(t)
        print(f"| {name} | {form} | {ms:.2f} | {base / ms:.2f}x | {fidelity[(name, form)]:.4f} |")
    return 0


if __name__ == "__main__":
    from . import run_as_script

    run_as_script(main, __spec__.name)
