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
