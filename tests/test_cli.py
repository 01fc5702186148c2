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
