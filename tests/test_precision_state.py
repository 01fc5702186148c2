"""snapvit_lightning.precision_state: the precision a scoring's checkpoints record, and the check on resume."""

from __future__ import annotations

import pytest

from snapvit_lightning.precision_state import MODULE_STATE_KEY, check_resumed_precision, precision_state, saved_precision


def test_the_saved_state_is_read_back_and_older_checkpoints_hold_none() -> None:
    state = precision_state("bf16-mixed", True, {"trainer_precision": "bf16-mixed"})
    assert saved_precision({MODULE_STATE_KEY: {"precision": state}}) == state
    for older in ({}, {MODULE_STATE_KEY: {"grads": None}}, {MODULE_STATE_KEY: {"precision": None}}, {MODULE_STATE_KEY: 3}):
        assert saved_precision(older) is None
        check_resumed_precision(saved_precision(older), "32-true", None)  # nothing to compare: resumes


def test_a_kernel_left_unset_counts_as_the_one_it_runs() -> None:
    # a fit set up by hand leaves explicit_attention None; a probed checkpoint recorded False: refused, same kernel
    for precision, device, kernel in (("32-true", "cpu", False), ("bf16-mixed", "cpu", True), ("bf16-mixed", "cuda", False)):
        assert precision_state(precision, None, None, device)["explicit_attention"] is kernel
        check_resumed_precision(precision_state(precision, kernel, {"probed": True}, device), precision, None, device)


def test_a_resume_in_another_precision_or_kernel_is_refused_with_what_resumes_it() -> None:
    saved = precision_state("bf16-mixed", True, None)
    check_resumed_precision(saved, "bf16-mixed", True)
    check_resumed_precision(saved, "bf16-mixed", None)  # on a CPU, bf16 matmuls run the explicit kernel
    check_resumed_precision({**saved, "explicit_attention": None}, "bf16-mixed", None)  # a kernel saved unset: as run
    with pytest.raises(ValueError, match=r"^the checkpoint's scoring ran in bf16-mixed \(this fit: 32-true\): a resumed "
                                         r"scoring would sum gradients of both kinds; resume in bf16-mixed \(--trainer"
                                         r"\.precision, Trainer\(precision=\.\.\.\)\), or in the snapvit CLI"):
        check_resumed_precision(saved, "32-true", None)
    with pytest.raises(ValueError, match=r"explicit_attention True \(this fit: False\): a resumed scoring would mix two "
                                         r"attention kernels; in the snapvit CLI resume with --ckpt_path naming the \.ckpt "
                                         r"file \(not last\).* set the module's explicit_attention = True before the fit"):
        check_resumed_precision(saved, "bf16-mixed", False)
