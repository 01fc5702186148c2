from __future__ import annotations

import pytest
import timm
import torch

from snapvit_lightning.deploy_size import set_deployment_size
from snapvit_lightning.elastic import ElasticViT
from snapvit_lightning.evaluation import model_cost

from conftest import random_scores, tiny_model


def test_a_fixed_size_model_takes_the_new_size_as_timm_sets_it() -> None:
    model, name, kwargs = tiny_model("distilled")  # fixed 64 px, patch 16
    reference = timm.create_model(name, pretrained=False, **kwargs).eval()
    reference.load_state_dict(model.state_dict())
    set_deployment_size(model, 96)
    reference.set_input_size(img_size=(96, 96))
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert tuple(model.patch_embed.img_size) == (96, 96)
    assert model_cost(model)["flops"] > model_cost(timm.create_model(name, pretrained=False, **kwargs))["flops"]


def test_an_elastic_model_cuts_budgets_and_corrected_subnets_at_the_new_size() -> None:
    model, name, kwargs = tiny_model("distilled")
    elastic = ElasticViT(model, random_scores(model), model_name=name, model_kwargs=kwargs)
    elastic.attach_stats(elastic.collect_stats(torch.randn(8, 3, 64, 64), ranking=True))  # at 64 px
    small = elastic.cost(elastic.dims(0.5, 0.5))
    assert "calibration_size" not in elastic.subnet(0.5, 0.5).snapvit_cut  # statistics of its own size
    set_deployment_size(elastic.model, 128)
    assert elastic.input_size == (128, 128)
    sub = elastic.subnet(0.5, 0.5)
    # the Python route records the statistics' other size as `snapvit slice` does (save_subnet writes it)
    assert sub.snapvit_cut["calibration_size"] == [64, 64]
    assert "calibration_size" not in elastic.subnet(0.5, 0.5, correct="none").snapvit_cut
    large = elastic.cost(elastic.dims(0.5, 0.5))
    assert model_cost(sub)["flops"] == large["flops"] > 3 * small["flops"]  # the FLOPs are counted at 128 px
    assert large["flops_fraction"] == pytest.approx(large["flops"] / model_cost(elastic.model)["flops"])  # of 128 px
    assert sub.snapvit_cut["correction"] == "lstsq"
    with torch.no_grad():
        assert sub(torch.randn(1, 3, 128, 128)).shape == elastic.model(torch.randn(1, 3, 128, 128)).shape


def test_the_models_own_size_is_taken_even_when_it_is_not_whole_patches() -> None:
    # A model built at 100 px (timm leaves out the last 4 px) was cut by slice but refused by slice --img-size 100.
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=100, depth=1).eval()
    before = model.pos_embed.clone()
    set_deployment_size(model, 100)
    assert torch.equal(model.pos_embed, before) and tuple(model.patch_embed.img_size) == (100, 100)
    with pytest.raises(ValueError, match=r"--img-size 104: the images would not cut"):
        set_deployment_size(model, 104)


def test_a_padding_patch_embedding_takes_any_size() -> None:
    model = timm.create_model("test_vit", pretrained=False, dynamic_img_pad=True).eval()
    set_deployment_size(model, 50)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 50, 50)).shape == (1, 1000)
    # without dynamic_img_size its position grid is fixed: padded patches would outnumber it (timm's forward fails)
    fixed = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=160, dynamic_img_pad=True)
    with pytest.raises(ValueError, match=r"^--img-size 150: the images would not cut into this model's 16 x 16 px patches"):
        set_deployment_size(fixed, 150)


@pytest.mark.parametrize("size, match", [
    (100, r"--img-size 100: the images would not cut into this model's 16 x 16 px patches; give a multiple of 16 "
          r"\(e\.g\. 96 or 112\)"),
    (0, r"--img-size: must be an int >= 1, got 0"),
    (True, r"--img-size: must be an int >= 1, got True"),
    (96.0, r"--img-size: must be an int >= 1, got 96.0"),
])
def test_a_size_the_model_cannot_take_is_refused_unchanged(size, match) -> None:
    model = timm.create_model("test_vit", pretrained=False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        set_deployment_size(model, size)
    assert tuple(model.patch_embed.img_size) == (160, 160)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_without_timm_set_input_size_is_refused() -> None:
    with pytest.raises(ValueError, match=r"img_size: Linear has no timm set_input_size"):
        set_deployment_size(torch.nn.Linear(2, 2), 64, option="img_size")
