"""The precisions the scoring takes; the one a scoring epoch runs in, as its Lightning checkpoints record it, and the check on resume.

A scoring resumed in another precision sums gradients of two kinds (bf16 steps, then float32 ones)
into one set of scores: a resumed ``trainer.precision: auto`` probes again and may choose otherwise.
The CLI's ``auto`` takes the checkpoint's choice instead (:func:`saved_precision`); any other resume
in another precision is refused (:func:`check_resumed_precision`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALLOWED_PRECISIONS", "check_resumed_precision", "precision_refusal", "precision_state", "saved_precision"]

#: Trainer precisions of the scoring: gradients unscaled (``16-mixed`` scales the loss) and inputs in the
#: model's dtype (``64-true`` leaves the float32 crops as they are).
ALLOWED_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true")


def precision_refusal(name: str, value: object) -> str:
    """``NAME must be one of ['auto', ...], got VALUE``, with why for a precision Lightning has and the scoring refuses."""
    text = str(value)
    if text.startswith("transformer-engine"):
        why = "Transformer Engine's FP8 is not supported"
    elif text.startswith("16"):
        why = "float16 gradients need loss scaling, which corrupts raw gradient scores, or overflow without it"
    elif text.startswith("64"):
        why = "64-bit is not supported"
    else:
        why = None
    return f"{name} must be one of {['auto', *ALLOWED_PRECISIONS]}, got {value!r}" + (f" ({why})" if why else "")

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
    saved = precision_state(saved["trainer_precision"], saved.get("explicit_attention"), None, device_type)  # None: as run
    now = precision_state(trainer_precision, explicit_attention, None, device_type)
    if saved["trainer_precision"] != now["trainer_precision"]:  # another precision runs another kernel too: named once
        raise ValueError(
            f"the checkpoint's scoring ran in {saved['trainer_precision']} (this fit: {now['trainer_precision']}): a resumed "
            f"scoring would sum gradients of both kinds; resume in {saved['trainer_precision']} (--trainer.precision, "
            "Trainer(precision=...)), or in the snapvit CLI with trainer.precision auto and --ckpt_path naming the .ckpt "
            "file, which takes the checkpoint's choice")
    if saved["explicit_attention"] != now["explicit_attention"]:
        raise ValueError(
            f"the checkpoint's scoring ran with explicit_attention {saved['explicit_attention']} (this fit: "
            f"{now['explicit_attention']}): a resumed scoring would mix two attention kernels; in the snapvit CLI resume "
            "with --ckpt_path naming the .ckpt file (not last), which takes the checkpoint's kernel; in Python set the "
            f"module's explicit_attention = {saved['explicit_attention']} before the fit")
