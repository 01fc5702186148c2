"""benchmarks.deploy: every deployment form of a subnet computes the subnet's features, and the table says so."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_scores, tiny_model
from snapvit_lightning.benchmarks import deploy
from snapvit_lightning.elastic import ElasticViT


def test_every_form_computes_the_models_features() -> None:
    model = tiny_model("test_vit")[0].eval()
    x = torch.randn(3, 3, *model.patch_embed.img_size)
    with torch.inference_mode():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        forms = deploy.deployed_forms(model, x[:1])
        assert list(forms) == list(deploy.FORMS)
        for form, fn in forms.items():
            got = fn(x)
            assert got.dtype == torch.float32 and got.shape == expected.shape, form
            tolerance = {"eager float32": 0.0, "jit trace+freeze": 1e-5}.get(form, 0.1 * float(expected.abs().max()))
            assert float((got - expected).abs().max()) <= tolerance, form
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training  # the model unchanged


def test_the_table_measures_the_checkpoint(tmp_path, capsys, one_thread) -> None:
    model, name, kwargs = tiny_model("test_vit")
    path = tmp_path / "tiny.elastic.safetensors"
    ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs or None).save(path)
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    assert deploy.main([str(path), "--data", str(tmp_path), "--images", "3", "--repeats", "2", "--flops", "0.6"]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| dense") or line.startswith("| subnet")]
    assert len(rows) == 2 * len(deploy.FORMS) and "subnet: flops=0.6, plain (no statistics" in out
    assert rows[0][:2] == ["| dense", "eager float32"] and rows[0][3] == "1.00x" and rows[0][4] == "1.0000 |"
    assert "fidelity on 3 images of" in out
    with pytest.raises(FileNotFoundError, match="elastic checkpoint not found"):  # raised, for Python callers
        deploy.main([str(tmp_path / "missing.elastic.safetensors"), "--data", str(tmp_path)])
    # from the shell: one line, status 2 (run_as_script)
    run = subprocess.run([sys.executable, "-m", "snapvit_lightning.benchmarks.deploy", str(tmp_path / "missing.elastic.safetensors"),
                          "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.splitlines() == [
        "python -m snapvit_lightning.benchmarks.deploy: error: ELASTIC: elastic checkpoint not found: "
        f"'{tmp_path / 'missing.elastic.safetensors'}'"]
