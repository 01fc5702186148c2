"""The ``snapvit`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__


def _info(args: argparse.Namespace) -> int:
    from .elastic import ElasticViT, read_metadata

    meta = read_metadata(args.path)
    if meta["kind"] != "elastic":
        print(f"{args.path}: {meta['kind']} of {meta['model_name']}, block dims [heads, neurons] {meta['block_dims']}")
        return 0
    elastic = ElasticViT.load(args.path)
    print(f"{args.path}: {meta['model_name']} {meta['model_kwargs']} input {meta['input_size']} "
          f"(snapvit {meta['snapvit_version']}, timm {meta['timm_version']})")
    print(f"{'mlp_ratio':>9} {'head_ratio':>10} {'params':>12} {'FLOPs':>14} {'flops %':>8}  kept heads / neurons per block")
    for mlp_ratio, head_ratio in args.budgets:
        dims = elastic.dims(mlp_ratio, head_ratio)
        cost = elastic.cost(dims)
        kept = " ".join(f"{d.num_heads}/{d.mlp_hidden}" for d in dims)
        print(f"{mlp_ratio:>9.2f} {head_ratio:>10.2f} {cost['params']:>12,} {cost['flops']:>14,} "
              f"{100 * cost['flops_fraction']:>7.1f}%  {kept}")
    return 0


def _budget(text: str) -> tuple[float, float]:
    try:
        mlp, head = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"budget must be MLP_RATIO,HEAD_RATIO such as 0.35,0.2, got {text!r}") from err
    return mlp, head


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snapvit", description="Elastic, retraining-free pruning of timm Vision Transformers (SnapViT)."
    )
    parser.add_argument("--version", action="version", version=f"snapvit_lightning {__version__}")
    sub = parser.add_subparsers(dest="command")
    info = sub.add_parser("info", help="show the budgets of an elastic checkpoint")
    info.add_argument("path", help="an *.elastic.safetensors file")
    info.add_argument(
        "--budgets", nargs="+", type=_budget,
        default=[(0.0, 0.0), (0.15, 0.0), (0.25, 0.1), (0.35, 0.2), (0.45, 0.3), (0.55, 0.4), (0.65, 0.5)],
        help="MLP_RATIO,HEAD_RATIO pairs to list (default: 0,0 to 0.65,0.5)",
    )
    info.set_defaults(func=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``snapvit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"snapvit {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
