"""``python -m snapvit_lightning.benchmarks.step`` runs on the real ViT-S/14 and restores the module."""

from __future__ import annotations

import torch

from snapvit_lightning import forward, module
from snapvit_lightning.benchmarks import step as bench_step


def test_bench_step_prints_the_variants_per_precision(real_weights, capsys, one_thread) -> None:
    shortcuts = module.embed, module._v_rows_weight_grads, forward.prefers_explicit_attention
    assert bench_step.main(["--batch-size", "1", "--views", "2", "--repeats", "1", "--img-size", "56"]) == 0
    assert (module.embed, module._v_rows_weight_grads, forward.prefers_explicit_attention) == shortcuts
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "s/step" in line]
    assert [r[0] for r in rows] == ["fp32"] * 4 + ["bf16-autocast"] * 5
    assert rows[0][1] == "official" and rows[-1][1:4] == ["+", "explicit", "attention"]
    assert all(r[-1] == "(1.00x)" for r in (rows[0], rows[4]))
    assert all(float(r[r.index("s/step") - 1]) > 0 for r in rows)


def test_teacher_pass_embeds_the_global_views_once_more(one_thread) -> None:
    from conftest import tiny_model

    from snapvit_lightning.module import SnapViTModule

    m = SnapViTModule(tiny_model("test_vit")[0])
    batches: list[int] = []
    m.student.patch_embed.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    views = torch.randn(3, 4, 3, *m.student.patch_embed.img_size)
    bench_step._step(m, views)
    bench_step._step(m, views, teacher_pass=True)
    assert batches == [12, 6, 12]  # 3 images x 4 views; the teacher pass sees the 2 global views
