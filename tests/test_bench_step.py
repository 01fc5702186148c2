"""``python -m snapvit_lightning.bench_step`` runs on the real ViT-S/14 and restores the module."""

from __future__ import annotations

from snapvit_lightning import bench_step, forward, module


def test_bench_step_prints_the_variants_per_precision(real_weights, capsys, one_thread) -> None:
    shortcuts = module.embed, module._v_rows_weight_grads, forward.prefers_explicit_attention
    assert bench_step.main(["--batch-size", "1", "--views", "2", "--repeats", "1", "--img-size", "56"]) == 0
    assert (module.embed, module._v_rows_weight_grads, forward.prefers_explicit_attention) == shortcuts
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "s/step" in line]
    assert [r[0] for r in rows] == ["fp32"] * 3 + ["bf16-autocast"] * 4
    assert rows[-1][1:4] == ["+", "explicit", "attention"]
    assert all(float(r[r.index("s/step") - 1]) > 0 for r in rows)
