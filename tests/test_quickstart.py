"""End to end on the real DINOv2 ViT-S/14: the README's main job writes a usable elastic checkpoint."""

from __future__ import annotations

import pytest
import torch

from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.quickstart import main, run


def test_main_job_on_real_model(real_weights, photos_dir, tmp_path, capsys) -> None:
    target = run(tmp_path, weights=real_weights, data=str(photos_dir), img_size=56, max_samples=4, batch_size=4)
    elastic = ElasticViT.load(target)
    assert elastic.scores.criterion == "dino" and elastic.input_size == (56, 56)
    assert (elastic.scores.mlp > 0).any() and (elastic.scores.heads > 0).any()
    sub = elastic.subnet(0.35, 0.2)
    with torch.no_grad():
        out = sub(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 384) and torch.isfinite(out).all()
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        run(tmp_path, weights=real_weights, data=str(photos_dir), img_size=56, max_samples=4)


def test_main_job_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path), "--weights", str(tmp_path / "none.safetensors"), "--data", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
