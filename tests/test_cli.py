from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from snapvit_lightning import __version__
from snapvit_lightning.cli import main
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.scores import ImportanceScores

from conftest import tiny_model


def test_version_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "snapvit_lightning.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and __version__ in out.stdout
    assert main([]) == 0


def test_info_lists_budgets(tmp_path, capsys) -> None:
    model, _, _ = tiny_model("test_vit")
    scores = ImportanceScores(torch.rand(6, 192), torch.rand(6, 2))
    path = tmp_path / "m.elastic.safetensors"
    ElasticViT(model, scores).save(path)
    assert main(["info", str(path), "--budgets", "0,0", "0.5,0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "100.0%" in lines[2] and lines[3].split()[:2] == ["0.50", "0.50"]
    assert len(lines) == 4


def test_info_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["info", str(tmp_path / "missing.elastic.safetensors")])
    assert exc.value.code == 2 and "no elastic/subnet file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["info", "x", "--budgets", "0.3"])
    assert exc.value.code == 2 and "MLP_RATIO,HEAD_RATIO" in capsys.readouterr().err


def test_slice_writes_a_subnet(tmp_path, capsys) -> None:
    from snapvit_lightning.elastic import load_subnet
    from snapvit_lightning.structure import count_flops

    model, _, _ = tiny_model("test_vit")
    scores = ImportanceScores(torch.rand(6, 192), torch.rand(6, 2))
    path = tmp_path / "m.elastic.safetensors"
    ElasticViT(model, scores).save(path)
    out = tmp_path / "s.safetensors"
    assert main(["slice", str(path), "--flops", "0.6", "-o", str(out)]) == 0
    sub = load_subnet(out)
    assert count_flops(sub)["total"] <= 0.6 * count_flops(model)["total"]
    assert main(["slice", str(path), "--mlp-ratio", "0.3", "--head-ratio", "0.2", "-o", str(out), "--overwrite"]) == 0
    with pytest.raises(SystemExit) as exc:  # exists, no --overwrite
        main(["slice", str(path), "--flops", "0.5", "-o", str(out)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(path), "--flops", "0.5", "--mlp-ratio", "0.1", "-o", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["slice", str(path), "--flops", "1.5", "-o", str(tmp_path / "y.safetensors")])
    assert exc.value.code == 2 and "flops must be a fraction" in capsys.readouterr().err


def test_fit_subcommand_goes_to_lightning_cli(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "criterion: dino" in printed and "num_local_crops: 10" in printed


_DDP_CONFIG = """
seed_everything: 0
model:
  model: test_vit
  model_kwargs: {{img_size: 32}}
data:
  data_dir: {images}
  batch_size: 2
  num_local_crops: 2
trainer:
  accelerator: cpu
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: snapvit_lightning.search.EvolutionarySearch
      init_args: {{max_evals: 4, autocast: false}}
    - class_path: snapvit_lightning.callbacks.ElasticExport
      init_args: {{dirpath: {out}, budgets: [[0.0, 0.0], [0.35, 0.2]]}}
"""


def test_fit_with_two_ddp_processes_equals_one(tmp_path) -> None:
    """`snapvit fit` on 2 CPU processes (DDP, gloo) writes the same elastic checkpoint as 1 process."""
    import os

    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    for i in range(8):  # divisible by ranks x batch size: DistributedSampler adds no padding
        folder = tmp_path / "images" / "ab"[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"out{devices}"
        config = tmp_path / f"config{devices}.yaml"
        config.write_text(_DDP_CONFIG.format(images=tmp_path / "images", out=out))
        cmd = [sys.executable, "-m", "snapvit_lightning.cli", "fit", "--config", str(config), "--trainer.devices", str(devices)]
        if devices > 1:
            cmd += ["--trainer.strategy", "ddp"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = load_file(str(out / "test_vit.elastic.safetensors"))
    one, two = results[1], results[2]
    assert set(one) == set(two)
    for key in one:
        if key.startswith("scores.mlp") or key.startswith("scores.heads"):
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-9)
        else:  # permuted weights, unit orders, search weights and covariance: identical
            assert torch.equal(two[key], one[key]), key
