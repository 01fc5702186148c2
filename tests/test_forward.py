"""The shortened CLS forward equals the model's own forward, and its gradients too."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODELS, load_real_model, model_input, tiny_model

from snapvit_lightning.forward import embed, supports_cls_only
from snapvit_lightning.structure import inspect_vit, select_units


def _full(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("key", sorted(TINY_MODELS))
def test_embed_equals_forward(key, one_thread):
    model, _, _ = tiny_model(key)
    x = model_input(model)
    with torch.no_grad():
        torch.testing.assert_close(embed(model, x), _full(model, x), rtol=1e-5, atol=1e-5)


def test_which_models_take_the_short_path():
    expected = {  # token pooling only: avg pool and attention pooling need every token, and the
        # distilled model's own forward_head also reads the distillation token
        "test_vit": True, "test_vit2": False, "test_vit3": False, "test_vit4": False, "swiglu": False,
        "glu": True, "distilled": False, "siglip": False, "registers": True,
    }
    assert {key: supports_cls_only(tiny_model(key)[0]) for key in TINY_MODELS} == expected
    model = tiny_model("test_vit")[0]
    model.blocks[-1].train()  # dropout/drop-path would draw per-token randomness
    assert not supports_cls_only(model)
    assert not supports_cls_only(torch.nn.Linear(2, 2))


def test_embed_on_a_cut_model_and_its_gradients(one_thread):
    """A cut last block (fewer heads and neurons); weight gradients equal the full forward's."""
    model, _, _ = tiny_model("glu")
    blocks = inspect_vit(model).blocks
    select_units(model.blocks[-1], torch.arange(blocks[-1].mlp_hidden // 2), torch.tensor([0, 2]))
    assert supports_cls_only(model)
    x = model_input(model, batch=3)
    grads = []
    for fn in (embed, lambda m, t: _full(m, t)):
        model.zero_grad()
        out = fn(model, x)
        (out.square().sum() + out.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_embed_on_the_real_model(real_weights):
    model = load_real_model(real_weights)
    assert supports_cls_only(model)
    x = model_input(model, batch=4)
    with torch.inference_mode():
        torch.testing.assert_close(embed(model, x), _full(model, x), rtol=1e-4, atol=1e-4)
