"""The precision a scoring epoch runs in, as its Lightning checkpoints record it, and the check on resume.

A scoring resumed in another precision sums gradients of two kinds (bf16 steps, then float32 ones)
into one set of scores: a resumed ``trainer.precision: auto`` probes again and may choose otherwise.
The CLI's ``auto`` takes the checkpoint's choice instead (:func:`saved_precision`); any other resume
in another precision is refused (:func:`check_resumed_precision`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_resumed_precision", "precision_state", "saved_precision"]

#: The key of the module's state in a Lightning checkpoint (``SnapViTModule.on_save_checkpoint``).
MODULE_STATE_KEY = "snapvit_scoring"


def precision_state(
    trainer_precision: Any, explicit_attention: bool | None, probe: dict[str, Any] | None, device_type: str = "cpu"
) -> dict[str, Any]:
    """What a checkpoint records: the Trainer's precision, the attention kernel and the probe's record (plain values).

    ``explicit_attention=None`` (the module's default) is recorded as the kernel it runs: explicit where the
    matmuls run in bf16 on a CPU (``forward.prefers_explicit_attention``), else the model's own.
    """
    if explicit_attention is None:
        explicit_attention = str(trainer_precision).startswith("bf16") and device_type == "cpu"
    return {"trainer_precision": str(trainer_precision), "explicit_attention": bool(explicit_attention), "probe": probe}


def saved_precision(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The :func:`precision_state` a Lightning checkpoint's scoring recorded, or ``None`` (none, or an older checkpoint)."""
    state = checkpoint.get(MODULE_STATE_KEY)
    saved = state.get("precision") if isinstance(state, dict) else None
    return saved if isinstance(saved, dict) and "trainer_precision" in saved else None


def check_resumed_precision(
    saved: dict[str, Any] | None, trainer_precision: Any, explicit_attention: bool | None, device_type: str = "cpu"
) -> None:
    """Refuse to resume a scoring in another precision or attention kernel (as :func:`precision_state` reads it).

    Raises:
        ValueError: Naming both and the option that resumes it as it began.
    """
    if saved is None:
        return
    now = precision_state(trainer_precision, explicit_attention, None, device_type)
    differ = [f"{key} {saved.get(key)!r} (this fit: {now[key]!r})" for key in ("trainer_precision", "explicit_attention")
              if saved.get(key) != now[key]][:1]  # another precision runs another kernel too: named once
    if not differ:
        return
    how = (f"resume with --trainer.precision {saved['trainer_precision']} (Trainer(precision=...))"
           if saved.get("trainer_precision") != now["trainer_precision"] else
           f"set the module's explicit_attention = {saved.get('explicit_attention')!r} before the fit")
    raise ValueError(
        f"the checkpoint's scoring ran with {'; '.join(differ)}: a resumed scoring would sum gradients of both kinds; "
        f"{how}; or, in the snapvit CLI, resume with trainer.precision auto (or the checkpoint's) and --ckpt_path naming "
        "the .ckpt file: it takes the checkpoint's choice"
    )
