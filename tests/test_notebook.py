"""notebooks/quickstart.ipynb runs top to bottom offline on an elastic checkpoint of the real ViT-S/14."""

from __future__ import annotations


import nbformat
import torch
from nbclient import NotebookClient

from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.scores import ImportanceScores

from conftest import REPO, load_real_model


def test_quickstart_notebook_runs(real_weights, tmp_path, monkeypatch) -> None:
    """Its defaults need nothing but an elastic checkpoint: the images are scikit-image's photos."""
    model = load_real_model(real_weights, img_size=56)
    g = torch.Generator().manual_seed(0)
    scores = ImportanceScores(torch.rand(12, 1536, generator=g), torch.rand(12, 6, generator=g))
    path = tmp_path / "vits14.elastic.safetensors"
    elastic = ElasticViT(model, scores, model_name="vit_small_patch14_dinov2", model_kwargs={"num_classes": 0, "img_size": 56})
    elastic.save(path)
    elastic.collect_stats(torch.randn(8, 3, 56, 56, generator=g)).save(tmp_path / "vits14.stats.safetensors")
    monkeypatch.setenv("SNAPVIT_ELASTIC", str(path))
    monkeypatch.delenv("SNAPVIT_PHOTOS", raising=False)
    monkeypatch.setenv("SNAPVIT_MAX_IMAGES", "16")
    nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "fidelity 1.000" in outputs and "speed-up" in outputs and "14 images from scikit-image" in outputs
    assert "attached: subnet() is lstsq-corrected" in outputs and "(plain cut 1.000)" in outputs
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
