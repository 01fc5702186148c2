"""What an export reports beside the numbers: the subnets' fidelity and the two plots.

The *fidelity* of a subnet is the mean cosine similarity between its pre-logits features
(``forward_head(forward_features(x), pre_logits=True)``) and the dense model's, in float32.
The plots are ``fidelity_vs_flops.png`` and ``kept_units.png`` (see :mod:`snapvit_lightning.export`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .forward import embed

@torch.inference_mode()
def _features(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    model.eval()
    out = [
        embed(model, images[i : i + batch_size]).float()
        for i in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)


def _fidelity(sub: nn.Module, dense_features: Tensor, images: Tensor, batch_size: int) -> float:
    """Fidelity of ``sub`` measured on the device of ``images`` (``sub`` itself is not moved)."""
    if next(sub.parameters()).device != images.device:
        sub = copy.deepcopy(sub).to(images.device)
    feats = _features(sub, images, batch_size)
    cosines = F.cosine_similarity(feats.double(), dense_features.double(), dim=-1)
    return float(cosines.clamp(-1.0, 1.0).mean())  # rounding can put equal vectors' cosine above 1


def _figure(width: float, height: float):
    # The object-oriented API with an Agg canvas: no pyplot, no change of the global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def measured_on(report: dict[str, Any]) -> str:
    """Which images a report's fidelity was measured on, in words (``""`` when it measured none)."""
    n = report.get("fidelity_images")
    if n is None:
        return ""
    if (report.get("correction") or {}).get("fidelity_images_are_calibration_images") is True:
        return f"on its {n} calibration images (in-sample: unseen photos keep less)"  # fits under a 6-inch title
    return f"on {n} images"


def stage_times(build_times: dict[str, Any]) -> str:
    """A report's times in words, for the export's last line.

    ``in 13.6 s (the corrected path's ranking 4.5 s of it; the checkpoint's scoring 6.5 s, search 22.9 s of
    50 evaluations)``: the export's own time, and the times its checkpoint was built in (this fit's, at the
    end of one; an earlier run's for an export of a loaded checkpoint). What the report lacks is left out.
    """
    export, ranking = build_times.get("export_s"), build_times.get("ranking_s")
    parts = [] if ranking is None else [f"the corrected path's ranking {ranking:.1f} s of it"]
    built = [f"{stage} {build_times[f'{stage}_s']:.1f} s" for stage in ("scoring", "search")
             if build_times.get(f"{stage}_s") is not None]
    if built and build_times.get("search_s") is not None and build_times.get("search_evaluations") is not None:
        built[-1] += f" of {build_times['search_evaluations']} evaluations"
    if built:
        parts.append("the checkpoint's " + ", ".join(built))
    head = "" if export is None else f"in {export:.1f} s"
    return f"{head} ({'; '.join(parts)})".strip() if parts else head


def _fidelity_figure(entries: list[dict[str, Any]], title: str, images: str = ""):
    """Fidelity against FLOPs; ``images`` says which images measured it (under the title)."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    points = sorted((e["flops_fraction"], e["fidelity"], e["label"]) for e in entries if e["fidelity"] is not None)
    corrected = sorted((e["flops_fraction"], e["fidelity_corrected"]) for e in entries if e["fidelity_corrected"] is not None)
    if points:
        xs, ys, labels = zip(*points)
        ax.plot(xs, ys, "o-", label="sliced")
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if corrected:
            ax.plot(*zip(*corrected), "s--", label="sliced + weight correction")
            ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no fitness images: fidelity not measured", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("FLOPs (fraction of the dense model)")
    ax.set_ylabel("fidelity (mean cosine to dense features)")
    ax.set_title(f"{title}\n{images}" if images else title, fontsize=10 if images else None)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def _kept_units_figure(
    entries: list[dict[str, Any]], mlp_hidden: int, num_heads: int, title: str, corrected: bool = False
):
    """Kept fraction per block and budget; ``corrected``: the corrected subnets' cut (``*_corrected`` where stored)."""
    import numpy as np

    rows = max(1, len(entries))
    fig = _figure(10.0, 1.5 + 0.45 * rows)
    labels = [e["label"] for e in entries]
    cut = "corrected subnets" if corrected else "plain cut"
    for k, (key, total, what) in enumerate((("kept_neurons", mlp_hidden, "MLP neurons"), ("kept_heads", num_heads, "heads"))):
        ax = fig.add_subplot(1, 2, k + 1)
        kept = [e.get(f"{key}_corrected", e[key]) if corrected else e[key] for e in entries]
        data = np.array([[v / total for v in row] for row in kept], dtype=float) if entries else np.zeros((1, 1))
        im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels if entries else [])
        ax.set_xlabel("block")
        ax.set_title(f"kept {what} (fraction, {cut})")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
