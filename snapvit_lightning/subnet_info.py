"""What ``snapvit info`` says about a subnet file: its blocks, cost, and the budget it was cut for."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_subnet", "head_split"]


def head_split(share: float | None, knee: float | None = None) -> str:
    """How a fraction budget split its cut between heads and neurons, in words (``""`` for a ratio budget)."""
    if share is None or share == 1:
        return "" if share is None else " (heads pruned at the neurons' ratio, down to every block's minimum)"
    from .scores import HEAD_SHARE_KNEE

    knee = HEAD_SHARE_KNEE if knee is None else knee
    return f" (heads pruned at {share:g} x the neurons' ratio until {knee:g} of the neurons go, then both to every block's minimum)"


def _latency_line(m: dict[str, Any]) -> str:
    """A ``slice --latency-ms`` record in words: the scaled figure, what the timing read, where."""
    from .latency import LOAD_DRIFT_WARN, pixels

    threads = m.get("threads") or m.get("torch_threads")
    drift = m.get("load_drift")
    unsteady = (f"; the machine's load changed {drift:.1f}x during that search (each trial read relative to "
                "the dense model timed alongside it): measure it again on a quiet machine"
                if isinstance(drift, float) and drift > LOAD_DRIFT_WARN else "")
    raw = (f"; scaled from {m['raw_ms']:.2f} ms timed beside the dense model's {m['dense_alongside_ms']:.2f} ms"
           if isinstance(m.get("raw_ms"), float) and isinstance(m.get("dense_alongside_ms"), float) else "")
    load = m.get("load_average")
    unsteady += f"; 1-minute load average {load:.2f} as it began" if isinstance(load, (int, float)) else ""
    return (f"latency {m.get('measured_ms', float('nan')):.2f} ms (target {m.get('target_ms')} ms, dense "
            f"{m.get('dense_ms', float('nan')):.2f} ms{raw}) per batch of {m.get('batch_size')}{pixels(m.get('input_size'))} "
            f"on {m.get('device')} "
            f"({m.get('device_name')}; {m.get('backend')}, {threads} thread{'s' * (threads != 1)}, "
            f"{m.get('dtype', 'float32')}), "  # files before the dtype was recorded timed float32
            f"measured where it was sliced{unsteady}")


#: The keys of a cut's record (``ElasticViT.subnet``, ``snapvit slice``, the export).
_CUT_KEYS = frozenset({"mlp_ratio", "head_ratio", "correction", "requested", "elastic", "head_ratio_scale",
                       "head_share_knee", "latency", "elastic_input_size", "calibration_size"})


def describe_subnet(path: str, meta: dict[str, Any]) -> list[str]:
    """Lines on the subnet file at ``path`` (its :func:`~snapvit_lightning.checkpoint.read_metadata` is ``meta``).

    A budget written by ``snapvit slice`` or the export names the checkpoint and the ratios it was cut
    at; one given to ``save_subnet(budget=...)`` from Python is shown as given.
    """
    from .checkpoint import architecture, load_subnet
    from .evaluation import model_cost

    model = architecture(path, meta) if str(path).lower().endswith(".onnx") else load_subnet(path)  # a graph: its shapes
    cost, (h, w) = model_cost(model), meta["input_size"]
    lines = [f"{path}: {meta['kind']} of {meta['model_name']}, block dims [heads, neurons] {meta['block_dims']}",
             f"input {h} x {w} px, {cost['params']:,} params, {cost['flops']:,} FLOPs per image"]
    budget = meta.get("budget")
    if not isinstance(budget, dict):  # files before 2026-12-06, or save_subnet without a budget
        return lines
    cut = {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in budget.items()}
    if "elastic" in cut or {"mlp_ratio", "head_ratio", "correction"} <= cut.keys():  # slice, the export, subnet()
        requested = cut.get("requested")
        asked = ", ".join(f"{k} {v}" for k, v in requested.items()) if isinstance(requested, dict) else ""
        split = head_split(budget.get("head_ratio_scale"), budget.get("head_share_knee"))
        lines.append(f"cut from {cut.get('elastic', 'an elastic model')}{f' (asked: {asked})' if asked else ''}: mlp_ratio "
                     f"{cut.get('mlp_ratio')}, head_ratio {cut.get('head_ratio')}{split}, correction {cut.get('correction')}")
        sizes = [f"{what} {v[0]} x {v[1]} px" for key, what in (
            ("elastic_input_size", "the elastic model's scores and search were measured at"),
            ("calibration_size", "its correction statistics were collected at"))
            if isinstance(v := budget.get(key), list) and len(v) == 2]
        if sizes:  # slice --img-size, or statistics of another size
            lines.append(f"cut for {h} x {w} px inputs: {'; '.join(sizes)}")
        added = ", ".join(f"{k} {v}" for k, v in cut.items() if k not in _CUT_KEYS)
        if added:  # save_subnet(budget=...) beside the cut, e.g. how it was fine-tuned
            lines.append(f"budget (as saved): {added}")
    else:  # save_subnet(budget=...) from Python: its own keys
        given = ", ".join(f"{k} {v}" for k, v in cut.items() if k != "latency")
        lines.append(f"budget (as saved): {given}" if given else "budget (as saved): -")
    if isinstance(budget.get("latency"), dict):
        lines.append(_latency_line(budget["latency"]))
    return lines
