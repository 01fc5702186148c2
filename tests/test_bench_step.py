"""``python -m snapvit_lightning.bench_step`` runs on the real ViT-S/14 and restores the module."""

from __future__ import annotations

from snapvit_lightning import bench_step, module


def test_bench_step_prints_three_variants_per_precision(real_weights, capsys, one_thread) -> None:
    shortcuts = module.embed, module._v_rows_weight_grads
    assert bench_step.main(["--batch-size", "1", "--views", "2", "--repeats", "1", "--img-size", "56"]) == 0
    assert (module.embed, module._v_rows_weight_grads) == shortcuts
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "s/step" in line]
    assert len(rows) == 6 and {r[0] for r in rows} == {"fp32", "bf16-autocast"}
    assert all(float(r[r.index("s/step") - 1]) > 0 for r in rows)
